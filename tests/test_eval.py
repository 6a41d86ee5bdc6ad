"""eval.py, eval_cocotest.py, misc/eval/evaluation.py, misc/viewer/visualize.py on the tiny dataset with a tiny random checkpoint.

Every run is in-process (main(argv)) in a temporary working directory: vis/ and eval_results/ land in tmp_path.
"""
import html
import json
import os
import re
import shutil

import numpy as np
import pytest

import eval as eval_script
import eval_cocotest
from misc.eval import coco_eval
from models.sat import SATModel
from opts import parse_eval_opt, resolve_eval_options
from scripts import prepro_cocotest
from tests.helpers import pycocoevalcap_scores, tiny_checkpoint

needs_java = pytest.mark.skipif(not coco_eval.java_available(), reason='java not installed')
METRICS = ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr')


@pytest.fixture(scope='module')
def checkpoint(tiny_dataset, tmp_path_factory):
    return tiny_checkpoint(tiny_dataset, str(tmp_path_factory.mktemp('ckpt')), train_steps=60)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def split_ids(ds, split):
    with open(ds.input_json) as f:
        return [img['id'] for img in json.load(f)['images'] if img['split'] == split]


def run_eval(checkpoint, *args, main=eval_script.main):
    """main() of eval.py (or eval_cocotest.py) with this checkpoint; data paths come from its infos."""
    return main(['--model', checkpoint[0], '--infos_path', checkpoint[1], *args])


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_options_come_from_infos_with_the_evaluations_overrides(tiny_dataset, workdir):
    infos_opt = tiny_dataset.opt(beam_size=5, max_length=16, length_penalty='wu_0.5', K=2, num_images=7)
    infos = {'opt': infos_opt, 'vocab': {'1': 'a', '2': 'b'}}
    opt = resolve_eval_options(parse_eval_opt(['--beam_size', '3', '--input_att_dir', '/elsewhere/att']), infos)
    assert (opt.beam_size, opt.max_length, opt.length_penalty, opt.num_images) == (3, 20, '', -1)  # eval's own
    assert opt.input_att_dir == '/elsewhere/att'  # a path given on the command line
    assert (opt.input_json, opt.input_fc_dir) == (infos_opt.input_json, infos_opt.input_fc_dir)  # the infos'
    assert (opt.K, opt.att_feat_size, opt.vocab_size) == (2, infos_opt.att_feat_size, 2)  # the model's, the vocab's
    # The references of the training run are remembered (issue 26); --ref_json overrides them.
    assert resolve_eval_options(parse_eval_opt([]), infos).ref_json == infos_opt.ref_json
    assert resolve_eval_options(parse_eval_opt(['--ref_json', 'mine.json']), infos).ref_json == 'mine.json'
    # Without them (reference infos), the default references are the repository's, whatever the working directory.
    del infos_opt.ref_json
    default = resolve_eval_options(parse_eval_opt([]), infos).ref_json
    assert default == os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   'coco-caption', 'annotations', 'captions_val2014.json')


def test_eval_writes_every_image_once_whatever_the_batch_size(tiny_dataset, checkpoint, workdir, capsys,
                                                               monkeypatch):
    test_ids = split_ids(tiny_dataset, 'test')
    boxes = {i: np.load(os.path.join(tiny_dataset.att_dir, f'{i}.npz'))['feat'].shape[0] for i in test_ids}
    assert len(set(boxes.values())) > 1  # batches of these images need att_masks
    seen_masks, real_decode = [], SATModel.decode

    def decode(self, att_feats, att_masks=None, *args, **kwargs):
        seen_masks.append(None if att_masks is None else att_masks.sum(1).tolist())
        return real_decode(self, att_feats, att_masks, *args, **kwargs)
    monkeypatch.setattr(SATModel, 'decode', decode)

    captions = {}
    for batch_size in (1, 2, 4):  # 3 test images: batches wrap to the split's start (2) or overflow it (4)
        seen_masks.clear()
        assert run_eval(checkpoint, '--language_eval', '0', '--batch_size', str(batch_size), '--beam_size', '2',
                        '--id', f'b{batch_size}', '--timing_json', 'timing.json') == 0
        predictions = read_json(f'vis/b{batch_size}.json')
        assert [p['image_id'] for p in predictions] == test_ids
        assert all(isinstance(p['caption'], str) and p['caption'] for p in predictions)
        captions[batch_size] = predictions
        out = capsys.readouterr().out
        assert re.search(rf'decoding: [\d.]+ ms per image at batch size {batch_size}, beam size 2 \(3 images', out)
        assert read_json('timing.json')['images'] == 3
        # Each image decoded once, with the mask of its own regions when the batch mixes box counts.
        decoded = [[boxes[i] for i in test_ids[k:k + batch_size]] for k in range(0, 3, batch_size)]
        assert len(seen_masks) == len(decoded) and [m or b for m, b in zip(seen_masks, decoded)] == decoded
        assert batch_size == 1 or any(seen_masks)
    assert captions[1] == captions[2] == captions[4]


