"""The reference's outputs for other K and max_length and for its decoding options (../shared/conformance/decoding).

Every case is loaded into our model (strict) and reproduced through the reference call convention
`model(fc, att, att_masks, opt=..., mode='sample')`: forward log-probs (1e-5), tokens exactly, seqLogprobs (1e-4)
and every done_beams entry (sequence exactly, score 1e-3). Skipped cleanly without ../shared.
"""
import argparse
import json
import os

import pytest
import torch

import models
from misc.utils import decode_sequence
from tests.helpers import needs_shared, setup_model, shared_path

CASES_PT = shared_path('conformance', 'decoding', 'cases.pt')
BAD_ENDINGS = shared_path('conformance', 'decoding', 'bad_endings.json')
pytestmark = needs_shared('conformance', 'decoding', 'cases.pt')


def load_cases():
    if not os.path.isfile(CASES_PT):
        return []
    return torch.load(CASES_PT, weights_only=True)  # plain tensors, dicts and lists: no code


CASES = load_cases()


def build(case):
    model = setup_model(argparse.Namespace(**case['opt']))
    model.load_state_dict(case['state_dict'], strict=True)
    return model.eval()


@pytest.mark.parametrize('case', CASES, ids=[c['name'] for c in CASES])
def test_forward_logprobs(case):
    x = case['inputs']
    with torch.no_grad():
        out = build(case)(x['fc_feats'], x['att_feats'], x['labels'], x['att_masks'])
    assert out.shape == case['forward_logprobs'].shape
    torch.testing.assert_close(out, case['forward_logprobs'], atol=1e-5, rtol=0)


DECODES = [(case, d) for case in CASES for d in case['decodes']]


def reproduce(case, decode, use_cache, device='cpu', graphs=False):
    """Decode the case on device and compare with the reference: tokens, seqLogprobs, every done_beams entry.
    graphs: the fixed-shape graphed step (models.accel.cuda_graphs; replayed from CUDA graphs on a GPU, run eagerly on
    the CPU)."""
    model = build(case).to(device)
    model.cuda_graphs = graphs
    x = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in case['inputs'].items()}
    opt = dict(decode['opt'], use_cache=use_cache)
    seed = opt.pop('seed', None)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        seq, logprobs = decoded = model(x['fc_feats'], x['att_feats'], x['att_masks'], opt=opt, mode='sample')
    assert seq.device.type == torch.device(device).type
    assert torch.equal(seq.cpu(), decode['seq'])
    torch.testing.assert_close(logprobs.cpu(), decode['seqLogprobs'], atol=1e-4, rtol=0)
    if 'done_beams' in decode:
        assert model.done_beams is decoded.hypotheses  # the reference's interface: the returned hypotheses
        assert len(decoded.hypotheses) == len(decode['done_beams'])
        for ours, theirs in zip(decoded.hypotheses, decode['done_beams']):
            assert len(ours) == len(theirs)
            for a, b in zip(ours, theirs):
                assert torch.equal(a['seq'].cpu(), b['seq'])
                assert abs(a['p'] - float(b['p'])) < 1e-3


def decode_id(case, decode):
    return f"{case['name']}-{'-'.join(f'{k}{v}' for k, v in decode['opt'].items()) or 'greedy'}"


@pytest.mark.parametrize('use_cache', [1, 0])
@pytest.mark.parametrize('case,decode', DECODES, ids=[decode_id(c, d) for c, d in DECODES])
def test_decoding_reproduces_the_reference(case, decode, use_cache):
    reproduce(case, decode, use_cache)


@pytest.mark.parametrize('case,decode', DECODES, ids=[decode_id(c, d) for c, d in DECODES])
def test_fixed_shape_graph_step_reproduces_the_reference(case, decode):
    """The step models.accel.cuda_graphs captures, on its padded fixed-shape tensors, run eagerly on the CPU."""
    reproduce(case, decode, use_cache=1, graphs=True)


CUDA_DECODES = [(case, d) for case, d in DECODES if 'seed' not in d['opt']]  # CUDA draws other random numbers


@pytest.mark.cuda
@pytest.mark.parametrize('case,decode', CUDA_DECODES, ids=[decode_id(c, d) for c, d in CUDA_DECODES])
def test_decoding_on_cuda_reproduces_the_reference(case, decode):
    """Greedy and beam searches on a GPU (fp32, cached): the same checks as on the CPU."""
    reproduce(case, decode, use_cache=1, device='cuda')


@pytest.mark.cuda
@pytest.mark.parametrize('case,decode', CUDA_DECODES, ids=[decode_id(c, d) for c, d in CUDA_DECODES])
def test_cuda_graph_replay_reproduces_the_reference(case, decode):
    """--cuda_graphs 1: greedy and beam searches with every step replayed from a CUDA graph."""
    reproduce(case, decode, use_cache=1, device='cuda', graphs=True)


def test_remove_bad_endings_strings():
    with open(BAD_ENDINGS) as f:
        fixture = json.load(f)
    assert decode_sequence(fixture['ix_to_word'], fixture['seq']) == fixture['captions']
    assert decode_sequence(fixture['ix_to_word'], fixture['seq'], remove_bad_endings=True) == \
        fixture['captions_remove_bad_endings']
    # The fixture would pass trivially if no caption had a bad ending.
    assert fixture['captions'] != fixture['captions_remove_bad_endings']
