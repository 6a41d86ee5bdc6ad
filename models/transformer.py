"""Transformer building blocks: the Annotated Transformer, as the reference code used it.

Class and attribute names (`linears`, `sublayer`, `a_2`, `lut`, `pe`, `proj`, ...) are the checkpoint format of
the released models, so they stay as they are. On top of the reference's full-sequence `forward` methods, the
decoder layer has a `step` method that runs only the newest positions against cached keys/values
(`models.cache`, fairseq-style incremental decoding, same numbers), and the encoder runs on packed rows (the real
regions only, `models.masks.Packing`).

Shapes: B images, S decoding rows (B or B*beam), N regions, T tokens, D d_model, H heads, dk = D / H.
Masks are boolean, True = may attend, broadcastable to (B, H, T_query, T_key).
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


def linear(module, x):
    """module(x) for a linear layer without the module-call machinery (a few microseconds per call, ~40 calls per
    decoding step): F.linear for an nn.Linear, its forward for another (e.g. models.speed.Int8Linear); module
    hooks are not called."""
    if type(module) is nn.Linear:
        return F.linear(x, module.weight, module.bias)
    return module.forward(x)


def clones(module, n):
    """n independent deep copies of a module."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


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


class _ReferenceLayerNorm(torch.autograd.Function):
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


def reference_layer_norm(x, a, b, eps):
    """The reference layer norm, a * (x - mean) / (std + eps) + b with the UNBIASED std, in few passes.

    Under torch.compile the plain formula (inductor fuses it into one kernel); with gradients the hand-written
    backward above; without, centre + norm (see _center_and_std), then a * centred / (std + eps) + b.
    """
    # Under autocast (--bf16/--fp16) x arrives in half precision: normalise in the parameters' dtype (float32), as
    # autocast runs torch's layer_norm; in float16 a zero row's 1 / (0 + eps) = 1e6 would overflow to inf.
    x = x.to(a.dtype)
    if torch.compiler.is_compiling():
        std, mean = torch.std_mean(x, dim=-1, keepdim=True)
        return a * (x - mean) / (std + eps) + b
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad):
        return _ReferenceLayerNorm.apply(x, a, b, eps)
    centred, std = _center_and_std(x)
    # the reference's order of operations, a * (x - mean) then / (std + eps), then + b. This runs 19 times per
    # decoding step: eps as a 0-dim tensor of x's dtype (the same float32 value) spares the scalar's wrapping and
    # type promotion (~6 us per call), the in-place add the new tensor of an out-of-place `std + eps`.
    return torch.addcdiv(b, centred.mul_(a), std.add_(_scalar_tensor(eps, std.dtype)))


_SCALARS = {}


def _scalar_tensor(value, dtype):
    """A cached 0-dim CPU tensor holding value (adds and multiplies by it round exactly as by the Python float)."""
    key = (value, dtype)
    if key not in _SCALARS:
        with torch.inference_mode(False):  # a plain tensor, usable inside and outside inference mode
            _SCALARS[key] = torch.tensor(value, dtype=dtype)
    return _SCALARS[key]


class LayerNorm(nn.Module):
    """The reference layer norm: a_2 * (x - mean) / (std + eps) + b_2, with the UNBIASED std."""

    def __init__(self, features, eps=1e-6):
        super().__init__()
        self.a_2 = nn.Parameter(torch.ones(features))
        self.b_2 = nn.Parameter(torch.zeros(features))
        self.eps = eps

    def forward(self, x):
        # reference quirk: eps is added to the unbiased std, not to the variance (differs from nn.LayerNorm).
        return reference_layer_norm(x, self.a_2, self.b_2, self.eps)


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


class SublayerConnection(nn.Module):
    """Residual connection around a sublayer: x + dropout(sublayer(norm(x))) (norm first, as opposed to last)."""

    def __init__(self, size, dropout):
        super().__init__()
        self.norm = LayerNorm(size)
        self.dropout = Dropout(dropout)

    def forward(self, x, sublayer):
        return x + self.dropout(sublayer(self.norm(x)))

    def residual(self, x, y):
        """x + dropout(y), skipping the identity dropout call in eval mode (a little less per decoding step)."""
        return x + self.dropout(y) if self.training else x + y