def test_num_images_cuts_the_split(tiny_dataset, checkpoint, workdir):
    assert run_eval(checkpoint, '--language_eval', '0', '--num_images', '2', '--batch_size', '3', '--id', 'cut') == 0
    assert [p['image_id'] for p in read_json('vis/cut.json')] == split_ids(tiny_dataset, 'test')[:2]


@pytest.mark.parametrize('beam_size', [1, 3])
def test_seq_kd_writes_every_images_beams(tiny_dataset, checkpoint, workdir, beam_size):
    assert run_eval(checkpoint, '--language_eval', '0', '--seq_kd', '1', '--beam_size', str(beam_size),
                    '--batch_size', '2', '--split', 'val', '--id', 'kd') == 0
    beams, best = read_json('vis/kd_seq_kd.json'), read_json('vis/kd.json')
    assert [b['image_id'] for b in beams] == [p['image_id'] for p in best] == split_ids(tiny_dataset, 'val')
    for entry, prediction in zip(beams, best):
        assert len(entry['caption']) == beam_size and all(isinstance(c, str) for c in entry['caption'])
        assert entry['caption'][0] == prediction['caption']


@needs_java
def test_language_eval_and_viewer_match_pycocoevalcap(tiny_dataset, checkpoint, workdir, capsys, monkeypatch,
                                                       one_meteor_process):
    images = workdir / 'images'
    with open(tiny_dataset.input_json) as f:
        for img in json.load(f)['images']:
            (images / img['file_path']).parent.mkdir(parents=True, exist_ok=True)
            (images / img['file_path']).write_bytes(b'\xff\xd8 not really a jpeg')
    assert run_eval(checkpoint, '--language_eval', '1', '--ref_json', tiny_dataset.ref_json, '--batch_size', '2',
                    '--dump_images', '1', '--image_root', str(images), '--id', 'lang') == 0
    printed = dict(re.findall(r'^(\w+): ([\d.]+)$', capsys.readouterr().out, flags=re.M))
    predictions = read_json('vis/lang.json')
    saved = read_json('eval_results/lang_test.json')

    overall, img_to_eval = pycocoevalcap_scores(tiny_dataset.ref_json, predictions, workdir, monkeypatch)
    assert len(one_meteor_process) == 1
    for metric, value in overall.items():
        assert saved['overall'][metric] == pytest.approx(value, rel=1e-9, abs=1e-12), metric
        assert printed[metric] == f'{value:.3f}', metric
    for image_id, scores in img_to_eval.items():
        assert saved['imgToEval'][str(image_id)]['CIDEr'] == pytest.approx(scores['CIDEr'], rel=1e-9, abs=1e-12)

    page = (workdir / 'vis' / 'index.html').read_text()
    references = {}
    for ann in read_json(tiny_dataset.ref_json)['annotations']:
        references.setdefault(ann['image_id'], []).append(ann['caption'])
    for p in predictions:
        assert html.escape(p['caption']) in page
        assert all(html.escape(r) in page for r in references[p['image_id']])
        assert f"{img_to_eval[p['image_id']]['CIDEr']:.3f}" in page
        assert f'src="imgs/{p["image_id"]}.jpg"' in page
    assert sorted(os.listdir(workdir / 'vis' / 'imgs')) == sorted(f"{p['image_id']}.jpg" for p in predictions)


def test_viewer_without_references_lists_the_captions(tiny_dataset, checkpoint, workdir):
    assert run_eval(checkpoint, '--language_eval', '0', '--dump_images', '1', '--ref_json', 'absent.json',
                    '--id', 'view') == 0
    page = (workdir / 'vis' / 'index.html').read_text()
    assert all(html.escape(p['caption']) in page for p in read_json('vis/view.json'))


