"""Speed kernels under models.transformer: the same numbers as the formulas there, in fewer passes or calls.

models/transformer.py reads as the paper's model and calls these where the plain PyTorch form is slow (mostly
on the CPU, mostly per decoding step). Each one, and the equivalence that makes it safe (each has a test in
tests/test_kernels.py):

- `linear(module, x)`: F.linear on an nn.Linear's parameters without the module call (hooks on the linear are
  not run; this project sets none). The call nn.Linear makes itself: the same numbers.
- `layer_norm(x, a, b, eps)`: the reference layer norm a * (x - mean) / (std + eps) + b (unbiased std) with a
  hand-written backward and, without gradients, a centre + vector-norm forward. The forward is the formula's
  order of operations; the backward is the formula's gradient (gradcheck in float64; std = 0 rows as torch's).
- `dropout(x, p, training)` / `Dropout`: the dropout mask drawn as 31-bit integers compared with p * 2^31 on the
  CPU (bernoulli_ is slow there): the same distribution to 2^-31, other random values than torch's. CUDA and
  compiled graphs use torch's own.
- `scaled_dot_product_attention`: torch's fused kernel, except with attention dropout on the CPU (where torch
  has no fused kernel) and for decoding steps from a few rows on (`few_queries`: one or two queries per row, where
  the fused CPU kernel is slower) the plain steps; masked positions get no weight either way.
- `project_concat(attn, x, which)`: several of a MultiHeadedAttention's projections (q|k|v, k|v) as one matrix
  product over their concatenated weights (cached at inference, keyed by the weights' versions). Each output
  column is the same dot product as the separate linear's.
- `packed_self_attention`, `memory_key_value`, `attend_memory`: attention over packed rows (the real regions
  only, models.masks.Packing, optionally per group of images of similar region counts), and each image's
  several decoding rows (beams, captions) folded onto one copy of its memory keys/values. Padding never
  reaches a real position (it is masked), so the real rows are those of the padded computation.

Shapes: S rows, M packed rows, N regions, T tokens, D d_model, H heads, dk = D / H.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def linear(module, x):
    """module(x) for a linear layer without the module-call machinery (a few microseconds per call, ~40 calls per
    decoding step): F.linear for an nn.Linear, its forward for another (e.g. models.accel.speed.Int8Linear); module
    hooks are not called."""
    if type(module) is nn.Linear:
        return F.linear(x, module.weight, module.bias)
    return module.forward(x)


# ---- layer norm -----------------------------------------------------------------------------------------------
def _center_and_std(x):
    """x - mean and the unbiased std over the last dim (both keepdim).

    torch.std_mean is a slow Welford kernel on CPU (about 4 us per 512-wide row); mean, subtract and a vector
    norm of the centred rows are about 6x faster from a few rows on, and the centred rows are needed anyway.
    A few rows (batch-1 decoding, K of them) are cheaper in one call than in the five of the other way."""
    if x.numel() <= 8 * x.size(-1):
        std, mean = torch.std_mean(x, dim=-1, keepdim=True)
        return x - mean, std
    centred = x - x.mean(dim=-1, keepdim=True)
    return centred, torch.linalg.vector_norm(centred, dim=-1, keepdim=True).div_(math.sqrt(x.size(-1) - 1))


class _LayerNormFunction(torch.autograd.Function):
    """a * (x - mean) / (std + eps) + b with the unbiased std, and its gradient written out by hand.

    Autograd of the plain formula records std_mean, sub, add, div and addcmul and runs about twice as many
    full-size passes backwards; here the forward keeps only xhat = (x - mean) / (std + eps) and the backward is
      g_xhat = g * a,  dx = (g_xhat - mean(g_xhat)) / (std + eps) - xhat * sum(g_xhat * xhat) / ((D - 1) * std)
    (the std term is 0 where std = 0, as torch's own std backward).
    """

    @staticmethod
    def forward(ctx, x, a, b, eps):
        centred, std = _center_and_std(x)
        inv = (std + eps).reciprocal_()
        xhat = centred.mul_(inv)
        ctx.save_for_backward(xhat, inv, std, a)
        return torch.addcmul(b, a, xhat)

    @staticmethod
    def backward(ctx, grad):
        xhat, inv, std, a = ctx.saved_tensors
        d = xhat.size(-1)
        g = grad * a
        dot = torch.linalg.vecdot(g, xhat).unsqueeze(-1)  # (..., 1)
        coef = torch.where(std > 0, dot / std, 0.0).mul_(-1.0 / (d - 1))  # (..., 1)
        dx = torch.addcmul(g.mean(-1, keepdim=True).mul_(inv).neg_(), xhat, coef).addcmul_(g, inv)
        flat = grad.reshape(-1, d)
        da = (flat * xhat.reshape(-1, d)).sum(0).to(a.dtype) if ctx.needs_input_grad[1] else None
        db = flat.sum(0).to(a.dtype) if ctx.needs_input_grad[2] else None
        return dx.to(xhat.dtype), da, db, None


def layer_norm(x, a, b, eps):
    """The reference layer norm, a * (x - mean) / (std + eps) + b with the UNBIASED std, in few passes.

    Under torch.compile the plain formula (inductor fuses it into one kernel); with gradients the hand-written
    backward above; without, layer_norm_inference.
    """
    if torch.compiler.is_compiling():
        x = x.to(a.dtype)
        std, mean = torch.std_mean(x, dim=-1, keepdim=True)
        return a * (x - mean) / (std + eps) + b
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad):
        return _LayerNormFunction.apply(x.to(a.dtype), a, b, eps)
    return layer_norm_inference(x, a, b, eps)


def layer_norm_inference(x, a, b, eps):
    """layer_norm without gradients: centre + norm (see _center_and_std), then a * centred / (std + eps) + b."""
    # Under autocast (--bf16/--fp16) x arrives in half precision: normalise in the parameters' dtype (float32), as
    # autocast runs torch's layer_norm; in float16 a zero row's 1 / (0 + eps) = 1e6 would overflow to inf.
    centred, std = _center_and_std(x if x.dtype == a.dtype else x.to(a.dtype))  # (.to costs ~4 us even as a no-op)
    # the reference's order of operations, a * (x - mean) then / (std + eps), then + b. This runs 19 times per
    # decoding step: eps as a 0-dim tensor of x's dtype (the same float32 value) spares the scalar's wrapping and
    # type promotion (~6 us per call), the in-place add the new tensor of an out-of-place `std + eps`.
    return torch.addcdiv(b, centred.mul_(a), std.add_(_scalar_tensor(eps, std.dtype)))


_SCALARS = {}  # (value, dtype) -> 0-dim tensor: constants, the same for every model


def _scalar_tensor(value, dtype):
    """A cached 0-dim CPU tensor holding value (adds and multiplies by it round exactly as by the Python float)."""
    key = (value, dtype)
    if key not in _SCALARS:
        with torch.inference_mode(False):  # a plain tensor, usable inside and outside inference mode
            _SCALARS[key] = torch.tensor(value, dtype=dtype)
    return _SCALARS[key]


# ---- dropout --------------------------------------------------------------------------------------------------
def dropout(x, p, training=True):
    """F.dropout(x, p, training): zero each element with probability p, scale the rest by 1 / (1 - p).

    On CPU, torch draws its mask with bernoulli_, which is slow; here one 31-bit random integer per element is
    compared with p * 2^31 (the same probability, to 2^-31) and the mask is kept as the float scale factors, so the
    backward is one multiplication: about 1.6x faster forward + backward. Elsewhere (CUDA, compiled) torch's own.
    """
    if not training or p == 0.0:
        return x
    if p >= 1.0 or x.device.type != 'cpu' or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    keep = torch.empty(x.shape, dtype=torch.int32).random_() >= int(round(p * 2 ** 31))  # [0, 2^31) uniform
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """nn.Dropout with the faster CPU mask above (no parameters: checkpoints are unchanged)."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


# ---- attention ------------------------------------------------------------------------------------------------
def scaled_dot_product_attention(q, k, v, mask=None, dropout_p=0.0):
    """softmax(q k^T / sqrt(dk)) v for q (B, H, Tq, dk), k/v (B, H, Tk, dk), boolean mask (True = may attend)
    -> (B, H, Tq, dk).

    Without dropout torch's fused kernel; with attention dropout on CPU, where torch has no fused kernel and its
    fallback adds full-size mask conversions and fully-masked-row checks, the four plain steps (scores, masked
    softmax, dropout, weighted sum)."""
    if dropout_p == 0.0 and q.device.type == 'cpu' and few_queries(q) and not torch.compiler.is_compiling():
        return _plain_attention(q, k, v, mask)  # decoding steps at batch > 1 (see few_queries)
    if dropout_p == 0.0 or q.device.type != 'cpu' or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return _plain_attention(q, k, v, mask, dropout_p)


# Decoding steps (a few queries per row) on the CPU attend with the plain steps from this many rows on: torch's
# fused CPU kernel splits its work into query blocks and is tuned for long queries; for one or two queries per row
# over 10-100 keys it costs 1.1-2.5x the plain matmul/softmax/matmul (bench/README.md, issue 30) and, with a boolean
# mask, converts the mask at every call. Below it (batch 1) the fused kernel is a few microseconds faster.
# bench/step_attention.py sets it to compare both (a large value: the fused kernel always).
PLAIN_ATTENTION_MIN_ROWS = 4
PLAIN_ATTENTION_MAX_QUERIES = 4


def few_queries(q):
    """Whether q (B, H, Tq, dk) is a decoding step's queries that the plain steps attend faster (no gradients)."""
    return (q.size(-2) <= PLAIN_ATTENTION_MAX_QUERIES and q.size(0) >= PLAIN_ATTENTION_MIN_ROWS
            and not (torch.is_grad_enabled() and q.requires_grad))


def _plain_attention(q, k, v, mask=None, dropout_p=0.0):
    """The four plain steps: scores, masked softmax, dropout, weighted sum (masked scores get no weight)."""
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(1.0 / math.sqrt(q.size(-1)))  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill_(~mask, float('-inf'))
    return torch.matmul(dropout(torch.softmax(scores, dim=-1), dropout_p), v)


def project_concat(attn, x, which):
    """x (..., D) through the MultiHeadedAttention attn's linears `which` (e.g. (0, 1, 2) = query, key, value)
    -> their outputs side by side (..., len(which) * D).

    One matrix product with the weights concatenated when the linears are plain nn.Linear (one larger GEMM,
    fewer calls), or attn.fused_projections[which] where set (models.accel.speed.quantize_int8); per-module calls
    otherwise (e.g. compiled)."""
    if len(which) == 1:
        return linear(attn.linears[which[0]], x)
    projection = concatenated_projection(attn, which)
    if projection is None:  # compiled: no weight concatenation in the graph
        return torch.cat([attn.linears[i](x) for i in which], dim=-1)
    if type(projection) is tuple:
        return F.linear(x, *projection)
    return projection(x)


def concatenated_projection(attn, which):
    """attn's linears `which` (several) as one: attn.fused_projections[which] (a module) where set, else the
    concatenated (weight, bias) of plain nn.Linear (fused_weights), else None (compiled, or other modules: call
    each one)."""
    if which in attn.fused_projections:
        return attn.fused_projections[which]
    linears = [attn.linears[i] for i in which]
    if torch.compiler.is_compiling() or not all(type(m) is nn.Linear for m in linears):
        return None
    return fused_weights(attn._fused, which, linears)


def fused_weights(cache, which, linears):
    """The linears' weights (len * D, D) and biases concatenated: anew with gradients (so that they reach each
    linear's parameters), else from cache (which -> (key, weight, bias)), rebuilt when a weight changed."""
    if torch.is_grad_enabled():
        return torch.cat([m.weight for m in linears]), torch.cat([m.bias for m in linears])
    key = tuple((m.weight.data_ptr(), m.weight._version, m.bias.data_ptr(), m.bias._version) for m in linears)
    cached = cache.get(which)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.cat([m.weight for m in linears]), torch.cat([m.bias for m in linears]))
        cache[which] = cached
    return cached[1], cached[2]


