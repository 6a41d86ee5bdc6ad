"""Opt-in speed paths, off by default and never used for conformance: torch.compile (`--compile 1`) and
dynamic int8 quantization of the linear layers for CPU inference (`--quantize int8`).

compile_model: torch.compile of the training forward (att_embed + encoder + decoder, `SATModel.teacher_forcing`;
its backward is compiled with it), of the generator + log-softmax, of the encoder alone (`SATModel.encode_rows`)
and of the cached decoding step (`SATModel.cached_step`). The fixed-shape decoding cache (models/cache.py) gives
every step the same shapes, so the step compiles once per batch shape; training shapes vary with every batch
(regions, caption lengths), hence dynamic shapes there. Inductor's dropout draws its own random numbers (same
distribution, other values than eager). The numbers are otherwise those of the eager model, to float rounding.

quantize_int8: every nn.Linear becomes an Int8Linear (weights int8 per tensor, activations quantized to uint8 per
call, int32 accumulation: fbgemm's kernel, the one PyTorch's own dynamic quantization builds on); the layer norms,
embeddings and attention stay fp32. Inference only.

Which int8 kernel a CPU gets (int8_kernel()): fbgemm picks its kernel from the CPU. With VNNI (avx512_vnni) it
multiplies uint8 by int8 into int32 (vpdpbusd): nothing saturates, and the weights keep 8 bits. Without VNNI (AVX2
and plain AVX-512 CPUs: many AMD Zen 2/3 servers, most laptops, Skylake-X) it multiplies in pairs whose sums
saturate at int16 (vpmaddubsw): 255 * 128 * 2 > 32767, and a 512 -> 2048 layer is 17% off. There the weights keep
7 bits ([-64, 63]: 255 * 64 * 2 <= 32767), so no pair can saturate (1.1% off on N(0, 3) inputs, against torch.ao's
1.7% with 7-bit activations). The choice is made by running the kernel once on a case that saturates (not by the
torch build's capability, which says nothing about VNNI, nor by CPU flags alone, which FBGEMM_ENABLE_INSTRUCTIONS
can override).
"""
import contextlib
import copy
import functools
import os
import warnings

import torch
from torch import nn

from misc.errors import SaticError
from models.transformer import MultiHeadedAttention


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


def fbgemm_int8_available():
    """True where torch has fbgemm's int8 kernels (x86-64 builds); elsewhere (e.g. ARM) torch.ao's engine."""
    return hasattr(torch, 'fbgemm_linear_int8_weight_fp32_activation') and 'fbgemm' in \
        torch.backends.quantized.supported_engines


@contextlib.contextmanager
def _no_deprecation_notes():
    """torch 2.13 calls both of its int8 paths deprecated (torch.ao's and fbgemm's tensor functions) and ships
    both (requirements.txt pins it): its notes are about PyTorch's roadmap, not about what the user asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message=r'.*(deprecated|will be removed)', category=UserWarning)
        warnings.filterwarnings('ignore', category=DeprecationWarning)
        yield


@torch.library.custom_op('satic::int8_linear', mutates_args=())
def int8_linear(x: torch.Tensor, qweight: torch.Tensor, packed: torch.Tensor, col_offsets: torch.Tensor,
                scale: float, zero_point: int, bias: torch.Tensor) -> torch.Tensor:
    """fbgemm's int8 linear as an operator torch.compile can place in a graph (torch has no shape function for
    the fbgemm call itself); eager calls go to fbgemm directly. (torch's one-time deprecation note was given, and
    silenced, when the layer was packed: no warning filter per call.)"""
    return torch.fbgemm_linear_int8_weight_fp32_activation(x, qweight, packed, col_offsets, scale, zero_point, bias)


@int8_linear.register_fake
def _int8_linear_shape(x, qweight, packed, col_offsets, scale, zero_point, bias):
    return x.new_empty(*x.shape[:-1], qweight.size(0))


def quantize_weight(weight, bits):
    """fbgemm's int8 weight format with `bits` bits: (qweight (out, in) int8 in [-2^(bits-1), 2^(bits-1)-1],
    col_offsets (out,) int32 = sum over inputs of (qweight - zero_point), scale, zero_point), per tensor, over the
    weights' range with 0 included (as fbgemm_linear_quantize_weight, which is the 8-bit case)."""
    if bits == 8:
        with _no_deprecation_notes():
            return torch.fbgemm_linear_quantize_weight(weight)
    qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    low, high = min(weight.min().item(), 0.0), max(weight.max().item(), 0.0)
    scale = (high - low) / (qmax - qmin) or 1.0
    zero_point = int(min(qmax, max(qmin, round(qmin - low / scale))))
    qweight = torch.clamp(torch.round(weight / scale) + zero_point, qmin, qmax).to(torch.int8)
    col_offsets = (qweight.to(torch.int32) - zero_point).sum(1, dtype=torch.int32)
    return qweight, col_offsets, scale, zero_point


