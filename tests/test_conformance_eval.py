"""eval.py on the reference's conformance checkpoints writes exactly the reference's captions (expected.json).

The README's command line, run in-process from a temporary working directory; skipped when ../shared/conformance
is absent. Batch size 1 is the reference's setting; batch size 5 (images of different box counts, so att_masks
are used, and a last batch that wraps to the split's start) must give the same captions.
"""
import json
from pathlib import Path

import pytest

import eval as eval_script
from tests.helpers import needs_shared, shared_path

CONFORMANCE = Path(shared_path('conformance'))
pytestmark = needs_shared('conformance', 'expected.json')


@pytest.fixture(scope='module')
def expected():
    with open(CONFORMANCE / 'expected.json') as f:
        return json.load(f)


@pytest.mark.parametrize('batch_size', [1, 5])
@pytest.mark.parametrize('beam_size', [1, 3])
@pytest.mark.parametrize('name', ['transformer', 'sat-2', 'sat-4'])
def test_eval_writes_the_reference_captions(name, beam_size, batch_size, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = CONFORMANCE / 'data'
    run_id = f'fixture-{name}'
    assert eval_script.main([
        '--model', str(CONFORMANCE / name / 'model.pth'), '--infos_path', str(CONFORMANCE / name / f'infos_{name}.pkl'),
        '--input_json', str(data / 'cocotalk.json'), '--input_fc_dir', str(data / 'fc'),
        '--input_att_dir', str(data / 'att'), '--input_label_h5', str(data / 'cocotalk_label.h5'),
        '--split', 'test', '--batch_size', str(batch_size), '--beam_size', str(beam_size), '--language_eval', '0',
        '--id', run_id]) == 0
    assert f'ms per image at batch size {batch_size}, beam size {beam_size}' in capsys.readouterr().out

    with open(tmp_path / 'vis' / f'{run_id}.json') as f:
        predictions = json.load(f)
    key = 'greedy' if beam_size == 1 else 'beam3'
    reference = {int(image_id): captions[key] for image_id, captions in expected[name]['captions'].items()}
    with open(data / 'cocotalk.json') as f:
        test_ids = [img['id'] for img in json.load(f)['images'] if img['split'] == 'test']
    assert [p['image_id'] for p in predictions] == test_ids  # each image once, in the split's order
    assert {p['image_id']: p['caption'] for p in predictions} == reference