# ---- attention over packed rows (real regions only) and folded memory -----------------------------------------
def packed_self_attention(attn, x, packing):
    """attn's self-attention of packed rows x (M, D) (the real positions of packing's (B, N) batch) -> (M, D).

    Projections run on the M real rows only; queries, keys and values are scattered into the padded
    (B, H, N, dk) layout for the attention itself, masked by packing.attn_mask, and gathered back; with
    packing.groups, per group of images padded to the group's own length."""
    qkv = project_concat(attn, x, (0, 1, 2))  # (M, 3D)
    if not packing.groups:
        return linear(attn.linears[3], _padded_self_attention(attn, qkv, packing))
    out = qkv.new_empty(qkv.size(0), attn.h * attn.d_k)  # (M, D): every row is written by one group
    for group in packing.groups:
        out.index_copy_(0, group.rows, _padded_self_attention(attn, qkv.index_select(0, group.rows), group))
    return linear(attn.linears[3], out)


def _padded_self_attention(attn, qkv, packing):
    """Packed q|k|v rows (M, 3D) -> attention outputs (M, D) before the output projection."""
    qkv = packing.pad(qkv)  # (B, N, 3D)
    b, n = qkv.shape[:2]
    q, k, v = qkv.view(b, n, 3, attn.h, attn.d_k).permute(2, 0, 3, 1, 4)  # (B, H, N, dk) each
    y = scaled_dot_product_attention(q, k, v, packing.attn_mask, attn.dropout_p)  # (B, H, N, dk)
    return packing.unpad(y.transpose(1, 2))  # (M, D)