def cpu_flags():
    """The CPU's instruction-set flags from /proc/cpuinfo (an empty set where it cannot be read)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('flags'):
                    return set(line.split(':', 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def int8_kernel_saturates():
    """True when fbgemm's int8 kernel on this CPU adds uint8 x int8 products in int16 pairs that saturate (no
    VNNI). Runs the kernel once on a row of 255s against weights of 127: exact 64 * 1.0, or about half when the
    pairs saturate."""
    weight, x = torch.ones(8, 64), torch.ones(1, 64)
    qweight, col_offsets, scale, zero_point = quantize_weight(weight, 8)
    with _no_deprecation_notes():
        y = torch.fbgemm_linear_int8_weight_fp32_activation(
            x, qweight, torch.fbgemm_pack_quantized_matrix(qweight), col_offsets, scale, zero_point,
            torch.zeros(8))
    return bool((y - 64).abs().max() > 1)


def int8_weight_bits():
    """The weight width the int8 path uses on this CPU: 8 where the kernel cannot saturate, else 7."""
    return 7 if int8_kernel_saturates() else 8


def int8_kernel():
    """One line for eval.py's output: which int8 path this CPU gets, and why."""
    if not fbgemm_int8_available():
        return "int8: torch.ao's dynamic quantization (no fbgemm in this torch build)"
    flags = cpu_flags()
    vnni = sorted(flags & {'avx512_vnni', 'avx_vnni'}) or ['no VNNI']
    isa = 'avx512f' if 'avx512f' in flags else 'avx2' if 'avx2' in flags else 'no avx2'
    forced = os.environ.get('FBGEMM_ENABLE_INSTRUCTIONS')
    isa += f', FBGEMM_ENABLE_INSTRUCTIONS={forced}' if forced else ''
    if int8_kernel_saturates():
        return (f'int8: fbgemm with 7-bit weights (this CPU\'s int8 kernel adds products in int16 pairs that '
                f'saturate; {isa}, {", ".join(vnni)})')
    return f'int8: fbgemm with 8-bit weights (int32 products; {isa}, {", ".join(vnni)})'


