"""Opt-in speed paths, off by default and never used for conformance: torch.compile (`--compile 1`) and
dynamic int8 quantization of the linear layers for CPU inference (`--quantize int8`).

compile_model: torch.compile of the training forward (att_embed + encoder + decoder, `SATModel.teacher_forcing`;
its backward is compiled with it), of the generator + log-softmax, of the encoder alone (`SATModel.encode_rows`)
and of the cached decoding step (`SATModel.cached_step`). The fixed-shape decoding cache (models/cache.py) gives
every step the same shapes, so the step compiles once per batch shape; training shapes vary with every batch
(regions, caption lengths), hence dynamic shapes there. Inductor's dropout draws its own random numbers (same
distribution, other values than eager). The numbers are otherwise those of the eager model, to float rounding.

quantize_int8: torch.ao.quantization.quantize_dynamic on every nn.Linear (weights int8 per tensor, activations
quantized on the fly per call); the layer norms, embeddings and attention stay fp32. Inference only.
"""
import warnings

import torch
from torch import nn


def compile_available():
    """(True, '') when torch.compile can build a CPU/CUDA kernel here, else (False, why)."""
    try:
        fn = torch.compile(lambda x: torch.relu(x) + 1, dynamic=False)
        fn(torch.randn(4))
        return True, ''
    except Exception as e:  # no C++ compiler, unsupported Python, ...
        return False, f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'


def compile_model(model, training=True, decoding=True):
    """Compile model's hot paths in place (see the module docstring); returns model. Compilation itself happens on
    the first call of each path (and again for new shapes the guards reject), not here."""
    compiled = model.__dict__.setdefault('_compiled', {})
    model.group_regions = False  # one attention per layer: the same graph whatever the batch's region counts
    if training:
        compiled['teacher_forcing'] = torch.compile(model.teacher_forcing, dynamic=True)
        compiled['generator'] = torch.compile(model.model.generator, dynamic=True)
        compiled['encode'] = torch.compile(model.encode_rows, dynamic=True)
    if decoding:
        # Shapes are fixed through a caption; a new batch size or region count makes the guards mark that size
        # dynamic (one more compilation), not one compilation per batch.
        compiled['step'] = torch.compile(model.cached_step)
    return model


def uncompile(model):
    """Back to eager (e.g. before deep-copying or saving a model object)."""
    model.__dict__.pop('_compiled', None)
    model.group_regions = True
    return model


def quantize_int8(model):
    """A copy of model whose nn.Linear layers are dynamically quantized to int8 (CPU inference only)."""
    if next(model.parameters()).device.type != 'cpu':
        raise ValueError('--quantize int8 runs on the CPU only (use --device cpu)')
    with warnings.catch_warnings():  # torch 2.13 announces the future removal of quantized tensor creation
        warnings.simplefilter('ignore', UserWarning)
        return torch.ao.quantization.quantize_dynamic(uncompile(model), {nn.Linear}, dtype=torch.qint8).eval()


def apply_eval_options(model, opt):
    """eval.py / eval_cocotest.py after loading the checkpoint: --quantize int8, then --compile 1 (decoding step
    and encoder). Returns the model to evaluate (a quantized copy, or model itself)."""
    quantize = opt.quantize or ''
    if quantize not in ('', 'none', 'int8'):
        from misc.errors import SaticError
        raise SaticError(f"--quantize {quantize!r}: use int8 (dynamic int8 linear layers, CPU) or leave it out")
    if quantize == 'int8':
        if next(model.parameters()).device.type != 'cpu':
            from misc.errors import SaticError
            raise SaticError('--quantize int8 runs on the CPU only: add --device cpu')
        model = quantize_int8(model)
    if opt.compile:
        compile_model(model, training=False)
    return model
