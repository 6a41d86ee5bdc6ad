"""misc/eval/coco_eval.py: language_eval == pycocoevalcap's COCOEvalCap on a tiny reference file; SPICE and Java fallbacks."""
import json
import os

import pytest

from misc.eval import coco_eval
from misc.errors import SaticError

needs_java = pytest.mark.skipif(not coco_eval.java_available(), reason='java not installed')

from tests.helpers import (PREDICTIONS, java_children, pycocoevalcap_scores, share_one_meteor,
                           write_reference_json)


@pytest.fixture
def one_meteor_process(monkeypatch):
    """Both sides share one METEOR java process; unlike conftest's fixture, language_eval closes it, as in use."""
    return share_one_meteor(monkeypatch)


@needs_java
def test_language_eval_equals_cocoevalcap(tmp_path, monkeypatch, capsys, one_meteor_process):
    ref_json = str(tmp_path / 'captions_val.json')
    write_reference_json(ref_json)
    expected, expected_img = pycocoevalcap_scores(ref_json, PREDICTIONS, tmp_path, monkeypatch)
    capsys.readouterr()

    monkeypatch.setattr(coco_eval, 'spice_setup', lambda: (None, 'CoreNLP jars are not installed'))
    out_path = str(tmp_path / 'eval_results' / 'run_test.json')
    overall, img_to_eval = coco_eval.language_eval(PREDICTIONS, ref_json, 'test', out_path=out_path)
    assert len(one_meteor_process) == 1
    assert not java_children()  # METEOR closed, tokenizer finished
    out = capsys.readouterr().out
    assert 'using 4/5 predictions' in out and 'SPICE: unavailable (CoreNLP jars are not installed)' in out

    assert list(overall) == ['Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr']
    for metric, value in expected.items():
        assert overall[metric] == pytest.approx(value, abs=1e-9), metric
    assert sorted(img_to_eval) == [101, 102, 103, 105]
    for image_id, scores in expected_img.items():
        for metric in expected:
            assert img_to_eval[image_id][metric] == pytest.approx(scores[metric], abs=1e-9), (image_id, metric)
    assert img_to_eval[101]['caption'] == 'a man riding a wave on a surfboard'
    assert overall['CIDEr'] > 0.5 and 0 < overall['METEOR'] < 1

    with open(out_path) as f:
        written = json.load(f)
    assert written['overall'] == pytest.approx(overall)
    assert written['imgToEval']['103']['CIDEr'] == pytest.approx(img_to_eval[103]['CIDEr'])
    assert [f for f in os.listdir(os.path.dirname(out_path))] == ['run_test.json']


@needs_java
def test_no_prediction_in_references(tmp_path):
    ref_json = str(tmp_path / 'refs.json')
    write_reference_json(ref_json)
    with pytest.raises(SaticError, match='--ref_json'):
        coco_eval.language_eval([{'image_id': 7, 'caption': 'a dog'}], ref_json, verbose=False)


class FakeMeteor:
    def compute_score(self, gts, res):
        return 0.25, [0.25] * len(gts)

    def close(self):
        pass


# A stand-in for SPICE's java program: reads SPICE's input json, writes its output json (images in reverse order,
# All-F = image_id / 1000, a null precision), or fails as java does, its trace on stderr.
FAKE_SPICE = r"""
import json, sys
in_json, out_json, fails = sys.argv[1], sys.argv[2], sys.argv[3] == '1'
items = json.load(open(in_json))
print('Parsing reference captions', file=sys.stderr)
if fails:
    print('Exception in thread "main" java.lang.OutOfMemoryError: Java heap space', file=sys.stderr)
    print('\tat edu.anu.spice.SpiceScorer.main(SpiceScorer.java:60)', file=sys.stderr)
    sys.exit(1)
assert all(set(item) == {'image_id', 'test', 'refs'} and item['refs'] for item in items)
scores = [{'image_id': item['image_id'], 'test_tuples': [], 'ref_tuples': [],
           'scores': {'All': {'pr': None, 're': 0.5, 'f': item['image_id'] / 1000.0, 'fn': 1, 'numImages': 1}}}
          for item in reversed(items)]
json.dump(scores, open(out_json, 'w'), indent=2)
print('SPICE evaluation took: 1.0 s')
"""


