"""Decoder state for incremental (group-by-group) decoding, passed explicitly to `SATModel.step`.

fairseq style: self-attention keys/values grow by one K-word group per step; cross-attention keys/values are
projected from the encoder memory once per image (on its real regions only) and shared by that image's rows
(beams, or its sampled captions), never copied per row; beam search calls `reorder(index)` to follow the
surviving beams.

Two layouts of the self-attention keys/values:
- fixed (decoding without gradients, the default): buffers (S, H, capacity, dk) allocated once for the whole
  caption (capacity = max_length rounded up to whole groups); a step writes its positions in place and attends
  over the whole buffer with a mask hiding the positions not yet filled. Every step has the same shapes, so a
  compiled step (torch.compile, CUDA graphs) is built once; no torch.cat per step.
- growing (with gradients, e.g. self-critical sampling in train mode): torch.cat per step, so that autograd keeps
  each step's keys/values (an in-place buffer would be overwritten under it).

With `incremental=False` the state only remembers the token prefix and the memory, and every step re-decodes the
whole prefix with cross-attention recomputed (the reference's way; kept for tests and benchmarks).

The cache also holds how its steps run (`Step`, chosen once per decoding by models.accel.decoding_step):
`CachedStep` over the keys/values above, or `PrefixStep`.

Shapes: B images, R rows per image (rows_per_image), S = B * R rows, H heads, T positions so far, N regions, dk = D / H.
"""
import torch


class LayerCache:
    """One decoder layer's keys/values: self-attention (S, H, T or capacity, dk); memory: the list of
    models.accel.kernels.memory_key_value ((B_g, H, N_g, dk) keys and values, mask, group), per group of images."""

    def __init__(self, memory, capacity=None):
        self.memory = memory
        self.capacity = capacity  # None: growing layout
        self.key = None  # allocated by DecoderCache.buffers on the first step
        self.value = None

    def reorder(self, index):
        if self.key is None:
            return
        if self.capacity is None:
            self.key = self.key.index_select(0, index)
            self.value = self.value.index_select(0, index)
        else:  # in place: the buffers keep their addresses (CUDA graphs, compiled steps)
            self.key.copy_(self.key.index_select(0, index))
            self.value.copy_(self.value.index_select(0, index))


class StepBuffers:
    """One layer's state during one decoding step, as plain tensors (what a compiled step takes).

    fixed=True: self-attention buffers (S, H, capacity, dk) written in place at the step's positions and returned
    whole (the caller masks the unfilled positions), or only their first `filled` positions; fixed=False: the
    keys/values so far (S, H, T, dk), concatenated with the new ones (kept in .key/.value for the caller).
    memory: the layer's memory keys/values (LayerCache.memory) either way."""

    def __init__(self, key, value, memory, fixed, filled=None):
        self.key, self.value = key, value
        self.memory = memory
        self.fixed, self.filled = fixed, filled

    def append(self, key, value, positions):
        """The newest positions' keys/values (S, H, Tn, dk) -> the keys/values to attend over."""
        if self.fixed:
            self.key.index_copy_(2, positions, key)
            self.value.index_copy_(2, positions, value)
            if self.filled is not None:
                return self.key[:, :, :self.filled], self.value[:, :, :self.filled]
        else:
            self.key = torch.cat([self.key, key], dim=2)
            self.value = torch.cat([self.value, value], dim=2)
        return self.key, self.value


