"""Transformer building blocks: the Annotated Transformer, as the reference code used it.

Class and attribute names (`linears`, `sublayer`, `a_2`, `lut`, `pe`, `proj`, ...) are the checkpoint format of
the released models, so they stay as they are. On top of the reference's full-sequence `forward` methods, the
attention, decoder layer and decoder have `step` methods that run only the newest positions against a
`models.cache.DecoderCache` (fairseq-style incremental decoding, same numbers).

Shapes: B images, S decoding rows (B or B*beam), N regions, T tokens, D d_model, H heads, dk = D / H.
Masks are boolean, True = may attend, broadcastable to (B, H, T_query, T_key).
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


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
        std, mean = torch.std_mean(x, dim=-1, keepdim=True)
        return torch.addcmul(self.b_2, self.a_2, (x - mean) / (std + self.eps))


class SublayerConnection(nn.Module):
    """Residual connection around a sublayer: x + dropout(sublayer(norm(x))) (norm first, as opposed to last)."""

    def __init__(self, size, dropout):
        super().__init__()
        self.norm = LayerNorm(size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, sublayer):
        return x + self.dropout(sublayer(self.norm(x)))


class MultiHeadedAttention(nn.Module):
    """Scaled dot-product attention over H heads; linears 0..3 project query, key, value and output."""

    def __init__(self, h, d_model, dropout=0.1):
        super().__init__()
        assert d_model % h == 0, f'd_model {d_model} is not divisible by {h} heads'
        self.d_k = d_model // h
        self.h = h
        self.linears = clones(nn.Linear(d_model, d_model), 4)
        self.dropout = nn.Dropout(p=dropout)

    def split_heads(self, x):
        """(B, T, D) -> (B, H, T, dk)."""
        return x.view(x.size(0), -1, self.h, self.d_k).transpose(1, 2)

    def project_query(self, query):
        """(B, T, D) -> (B, H, T, dk)."""
        return self.split_heads(self.linears[0](query))

    def project_key_value(self, key, value):
        """(B, T, D) twice -> keys and values (B, H, T, dk) each."""
        return self.split_heads(self.linears[1](key)), self.split_heads(self.linears[2](value))

    def attend(self, q, k, v, mask=None):
        """Queries (B, H, Tq, dk) over keys/values (B, H, Tk, dk) -> (B, Tq, D) after the output projection.

        Masked scores get no weight at all, as the reference's -1e9 fill did (no row is ever fully masked).
        """
        p = self.dropout.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, Tq, dk)
        x = x.transpose(1, 2).reshape(q.size(0), -1, self.h * self.d_k)  # (B, Tq, D)
        return self.linears[3](x)

    def forward(self, query, key, value, mask=None):
        """query (B, Tq, D), key/value (B, Tk, D), mask (B, 1 or Tq, Tk) -> (B, Tq, D)."""
        if mask is not None:
            mask = mask.unsqueeze(1)  # same mask for every head
        k, v = self.project_key_value(key, value)
        return self.attend(self.project_query(query), k, v, mask)


class PositionwiseFeedForward(nn.Module):
    """FFN(x) = w_2(dropout(relu(w_1(x))))."""

    def __init__(self, d_model, d_ff, dropout=0.1):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.w_2(self.dropout(F.relu(self.w_1(x))))


class Embeddings(nn.Module):
    """Word embedding scaled by sqrt(d_model)."""

    def __init__(self, d_model, vocab):
        super().__init__()
        self.lut = nn.Embedding(vocab, d_model)
        self.d_model = d_model

    def forward(self, x):
        return self.lut(x) * math.sqrt(self.d_model)


class PositionalEncoding(nn.Module):
    """Adds the sinusoidal encoding of absolute positions start, start+1, ... then dropout."""

    def __init__(self, d_model, dropout, max_len=5000):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        position = torch.arange(max_len, dtype=torch.float).unsqueeze(1)  # (max_len, 1)
        div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float) * -(math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer('pe', pe.unsqueeze(0))  # (1, max_len, D); persistent: it is in the checkpoints

    def forward(self, x, start=0):
        """x (B, T, D) holding positions start .. start+T-1."""
        return self.dropout(x + self.pe[:, start:start + x.size(1)])


class Generator(nn.Module):
    """Linear projection to the vocabulary, then log-softmax."""

    def __init__(self, d_model, vocab):
        super().__init__()
        self.proj = nn.Linear(d_model, vocab)

    def forward(self, x):
        return F.log_softmax(self.proj(x), dim=-1)


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

    def step(self, x, layer_cache, memory_mask, beam):
        """Only the newest positions: x (S, Tn, D) -> (S, Tn, D), appending their keys/values to layer_cache.

        The new positions see every cached position and each other (the block mask has no zero there), so the
        self-attention needs no mask. memory_mask (B, 1, 1, N); S = B * beam rows share each image's memory.
        """
        attn, sub = self.self_attn, self.sublayer[0]
        h = sub.norm(x)
        k, v = layer_cache.append(*attn.project_key_value(h, h))  # (S, H, T, dk) each
        x = x + self._dropout(sub, attn.attend(attn.project_query(h), k, v))

        attn, sub = self.src_attn, self.sublayer[1]
        q = attn.project_query(sub.norm(x))  # (S, H, Tn, dk)
        rows, heads, tn, dk = q.shape
        if beam > 1:
            # The beams of an image attend to the same memory: fold them into the query axis instead of copying it.
            q = q.view(-1, beam, heads, tn, dk).transpose(1, 2).reshape(-1, heads, beam * tn, dk)  # (B, H, beam*Tn, dk)
        p = attn.dropout.p if attn.training else 0.0
        y = F.scaled_dot_product_attention(q, layer_cache.memory_key, layer_cache.memory_value,
                                           attn_mask=memory_mask, dropout_p=p)  # (B, H, beam*Tn, dk)
        if beam > 1:
            y = y.view(-1, heads, beam, tn, dk).transpose(1, 2)  # (B, beam, H, Tn, dk)
        y = y.reshape(rows, heads, tn, dk).transpose(1, 2).reshape(rows, tn, heads * dk)  # (S, Tn, D)
        x = x + self._dropout(sub, attn.linears[3](y))

        return self.sublayer[2](x, self.feed_forward)

    def _dropout(self, sublayer, y):
        # Skipping the identity module call in eval mode saves a little on every decoding step.
        return sublayer.dropout(y) if self.training else y


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

    def step(self, x, cache):
        """Newest positions only: x (S, Tn, D) -> (S, Tn, D), growing the cache's self-attention keys/values."""
        for layer, layer_cache in zip(self.layers, cache.layers):
            x = layer.step(x, layer_cache, cache.memory_mask, cache.beam)
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
        """Token ids (S, T) at absolute positions start.. -> (S, T, D)."""
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
