"""Speed paths: the same numbers as the paper's model in models/, computed in fewer passes, calls or launches.

- kernels: what models/transformer.py calls where the plain PyTorch form is slow (layer norm, CPU dropout mask,
  fused projections, packed and folded attention), each the formula written there;
- flat_step: the cached decoding step as one function over the decoder's tensors (eval-mode decoding, the default);
- cuda_graphs: that step on fixed shapes replayed from CUDA graphs (`--cuda_graphs 1`, a GPU only);
- speed: opt-in `--compile 1` (torch.compile) and `--quantize int8` (CPU inference).

`decoding_step` is the one place that chooses how a decoding runs its steps (SATModel.init_cache asks it once per
decoding).
"""
import torch

from models.accel.cuda_graphs import GraphedDecoding
from models.accel.flat_step import FlatStep
from models.cache import CachedStep, PrefixStep


def decoding_step(model, memory, use_cache, capacity):
    """How one decoding of `model` (a SATModel) runs its steps: a models.cache.Step, one of five.

    memory (B, N, D): the decoding's memory (its device); use_cache: layer caches at all; capacity: the fixed
    layout's positions (None: the growing layout, with gradients).
    1. no cache: SATModel.prefix_step, the reference's re-decoding of the whole prefix;
    2. --compile 1 (speed.compile_model): the compiled SATModel.cached_step, the fixed layout attended under a mask;
    3. with gradients (self-critical sampling), or model.flat_step off: SATModel.cached_step, the modules' step;
    4. eval mode without gradients: the flat step (flat_step.FlatStep), the same numbers in fewer Python calls;
    5. that, with model.cuda_graphs (--cuda_graphs 1, a GPU) and not under autocast (--bf16 / --fp16: its cache of
       cast weights must not be captured): replayed from CUDA graphs (cuda_graphs).
    """
    if not use_cache:
        return PrefixStep(model.prefix_step)
    compiled = model.__dict__.get('_compiled', {}).get('step')
    if compiled is not None:
        return CachedStep(compiled, masked=True)
    if capacity is None or not model.flat_step or not FlatStep.applies(model):
        return CachedStep(model.cached_step)
    if model.cuda_graphs and not torch.is_autocast_enabled(memory.device.type):
        return GraphedDecoding(model)
    return CachedStep(FlatStep(model))
