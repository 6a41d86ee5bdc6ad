"""models.accel.decoding_step: the one choice of how a decoding runs its steps, among the five implementations."""
import torch

from models.accel import decoding_step
from models.accel.cuda_graphs import GraphedDecoding
from models.accel.flat_step import FlatStep
from models.cache import CachedStep, PrefixStep
from models.decode_config import DecodeConfig
from tests.helpers import tiny_sat, masked_batch


def tiny():
    torch.manual_seed(0)
    return tiny_sat(vocab_size=15, K=2, d_model=16, d_ff=32, num_layers=1, att_feat_size=8).eval()


def chosen(model, use_cache=True, grad=False):
    att, masks = masked_batch((4, 2, 6, 1), 6, 8)
    with torch.set_grad_enabled(grad):
        memory, memory_mask = model.encode(att, masks)
        return model.init_cache(memory, memory_mask, use_cache=use_cache).step


def test_each_setting_gets_its_step_implementation():
    model = tiny()
    step = chosen(model)  # eval mode, no gradients: the flat step
    assert type(step) is CachedStep and isinstance(step.fn, FlatStep) and not step.masked
    assert type(chosen(model, use_cache=False)) is PrefixStep  # the reference's re-decoding
    model.flat_step = False
    assert chosen(model).fn == model.cached_step
    model.flat_step = True
    assert chosen(model.train(), grad=True).fn == model.cached_step  # self-critical sampling: gradients
    model.eval()
    model.cuda_graphs = True  # (on the CPU the graphed step runs eagerly)
    step = chosen(model)
    assert type(step) is GraphedDecoding and not step.grouped_memory
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):  # autocast's cast weights must not be captured
        assert isinstance(decoding_step(model, torch.zeros(1), True, 20).fn, FlatStep)
    model.cuda_graphs = False
    model.__dict__['_compiled'] = {'step': model.cached_step}  # what speed.compile_model sets
    step = chosen(model)
    assert step.fn == model.cached_step and step.masked


def test_every_implementation_decodes_the_same_captions():
    model = tiny()
    att, masks = masked_batch((4, 2, 6, 1), 6, 8)
    expected = model.decode(att, masks, DecodeConfig(beam_size=3)).seq
    for setting in ('flat_step', 'cuda_graphs', 'use_cache'):
        model.flat_step, model.cuda_graphs, model.use_cache = True, False, True
        setattr(model, setting, setting != 'flat_step' and setting != 'use_cache')
        assert torch.equal(model.decode(att, masks, DecodeConfig(beam_size=3)).seq, expected), setting
