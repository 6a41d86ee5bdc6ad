"""An ensemble of captioners decoded as one model (eval_ensemble.py; docs/ensembles.md).

At every decoding step each member gives its log-probs for the K words of the group; the ensemble's are the log of
the weighted mean of the members' word probabilities, log(sum_i w_i p_i) with the weights normalised to sum to one
(the reference's eval_ensemble.py: softmax, weighted mean, log). `EnsembleModel` has SATModel's decoding surface
(`encode`, `init_cache`, `step`, `decode`, K, vocab_size, max_length), so the generation loop (models.decoding) with
every search (models.search: greedy, sampling, beam and diverse beam) and every decoding option runs on it unchanged:
its cache holds one decoding cache per member and `reorder` reorders each.

Members must share K (the same words per step) and the vocabulary (the same word ids), which the caller checks
with the files' names (eval_ensemble.py); their sizes (layers, d_model) may differ. Each member sees the region
features as it was trained on them: with `normalise` (one flag per member, its --norm_att_feat), the loader reads
them un-normalised and the members trained on L2-normalised features normalise them themselves (the loader's
normalisation, per region, padding left zero), so the members' order changes nothing.

Shapes: B images, S decoding rows, N regions, K group size, V vocabulary + 1, T positions.
"""
import math

import torch
from torch import nn

from models.decoding import generate


class EnsembleEncoding:
    """Every member's encoder output for one batch: memories [(B, N, D_i)] and masks [(B, 1, N) or None]."""

    def __init__(self, memories, masks):
        self.memories, self.masks = memories, masks


class EnsembleCache:
    """One decoding cache (models.cache.DecoderCache) per member, reordered together."""

    def __init__(self, caches):
        self.caches = caches

    @property
    def length(self):
        return self.caches[0].length

    def reorder(self, index):
        """Keep rows `index` (S,) of every member's per-row state (beam search's surviving beams)."""
        for cache in self.caches:
            cache.reorder(index)
        return self


class EnsembleModel(nn.Module):
    """Several SATModels of one K and vocabulary, their word probabilities averaged with `weights` at each step."""

    def __init__(self, members, weights=None, normalise=None):
        """normalise: per member, whether it L2-normalises the (un-normalised) region features it is given (None:
        no member does: the features arrive as every member was trained on them)."""
        super().__init__()
        if not members:
            raise ValueError('an ensemble needs at least one model')
        weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
        if len(weights) != len(members):
            raise ValueError(f'{len(weights)} weights for {len(members)} models: give one weight per model')
        if not all(math.isfinite(w) and w >= 0 for w in weights) or max(weights) <= 0:
            raise ValueError(f'weights must be finite, >= 0 and not all 0 (got {weights})')
        self.normalise = [False] * len(members) if normalise is None else [bool(n) for n in normalise]
        if len(self.normalise) != len(members):
            raise ValueError(f'{len(self.normalise)} normalise flags for {len(members)} models')
        for member in members[1:]:
            if (member.K, member.vocab_size) != (members[0].K, members[0].vocab_size):
                raise ValueError(f'members decode K={member.K} over {member.vocab_size} words and '
                                 f'K={members[0].K} over {members[0].vocab_size}: an ensemble needs one K and one '
                                 'vocabulary')
        self.members = nn.ModuleList(members)
        weights = [w / max(weights) for w in weights]  # (1e308 1e308 would overflow the sum)
        self.weights = [w / sum(weights) for w in weights]  # normalised
        # log w_i: log(sum_i w_i p_i) = logsumexp_i(log p_i + log w_i); a one-model ensemble is that model exactly.
        self.log_weights = [math.log(w) if w > 0 else float('-inf') for w in self.weights]
        self.K, self.vocab_size = members[0].K, members[0].vocab_size
        self.max_length = max(member.max_length for member in members)

    def combine(self, logprobs):
        """Members' log-probs [(..., V)] -> log of their weighted mean probabilities (..., V)."""
        stacked = torch.stack([lp.float() for lp in logprobs])  # (M, ..., V)
        log_weights = stacked.new_tensor(self.log_weights).view(-1, *[1] * (stacked.dim() - 1))
        return torch.logsumexp(stacked + log_weights, dim=0)

    def member_features(self, att_feats):
        """[(B, N, D)] region features as each member takes them: L2-normalised per region where normalise says
        (as the loader's --norm_att_feat 1; all-zero padding regions stay zero)."""
        if not any(self.normalise):
            return [att_feats] * len(self.members)
        norm = att_feats.norm(p=2, dim=-1, keepdim=True)  # (B, N, 1)
        normalised = att_feats / torch.where(norm > 0, norm, torch.ones_like(norm))
        return [normalised if n else att_feats for n in self.normalise]

    # ---- decoding primitives (SATModel's surface) --------------------------------------------------------------
    def encode(self, att_feats, att_masks=None):
        """-> (the first member's memory (B, N, D), for the searches' shapes and device; EnsembleEncoding of all).

        The searches pass the second value on to init_cache untouched, as they do SATModel's memory mask."""
        encoded = [member.encode(feats, att_masks)
                   for member, feats in zip(self.members, self.member_features(att_feats))]
        return encoded[0][0], EnsembleEncoding([m for m, _ in encoded], [mask for _, mask in encoded])

    def init_cache(self, memory, encoding, rows_per_image=1, use_cache=None, max_length=None):
        """Every member's fresh decoding state (SATModel.init_cache) for rows_per_image rows per image."""
        return EnsembleCache([member.init_cache(m, mask, rows_per_image=rows_per_image, use_cache=use_cache,
                                                max_length=max_length)
                              for member, m, mask in zip(self.members, encoding.memories, encoding.masks)])

    def step(self, tokens, cache):
        """One K-word group for every member: tokens (S, K) -> the averaged log-probs (S, K, V), the cache."""
        logprobs = [member.step(tokens, member_cache)[0] for member, member_cache in zip(self.members, cache.caches)]
        return self.combine(logprobs), cache

    def decode(self, att_feats, att_masks=None, config=None, seq_per_img=1):
        """Caption a batch as SATModel.decode does (models.decoding.generate): a models.decoding.Decoded."""
        return generate(self, att_feats, att_masks, config, seq_per_img)

    def region_attention(self, att_feats, att_masks, seq):
        """The members' SATModel.region_attention for the ensemble's caption seq (B, T): their attention weights
        (B, T, N) averaged with the ensemble's weights (rows still sum to one), and the ensemble's log-probs."""
        attention, logprobs = zip(*(member.region_attention(feats, att_masks, seq)
                                    for member, feats in zip(self.members, self.member_features(att_feats))))
        weights = sum(w * a for w, a in zip(self.weights, attention))
        return weights, self.combine(logprobs)

    # ---- teacher forcing (eval.py --verbose_loss) ----------------------------------------------------------------
    def forward(self, fc_feats, att_feats, labels, att_masks=None):
        """model(fc, att, labels, att_masks) -> the ensemble's teacher-forced log-probs (S, L-1, V)."""
        return self.combine([member.forward_xe(feats, labels, att_masks)
                             for member, feats in zip(self.members, self.member_features(att_feats))])