def memory_key_value(attn, memory, packing):
    """attn's (a cross-attention's) keys/values of packed memory rows (M, D), projected once: a list of
    (key, value, mask, group) per group of images (one, group None, without packing.groups): keys/values
    (B_g, H, N_g, dk), zero at padding, mask (B_g, 1, 1, N_g) or None; group the models.masks.Packing of the
    group (its .images)."""
    kv = project_concat(attn, memory, (1, 2))  # (M, 2D)
    if not packing.groups:
        return [_padded_key_value(attn, kv, packing) + (packing.attn_mask, None)]
    return [_padded_key_value(attn, kv.index_select(0, group.rows), group) + (group.attn_mask, group)
            for group in packing.groups]


def _padded_key_value(attn, kv, packing):
    kv = packing.pad(kv)  # (B, N, 2D)
    b, n = kv.shape[:2]
    k, v = kv.view(b, n, 2, attn.h, attn.d_k).permute(2, 0, 3, 1, 4)  # (B, H, N, dk) each
    return k, v


def attend_memory(attn, q, memory, rows_per_image=1):
    """Queries q (S, H, Tq, dk) over per-image memory keys/values (memory_key_value's list), S = B * rows_per_image
    rows (an image's rows follow each other: beams, or its captions) -> (S, Tq, D) after attn's output projection.

    The rows of an image are folded into the query axis instead of copying the memory per row."""
    return linear(attn.linears[3], attend_memory_rows(q, memory, rows_per_image, attn.dropout_p))


