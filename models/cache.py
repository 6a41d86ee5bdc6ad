"""Decoder state for incremental (group-by-group) decoding, passed explicitly to `SATModel.step`.

fairseq style: self-attention keys/values grow by one K-word group per step; cross-attention keys/values are
projected from the encoder memory once per image and shared by that image's beams (never copied per beam);
beam search calls `reorder(index)` to follow the surviving beams.

With `incremental=False` the state only remembers the token prefix and the memory, and every step re-decodes the
whole prefix with cross-attention recomputed (the reference's way; kept for tests and benchmarks).

Shapes: B images, beam rows per image, S = B * beam rows, H heads, T positions so far, N regions, dk = D / H.
"""
import torch


class LayerCache:
    """One decoder layer's keys/values: self-attention (S, H, T, dk), memory (B, H, N, dk)."""

    def __init__(self, memory_key, memory_value):
        self.memory_key = memory_key
        self.memory_value = memory_value
        self.key = None
        self.value = None

    def append(self, key, value):
        """Add the newest positions' keys/values (S, H, Tn, dk); return all of them (S, H, T, dk)."""
        if self.key is not None:
            key = torch.cat([self.key, key], dim=2)
            value = torch.cat([self.value, value], dim=2)
        self.key, self.value = key, value
        return key, value

    def reorder(self, index):
        if self.key is not None:
            self.key = self.key.index_select(0, index)
            self.value = self.value.index_select(0, index)


class DecoderCache:
    """Everything a decoding step needs besides the new tokens.

    memory (B, N, D) and memory_mask (B, 1, N) or None come from `SATModel.encode`; the `beam` rows of an image
    follow each other (rows b*beam .. b*beam+beam-1 belong to image b). `length` counts the positions decoded so far.
    """

    def __init__(self, memory, memory_mask, layers=None, beam=1):
        self.memory = memory  # (B, N, D)
        self.encoder_mask = memory_mask  # (B, 1, N) or None (every region valid)
        # (B, 1, 1, N): one mask for every head and query
        self.memory_mask = None if memory_mask is None else memory_mask.unsqueeze(1)
        self.layers = layers  # list of LayerCache, or None: re-decode the prefix at every step
        self.beam = beam
        self.length = 0
        self.prefix = None  # (S, T) tokens so far, kept only without layer caches

    @property
    def incremental(self):
        return self.layers is not None

    def extend_prefix(self, tokens):
        """Non-incremental path: append the new tokens (S, Tn) to the prefix and return it (S, T)."""
        self.prefix = tokens if self.prefix is None else torch.cat([self.prefix, tokens], dim=1)
        return self.prefix

    def reorder(self, index):
        """Keep rows `index` (S,) of the per-row state, e.g. the parent beams chosen by beam search.

        Rows must stay within their image (index // beam == arange(S) // beam): the memory and its keys/values
        are per image and are not touched.
        """
        if self.layers is not None:
            for layer in self.layers:
                layer.reorder(index)
        if self.prefix is not None:
            self.prefix = self.prefix.index_select(0, index)
        return self
