"""Decoding steps replayed from CUDA graphs (`--cuda_graphs 1`, ours; issue 22): the flat step (accel/flat_step.py)
on fixed shapes, captured once per shape bucket and replayed at every step.

On a GPU a decoding step is a few hundred small kernels whose launches cost more host time than the GPU spends
running them. A CUDA graph records the launches of one step once; a replay launches all of them in one call. That
needs every tensor the step touches at a fixed address with a fixed shape, and no host read inside. `GraphedStep`
owns such tensors for one bucket (rows, regions, capacity, K):

- the step's tokens (rows_b, K), the number of positions decoded so far as a device tensor (positions and the
  self-attention mask are computed from it inside the step: nothing is copied from the host per step);
- per layer the self-attention keys/values (rows_b, H, capacity, dk), attended under the mask of the filled
  positions (the fixed layout's masked form, as `--compile 1` uses), and the memory keys/values of the batch's
  images padded to (images_b, H, regions_b, dk) with their mask;
- the log-probs it writes (rows_b, K, V).

A batch is padded up to its bucket: rows to the next power of two, regions to the next multiple of 16; padded rows
decode token 0 against one unmasked zero region and are never read. Buckets keep their buffers and graph across
decodes (a graph pool shared by all buckets of the model), and are rebuilt when the model's weights change (e.g.
after training steps, before the next validation).

The same numbers as the eager flat step up to the rounding of attention over padded (masked) keys: the masked
keys get weight 0, but a fused attention kernel may sum the rest in another order. On the CPU (where there are no
CUDA graphs) `GraphedStep` runs the same fixed-shape step eagerly: that is what the CPU tests check (the same
tokens as the eager path on every conformance case); `pytest -m cuda` checks the captured replay on a GPU.

Not graphed: self-critical sampling (train mode, gradients through the sampled log-probs) and decoding under
autocast (--bf16, --fp16: autocast caches its casts of the weights, which a graph must not capture).
"""
import weakref

import torch

from models.accel.flat_step import FlatStep
from models.cache import Step

REGION_BUCKET = 16  # regions are padded to a multiple of this


def rows_bucket(rows):
    """The next power of two >= rows."""
    return 1 << max(rows - 1, 0).bit_length()


