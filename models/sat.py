"""SATIC: the semi-autoregressive transformer captioner (K words per decoding step; K = 1 is 'transformer').

Pipeline: region features --att_embed--> encoder --> memory; the decoder reads the caption shifted by one K-word
group and predicts K words per position group. `forward` is teacher forcing (training), `encode` + `step` are the
decoding primitives used by `models.decoding` (the generation loop of every search, models.search). The reference call
conventions (`model(fc, att, labels, att_masks)`, `model(fc, att, att_masks, opt=..., mode='sample')`) are a thin
layer on top.

Shapes: B images, S decoding rows, N regions, F region feature size, L label length (18), T tokens,
K group size, V vocabulary + 1 (token 0 = BOS/EOS/padding), D d_model.
"""
import math

import torch
from torch import nn

from models.accel import decoding_step
from models.accel.kernels import Dropout, memory_key_value
from models.cache import DecoderCache, LayerCache, StepBuffers
from models.decode_config import DecodeConfig
from models.decoding import generate
from models.masks import Packing, group_mask, target_mask
from models.transformer import make_model

HEADS = 8
DROPOUT = 0.1


class SATModel(nn.Module):
    """Region features -> caption, K words per step. state_dict: `att_embed.*` and `model.*` (the reference's)."""

    def __init__(self, vocab_size, K=1, d_model=512, d_ff=2048, num_layers=6, att_feat_size=2048,
                 drop_prob_lm=0.5, use_bn=0, max_length=20, use_cache=True, flat_step=True):
        super().__init__()
        self.vocab_size = vocab_size  # words; V = vocab_size + 1 outputs
        self.K = K
        self.max_length = max_length
        self.use_cache = bool(use_cache)
        # Speed paths of the decoding step (models.accel.decoding_step reads them):
        self.flat_step = bool(flat_step)  # decoding steps without gradients as one function (models.accel.flat_step)
        self.cuda_graphs = False  # (ours) eval decoding steps replayed from CUDA graphs (models.accel.cuda_graphs)
        self.group_regions = True  # attention per group of images of similar region counts (models.masks)
        self.d_model = d_model
        embed = [nn.Linear(att_feat_size, d_model), nn.ReLU(inplace=True), Dropout(drop_prob_lm)]
        if use_bn:
            embed.insert(0, nn.BatchNorm1d(att_feat_size))
        if use_bn == 2:
            embed.append(nn.BatchNorm1d(d_model))
        self.att_embed = nn.Sequential(*embed)
        self.model = make_model(vocab_size + 1, num_layers, d_model, d_ff, HEADS, DROPOUT)

    # ---- encoder -------------------------------------------------------------------------------------------
    def encode_packed(self, att_feats, att_masks=None):
        """att_feats (B, N, F), att_masks (B, N) float 1/0 or None -> (memory rows (M, D), models.masks.Packing).

        Only the M real regions go through att_embed and the encoder's per-position layers (norms, projections,
        FFN); attention runs per image over its own regions (packing.attn_mask). With att_masks, regions are cut
        to the batch's longest valid count, as the reference's clip_att did; without, every region is real.
        The numbers are those of the padded computation (padding never reached a real region).
        """
        rows, packing = self.real_regions(att_feats, att_masks)
        return self._encode_fn(rows, packing.index, packing.attn_mask, packing.batch, packing.length,
                               packing.groups), packing

    def _grouped(self, packing):
        """packing with attention groups of similar region counts (Packing.grouped), on the CPU only, unless
        turned off (group_regions False, e.g. compiled: fixed group structures recompile less). On a GPU the
        padded attention costs little and every group adds kernel launches and host reads to each decoding step
        (bench/README.md, "On a GPU"); the numbers are the same either way, to rounding."""
        on_cpu = packing.attn_mask is None or packing.attn_mask.device.type == 'cpu'
        return packing.grouped() if self.group_regions and on_cpu else packing

    def real_regions(self, att_feats, att_masks=None):
        """att_feats (B, N, F) -> the real regions' features (M, F) and their models.masks.Packing."""
        batch, n_full, feat = att_feats.shape
        if att_masks is None:  # every region valid: no mask at all
            return att_feats.reshape(batch * n_full, feat), Packing(batch=batch, length=n_full)
        valid = att_masks > 0  # (B, N)
        longest = att_masks.sum(1).max().long()  # the longest valid count: regions are cut there (clip_att)
        kept = valid.cumsum(1).gather(1, (longest - 1).clamp(min=0).expand(batch, 1))  # (B, 1) valid ones kept
        n, m = torch.stack([longest, kept.sum()]).tolist()  # the one host read: the padded and packed sizes
        packing = self._grouped(Packing(valid[:, :n], count=m))  # (B, N')
        # Gathered straight from att_feats, whatever its strides; BatchNorm statistics see real regions only,
        # as the reference's packing did.
        return att_feats[packing.index // n, packing.index % n], packing  # (M, F)

    @staticmethod
    def _packing(index, attn_mask, batch, length, groups):
        packing = Packing(batch=batch, length=length, index=index, attn_mask=attn_mask)
        packing.groups = groups
        return packing

    def encode_rows(self, rows, index, attn_mask, batch, length, groups=None):
        """att_embed + encoder on the real regions' features rows (M, F) of a (batch, length) padded batch
        (models.masks.Packing parts: plain tensors and ints, what --compile 1 compiles) -> memory rows (M, D)."""
        packing = self._packing(index, attn_mask, batch, length, groups)
        return self.model.encoder.forward_packed(self.att_embed(rows), packing)

    def teacher_forcing(self, rows, index, attn_mask, batch, length, groups, tokens, tgt_mask, rows_per_image):
        """encode_rows, then the decoder over the shifted tokens (S, T) with tgt_mask (S, T, T) -> (S, T, D)
        (plain tensors and ints: what --compile 1 compiles for training)."""
        packing = self._packing(index, attn_mask, batch, length, groups)
        memory = self.encode_rows(rows, index, attn_mask, batch, length, groups)  # (M, D)
        memory_kv = [memory_key_value(layer.src_attn, memory, packing) for layer in self.model.decoder.layers]
        return self.model.decoder.forward_memory_kv(self.model.embed(tokens), memory_kv, tgt_mask, rows_per_image)

    def _maybe_compiled(self, name, fallback):
        compiled = self.__dict__.get('_compiled', {}).get(name)
        return fallback if compiled is None else compiled

    @property
    def _encode_fn(self):
        return self._maybe_compiled('encode', self.encode_rows)

    @property
    def _teacher_forcing_fn(self):
        return self._maybe_compiled('teacher_forcing', self.teacher_forcing)

    @property
    def _generator_fn(self):
        return self._maybe_compiled('generator', self.model.generator)

    def encode(self, att_feats, att_masks=None):
        """att_feats (B, N, F), att_masks (B, N) float 1/0 or None -> memory (B, N', D), memory mask (B, 1, N').

        See encode_packed; the memory is zero at padded positions, and the mask is None when every region of
        the batch is valid (attention then skips masking).
        """
        memory, packing = self.encode_packed(att_feats, att_masks)
        return packing.pad(memory), packing.memory_mask

    # ---- teacher forcing -----------------------------------------------------------------------------------
    def shift_labels(self, labels):
        """labels (S, L) = [0, w1 .. w16, 0] -> decoder input (S, ceil(L/K)*K - 1).

        K-1 zeros are prepended so that group g's input is the K words of group g-1 (group 0: K zeros).
        """
        k = self.K
        shifted = torch.cat([labels.new_zeros(labels.size(0), k - 1), labels], dim=1)  # (S, L+K-1)
        return shifted[:, :math.ceil(labels.size(1) / k) * k - 1]

    def decoder_states(self, att_feats, labels, att_masks=None, seq_per_img=1):
        """Teacher forcing up to the decoder's final norm: (S, T, D), T = ceil(L/K)*K - 1 input positions.

        att_feats (S, N, F), or (S / seq_per_img, N, F) with one row per image: the image is then encoded once
        and its seq_per_img caption rows attend to the same memory keys/values (in train mode they share one
        encoder dropout draw). Cross-attention keys/values are projected from the real regions only.
        """
        rows, packing = self.real_regions(att_feats, att_masks)  # (M, F)
        tokens = self.shift_labels(labels)  # (S, T)
        return self._teacher_forcing_fn(rows, packing.index, packing.attn_mask, packing.batch, packing.length,
                                        packing.groups, tokens, target_mask(tokens, self.K), seq_per_img)

    def forward_xe(self, att_feats, labels, att_masks=None, seq_per_img=1):
        """Teacher forcing: log-probs (S, L-1, V); position i predicts labels[:, i+1]."""
        out = self.decoder_states(att_feats, labels, att_masks, seq_per_img)  # (S, T, D)
        return self._generator_fn(out[:, :labels.size(1) - 1])  # (S, L-1, V)

    def scored_logprobs(self, att_feats, labels, att_masks=None, masks=None, seq_per_img=1):
        """Teacher forcing at the scored positions only: (log-probs (M, V), targets (M,)).

        The M positions are those of masks[:, 1:] > 0 (all L-1 without masks), row by row; the generator and
        the log-softmax over the vocabulary run on them only. Row m equals forward_xe(...)[masks[:, 1:] > 0][m].
        """
        out = self.decoder_states(att_feats, labels, att_masks, seq_per_img)  # (S, T, D)
        length = labels.size(1) - 1
        targets = labels[:, 1:]  # (S, L-1)
        if masks is None:
            return self._generator_fn(out[:, :length].reshape(-1, out.size(-1))), targets.reshape(-1)
        scored = (masks[:, 1:length + 1] > 0).reshape(-1).nonzero().squeeze(1)  # (M,) into (S*(L-1))
        rows = out[:, :length].reshape(-1, out.size(-1)).index_select(0, scored)  # (M, D)
        return self._generator_fn(rows), targets.reshape(-1).index_select(0, scored)

    def region_attention(self, att_feats, att_masks, seq):
        """The last decoder layer's cross-attention, heads averaged, while the decoder reads the caption seq
        (B, T) it decoded (eval.py --dump_attention): (weights (B, T, N), log-probs (B, T, V)).

        Row t is the attention of the position that chose seq[:, t], over the N regions of att_feats (each row sums
        to one over the image's real regions; padding and regions past the batch's longest count weigh 0). The
        decoder input is the decoding's (K start zeros, then seq shifted by one group; the group mask, all K start
        zeros visible), so log-probs[b, t, seq[b, t]] is the log-prob the decoding gave that word, to rounding.
        Re-decoding the whole caption once keeps the decoding steps themselves free of attention bookkeeping."""
        batch, length, k = seq.size(0), seq.size(1), self.K
        memory, memory_mask = self.encode(att_feats, att_masks)  # (B, N', D), (B, 1, N') or None
        padded = math.ceil(length / k) * k
        tokens = torch.cat([seq.new_zeros(batch, k), seq[:, :padded - k]], dim=1)  # (B, T'): groups shifted by one
        x = self.model.embed(tokens)  # (B, T', D)
        mask = group_mask(padded, k, seq.device)  # (1, T', T')
        layers = self.model.decoder.layers
        for layer in layers[:-1]:
            x = layer(x, memory, memory_mask, mask)
        x, weights = layers[-1].forward_with_attention(x, memory, memory_mask, mask)  # (B, H, T', N')
        logprobs = self.model.generator(self.model.decoder.norm(x))[:, :length]  # (B, T, V)
        weights = weights.mean(1)[:, :length]  # (B, T, N'): heads averaged
        full = weights.new_zeros(batch, length, att_feats.size(1))  # (B, T, N)
        full[:, :, :weights.size(2)] = weights
        return full, logprobs

    # ---- decoding primitives -------------------------------------------------------------------------------
    def init_cache(self, memory, memory_mask, rows_per_image=1, use_cache=None, max_length=None):
        """A fresh decoding state for B images with rows_per_image rows each (see models.cache).

        memory (B, N, D) and memory_mask (B, 1, N) or None from encode. The cross-attention keys/values are
        projected once, from the real regions only. Without gradients the self-attention keys/values go into
        fixed buffers for max_length positions (default self.max_length), rounded up to whole K-word groups.
        Without the cache (use_cache off) every step re-decodes the prefix (prefix_step). How the steps run is
        chosen once here, by models.accel.decoding_step (cached_step, or a speed path with its numbers).
        """
        use_cache = self.use_cache if use_cache is None else use_cache
        capacity = None
        if use_cache and not torch.is_grad_enabled():
            capacity = math.ceil((max_length or self.max_length) / self.K) * self.K
        step = decoding_step(self, memory, use_cache, capacity)
        layers = None
        if use_cache:
            if memory_mask is None:
                packing = Packing(batch=memory.size(0), length=memory.size(1))
            else:
                packing = Packing(memory_mask.squeeze(1))
                packing = self._grouped(packing) if step.grouped_memory else packing
            rows = packing.unpad(memory)  # (M, D)
            layers = [LayerCache([(key.contiguous(), value.contiguous(), mask, group) for key, value, mask, group
                                  in memory_key_value(layer.src_attn, rows, packing)], capacity)
                      for layer in self.model.decoder.layers]
        cache = DecoderCache(memory, memory_mask, layers, rows_per_image, capacity, step)
        step.attach(cache)
        return cache

    def step(self, tokens, cache):
        """One K-word group: the previous group's tokens (S, K) -> log-probs of the next K words (S, K, V).

        The cache (updated in place, also returned) holds every earlier group. At decoding time all K start zeros
        are visible: there is no key-padding mask.
        """
        logprobs = cache.step(tokens, cache)  # (S, K, V): the implementation init_cache chose
        cache.length += tokens.size(1)
        return logprobs, cache

    def prefix_step(self, tokens, cache):
        """A step without layer caches (the reference's way): the whole prefix re-decoded, cross-attention
        recomputed -> log-probs of the newest K positions (S, K, V)."""
        k = tokens.size(1)
        prefix = cache.extend_prefix(tokens)  # (S, T)
        memory, memory_mask = cache.memory, cache.encoder_mask  # (B, N, D), (B, 1, N) or None
        if cache.rows_per_image > 1:
            memory = memory.repeat_interleave(cache.rows_per_image, dim=0)  # (S, N, D)
            if memory_mask is not None:
                memory_mask = memory_mask.repeat_interleave(cache.rows_per_image, dim=0)
        mask = group_mask(prefix.size(1), self.K, prefix.device)  # (1, T, T)
        out = self.model.decode(memory, memory_mask, prefix, mask)[:, -k:]  # (S, K, D)
        return self.model.generator(out)

    def cached_step(self, tokens, positions, self_mask, keys, values, memory, rows_per_image, filled=None):
        """One cached decoding step on plain tensors (what --compile 1 compiles): tokens (S, K) at positions (K,);
        per layer the self-attention keys/values and the memory keys/values (models.cache.LayerCache.memory).
        Fixed layout (self_mask (1, 1, 1, capacity) given, or the int `filled`): keys/values
        are the (S, H, capacity, dk) buffers, written in place, attended over under the mask or up to `filled`;
        growing layout (neither): the (S, H, T, dk) keys/values so far. Returns (log-probs (S, K, V), the keys, the
        values)."""
        x = self.model.embed(tokens, positions)  # (S, K, D)
        fixed = self_mask is not None or filled is not None
        new_keys, new_values = [], []
        for i, layer in enumerate(self.model.decoder.layers):
            buffers = StepBuffers(keys[i], values[i], memory[i], fixed, filled)
            x = layer.step(x, buffers, positions, self_mask, rows_per_image)
            new_keys.append(buffers.key)
            new_values.append(buffers.value)
        return self.model.generator(self.model.decoder.norm(x)), new_keys, new_values

    def decode(self, att_feats, att_masks=None, config=None, seq_per_img=1):
        """Caption a batch: a models.decoding.Decoded, (seq (B, max_length) int64, seqLogprobs (B, max_length)),
        zero padded, with the finished hypotheses as .hypotheses; config a models.decode_config.DecodeConfig
        (default: greedy). See models.decoding.generate."""
        return generate(self, att_feats, att_masks, config, seq_per_img)

    # ---- the reference call conventions --------------------------------------------------------------------
    def forward(self, fc_feats, att_feats, *args, mode='forward', **kwargs):
        """model(fc, att, labels, att_masks) -> log-probs (S, L-1, V);
        model(fc, att, att_masks, opt={...}, mode='sample') -> (seq, seqLogprobs) (B, max_length); beam search
        also leaves its finished beams in model.done_beams, as the reference did (its notebooks and tools read them
        there; our code reads decode's returned hypotheses).

        fc_feats are unused by this model (kept for the reference signature).
        """
        if mode == 'forward':
            return self.forward_xe(att_feats, *args, **kwargs)
        if mode == 'sample':
            return self._sample(att_feats, *args, **kwargs)
        raise ValueError(f"unknown mode {mode!r}: use 'forward' or 'sample'")

    def _sample(self, att_feats, att_masks=None, opt=None):
        # opt: the reference's sample-mode dict (model(..., opt={'beam_size': 3}, mode='sample')), not a Namespace;
        # its keyword name is the reference's API, kept (the one `opt` parameter left in models/, misc/).
        config, seq_per_img = DecodeConfig.from_reference_opt(opt)
        decoded = self.decode(att_feats, att_masks, config, seq_per_img=seq_per_img)
        if config.beam_size > 1:
            self.done_beams = decoded.hypotheses  # the reference's interface only
        return decoded


def build_model(config, vocab_size):
    """SATModel of a misc.options.configs.ModelConfig (models.setup) over vocab_size words."""
    return SATModel(vocab_size=vocab_size, K=config.K,
                    d_model=config.input_encoding_size, d_ff=config.rnn_size, num_layers=config.num_layers,
                    att_feat_size=config.att_feat_size, drop_prob_lm=config.drop_prob_lm, use_bn=config.use_bn,
                    max_length=config.max_length or 20, use_cache=config.use_cache)
