"""models.accel.bf16: bfloat16 decoding with the weights cast once (the numbers of autocast casting them at every
call), copies remade when the weights change, and the automatic choice (AMX CPUs only) tested with faked CPU flags.
Nothing here depends on the CPU running the tests (bfloat16 matrix products run on AVX2-only CPUs too, emulated)."""
import torch

from models.accel import bf16
from models.decode_config import DecodeConfig
from tests.helpers import tiny_sat, masked_batch

AMX = {'avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16', 'amx_int8'}
ZEN4 = {'avx2', 'avx512f', 'avx512_bf16', 'avx512_vnni'}  # avx512_bf16 without AMX


def tiny(K=2, seed=0):
    torch.manual_seed(seed)
    return tiny_sat(vocab_size=30, K=K, d_model=32, d_ff=48, num_layers=2, att_feat_size=6).eval()


def decode(model, att, masks, precision, beam_size=2):
    """(seq, logprobs) greedy in fp32, 'bf16' (weights cast once: the flat step) or 'bf16-per-call' (autocast
    casting every weight at every call, as before)."""
    real = bf16.cast_once
    if precision == 'bf16-per-call':
        bf16.cast_once = lambda model, tensor: tensor
    try:
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision != 'fp32'):
            return model.decode(att, masks, DecodeConfig(beam_size=beam_size))
    finally:
        bf16.cast_once = real


def test_auto_choice_is_bf16_on_amx_cpus_only(monkeypatch):
    monkeypatch.delenv('ATEN_CPU_CAPABILITY', raising=False)
    monkeypatch.delenv('ONEDNN_MAX_CPU_ISA', raising=False)
    auto = {'SATIC_BF16': 'auto'}
    assert bf16.native_bf16(AMX) and not bf16.native_bf16(ZEN4) and not bf16.native_bf16({'avx2'})
    assert not bf16.decode_bf16(0, 'cpu', AMX, environ={})  # the default: fp32 (the reference's captions) anywhere
    assert bf16.decode_bf16(0, 'cpu', AMX, environ=auto)
    assert not bf16.decode_bf16(0, 'cpu', ZEN4, environ=auto)
    assert not bf16.decode_bf16(0, 'cuda', AMX, environ=auto)  # the GPU's choice is --bf16 1's alone
    assert bf16.decode_bf16(1, 'cpu', ZEN4, environ={}) and bf16.decode_bf16(1, 'cpu', set(), environ={})
    assert not bf16.decode_bf16(0, 'cpu', AMX, environ={'SATIC_BF16': '0'})
    assert bf16.decode_bf16(0, 'cpu', ZEN4, environ={'SATIC_BF16': '1'})
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', 'AVX2')  # the libraries held below AMX
    assert not bf16.decode_bf16(0, 'cpu', AMX, environ=auto)


def test_weights_cast_once_give_autocasts_numbers_and_follow_weight_changes():
    model = tiny()
    att, masks = masked_batch((4, 2, 6, 1), 8, 6)
    seq, logprobs = decode(model, att, masks, 'bf16')
    copies = model.__dict__['_bf16_weights']
    assert copies and all(copy.dtype == torch.bfloat16 for _, _, copy in copies.values())
    seq_c, logprobs_c = decode(model, att, masks, 'bf16-per-call')
    assert torch.equal(seq, seq_c) and torch.equal(logprobs, logprobs_c)
    first = {key: copy for key, (_, _, copy) in copies.items()}
    decode(model, att, masks, 'bf16')  # a second decode reuses the copies
    assert all(copies[key][2] is copy for key, copy in first.items())
    with torch.no_grad():  # new weights (as an optimizer step or load_state_dict): copies remade
        for p in model.parameters():
            p.mul_(1.5)
    seq, logprobs = decode(model, att, masks, 'bf16')
    seq_c, logprobs_c = decode(model, att, masks, 'bf16-per-call')
    assert torch.equal(seq, seq_c) and torch.equal(logprobs, logprobs_c)
    weight = model.model.generator.proj.weight
    assert torch.equal(bf16.cast_once(model, weight), weight.detach().to(torch.bfloat16))


def test_bf16_decoding_is_close_to_fp32():
    model = tiny(K=1)
    att, masks = masked_batch((4, 2, 6, 1), 8, 6)
    seq, logprobs = decode(model, att, masks, 'fp32', beam_size=1)  # greedy
    seq16, logprobs16 = decode(model, att, masks, 'bf16', beam_size=1)
    assert logprobs16.dtype == torch.float32
    agree = (seq == seq16).float().mean().item()
    assert agree >= 0.7, agree
    same_so_far = (seq == seq16).long().cumprod(1).bool() & (seq > 0)  # the same words up to here
    assert same_so_far.sum() >= 10
    assert (logprobs - logprobs16)[same_so_far].abs().max() < 0.1  # bfloat16 keeps 8 bits of mantissa
