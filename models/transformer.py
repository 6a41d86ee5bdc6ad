"""Transformer building blocks: the Annotated Transformer's classes, as the reference code used them.

Class and attribute names (`linears`, `sublayer`, `a_2`, `lut`, `pe`, `proj`, ...) are the checkpoint format of
the released models, so they stay as they are. Deviations from the paper (Vaswani et al. 2017) are marked where
they happen: the norm comes first in each residual ("pre-norm", the Annotated Transformer's choice), the layer
norm is the reference's (`# reference quirk:`), and image regions get no positional encoding.

On top of the reference's full-sequence `forward` methods, the decoder layer has a `step` method that runs only
the newest positions against cached keys/values (`models.cache`, fairseq-style incremental decoding, same
numbers), and the encoder runs on packed rows (the real regions only, `models.masks.Packing`). The speed kernels
these call (hand-written layer-norm backward, CPU dropout mask, fused projections, packed and folded attention)
are in models/accel/kernels.py, each the same numbers as the formula written here.

Shapes: B images, S decoding rows (B, or B * rows per image: beams or captions), N regions, T tokens, D d_model,
H heads, dk = D / H.
Masks are boolean, True = may attend, broadcastable to (B, H, T_query, T_key).
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.accel import kernels


def clones(module, n):
    """n independent deep copies of a module."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


class LayerNorm(nn.Module):
    """The reference layer norm: a_2 * (x - mean) / (std + eps) + b_2, with the UNBIASED std."""

    def __init__(self, features, eps=1e-6):
        super().__init__()
        self.a_2 = nn.Parameter(torch.ones(features))
        self.b_2 = nn.Parameter(torch.zeros(features))
        self.eps = eps

    def forward(self, x):
        # reference quirk: eps is added to the unbiased std, not to the variance (differs from nn.LayerNorm).
        return kernels.layer_norm(x, self.a_2, self.b_2, self.eps)  # this formula, in fewer passes


class SublayerConnection(nn.Module):
    """Residual connection around a sublayer: x + dropout(sublayer(norm(x))) (norm first, as opposed to last)."""

    def __init__(self, size, dropout):
        super().__init__()
        self.norm = LayerNorm(size)
        self.dropout = kernels.Dropout(dropout)

    def forward(self, x, sublayer):
        """x (..., D) -> (..., D)."""
        return x + self.dropout(sublayer(self.norm(x)))  # deviation from the paper: norm first (pre-norm)

    def residual(self, x, y):
        """x + dropout(y), skipping the identity dropout call in eval mode (a little less per decoding step)."""
        return x + self.dropout(y) if self.training else x + y


def attention(q, k, v, mask=None, dropout_p=0.0):
    """Scaled dot-product attention softmax(q k^T / sqrt(dk)) v: queries (B, H, Tq, dk) over keys/values
    (B, H, Tk, dk) -> (B, H, Tq, dk), dropout_p on the attention weights.

    mask: boolean, True = may attend, broadcastable to (B, H, Tq, Tk); masked scores get no weight at all, as the
    reference's -1e9 fill did (no row is ever fully masked)."""
    return kernels.scaled_dot_product_attention(q, k, v, mask, dropout_p)  # torch's fused kernel where it has one


