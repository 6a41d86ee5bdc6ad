"""The reference fixtures (../shared/conformance, see its README) reproduced by models/.

Every fixture checkpoint (transformer, sat-2, sat-4) loads strict; teacher forcing matches the reference's
log-probs; batched greedy and beam-3 decoding match its token ids (with and without the key/value cache); decoding
one image at a time reproduces expected.json's captions.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from misc.files.safe_load import load_pickle
from models.sat import SATModel
from tests.helpers import needs_shared, setup_model, shared_path

CONFORMANCE = Path(shared_path('conformance'))
NAMES = ('transformer', 'sat-2', 'sat-4')

pytestmark = needs_shared('conformance', 'tensors.pt')


@pytest.fixture(scope='module')
def tensors():
    return torch.load(CONFORMANCE / 'tensors.pt')


@pytest.fixture(scope='module')
def expected():
    return json.loads((CONFORMANCE / 'expected.json').read_text())


def load_infos(name):
    return load_pickle(str(CONFORMANCE / name / f'infos_{name}.pkl'))  # the restricted unpickler


@pytest.fixture(scope='module', params=NAMES)
def fixture_model(request):
    name = request.param
    infos = load_infos(name)
    model = setup_model(infos['opt'])
    state = torch.load(CONFORMANCE / name / 'model.pth', weights_only=True)
    models.load_weights(model, state, str(CONFORMANCE / name / 'model.pth'))
    return name, model.eval(), infos


def caption(vocab, seq):
    words = []
    for token in seq.tolist():
        if token == 0:
            break
        words.append(vocab[str(token)])
    return ' '.join(words)


def test_checkpoints_load_strict(fixture_model, expected):
    name, model, infos = fixture_model
    state = torch.load(CONFORMANCE / name / 'model.pth', weights_only=True)
    model.load_state_dict(state, strict=True)
    assert model.K == expected[name]['K'] == (1 if name == 'transformer' else int(name.split('-')[1]))
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert shapes == expected[name]['state_dict_keys']


def test_paper_size_state_dict_layout():
    lines = (CONFORMANCE / 'full_size_state_dict.txt').read_text().splitlines()
    rows = (line.split('\t') for line in lines if not line.startswith('#'))
    reference = {key: json.loads(shape) for key, shape in rows}
    with torch.device('meta'):  # no memory, no init cost
        model = SATModel(vocab_size=9487, K=2, d_model=512, d_ff=2048, num_layers=6, att_feat_size=2048)
    assert {key: list(value.shape) for key, value in model.state_dict().items()} == reference


def test_teacher_forcing(fixture_model, tensors):
    name, model, _ = fixture_model
    t = tensors
    with torch.no_grad():
        logprobs = model(t['fc'], t['att'], t['labels'], t['att_masks'])
    reference = t[name]['forward_logprobs']
    assert logprobs.shape == reference.shape
    assert (logprobs - reference).abs().max() < 1e-5


@pytest.mark.parametrize('use_cache', [1, 0])
def test_batched_greedy_and_beam(fixture_model, tensors, use_cache):
    name, model, _ = fixture_model
    t = tensors
    seq, logprobs = model(t['fc'], t['att'], t['att_masks'], opt={'sample_max': 1, 'beam_size': 1, 'temperature': 1.0,
                                                                   'use_cache': use_cache}, mode='sample')
    assert torch.equal(seq, t[name]['greedy_seq'])
    # Including the log-probs past the end of a caption (see models/decoding.py).
    assert (logprobs - t[name]['greedy_logprobs']).abs().max() < 1e-5
    seq, _ = model(t['fc'], t['att'], t['att_masks'], opt={'beam_size': 3, 'use_cache': use_cache}, mode='sample')
    assert torch.equal(seq, t[name]['beam3_seq'])


def test_one_image_at_a_time(fixture_model, expected):
    """eval.py --batch_size 1: each image with its own boxes and no mask, greedy and beam 3."""
    name, model, infos = fixture_model
    images = [image for image in json.loads((CONFORMANCE / 'data' / 'cocotalk.json').read_text())['images']
              if image['split'] == 'test']
    assert len(images) == len(expected[name]['captions'])
    for image in images:
        feats = torch.from_numpy(np.load(CONFORMANCE / 'data' / 'att' / f"{image['id']}.npz")['feat'])[None]
        want = expected[name]['captions'][str(image['id'])]
        for beam, key in ((1, 'greedy'), (3, 'beam3')):
            seq, _ = model(None, feats, None, opt={'beam_size': beam}, mode='sample')
            assert caption(infos['vocab'], seq[0]) == want[key], (name, image['id'], key)


@pytest.mark.cuda
def test_batched_greedy_and_beam_on_cuda(fixture_model, tensors):
    """The same token ids on a GPU (fp32; TF32 is off unless --tf32 1), log-probs within 1e-4."""
    name, model, _ = fixture_model
    t = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in tensors.items() if k in ('fc', 'att', 'att_masks')}
    model = model.cuda()
    try:
        with torch.no_grad():
            seq, logprobs = model(t['fc'], t['att'], t['att_masks'], opt={'beam_size': 1}, mode='sample')
            assert seq.is_cuda and torch.equal(seq.cpu(), tensors[name]['greedy_seq'])
            torch.testing.assert_close(logprobs.cpu(), tensors[name]['greedy_logprobs'], atol=1e-4, rtol=0)
            seq, _ = model(t['fc'], t['att'], t['att_masks'], opt={'beam_size': 3}, mode='sample')
            assert torch.equal(seq.cpu(), tensors[name]['beam3_seq'])
    finally:
        model.cpu()
