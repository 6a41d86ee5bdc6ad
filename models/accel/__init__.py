"""Speed paths: the same numbers as the paper's model in models/, computed in fewer passes, calls or launches.

- kernels: what models/transformer.py calls where the plain PyTorch form is slow (layer norm, CPU dropout mask,
  fused projections, packed and folded attention), each the formula written there;
- flat_step: the cached decoding step as one function over the decoder's tensors (eval-mode decoding, the default);
- cuda_graphs: that step on fixed shapes replayed from CUDA graphs (`--cuda_graphs 1`, a GPU only);
- speed: opt-in `--compile 1` (torch.compile) and `--quantize int8` (CPU inference).
"""
