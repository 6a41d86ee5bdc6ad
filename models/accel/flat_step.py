"""The cached decoding step as one function over the decoder's tensors: SATModel.cached_step without the modules.

A batch-1 decoding step is a chain of small matrix-vector products; on a fast CPU core the Python around them (module
calls, attribute lookups, method dispatch: about 40 modules and 300 torch calls per step) costs as much as the
products themselves (issue 22: 6.6 ms a step against a 2.5 ms floor on the Intel Xeon). `FlatStep` collects, once
per decoding, the tensors the step reads (each layer's norms, projections and feed-forward, the embedding and the
generator) and runs the step as one loop of torch calls over them.

The same numbers as `SATModel.cached_step`, bit for bit (tests/test_flat_step.py): the same torch calls on the same
tensors in the same order, only fewer Python frames and fewer views around them (e.g. q|k|v split into heads with one
view and one permute instead of three of each). Used for decoding without gradients in eval mode (evaluation,
validation, beam search; not self-critical sampling, which needs dropout and gradients) unless the model is compiled
(`--compile 1`) or `SATModel.flat_step` is set False (bench/compare.py and the tests compare both paths).

Shapes: S rows, Tn new positions (K), D d_model, H heads, dk = D / H, V vocabulary + 1.
"""
import math

import torch
from torch import nn

from models.accel import bf16, kernels


def _same(tensor):
    return tensor


def _linear_of(module, cast=_same):
    """A linear layer as the step calls it: (bias, weight transposed) of a plain nn.Linear, each through `cast`
    (models.accel.bf16.cast_once under bfloat16 autocast), else the module's forward (e.g.
    models.accel.speed.Int8Linear)."""
    if type(module) is nn.Linear:
        return cast(module.bias), cast(module.weight).t()
    return module.forward


def _projections_of(attn, which, cast=_same):
    """attn's linears `which` as one linear over their concatenated outputs (models.accel.kernels.project_concat)."""
    projection = kernels.concatenated_projection(attn, which)
    if projection is None:
        return lambda x: kernels.project_concat(attn, x, which)
    if type(projection) is tuple:
        weight, bias = projection
        return cast(bias), cast(weight).t()
    return projection.forward


def _apply(linear, x):
    """x (R, D_in) -> (R, D_out): addmm on the transposed weight is the call F.linear makes (the same numbers)."""
    if type(linear) is not tuple:
        return linear(x)
    bias, weight_t = linear
    return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


class _Norm:
    """A LayerNorm's parameters (the reference layer norm, models.accel.kernels.layer_norm)."""
    __slots__ = ('a', 'b', 'eps')

    def __init__(self, norm):
        self.a, self.b, self.eps = norm.a_2, norm.b_2, norm.eps


class _Layer:
    """One decoder layer's tensors for a step."""
    __slots__ = ('norm_self', 'qkv', 'out_self', 'norm_src', 'q_src', 'out_src', 'norm_ff', 'w_1', 'w_2')

    def __init__(self, layer, cast=_same):
        self.norm_self, self.norm_src, self.norm_ff = (_Norm(sub.norm) for sub in layer.sublayer)
        self.qkv = _projections_of(layer.self_attn, (0, 1, 2), cast)
        self.out_self = _linear_of(layer.self_attn.linears[3], cast)
        self.q_src = _linear_of(layer.src_attn.linears[0], cast)
        self.out_src = _linear_of(layer.src_attn.linears[3], cast)
        self.w_1, self.w_2 = _linear_of(layer.feed_forward.w_1, cast), _linear_of(layer.feed_forward.w_2, cast)


class FlatStep:
    """SATModel.cached_step over the tensors of `model` (a SATModel) as they are now (built per decoding:
    models.sat.SATModel.init_cache).

    Built under bfloat16 CPU autocast (--bf16), the linear layers' weights and biases are bfloat16 copies cast
    once (models.accel.bf16.cast_once): autocast then casts only the activations, not every weight at every call.
    The same numbers as autocast casting them itself."""

    def __init__(self, model):
        transformer = model.model
        cast = (lambda t: bf16.cast_once(model, t)) if bf16.autocast_bf16('cpu') and \
            transformer.generator.proj.weight.device.type == 'cpu' else _same
        words, positions = transformer.tgt_embed
        self.lut, self.scale = words.lut.weight, math.sqrt(words.d_model)
        self.pe = positions.pe[0]  # (max_len, D)
        self.layers = [_Layer(layer, cast) for layer in transformer.decoder.layers]
        self.norm = _Norm(transformer.decoder.norm)
        self.generator = _linear_of(transformer.generator.proj, cast)
        attn = transformer.decoder.layers[0].self_attn
        self.heads, self.d_k = attn.h, attn.d_k

    @staticmethod
    def applies(model):
        """Whether the step may run flat: decoding without gradients, every dropout off."""
        return not model.training and not torch.is_grad_enabled()

    def __call__(self, tokens, positions, self_mask, keys, values, memory, rows_per_image, filled=None):
        """SATModel.cached_step (fixed layout: keys/values the (S, H, capacity, dk) buffers, written in place,
        attended under self_mask or up to `filled`) -> (log-probs (S, K, V), keys, values).

        The rows run as (S * Tn, D) matrices, the layout F.linear flattens 3-d inputs to."""
        rows, new = tokens.shape
        heads, d_k = self.heads, self.d_k
        x = torch.embedding(self.lut, tokens.reshape(-1)).mul_(self.scale)  # (S*Tn, D)
        x = (x.view(rows, new, -1) + self.pe.index_select(0, positions)).view(rows * new, -1)
        for layer, key, value, memory_kv in zip(self.layers, keys, values, memory):
            # masked self-attention over the cached positions and the new ones
            qkv = _apply(layer.qkv, _norm(x, layer.norm_self))  # (S*Tn, 3D)
            q, k, v = qkv.view(rows, new, 3, heads, d_k).permute(2, 0, 3, 1, 4)  # (S, H, Tn, dk) each
            if filled is not None:  # eager: the new positions are filled - Tn .. filled - 1, written as a slice
                key[:, :, filled - new:filled] = k
                value[:, :, filled - new:filled] = v
                k, v = key[:, :, :filled], value[:, :, :filled]
            else:  # (a graphed step: positions is a tensor the graph reads)
                key.index_copy_(2, positions, k)
                value.index_copy_(2, positions, v)
                k, v = key, value
            y = kernels.scaled_dot_product_attention(q, k, v, self_mask)  # (S, H, Tn, dk)
            x = x + _apply(layer.out_self, y.transpose(1, 2).reshape(rows * new, heads * d_k))
            # attention over the image's memory keys/values
            q = _apply(layer.q_src, _norm(x, layer.norm_src)).view(rows, new, heads, d_k).transpose(1, 2)
            y = kernels.attend_memory_rows(q, memory_kv, rows_per_image)  # (S, Tn, D)
            x = x + _apply(layer.out_src, y.view(rows * new, -1))
            # feed-forward
            x = x + _apply(layer.w_2, torch.relu_(_apply(layer.w_1, _norm(x, layer.norm_ff))))
        logprobs = torch.log_softmax(_apply(self.generator, _norm(x, self.norm)), dim=-1)  # (S*Tn, V)
        return logprobs.view(rows, new, -1), keys, values


def _norm(x, norm):
    return kernels.layer_norm_inference(x, norm.a, norm.b, norm.eps)