def attention(q, k, v, mask=None, dropout_p=0.0):
    """Softmax attention of queries (B, H, Tq, dk) over keys/values (B, H, Tk, dk) -> (B, H, Tq, dk).

    mask: boolean, True = may attend, broadcastable to (B, H, Tq, Tk); masked scores get no weight at all, as the
    reference's -1e9 fill did (no row is ever fully masked). Without dropout torch's fused kernel; with attention
    dropout on CPU, where torch has no fused kernel and its fallback adds full-size mask conversions and
    fully-masked-row checks, the four plain steps (scores, masked softmax, dropout, weighted sum).
    """
    if dropout_p == 0.0 or q.device.type != 'cpu' or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(1.0 / math.sqrt(q.size(-1)))  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill_(~mask, float('-inf'))
    return torch.matmul(dropout(torch.softmax(scores, dim=-1), dropout_p), v)


class MultiHeadedAttention(nn.Module):
    """Scaled dot-product attention over H heads; linears 0..3 project query, key, value and output."""

    def __init__(self, h, d_model, dropout=0.1):
        super().__init__()
        assert d_model % h == 0, f'd_model {d_model} is not divisible by {h} heads'
        self.d_k = d_model // h
        self.h = h
        self.linears = clones(nn.Linear(d_model, d_model), 4)
        self.dropout = Dropout(p=dropout)
        self._fused = {}  # inference only: concatenated projection weights, keyed by the weights' versions
        # optional modules computing several projections at once, keyed like `which` below (e.g. (0, 1, 2) ->
        # an int8 layer over the concatenated q|k|v weights, set by models.speed.quantize_int8)
        self.fused_projections = {}

    @property
    def dropout_p(self):
        return self.dropout.p if self.training else 0.0

    def split_heads(self, x):
        """(B, T, D) -> (B, H, T, dk)."""
        return x.view(x.size(0), -1, self.h, self.d_k).transpose(1, 2)

    def merge_heads(self, x):
        """(B, H, T, dk) -> (B, T, D)."""
        return x.transpose(1, 2).reshape(x.size(0), -1, self.h * self.d_k)

    def project(self, x, which):
        """x (..., D) through the linears `which` (e.g. (0, 1, 2) = query, key, value) -> a tuple of (..., D)."""
        return self.project_concat(x, which).split(self.h * self.d_k, dim=-1)

    def project_concat(self, x, which):
        """x (..., D) through the linears `which` -> their outputs side by side (..., len(which) * D).

        One matrix product with the weights concatenated when the linears are plain nn.Linear (one larger GEMM,
        fewer calls), or fused_projections[which] where set; per-module calls otherwise (e.g. compiled)."""
        linears = [self.linears[i] for i in which]
        if len(linears) == 1:
            return linear(linears[0], x)
        if which in self.fused_projections:
            return self.fused_projections[which](x)
        if torch.compiler.is_compiling() or not all(type(m) is nn.Linear for m in linears):
            return torch.cat([m(x) for m in linears], dim=-1)  # compiled: no weight concatenation in the graph
        weight, bias = self._fused_weights(which, linears)
        return F.linear(x, weight, bias)

    def _fused_weights(self, which, linears):
        if torch.is_grad_enabled():
            # training: concatenated anew each call, so that the gradient reaches each linear's parameters
            return torch.cat([m.weight for m in linears]), torch.cat([m.bias for m in linears])
        key = tuple((m.weight.data_ptr(), m.weight._version, m.bias.data_ptr(), m.bias._version) for m in linears)
        cached = self._fused.get(which)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, torch.cat([m.weight for m in linears]), torch.cat([m.bias for m in linears]))
            self._fused[which] = cached
        return cached[1], cached[2]

    def _apply(self, fn, *args, **kwargs):
        self._fused = {}  # .to() / .half() / ...: rebuild the concatenated weights from the new parameters
        return super()._apply(fn, *args, **kwargs)

    def project_query(self, query):
        """(B, T, D) -> (B, H, T, dk)."""
        return self.split_heads(linear(self.linears[0], query))

    def project_key_value(self, key, value):
        """(B, T, D) twice -> keys and values (B, H, T, dk) each."""
        if key is value:
            k, v = self.project(key, (1, 2))
            return self.split_heads(k), self.split_heads(v)
        return self.split_heads(self.linears[1](key)), self.split_heads(self.linears[2](value))

    def attend(self, q, k, v, mask=None):
        """Queries (B, H, Tq, dk) over keys/values (B, H, Tk, dk) -> (B, Tq, D) after the output projection."""
        return linear(self.linears[3], self.merge_heads(attention(q, k, v, mask, self.dropout_p)))

    def forward(self, query, key, value, mask=None):
        """query (B, Tq, D), key/value (B, Tk, D), mask (B, 1 or Tq, Tk) -> (B, Tq, D)."""
        if mask is not None:
            mask = mask.unsqueeze(1)  # same mask for every head
        if query is key and key is value:  # self-attention: one projection for q, k and v
            q, k, v = (self.split_heads(t) for t in self.project(query, (0, 1, 2)))
            return self.attend(q, k, v, mask)
        k, v = self.project_key_value(key, value)
        return self.attend(self.project_query(query), k, v, mask)

    def packed_self_attention(self, x, packing):
        """Self-attention of packed rows x (M, D) (the real positions of packing's (B, N) batch) -> (M, D).

        Projections run on the M real rows only; queries, keys and values are scattered into the padded
        (B, H, N, dk) layout for the attention itself, masked by packing.attn_mask, and gathered back; with
        packing.groups, per group of images padded to the group's own length."""
        qkv = self.project_concat(x, (0, 1, 2))  # (M, 3D)
        if not packing.groups:
            return linear(self.linears[3], self._padded_self_attention(qkv, packing))
        out = qkv.new_empty(qkv.size(0), self.h * self.d_k)  # (M, D): every row is written by one group
        for group in packing.groups:
            out.index_copy_(0, group.rows, self._padded_self_attention(qkv.index_select(0, group.rows), group))
        return linear(self.linears[3], out)

    def _padded_self_attention(self, qkv, packing):
        """Packed q|k|v rows (M, 3D) -> attention outputs (M, D) before the output projection."""
        qkv = packing.pad(qkv)  # (B, N, 3D)
        b, n = qkv.shape[:2]
        q, k, v = qkv.view(b, n, 3, self.h, self.d_k).permute(2, 0, 3, 1, 4)  # (B, H, N, dk) each
        y = attention(q, k, v, packing.attn_mask, self.dropout_p)  # (B, H, N, dk)
        return packing.unpad(y.transpose(1, 2))  # (M, D)

    def memory_key_value(self, memory, packing):
        """Cross-attention keys/values of packed memory rows (M, D): a list of (key, value, mask, group) per group
        of images (one, group None, without packing.groups): keys/values (B_g, H, N_g, dk), zero at padding,
        mask (B_g, 1, 1, N_g) or None; group the models.masks.Packing of the group (its .images)."""
        kv = self.project_concat(memory, (1, 2))  # (M, 2D)
        if not packing.groups:
            return [self._padded_key_value(kv, packing) + (packing.attn_mask, None)]
        return [self._padded_key_value(kv.index_select(0, group.rows), group) + (group.attn_mask, group)
                for group in packing.groups]

    def _padded_key_value(self, kv, packing):
        kv = packing.pad(kv)  # (B, N, 2D)
        b, n = kv.shape[:2]
        k, v = kv.view(b, n, 2, self.h, self.d_k).permute(2, 0, 3, 1, 4)  # (B, H, N, dk) each
        return k, v

    def attend_memory(self, q, memory, fold=1):
        """Queries q (S, H, Tq, dk) over per-image memory keys/values (memory_key_value's list), S = B * fold rows
        (the fold rows of an image follow each other: beams, or an image's captions) -> (S, Tq, D).

        The rows of an image are folded into the query axis instead of copying the memory per row."""
        if len(memory) == 1 and memory[0][3] is None:
            key, value, mask, _ = memory[0]
            return linear(self.linears[3], self._attend_folded(q, key, value, mask, fold))
        rows, _, tq, _ = q.shape
        out = q.new_empty(rows, tq, self.h * self.d_k)  # (S, Tq, D): every row is written by one group
        for key, value, mask, group in memory:
            index = group.query_rows(fold)  # (S_g,)
            out.index_copy_(0, index, self._attend_folded(q.index_select(0, index), key, value, mask, fold))
        return linear(self.linears[3], out)

    def _attend_folded(self, q, memory_key, memory_value, memory_mask, fold):
        rows, heads, tq, dk = q.shape
        if fold > 1:
            q = q.view(-1, fold, heads, tq, dk).transpose(1, 2).reshape(-1, heads, fold * tq, dk)  # (B, H, f*Tq, dk)
        y = attention(q, memory_key, memory_value, memory_mask, self.dropout_p)  # (B, H, f*Tq, dk)
        if fold > 1:
            y = y.view(-1, heads, fold, tq, dk).transpose(1, 2)  # (B, f, H, Tq, dk)
        return y.reshape(rows, heads, tq, dk).transpose(1, 2).reshape(rows, tq, heads * dk)  # (S, Tq, D)