def attend_memory_rows(q, memory, rows_per_image=1, dropout_p=0.0):
    """attend_memory before the output projection: (S, Tq, D), the heads merged."""
    if len(memory) == 1 and memory[0][3] is None:
        key, value, mask, _ = memory[0]
        return _attend_folded(q, key, value, mask, rows_per_image, dropout_p)
    rows, heads, tq, dk = q.shape
    out = q.new_empty(rows, tq, heads * dk)  # (S, Tq, D): every row is written by one group
    for key, value, mask, group in memory:
        index = group.query_rows(rows_per_image)  # (S_g,)
        out.index_copy_(0, index, _attend_folded(q.index_select(0, index), key, value, mask, rows_per_image,
                                                 dropout_p))
    return out


def _attend_folded(q, memory_key, memory_value, memory_mask, rows_per_image, dropout_p):
    rows, heads, tq, dk = q.shape
    r = rows_per_image
    if r > 1:
        q = q.view(-1, r, heads, tq, dk).transpose(1, 2).reshape(-1, heads, r * tq, dk)  # (B, H, r*Tq, dk)
    y = scaled_dot_product_attention(q, memory_key, memory_value, memory_mask, dropout_p)  # (B, H, r*Tq, dk)
    if r > 1:
        y = y.view(-1, heads, r, tq, dk).transpose(1, 2)  # (B, r, H, Tq, dk)
    return y.reshape(rows, heads, tq, dk).transpose(1, 2).reshape(rows, tq, heads * dk)  # (S, Tq, D)
