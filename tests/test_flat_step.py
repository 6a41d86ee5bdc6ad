"""models.accel.flat_step: the decoding step as one function over the decoder's tensors gives the numbers of the module
step (SATModel.cached_step) bit for bit: every search (greedy, seeded sampling, beam, diverse beam, decoding
constraints), K 1, 2 and 4, images with different region counts (attention groups), several rows per image,
autocast bf16 and --quantize int8; and it is the path decoding takes (eval mode, no gradients) and not otherwise.
The conformance tests (test_conformance_*.py) run the reference's checkpoints through it."""
import pytest
import torch

from models.accel import flat_step
from models.decode_config import DecodeConfig
from models.sat import SATModel
from models.accel.speed import fbgemm_int8_available, quantize_int8
from tests.helpers import tiny_sat, masked_batch


def tiny(K, seed=0):
    torch.manual_seed(seed)
    return tiny_sat(vocab_size=20, K=K, d_model=16, d_ff=24, num_layers=2, att_feat_size=6).eval()


def inputs(seed=1):
    return masked_batch((4, 2, 6, 1, 6), 8, 6, generator=torch.Generator().manual_seed(seed))


def decode_both(model, att, masks, config, seq_per_img=1, seed=None):
    """(flat, modules): (seq, logprobs, the returned beams' sequences) of each path."""
    out = []
    for flat in (True, False):
        model.flat_step = flat
        if seed is not None:
            torch.manual_seed(seed)
        seq, logprobs = decoded = model.decode(att, masks, config, seq_per_img=seq_per_img)
        beams = [[beam['seq'] for beam in image] for image in decoded.hypotheses] if config.beam_size > 1 else None
        out.append((seq, logprobs, beams))
    model.flat_step = True
    return out


CONFIGS = {
    'greedy': DecodeConfig(),
    'sampling': DecodeConfig(sample_max=False, temperature=0.8),
    'beam': DecodeConfig(beam_size=3),
    'diverse-beam': DecodeConfig(beam_size=4, group_size=2, diversity_lambda=0.5),
    'constraints': DecodeConfig(beam_size=2, decoding_constraint=True, length_penalty='wu_0.9'),
    'greedy-constraints': DecodeConfig(decoding_constraint=True, block_trigrams=True),
}


@pytest.mark.parametrize('K', [1, 2, 4])
@pytest.mark.parametrize('name', list(CONFIGS))
def test_flat_step_equals_module_step(K, name):
    model = tiny(K)
    model.model.generator.proj.bias.data[0] = -2.0  # longer captions: more steps compared
    att, masks = inputs()
    (seq, logprobs, beams), (seq_m, logprobs_m, beams_m) = decode_both(model, att, masks, CONFIGS[name], seed=3)
    assert torch.equal(seq, seq_m) and torch.equal(logprobs, logprobs_m)
    if beams is not None:
        assert [len(x) for x in beams] == [len(y) for y in beams_m]
        assert all(torch.equal(a, b) for x, y in zip(beams, beams_m) for a, b in zip(x, y))
    assert (seq > 0).sum() > att.size(0) * 2  # real captions, not all-EOS


def test_flat_step_with_several_rows_per_image_and_no_mask():
    model = tiny(2)
    att, _ = inputs()
    (seq, logprobs, _), (seq_m, logprobs_m, _) = decode_both(model, att, None, CONFIGS['sampling'], seq_per_img=3,
                                                              seed=5)
    assert seq.size(0) == 3 * att.size(0)
    assert torch.equal(seq, seq_m) and torch.equal(logprobs, logprobs_m)


def test_flat_step_under_bf16_autocast():
    model = tiny(2)
    att, masks = inputs()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        (seq, logprobs, _), (seq_m, logprobs_m, _) = decode_both(model, att, masks, CONFIGS['beam'])
    assert torch.equal(seq, seq_m) and torch.equal(logprobs, logprobs_m)


@pytest.mark.skipif(not fbgemm_int8_available(), reason="this torch has no fbgemm int8 kernels")
def test_flat_step_with_int8_layers():
    model = quantize_int8(tiny(1))
    att, masks = inputs()
    (seq, logprobs, _), (seq_m, logprobs_m, _) = decode_both(model, att, masks, CONFIGS['greedy'])
    assert torch.equal(seq, seq_m) and torch.equal(logprobs, logprobs_m)


def test_flat_step_runs_in_eval_decoding_only(monkeypatch):
    calls = []
    original = flat_step.FlatStep.__call__
    monkeypatch.setattr(flat_step.FlatStep, '__call__', lambda self, *a: calls.append(1) or original(self, *a))
    model = tiny(2)
    att, masks = inputs()
    model.decode(att, masks, CONFIGS['greedy'])
    assert calls, 'eval decoding did not take the flat step'
    calls.clear()
    model.train()  # self-critical sampling: dropout and gradients, the module step
    model.decode(att, masks, CONFIGS['sampling'])
    model.eval()
    model.flat_step = False
    model.decode(att, masks, CONFIGS['greedy'])
    assert not calls


def test_flat_step_follows_weight_changes_between_decodes():
    """Built per decoding: a weight changed between two decodes (a training step) is read by the next one."""
    model = tiny(1)
    att, masks = inputs()
    model.decode(att, masks)
    with torch.no_grad():
        for p in model.model.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    (seq, logprobs, _), (seq_m, logprobs_m, _) = decode_both(model, att, masks, CONFIGS['greedy'])
    assert torch.equal(seq, seq_m) and torch.equal(logprobs, logprobs_m)