class MultiHeadedAttention(nn.Module):
    """Scaled dot-product attention over H heads; linears 0..3 project query, key, value and output."""

    def __init__(self, h, d_model, dropout=0.1):
        super().__init__()
        assert d_model % h == 0, f'd_model {d_model} is not divisible by {h} heads'
        self.d_k = d_model // h
        self.h = h
        self.linears = clones(nn.Linear(d_model, d_model), 4)
        self.dropout = kernels.Dropout(p=dropout)
        # Speed only (models.accel.kernels.project_concat), not in the state_dict: the concatenated q|k|v and k|v
        # weights at inference, and modules computing such a concatenation at once, keyed like `which` (e.g.
        # (0, 1, 2) -> an int8 layer over the q|k|v weights, set by models.accel.speed.quantize_int8).
        self._fused = {}
        self.fused_projections = {}

    def _apply(self, fn, *args, **kwargs):
        self._fused = {}  # .to() / .half() / ...: rebuild the concatenated weights from the new parameters
        return super()._apply(fn, *args, **kwargs)

    @property
    def dropout_p(self):
        """Dropout on the attention weights: p in train mode, else 0."""
        return self.dropout.p if self.training else 0.0

    def split_heads(self, x):
        """(B, T, D) -> (B, H, T, dk)."""
        return x.view(x.size(0), -1, self.h, self.d_k).transpose(1, 2)

    def merge_heads(self, x):
        """(B, H, T, dk) -> (B, T, D)."""
        return x.transpose(1, 2).reshape(x.size(0), -1, self.h * self.d_k)

    def project(self, x, which):
        """x (..., D) through the linears `which` (e.g. (0, 1, 2) = query, key, value) -> a tuple of (..., D)."""
        return kernels.project_concat(self, x, which).split(self.h * self.d_k, dim=-1)  # one matrix product

    def project_query(self, query):
        """(B, T, D) -> (B, H, T, dk)."""
        return self.split_heads(kernels.linear(self.linears[0], query))

    def project_key_value(self, key, value):
        """(B, T, D) twice -> keys and values (B, H, T, dk) each."""
        if key is value:
            k, v = self.project(key, (1, 2))
            return self.split_heads(k), self.split_heads(v)
        return self.split_heads(self.linears[1](key)), self.split_heads(self.linears[2](value))

    def attend(self, q, k, v, mask=None):
        """Queries (B, H, Tq, dk) over keys/values (B, H, Tk, dk) -> (B, Tq, D) after the output projection."""
        return kernels.linear(self.linears[3], self.merge_heads(attention(q, k, v, mask, self.dropout_p)))

    def forward(self, query, key, value, mask=None):
        """query (B, Tq, D), key/value (B, Tk, D), mask (B, 1 or Tq, Tk) -> (B, Tq, D)."""
        if mask is not None:
            mask = mask.unsqueeze(1)  # same mask for every head
        if query is key and key is value:  # self-attention: one projection for q, k and v
            q, k, v = (self.split_heads(t) for t in self.project(query, (0, 1, 2)))
            return self.attend(q, k, v, mask)
        k, v = self.project_key_value(key, value)
        return self.attend(self.project_query(query), k, v, mask)


class PositionwiseFeedForward(nn.Module):
    """FFN(x) = w_2(dropout(relu(w_1(x))))."""

    def __init__(self, d_model, d_ff, dropout=0.1):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.dropout = kernels.Dropout(dropout)

    def forward(self, x):
        """x (..., D) -> (..., D)."""
        h = F.relu(kernels.linear(self.w_1, x), inplace=True)  # (..., d_ff); in place on the linear's fresh output
        return kernels.linear(self.w_2, self.dropout(h) if self.training else h)


class Embeddings(nn.Module):
    """Word embedding scaled by sqrt(d_model)."""

    def __init__(self, d_model, vocab):
        super().__init__()
        self.lut = nn.Embedding(vocab, d_model)
        self.d_model = d_model

    def forward(self, x):
        """Token ids (S, T) -> (S, T, D)."""
        return self.lut(x).mul_(math.sqrt(self.d_model))  # in place on the lookup's fresh output