class Int8Linear(nn.Module):
    """An nn.Linear for CPU inference with int8 weights: y = x W^T + b computed by fbgemm's int8 kernel
    (torch.fbgemm_linear_int8_weight_fp32_activation): W quantized once, symmetric per tensor; x quantized per
    call (uint8, its own min/max); int32 accumulation; y in fp32. weight_bits: 8, or 7 where the CPU's kernel
    saturates (None: int8_weight_bits(), see the module docstring).

    The same kernel as torch.ao's dynamically quantized Linear without its per-call Python and quantized-tensor
    wrapping: at batch 1 a decoding step's 49 calls take about 1/3 of the time (bench/README.md, "--quantize
    int8"). Its activations use the full 8 bits (torch.ao's x86 default reduces them to 7).
    """

    def __init__(self, linear, weight_bits=None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_bits = weight_bits or int8_weight_bits()
        weight = linear.weight.detach().float().contiguous()
        qweight, col_offsets, self.scale, self.zero_point = quantize_weight(weight, self.weight_bits)
        self.register_buffer('qweight', qweight)  # (out, in) int8
        self.register_buffer('col_offsets', col_offsets)  # (out,) int32
        bias = linear.bias if linear.bias is not None else weight.new_zeros(self.out_features)
        self.register_buffer('bias', bias.detach().float().clone())
        self._pack()

    def _pack(self):
        # fbgemm's packed matrix lives in this tensor's memory (C++ object, pointers included): never copied or
        # saved, rebuilt from qweight instead (see __deepcopy__)
        with _no_deprecation_notes():
            self.packed = torch.fbgemm_pack_quantized_matrix(self.qweight)
            self.forward(self.bias.new_zeros(1, self.in_features))  # torch's one-time note is given here

    def forward(self, x):
        if torch.compiler.is_compiling():  # --compile 1: an opaque call in the graph (see int8_linear)
            return int8_linear(x, self.qweight, self.packed, self.col_offsets, self.scale, self.zero_point, self.bias)
        return torch.fbgemm_linear_int8_weight_fp32_activation(
            x, self.qweight, self.packed, self.col_offsets, self.scale, self.zero_point, self.bias)

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        new.__dict__ = {key: copy.deepcopy(value, memo) for key, value in self.__dict__.items() if key != 'packed'}
        new._pack()
        return new

    def extra_repr(self):
        return (f'in_features={self.in_features}, out_features={self.out_features}, bits={self.weight_bits}, '
                f'scale={self.scale:.3g}')


def concatenated(linears):
    """One nn.Linear computing the given linears' outputs side by side."""
    weight = torch.cat([m.weight.detach() for m in linears])
    fused = nn.Linear(weight.size(1), weight.size(0))
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(torch.cat([m.bias.detach() for m in linears]))
    return fused


def quantize_int8(model):
    """A copy of model whose nn.Linear layers compute in int8 (CPU inference only): Int8Linear where fbgemm is
    available, else torch.ao's dynamic quantization."""
    if next(model.parameters()).device.type != 'cpu':
        raise ValueError('--quantize int8 runs on the CPU only (use --device cpu)')
    model = uncompile(model)
    model.__dict__.pop('_bf16_weights', None)  # bfloat16 copies of the weights (models.accel.bf16): not copied
    if not fbgemm_int8_available():
        with _no_deprecation_notes():
            return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8).eval()
    quantized = copy.deepcopy(model).eval()
    for module in quantized.modules():
        if isinstance(module, MultiHeadedAttention):  # q|k|v and k|v in one int8 call each (one scale for all)
            module.fused_projections = {which: Int8Linear(concatenated([module.linears[i] for i in which]))
                                        for which in ((0, 1, 2), (1, 2))}
    linears = [(name, module) for name, module in quantized.named_modules() if type(module) is nn.Linear]
    for name, module in linears:
        parent, _, attr = name.rpartition('.')
        setattr(quantized.get_submodule(parent) if parent else quantized, attr, Int8Linear(module))
    return quantized


def use_cuda_graphs(model, enabled):
    """--cuda_graphs 1: on a CUDA device, eval-mode decoding steps replayed from CUDA graphs (models.accel.cuda_graphs);
    off elsewhere (on the CPU the graphed step would be the flat step on padded tensors: no gain). Returns whether
    they are on."""
    on = bool(enabled) and next(model.parameters()).device.type == 'cuda'
    model.cuda_graphs = on
    return on


def apply_eval_options(model, quantize='', compile=False):
    """eval.py / eval_cocotest.py after loading the checkpoint: quantize 'int8' (--quantize), then compile
    (--compile 1: decoding step and encoder). Returns the model to evaluate (a quantized copy, or model itself)."""
    quantize = quantize or ''
    if quantize not in ('', 'none', 'int8'):
        raise SaticError(f"--quantize {quantize!r}: use int8 (dynamic int8 linear layers, CPU) or leave it out")
    if quantize == 'int8':
        if next(model.parameters()).device.type != 'cpu':
            raise SaticError('--quantize int8 runs on the CPU only: add --device cpu')
        model = quantize_int8(model)
    if compile:
        compile_model(model, training=False)
    return model
