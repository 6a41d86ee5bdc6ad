"""models.accel.cuda_graphs (--cuda_graphs 1): the fixed-shape step it captures gives the eager path's tokens (run eagerly
on the CPU here; the conformance cases in test_conformance_decoding.py too), its buckets are reused across decodes
of other sizes and rebuilt when the weights change, and on a GPU (marker cuda) the replayed graphs give the eager
tokens for greedy, beam and seeded sampling."""
import gc

import pytest
import torch

from models.accel.cuda_graphs import regions_bucket, rows_bucket
from models.decode_config import DecodeConfig
from models.accel.speed import use_cuda_graphs
from tests.helpers import tiny_sat, masked_batch


def tiny(K=2, device='cpu'):
    torch.manual_seed(0)
    model = tiny_sat(vocab_size=20, K=K, d_model=16, d_ff=24, num_layers=2, att_feat_size=6).eval().to(device)
    with torch.no_grad():
        model.model.generator.proj.bias[0] = -2.0  # longer captions
    return model


def images(counts, seed=1, device='cpu'):
    att, masks = masked_batch(counts, 9, 6, generator=torch.Generator().manual_seed(seed))
    return att.to(device), masks.to(device)


def decode(model, att, masks, config, graphs, seed=None):
    model.cuda_graphs = graphs
    if seed is not None:
        torch.manual_seed(seed)
    seq, logprobs = model.decode(att, masks, config)
    model.cuda_graphs = False
    return seq, logprobs


def assert_same_decoding(model, att, masks, config, seed=None):
    seq, logprobs = decode(model, att, masks, config, True, seed)
    seq_e, logprobs_e = decode(model, att, masks, config, False, seed)
    assert torch.equal(seq, seq_e)
    torch.testing.assert_close(logprobs, logprobs_e, atol=1e-5, rtol=0)  # attention over padded, masked keys
    assert (seq > 0).sum() > 2 * att.size(0)


def test_buckets():
    assert [rows_bucket(n) for n in (1, 2, 3, 5, 8, 9, 50)] == [1, 2, 4, 8, 8, 16, 64]
    assert [regions_bucket(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 112]


CONFIGS = {'greedy': DecodeConfig(), 'beam': DecodeConfig(beam_size=3),
           'sampling': DecodeConfig(sample_max=False), 'diverse': DecodeConfig(beam_size=4, group_size=2),
           'constraint': DecodeConfig(beam_size=2, decoding_constraint=True)}


@pytest.mark.parametrize('K', [1, 2, 4])
@pytest.mark.parametrize('name', list(CONFIGS))
def test_fixed_shape_step_gives_the_eager_tokens(K, name):
    model = tiny(K)
    att, masks = images((4, 2, 9, 1, 6))  # 5 images: padded to 8 rows per beam, 16 regions
    assert_same_decoding(model, att, masks, CONFIGS[name], seed=3)


def test_buckets_are_reused_across_decodes_and_their_buffers_reset():
    model = tiny(2)
    first, second = images((4, 2, 9, 1, 6), seed=1), images((3, 8, 5), seed=2)
    eager = [decode(model, *batch, DecodeConfig(), False) for batch in (first, second)]
    for batch, expected in zip((first, second, first), eager + eager[:1]):
        seq, logprobs = decode(model, *batch, DecodeConfig(), True)
        assert torch.equal(seq, expected[0])
        torch.testing.assert_close(logprobs, expected[1], atol=1e-5, rtol=0)
    buckets = model._graphed_steps.steps
    assert sorted(bucket[0] for bucket in buckets) == [4, 8]  # 5 images -> 8 rows, 3 -> 4; the third decode reused
    assert all(len(steps) == 1 for steps in buckets.values())


def test_concurrent_decoding_states_get_their_own_step_and_release_it():
    model = tiny(1)
    att, masks = images((4, 2, 9))
    decode(model, att, masks, CONFIGS['diverse'], True)  # two beam groups alive at once, one bucket
    gc.collect()
    (steps,) = model._graphed_steps.steps.values()
    assert len(steps) == 2 and not any(step.in_use for step in steps)


def test_changed_weights_rebuild_the_steps():
    model = tiny(2)
    att, masks = images((4, 2, 9))
    decode(model, att, masks, DecodeConfig(), True)
    old = model._graphed_steps.key
    with torch.no_grad():
        for p in model.model.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a training step, in place
    assert_same_decoding(model, att, masks, DecodeConfig())
    assert model._graphed_steps.key != old


def test_the_option_is_off_on_the_cpu():
    model = tiny(2)
    assert use_cuda_graphs(model, 1) is False and model.cuda_graphs is False


@pytest.mark.cuda
@pytest.mark.parametrize('K', [1, 2])
@pytest.mark.parametrize('name', ['greedy', 'beam', 'sampling', 'diverse'])
def test_graph_replay_gives_the_eager_tokens_on_cuda(K, name):
    model = tiny(K, 'cuda')
    assert use_cuda_graphs(model, 1) is True
    att, masks = images((4, 2, 9, 1, 6), device='cuda')
    for _ in range(2):  # the second decode replays the graphs the first captured
        assert_same_decoding(model, att, masks, CONFIGS[name], seed=3)
    steps = [step for steps in model._graphed_steps.steps.values() for step in steps]
    assert steps and all(step.graph is not None for step in steps)