class PositionwiseFeedForward(nn.Module):
    """FFN(x) = w_2(dropout(relu(w_1(x))))."""

    def __init__(self, d_model, d_ff, dropout=0.1):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x):
        h = F.relu(linear(self.w_1, x), inplace=True)  # in place on the linear's fresh output (autograd needs only it)
        return linear(self.w_2, self.dropout(h) if self.training else h)


class Embeddings(nn.Module):
    """Word embedding scaled by sqrt(d_model)."""

    def __init__(self, d_model, vocab):
        super().__init__()
        self.lut = nn.Embedding(vocab, d_model)
        self.d_model = d_model

    def forward(self, x):
        return self.lut(x).mul_(math.sqrt(self.d_model))  # in place on the lookup's fresh output


class PositionalEncoding(nn.Module):
    """Adds the sinusoidal encoding of absolute positions start, start+1, ... then dropout."""

    def __init__(self, d_model, dropout, max_len=5000):
        super().__init__()
        self.dropout = Dropout(p=dropout)
        position = torch.arange(max_len, dtype=torch.float).unsqueeze(1)  # (max_len, 1)
        div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float) * -(math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer('pe', pe.unsqueeze(0))  # (1, max_len, D); persistent: it is in the checkpoints

    def forward(self, x, start=0):
        """x (B, T, D) holding positions start .. start+T-1; start may be a (T,) tensor of the positions."""
        if torch.is_tensor(start):
            return self.dropout(x + self.pe[0].index_select(0, start))
        return self.dropout(x + self.pe[:, start:start + x.size(1)])


class Generator(nn.Module):
    """Linear projection to the vocabulary, then log-softmax."""

    def __init__(self, d_model, vocab):
        super().__init__()
        self.proj = nn.Linear(d_model, vocab)

    def forward(self, x):
        return F.log_softmax(linear(self.proj, x), dim=-1)


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each in a pre-norm residual."""

    def __init__(self, size, self_attn, feed_forward, dropout):
        super().__init__()
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.sublayer = clones(SublayerConnection(size, dropout), 2)
        self.size = size

    def forward(self, x, mask):
        x = self.sublayer[0](x, lambda y: self.self_attn(y, y, y, mask))
        return self.sublayer[1](x, self.feed_forward)

    def forward_packed(self, x, packing):
        """The real regions only: x (M, D) packed rows of packing's padded batch -> (M, D) (same numbers)."""
        attn, ff = self.sublayer
        x = attn.residual(x, self.self_attn.packed_self_attention(attn.norm(x), packing))
        return ff.residual(x, self.feed_forward(ff.norm(x)))


class Encoder(nn.Module):
    """N encoder layers, then a final norm."""

    def __init__(self, layer, n):
        super().__init__()
        self.layers = clones(layer, n)
        self.norm = LayerNorm(layer.size)

    def forward(self, x, mask):
        """x (B, N, D), mask (B, 1, N) -> memory (B, N, D)."""
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)

    def forward_packed(self, x, packing):
        """x (M, D): the real regions of a padded batch (models.masks.Packing) -> memory rows (M, D)."""
        for layer in self.layers:
            x = layer.forward_packed(x, packing)
        return self.norm(x)