class DecoderCache:
    """Everything a decoding step needs besides the new tokens.

    memory (B, N, D) and memory_mask (B, 1, N) or None come from `SATModel.encode`; the rows_per_image
    rows of an image follow each other (rows b*R .. b*R+R-1 belong to image b). `length` counts the positions
    decoded so far.
    capacity: positions the fixed layout holds (None: growing layout).
    """

    def __init__(self, memory, memory_mask, layers=None, rows_per_image=1, capacity=None, step=None):
        self.memory = memory  # (B, N, D)
        self.encoder_mask = memory_mask  # (B, 1, N) or None (every region valid)
        # (B, 1, 1, N): one mask for every head and query
        self.memory_mask = None if memory_mask is None else memory_mask.unsqueeze(1)
        self.layers = layers  # list of LayerCache, or None: re-decode the prefix at every step
        self.rows_per_image = rows_per_image
        self.capacity = capacity
        self.step = step  # a Step: how SATModel.step runs (models.accel.decoding_step)
        self.length = 0
        self.prefix = None  # (S, T) tokens so far, kept only without layer caches

    @property
    def incremental(self):
        return self.layers is not None

    @property
    def fixed(self):
        """True when the self-attention keys/values live in fixed-size buffers (see the module docstring)."""
        return self.layers is not None and self.capacity is not None

    def positions(self, count, device, masked=True):
        """The next `count` absolute positions as a tensor (count,), and the (1, 1, 1, capacity) mask of the
        buffer positions filled once they are written (None for the growing layout, or when not `masked`: eager
        steps attend over the filled slice of the buffers instead, which is a little faster)."""
        positions = torch.arange(self.length, self.length + count, device=device)
        if not self.fixed:
            return positions, None
        if self.length + count > self.capacity:
            self.grow(self.length + count)
        if not masked:
            return positions, None
        filled = torch.arange(self.capacity, device=device) < self.length + count
        return positions, filled.view(1, 1, 1, -1)

    def buffers(self, rows):
        """Per layer [self keys], [self values] (lists of tensors) and [memory] (LayerCache.memory) for a step.

        Allocated on the first step: fixed layout (rows, H, capacity, dk) zero buffers, growing layout empty
        (rows, H, 0, dk) tensors."""
        for layer in self.layers:
            if layer.key is None:
                memory_key = layer.memory[0][0]  # (B_g, H, N_g, dk)
                heads, dk = memory_key.size(1), memory_key.size(3)
                layer.key = memory_key.new_zeros(rows, heads, self.capacity or 0, dk)
                layer.value = memory_key.new_zeros(rows, heads, self.capacity or 0, dk)
        return ([layer.key for layer in self.layers], [layer.value for layer in self.layers],
                [layer.memory for layer in self.layers])

    def store(self, keys, values):
        """Growing layout: keep the step's concatenated keys/values (lists, one per layer)."""
        for layer, key, value in zip(self.layers, keys, values):
            layer.key, layer.value = key, value

    def grow(self, capacity):
        """Longer fixed buffers (a caller decoding past the max_length it announced)."""
        for layer in self.layers:
            if layer.key is not None:
                pad = layer.key.new_zeros(*layer.key.shape[:2], capacity - self.capacity, layer.key.size(3))
                layer.key = torch.cat([layer.key, pad], dim=2)
                layer.value = torch.cat([layer.value, pad], dim=2)
            layer.capacity = capacity
        self.capacity = capacity

    def extend_prefix(self, tokens):
        """Non-incremental path: append the new tokens (S, Tn) to the prefix and return it (S, T)."""
        self.prefix = tokens if self.prefix is None else torch.cat([self.prefix, tokens], dim=1)
        return self.prefix

    def reorder(self, index):
        """Keep rows `index` (S,) of the per-row state, e.g. the parent beams chosen by beam search.

        Rows must stay within their image (index // R == arange(S) // R): the memory and its keys/values
        are per image and are not touched.
        """
        if self.layers is not None:
            for layer in self.layers:
                layer.reorder(index)
        if self.prefix is not None:
            self.prefix = self.prefix.index_select(0, index)
        return self


class Step:
    """How one decoding runs its steps: (tokens (S, K), cache) -> log-probs of the next K words (S, K, V); the caller
    (SATModel.step) advances cache.length."""
    grouped_memory = True  # the memory keys/values may be split per group of images (models.masks.Packing.grouped)

    def attach(self, cache):
        """Called once the cache around it is built."""

    def __call__(self, tokens, cache):
        raise NotImplementedError


class PrefixStep(Step):
    """No layer caches: fn(tokens, cache) re-decodes the whole prefix (SATModel.prefix_step)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, tokens, cache):
        return self.fn(tokens, cache)


class CachedStep(Step):
    """A step over the cache's keys/values: fn has SATModel.cached_step's signature (cached_step itself, its
    compiled form, models.accel.flat_step.FlatStep). masked: the fixed layout attended under a mask over the whole
    buffer (one shape at every step: what a compiled step needs); else only the filled part of the buffers (a
    little faster eagerly)."""

    def __init__(self, fn, masked=False):
        self.fn, self.masked = fn, masked

    def __call__(self, tokens, cache):
        k = tokens.size(1)
        positions, self_mask = cache.positions(k, tokens.device, masked=self.masked)  # (K,), (1,1,1,cap) or None
        filled = cache.length + k if cache.fixed and not self.masked else None
        keys, values, memory = cache.buffers(tokens.size(0))
        logprobs, keys, values = self.fn(tokens, positions, self_mask, keys, values, memory, cache.rows_per_image,
                                         filled)
        if not cache.fixed:
            cache.store(keys, values)
        return logprobs