@needs_java
@pytest.mark.parametrize('fails', [False, True])
def test_spice_scores_by_image_id_and_failure_is_not_fatal(tmp_path, monkeypatch, capfd, fails):
    """SPICE's scores are matched to images by id; its own output stays off the terminal; a failing SPICE is one
    line with its error and the other metrics stand."""
    import sys

    def fake_command(in_json, out_json, cache_dir, java_major, js_jar=None):
        return [sys.executable, '-c', FAKE_SPICE, in_json, out_json, '1' if fails else '0']

    monkeypatch.setattr(coco_eval, 'spice_command', fake_command)
    monkeypatch.setattr(coco_eval, '_Meteor', FakeMeteor)
    monkeypatch.setattr(coco_eval, 'spice_setup', lambda: ({'java_major': 17, 'js_jar': 'js.jar'}, None))
    monkeypatch.setattr(coco_eval, 'SPICE_CACHE', str(tmp_path / 'spice-cache'))
    ref_json = str(tmp_path / 'refs.json')
    write_reference_json(ref_json)
    overall, img_to_eval = coco_eval.language_eval(PREDICTIONS, ref_json)
    out, err = capfd.readouterr()
    assert (tmp_path / 'spice-cache').is_dir()  # coco_eval.SPICE_CACHE, SPICE's -cache
    assert 'Parsing reference captions' not in out + err and 'evaluation took' not in out + err
    assert 'edu.anu.spice.SpiceScorer.main' not in out + err
    if fails:
        assert 'SPICE' not in overall and 'CIDEr' in overall
        line = [line for line in out.splitlines() if line.startswith('SPICE')]
        assert line == ['SPICE: unavailable (SPICE (spice-1.0.jar) failed with exit status 1: Exception in thread '
                        '"main" java.lang.OutOfMemoryError: Java heap space (see coco-caption/README.md))'], out
    else:
        assert overall['SPICE'] == pytest.approx(sum(img_to_eval) / 1000.0 / len(img_to_eval))
        assert all(img_to_eval[i]['SPICE']['All']['f'] == i / 1000.0 for i in img_to_eval)
        assert all(img_to_eval[i]['SPICE']['All']['pr'] != img_to_eval[i]['SPICE']['All']['pr']  # null -> nan
                   for i in img_to_eval)


def test_spice_status_without_jars(monkeypatch, tmp_path):
    monkeypatch.setattr(coco_eval, 'USER_SPICE_LIB', str(tmp_path))
    lib = coco_eval._package_dir('spice', 'lib')
    if all(os.path.isfile(os.path.join(lib, jar)) for jar in coco_eval.SPICE_JARS):
        pytest.skip('the CoreNLP jars are installed here')
    available, reason = coco_eval.spice_status()
    assert not available and reason


def test_missing_reference_file(tmp_path):
    with pytest.raises(SaticError, match='prepro_reference_json.py'):
        coco_eval.language_eval(PREDICTIONS, str(tmp_path / 'nope.json'))


def test_java_missing(tmp_path, monkeypatch):
    ref_json = str(tmp_path / 'refs.json')
    write_reference_json(ref_json)
    monkeypatch.setattr(coco_eval, 'java_available', lambda: False)
    with pytest.raises(SaticError, match='Java not found.*--language_eval 0'):
        coco_eval.language_eval(PREDICTIONS, ref_json)
    assert coco_eval.spice_status()[0] is False


@needs_java
def test_ptb_tokenizer_matches_pycocoevalcap():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    captions = ['A man, riding a Horse.', "Someone's dinner: (chicken) -- rice...", '', 'Café au lait!', 'x\ny']
    expected = PTBTokenizer().tokenize({i: [{'caption': c}] for i, c in enumerate(captions)})
    assert coco_eval.ptb_tokenize(captions) == [expected[i][0] for i in range(len(captions))]