@pytest.mark.parametrize('labels', ['none', 'training labels of other images'])
def test_eval_cocotest_writes_the_server_format(tiny_dataset, checkpoint, workdir, labels):
    ids = split_ids(tiny_dataset, 'train')[:5]  # images the label h5 lists among others, in another order
    (workdir / 'image_info_test2014.json').write_text(json.dumps(
        {'images': [{'id': i, 'file_name': f'COCO_test2014_{i:012d}.jpg'} for i in reversed(ids)]}))
    prepro_cocotest.run(prepro_cocotest.parse_args(['--input_json', 'image_info_test2014.json',
                                                    '--output_json', 'cocotest.json']))
    label_h5 = 'none' if labels == 'none' else tiny_dataset.label_h5
    assert run_eval(checkpoint, '--input_json', 'cocotest.json', '--input_fc_dir', tiny_dataset.fc_dir,
                    '--input_att_dir', tiny_dataset.att_dir, '--input_label_h5', label_h5, '--num_images', '-1',
                    '--language_eval', '0', '--batch_size', '2', '--beam_size', '3',
                    '--id', 'captions_test2014_alg_results', main=eval_cocotest.main) == 0
    results = read_json('vis/captions_test2014_alg_results.json')
    assert sorted(r['image_id'] for r in results) == sorted(ids)  # each test image once
    assert all(type(r['image_id']) is int and isinstance(r['caption'], str) and r['caption'] for r in results)


# ---- bad input: one line, exit 2, nothing half-written ----

@pytest.mark.parametrize('mismatch, message', [
    ('vocabulary', 'vocabulary of'),
    ('layers', 'encoder layers'),
    ('features', 'have 8 dimensions but the checkpoint'),
])
def test_checkpoint_and_infos_that_disagree_fail_in_one_line(tiny_dataset, workdir, capsys, mismatch, message):
    folder = str(workdir / 'bad')
    if mismatch == 'vocabulary':  # the infos of another dataset
        vocab = read_json(tiny_dataset.input_json)['ix_to_word']
        paths = tiny_checkpoint(tiny_dataset, folder, vocab={k: v for k, v in vocab.items() if k != '1'})
    elif mismatch == 'layers':
        paths = tiny_checkpoint(tiny_dataset, folder, model_overrides={'num_layers': 2})
    else:  # checkpoint and infos agree, the features are another kind
        paths = tiny_checkpoint(tiny_dataset, folder, att_feat_size=12)
    assert run_eval(paths, '--language_eval', '0') == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and 'Traceback' not in err
    assert not os.path.exists('vis')


def test_no_java_fails_before_decoding(checkpoint, workdir, capsys, monkeypatch, tiny_dataset):
    monkeypatch.setenv('PATH', str(workdir))  # nothing called java on PATH

    def must_not_decode(*args, **kwargs):
        raise AssertionError('decoding started before the Java check')
    monkeypatch.setattr(SATModel, 'decode', must_not_decode)
    assert run_eval(checkpoint, '--language_eval', '1', '--ref_json', tiny_dataset.ref_json) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'Java not found' in err


def test_spice_1_fails_before_decoding_where_it_cannot_run(checkpoint, workdir, capsys, monkeypatch, tiny_dataset):
    monkeypatch.setattr(coco_eval, 'check_java', lambda: None)
    monkeypatch.setattr(coco_eval, 'spice_setup', lambda: (None, 'Stanford CoreNLP 3.6.0 jars not found'))

    def must_not_decode(*args, **kwargs):
        raise AssertionError('decoding started before the SPICE check')
    monkeypatch.setattr(SATModel, 'decode', must_not_decode)
    assert run_eval(checkpoint, '--language_eval', '1', '--ref_json', tiny_dataset.ref_json, '--spice', '1') == 2
    err = capsys.readouterr().err.strip()
    assert err == 'error: --spice 1: SPICE cannot run here: Stanford CoreNLP 3.6.0 jars not found (or pass --spice auto)'


def test_missing_features_name_the_file_and_image(tiny_dataset, checkpoint, workdir, capsys):
    att_dir = workdir / 'att'
    shutil.copytree(tiny_dataset.att_dir, att_dir)
    missing = split_ids(tiny_dataset, 'test')[2]  # not the first: found by a loader worker, mid-split
    os.remove(att_dir / f'{missing}.npz')
    assert run_eval(checkpoint, '--language_eval', '0', '--input_att_dir', str(att_dir), '--batch_size', '1') == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert str(att_dir / f'{missing}.npz') in err and f'image {missing}' in err


@pytest.mark.parametrize('where', ['decoding', 'writing the json'])
def test_an_interrupted_evaluation_leaves_the_previous_json(checkpoint, workdir, monkeypatch, capsys, where):
    assert run_eval(checkpoint, '--language_eval', '0', '--id', 'run') == 0
    before = (workdir / 'vis' / 'run.json').read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    if where == 'decoding':
        monkeypatch.setattr(SATModel, 'decode', interrupt)
    else:  # the new json is complete in its temp file, not yet renamed
        monkeypatch.setattr(os, 'fsync', interrupt)
    capsys.readouterr()
    assert run_eval(checkpoint, '--language_eval', '0', '--id', 'run', '--num_images', '1') == 130  # another json
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('interrupted')
    assert (workdir / 'vis' / 'run.json').read_bytes() == before
    assert os.listdir(workdir / 'vis') == ['run.json']  # no temp file left