class DecoderLayer(nn.Module):
    """Masked self-attention, attention over the encoder memory, feed-forward; each in a pre-norm residual."""

    def __init__(self, size, self_attn, src_attn, feed_forward, dropout):
        super().__init__()
        self.size = size
        self.self_attn = self_attn
        self.src_attn = src_attn
        self.feed_forward = feed_forward
        self.sublayer = clones(SublayerConnection(size, dropout), 3)

    def forward(self, x, memory, src_mask, tgt_mask):
        """Full sequence (the reference way): x (S, T, D), memory (S, N, D)."""
        x = self.sublayer[0](x, lambda y: self.self_attn(y, y, y, tgt_mask))
        x = self.sublayer[1](x, lambda y: self.src_attn(y, memory, memory, src_mask))
        return self.sublayer[2](x, self.feed_forward)

    def forward_memory_kv(self, x, memory, tgt_mask, fold=1):
        """Full sequence x (S, T, D) with the memory's keys/values already projected (MultiHeadedAttention.
        memory_key_value), S = B * fold (the rows of an image follow each other), tgt_mask (S or 1, T, T)."""
        sub = self.sublayer
        x = sub[0](x, lambda y: self.self_attn(y, y, y, tgt_mask))
        h = sub[1].norm(x)
        x = sub[1].residual(x, self.src_attn.attend_memory(self.src_attn.project_query(h), memory, fold))
        return sub[2].residual(x, self.feed_forward(sub[2].norm(x)))

    def step(self, x, layer_cache, positions, self_mask, beam):
        """Only the newest positions: x (S, Tn, D) -> (S, Tn, D), their keys/values added to layer_cache (a
        models.cache.StepBuffers, which also holds the memory keys/values).

        The new positions see every cached position and each other (the block mask has no zero there);
        self_mask (1, 1, 1, capacity) hides the cache's unfilled positions (None: the cache holds exactly the
        positions so far). S = B * beam rows share each image's memory.
        """
        attn, sub = self.self_attn, self.sublayer[0]
        h = sub.norm(x)
        q, k, v = (attn.split_heads(t) for t in attn.project(h, (0, 1, 2)))  # (S, H, Tn, dk) each
        k, v = layer_cache.append(k, v, positions)  # (S, H, T or capacity, dk) each
        x = sub.residual(x, attn.attend(q, k, v, self_mask))

        attn, sub = self.src_attn, self.sublayer[1]
        q = attn.project_query(sub.norm(x))  # (S, H, Tn, dk)
        x = sub.residual(x, attn.attend_memory(q, layer_cache.memory, beam))
        sub = self.sublayer[2]
        return sub.residual(x, self.feed_forward(sub.norm(x)))


