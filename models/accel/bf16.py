"""bfloat16 decoding on the CPU: the decoder's weights cast once, and where it is chosen automatically.

Under `--bf16 1` decoding runs under torch.autocast('cpu', bfloat16), which casts every weight to bfloat16 at every
call it is passed to (its own cache of casts keeps only leaf tensors, and the flat step passes transposed views):
at batch 1, where a step is one pass over the weights, that doubled the memory traffic instead of halving it (issue
30: 2-2.4x slower than fp32). `cast_once(model, tensor)` keeps one bfloat16 copy per weight on the model, made on first
use and made again when the weight changes (its storage or its version counter: an optimizer step, load_state_dict,
an in-place edit); the flat step (models.accel.flat_step) takes its weights from it under bfloat16 autocast. The
numbers are autocast's own (the same casts, once instead of every call).

Whether bfloat16 pays depends on the CPU's matrix units (bench/README.md, "Issue 30"): with AMX (amx_bf16, Intel
Sapphire Rapids and later) a bfloat16 matrix product is several times an fp32 one; with only avx512_bf16 (AMD Zen 4,
Intel Cooper Lake) its dot-product instruction is about as fast as fp32 FMA, and on this project's AMD EPYC bfloat16
decoding measured slower than fp32 even with the weights cast once. So `decode_bf16` with SATIC_BF16=auto
(environment) picks bfloat16 only where the CPU has AMX; `--bf16 1` asks for it anywhere. The default stays fp32
everywhere: bfloat16 changes some captions, and eval.py's default must give the reference's captions on every CPU.
"""
import os
import weakref

import torch

from models.accel.speed import cpu_flags

AUTO_FLAGS = ('amx_bf16',)  # CPU flags under which bfloat16 decoding is chosen without --bf16 1


def native_bf16(flags=None):
    """Whether the CPU multiplies bfloat16 matrices natively fast enough for decoding to pay: AMX (amx_bf16 and
    amx_tile in /proc/cpuinfo, or `flags`). A torch build held below AVX-512 (ATEN_CPU_CAPABILITY=avx2 or
    ONEDNN_MAX_CPU_ISA=AVX2...) does not use it."""
    flags = cpu_flags() if flags is None else set(flags)
    if not all(flag in flags for flag in AUTO_FLAGS + ('amx_tile',)):
        return False
    held = (os.environ.get('ATEN_CPU_CAPABILITY', '') + os.environ.get('ONEDNN_MAX_CPU_ISA', '')).lower()
    return not any(isa in held for isa in ('avx2', 'default', 'sse'))


def decode_bf16(requested, device, flags=None, environ=None):
    """Whether eval-mode decoding on `device` runs in bfloat16: `requested` (--bf16) 1 yes; otherwise fp32 (the
    reference's numbers, on every CPU) unless SATIC_BF16 in the environment says otherwise: 1 as --bf16 1, auto:
    bfloat16 only on a CPU with AMX (native_bf16), where it pays."""
    if requested:
        return True
    setting = (os.environ if environ is None else environ).get('SATIC_BF16', '').strip().lower()
    if setting in ('1', 'yes', 'on'):
        return True
    if setting == 'auto':
        return torch.device(device).type == 'cpu' and native_bf16(flags)
    return False


def autocast_bf16(device_type='cpu'):
    """Whether torch.autocast for device_type is on with bfloat16 now."""
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16


def cast_once(model, tensor):
    """tensor (a weight or bias of model, or a tensor kept with them, e.g. the fused q|k|v weights of
    models.accel.kernels.fused_weights) in bfloat16: cast on first use and again after the tensor changed (its
    version counter); the copies live in model._bf16_weights, keyed by the tensor object (a weak reference: a tensor
    that is gone, e.g. fused weights rebuilt, drops its copy). Pass the parameter itself, not a view made anew."""
    if tensor is None or tensor.dtype != torch.float32:
        return tensor
    cache = model.__dict__.setdefault('_bf16_weights', {})
    version = 0 if tensor.is_inference() else tensor._version  # (inference tensors, e.g. fused weights made in
    hit = cache.get(id(tensor))                                 # inference mode, are rebuilt, not edited)
    if hit is None or hit[0]() is not tensor or hit[1] != version:
        for key in [key for key, (ref, _, _) in cache.items() if ref() is None]:
            del cache[key]
        with torch.no_grad():
            hit = (weakref.ref(tensor), version, tensor.detach().to(torch.bfloat16))
        cache[id(tensor)] = hit
    return hit[2]


def drop_casts(model):
    """Forget model's bfloat16 copies (e.g. before saving or copying the model object)."""
    model.__dict__.pop('_bf16_weights', None)