def regions_bucket(regions):
    return -(-regions // REGION_BUCKET) * REGION_BUCKET


def weights_key(model):
    """Changes whenever a parameter of the model is replaced or changed in place (a graph reads the tensors it
    was captured with, and the flat step's concatenated q|k|v weights are rebuilt on change)."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


class GraphedStep:
    """The fixed-shape decoding step of one bucket: static tensors, and on CUDA the graph that replays it."""

    def __init__(self, flat_step, images, rows_per_image, regions, capacity, k, template, graph_pool=None):
        """flat_step: a models.accel.flat_step.FlatStep; images/regions: the bucket's padded sizes; template: one
        layer's memory key (B, H, N, dk) for dtype and device."""
        self.flat_step, self.rows_per_image, self.k, self.capacity = flat_step, rows_per_image, k, capacity
        device, dtype = template.device, template.dtype
        heads, d_k = template.size(1), template.size(3)
        self.images, self.rows, self.regions = images, images * rows_per_image, regions
        layers = len(flat_step.layers)
        self.tokens = torch.zeros(self.rows, k, dtype=torch.long, device=device)
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.offsets = torch.arange(k, device=device)
        self.slots = torch.arange(capacity, device=device)
        self.keys = [torch.zeros(self.rows, heads, capacity, d_k, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros_like(key) for key in self.keys]
        self.memory_keys = [torch.zeros(images, heads, regions, d_k, dtype=dtype, device=device)
                            for _ in range(layers)]
        self.memory_values = [torch.zeros_like(key) for key in self.memory_keys]
        self.memory_mask = torch.zeros(images, 1, 1, regions, dtype=torch.bool, device=device)
        self.memory = [[(key, value, self.memory_mask, None)] for key, value in zip(self.memory_keys,
                                                                                 self.memory_values)]
        self.logprobs = None
        self.graph = None
        self.in_use = False  # held by a live decoding cache (GraphedSteps.get)
        if device.type == 'cuda':
            self._capture(graph_pool)

    def _body(self):
        """The step on the static tensors (what the graph records)."""
        positions = self.length + self.offsets  # (K,)
        self_mask = (self.slots < self.length + self.k).view(1, 1, 1, -1)  # (1, 1, 1, capacity)
        logprobs, _, _ = self.flat_step(self.tokens, positions, self_mask, self.keys, self.values, self.memory,
                                        self.rows_per_image)
        return logprobs  # (rows_b, K, V)

    def _capture(self, pool):
        self.memory_mask[:, :, :, 0] = True  # (warm-up and capture on a valid mask; load() sets the real one)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as torch.cuda.graph asks
            for _ in range(2):
                self._body()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logprobs = self._body()

    def load(self, layer_memory):
        """A new decoding: the images' memory keys/values (per layer, models.accel.kernels.memory_key_value's one padded
        group: key, value (B, H, N, dk), mask (B, 1, 1, N) or None) into the static tensors; position 0."""
        key0 = layer_memory[0][0][0]
        images, regions = key0.size(0), key0.size(2)
        for (key, value, mask, _), static_key, static_value in zip(
                (entries[0] for entries in layer_memory), self.memory_keys, self.memory_values):
            static_key[:images, :, :regions].copy_(key)
            static_value[:images, :, :regions].copy_(value)
        first = layer_memory[0][0][2]
        self.memory_mask.zero_()
        if first is None:
            self.memory_mask[:images, :, :, :regions] = True
        else:
            self.memory_mask[:images, :, :, :regions].copy_(first.view(images, 1, 1, regions))
        self.memory_mask[images:, :, :, 0] = True  # padded images: one zero region, so no row is fully masked
        self.length.zero_()

    def __call__(self, tokens):
        """tokens (S, K) of the real rows -> their log-probs (S, K, V) (a view of the static output, valid until
        the next step)."""
        rows = tokens.size(0)
        self.tokens[:rows].copy_(tokens)
        if self.graph is not None:
            self.graph.replay()
            logprobs = self.logprobs
        else:
            logprobs = self._body()
        self.length += self.k
        return logprobs[:rows]

    def row_views(self, rows):
        """The real rows of the self-attention keys/values, per layer (what DecoderCache.reorder writes)."""
        return [key[:rows] for key in self.keys], [value[:rows] for value in self.values]


class GraphedSteps:
    """A model's GraphedSteps per bucket, kept across decodes and dropped when the weights change. Several decoding
    states may be alive at once (diverse beam search: one per group), each with its own GraphedStep of the bucket;
    a step is free again once the cache holding it is gone."""

    def __init__(self):
        self.steps, self.key, self.pool = {}, None, None

    def get(self, model, cache, images, regions, template):
        """A free GraphedStep of the bucket of `cache` (a models.cache.DecoderCache of `model`), held until the
        cache is garbage collected."""
        key = weights_key(model)
        if key != self.key:
            self.steps, self.key = {}, key
        bucket = (rows_bucket(images), cache.rows_per_image, regions_bucket(regions), cache.capacity, model.K,
                  template.dtype, template.device)
        steps = self.steps.setdefault(bucket, [])
        step = next((s for s in steps if not s.in_use), None)
        if step is None:
            if template.device.type == 'cuda' and self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            step = GraphedStep(FlatStep(model), bucket[0], cache.rows_per_image, bucket[2], cache.capacity,
                               model.K, template, self.pool)
            steps.append(step)
        step.in_use = True
        weakref.finalize(cache, setattr, step, 'in_use', False)
        return step


class GraphedDecoding(Step):
    """One decoding's steps through its bucket's GraphedStep (models.accel.decoding_step)."""
    grouped_memory = False  # the graphed step attends over one padded group of images

    def __init__(self, model):
        self.model, self.graphed = model, None

    def attach(self, cache):
        """The bucket's GraphedStep, loaded with this decoding's memory; the cache's layers then hold views of its
        self-attention keys/values (so that beam search's reorder moves the right rows)."""
        steps = self.model.__dict__.setdefault('_graphed_steps', GraphedSteps())
        memory = [layer.memory for layer in cache.layers]
        images, regions = cache.memory.size(0), cache.memory.size(1)
        self.graphed = steps.get(self.model, cache, images, regions, template=memory[0][0][0])
        self.graphed.load(memory)
        keys, values = self.graphed.row_views(images * cache.rows_per_image)
        for layer, key, value in zip(cache.layers, keys, values):
            layer.key, layer.value = key, value

    def __call__(self, tokens, cache):
        return self.graphed(tokens)