class Decoder(nn.Module):
    """N decoder layers, then a final norm."""

    def __init__(self, layer, n):
        super().__init__()
        self.layers = clones(layer, n)
        self.norm = LayerNorm(layer.size)

    def forward(self, x, memory, src_mask, tgt_mask):
        """x (S, T, D), memory (S, N, D), src_mask (S, 1, N), tgt_mask (S or 1, T, T) -> (S, T, D)."""
        for layer in self.layers:
            x = layer(x, memory, src_mask, tgt_mask)
        return self.norm(x)

    def forward_memory_kv(self, x, memory_kv, tgt_mask, fold=1):
        """x (S, T, D) with each layer's memory keys/values (MultiHeadedAttention.memory_key_value) -> (S, T, D);
        S = B * fold."""
        for layer, memory in zip(self.layers, memory_kv):
            x = layer.forward_memory_kv(x, memory, tgt_mask, fold)
        return self.norm(x)


class EncoderDecoder(nn.Module):
    """The encoder, the decoder, the target embedding (words + positions) and the generator."""

    def __init__(self, encoder, decoder, tgt_embed, generator):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.tgt_embed = tgt_embed  # nn.Sequential(Embeddings, PositionalEncoding)
        self.generator = generator

    def encode(self, src, src_mask):
        """Embedded regions (B, N, D), mask (B, 1, N) -> memory (B, N, D); regions get no positional encoding."""
        return self.encoder(src, src_mask)

    def embed(self, tokens, start=0):
        """Token ids (S, T) at absolute positions start.. (or the (T,) positions tensor start) -> (S, T, D)."""
        words, positions = self.tgt_embed
        return positions(words(tokens), start)

    def decode(self, memory, src_mask, tgt, tgt_mask):
        """Whole target prefix tgt (S, T) -> decoder states (S, T, D)."""
        return self.decoder(self.embed(tgt), memory, src_mask, tgt_mask)

    def forward(self, src, tgt, src_mask, tgt_mask):
        return self.decode(self.encode(src, src_mask), src_mask, tgt, tgt_mask)


def make_model(tgt_vocab, n=6, d_model=512, d_ff=2048, h=8, dropout=0.1):
    """The reference builder: an EncoderDecoder with xavier-uniform init of every matrix."""
    c = copy.deepcopy
    attn = MultiHeadedAttention(h, d_model, dropout)
    ff = PositionwiseFeedForward(d_model, d_ff, dropout)
    model = EncoderDecoder(
        Encoder(EncoderLayer(d_model, c(attn), c(ff), dropout), n),
        Decoder(DecoderLayer(d_model, c(attn), c(attn), c(ff), dropout), n),
        nn.Sequential(Embeddings(d_model, tgt_vocab), PositionalEncoding(d_model, dropout)),
        Generator(d_model, tgt_vocab))
    for p in model.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    return model