def test_reference_decoding_options_reach_the_captions(checkpoint, workdir, capsys):
    from misc.utils import BAD_ENDINGS
    runs = {'plain': [], 'constraint': ['--decoding_constraint', '1'], 'bad': ['--remove_bad_endings', '1'],
            'diverse': ['--beam_size', '4', '--group_size', '2', '--diversity_lambda', '0.5'],
            'trigrams': ['--block_trigrams', '1']}
    captions = {}
    for name, args in runs.items():
        assert run_eval(checkpoint, '--language_eval', '0', '--id', name, *args) == 0, capsys.readouterr().err
        captions[name] = [p['caption'].split() for p in read_json(f'vis/{name}.json')]
    assert any(a == b for words in captions['plain'] for a, b in zip(words, words[1:]))  # the tiny model repeats
    assert all(a != b for words in captions['constraint'] for a, b in zip(words, words[1:]))
    assert captions['trigrams'] != captions['plain']
    assert all(not words or words[-1] not in BAD_ENDINGS or set(words) <= set(BAD_ENDINGS)
               for words in captions['bad'])
    for name in ('constraint', 'bad', 'diverse', 'trigrams'):
        assert len(captions[name]) == len(captions['plain'])


@pytest.mark.parametrize('args,words', [
    (['--image_folder', 'imgs'], '--image_folder'),
    (['--coco_json', 'x.json'], '--coco_json'),
    (['--beam_size', '5000'], 'beam_size 5000'),
    (['--beam_size', '3', '--group_size', '4'], 'group_size'),
    (['--length_penalty', 'bogus'], "--length_penalty 'bogus'"),
])
def test_unusable_decoding_options_are_one_line(checkpoint, workdir, capsys, args, words):
    assert run_eval(checkpoint, '--language_eval', '0', *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err


@pytest.mark.parametrize('verbose_beam', ['0', '1'])
def test_verbose_prints_the_beams_only_with_verbose_beam(checkpoint, workdir, capsys, verbose_beam):
    """--verbose 1 prints each caption; --verbose_beam (the reference's option, default 1) also its beams."""
    assert run_eval(checkpoint, '--language_eval', '0', '--beam_size', '2', '--verbose', '1',
                    '--verbose_beam', verbose_beam, '--id', 'v') == 0
    out = capsys.readouterr().out
    assert 'image ' in out and ('  beam: ' in out) == (verbose_beam == '1')


# ---- progress (issue 29): a bar on a terminal, lines with a rate in a log file ----

def test_eval_into_a_file_prints_progress_lines_with_a_rate(tiny_dataset, checkpoint, workdir):
    """eval.py with its output in a file (not a terminal, as a cluster job's log): a line with the images done,
    their rate and the elapsed time, in order with the run's other lines; no tqdm bar (no carriage returns)."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(workdir / 'eval.log', 'w') as log:
        proc = subprocess.run([sys.executable, os.path.join(repo, 'eval.py'), '--model', checkpoint[0],
                               '--infos_path', checkpoint[1], '--language_eval', '0', '--batch_size', '1',
                               '--id', 'logged'], stdout=log, stderr=subprocess.STDOUT, cwd=workdir, timeout=300)
    text = (workdir / 'eval.log').read_text()
    assert proc.returncode == 0, text
    assert re.search(r'^decoding test: 3/3 images \(100\.0%\), [\d.,]+ images/s, 0m\d\ds elapsed$', text, re.M), text
    assert '\r' not in text


def test_progress_lines_every_interval_with_time_left(tiny_dataset, checkpoint, workdir, capsys, monkeypatch):
    from misc.console import progress
    monkeypatch.setattr(progress, 'PROGRESS_SECONDS', 0.0)  # a line per batch
    assert run_eval(checkpoint, '--language_eval', '0', '--batch_size', '1', '--id', 'every') == 0
    out, err = capsys.readouterr()
    assert 'decoding test' not in err  # stderr: warnings and errors only
    lines = [line for line in out.splitlines() if line.startswith('decoding test: ')]
    assert [line.split(' images')[0] for line in lines] == ['decoding test: 1/3', 'decoding test: 2/3',
                                                             'decoding test: 3/3', 'decoding test: 3/3']
    assert all(re.search(r'images/s, 0m\d\ds elapsed', line) for line in lines)
    assert 'left' in lines[0] and 'left' not in lines[-1]