class PositionalEncoding(nn.Module):
    """Adds the sinusoidal encoding of absolute positions start, start+1, ... then dropout."""

    def __init__(self, d_model, dropout, max_len=5000):
        super().__init__()
        self.dropout = kernels.Dropout(p=dropout)
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
        """(..., D) -> log-probs (..., V)."""
        return F.log_softmax(kernels.linear(self.proj, x), dim=-1)


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each in a pre-norm residual."""

    def __init__(self, size, self_attn, feed_forward, dropout):
        super().__init__()
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.sublayer = clones(SublayerConnection(size, dropout), 2)
        self.size = size

    def forward(self, x, mask):
        """x (B, N, D), mask (B, 1, N) -> (B, N, D)."""
        x = self.sublayer[0](x, lambda y: self.self_attn(y, y, y, mask))
        return self.sublayer[1](x, self.feed_forward)

    def forward_packed(self, x, packing):
        """The real regions only: x (M, D) packed rows of packing's padded batch -> (M, D) (same numbers)."""
        attn, ff = self.sublayer
        x = attn.residual(x, kernels.packed_self_attention(self.self_attn, attn.norm(x), packing))
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

    def forward_with_attention(self, x, memory, src_mask, tgt_mask):
        """forward, also returning the attention weights over the memory (S, H, T, N) (eval.py --dump_attention;
        plain matrix products, never the decoding path). src_mask (S, 1, N) or None; masked regions weigh 0."""
        x = self.sublayer[0](x, lambda y: self.self_attn(y, y, y, tgt_mask))
        attn, sub = self.src_attn, self.sublayer[1]
        q = attn.project_query(sub.norm(x))  # (S, H, T, dk)
        k, v = attn.project_key_value(memory, memory)  # (S, H, N, dk) each
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(attn.d_k)  # (S, H, T, N)
        if src_mask is not None:
            scores = scores.masked_fill(~src_mask.unsqueeze(1), float('-inf'))
        weights = torch.softmax(scores.float(), dim=-1)  # (S, H, T, N)
        y = kernels.linear(attn.linears[3], attn.merge_heads(torch.matmul(weights.to(v.dtype), v)))  # (S, T, D)
        x = sub.residual(x, y)
        return self.sublayer[2](x, self.feed_forward), weights

    def forward_memory_kv(self, x, memory, tgt_mask, rows_per_image=1):
        """Full sequence x (S, T, D) with the memory's keys/values already projected (models.accel.kernels.
        memory_key_value), S = B * rows_per_image (the rows of an image follow each other), tgt_mask (S or 1, T, T)."""
        sub = self.sublayer
        x = sub[0](x, lambda y: self.self_attn(y, y, y, tgt_mask))
        q = self.src_attn.project_query(sub[1].norm(x))  # (S, H, T, dk)
        x = sub[1].residual(x, kernels.attend_memory(self.src_attn, q, memory, rows_per_image))
        return sub[2].residual(x, self.feed_forward(sub[2].norm(x)))

    def step(self, x, layer_cache, positions, self_mask, rows_per_image):
        """Only the newest positions: x (S, Tn, D) -> (S, Tn, D), their keys/values added to layer_cache (a
        models.cache.StepBuffers, which also holds the memory keys/values).

        The new positions see every cached position and each other (the block mask has no zero there);
        self_mask (1, 1, 1, capacity) hides the cache's unfilled positions (None: the cache holds exactly the
        positions so far). S = B * rows_per_image rows share each image's memory.
        """
        attn, sub = self.self_attn, self.sublayer[0]
        h = sub.norm(x)
        q, k, v = (attn.split_heads(t) for t in attn.project(h, (0, 1, 2)))  # (S, H, Tn, dk) each
        k, v = layer_cache.append(k, v, positions)  # (S, H, T or capacity, dk) each
        x = sub.residual(x, attn.attend(q, k, v, self_mask))

        attn, sub = self.src_attn, self.sublayer[1]
        q = attn.project_query(sub.norm(x))  # (S, H, Tn, dk)
        x = sub.residual(x, kernels.attend_memory(attn, q, layer_cache.memory, rows_per_image))
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

    def forward_memory_kv(self, x, memory_kv, tgt_mask, rows_per_image=1):
        """x (S, T, D) with each layer's memory keys/values (models.accel.kernels.memory_key_value) -> (S, T, D);
        S = B * rows_per_image."""
        for layer, memory in zip(self.layers, memory_kv):
            x = layer.forward_memory_kv(x, memory, tgt_mask, rows_per_image)
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
        """Embedded regions (B, N, D), mask (B, 1, N) -> memory (B, N, D)."""
        return self.encoder(src, src_mask)  # deviation from the paper's words: regions get no positional encoding

    def embed(self, tokens, start=0):
        """Token ids (S, T) at absolute positions start.. (or the (T,) positions tensor start) -> (S, T, D)."""
        words, positions = self.tgt_embed
        return positions(words(tokens), start)

    def decode(self, memory, src_mask, tgt, tgt_mask):
        """Whole target prefix tgt (S, T) -> decoder states (S, T, D)."""
        return self.decoder(self.embed(tgt), memory, src_mask, tgt_mask)

    def forward(self, src, tgt, src_mask, tgt_mask):
        """src (B, N, D), tgt (B, T) -> decoder states (B, T, D)."""
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
