"""The self-critical reward (Rennie et al. 2017, "new self-critical" leave-one-out baseline); its loss is
misc.train.losses.self_critical_loss.

Training with --self_critical_after samples S = seq_per_img captions per image; each one's reward is its CIDEr-D
against ALL of the image's references, with the train document frequencies cached by scripts/prepro_ngrams.py;
its baseline is the mean reward of the image's other S-1 samples. Sentences are scored as token-id strings, the end
token written as "0" (e.g. "1 5 33 0"), the same form prepro_ngrams counted.

As the reference (self-critical.pytorch get_scores): reward = cider_reward_weight * CIDEr-D
+ bleu_reward_weight * BLEU-4, BLEU-4 per sentence from pycocoevalcap's Bleu(4) on the same token-id strings; each
part is computed only when its weight is > 0, and the leave-one-out baseline is taken on the combined reward.

(ours) The parts are a registry, REWARDS (name -> RewardScorer subclass): a new reward is one class here,
decorated with @register_reward; opts.py makes its --<name>_reward_weight option (default_weight, help),
misc.train.loss_wrapper.LossConfig carries the weights as one mapping (reward_weights), and SelfCriticalReward adds the
parts up in the registry's order (CIDEr-D then BLEU-4: the reference's sum, the same numbers).
"""
import contextlib
import inspect
import io

import numpy as np

from misc.eval.cider_d import CiderD


def ids_to_str(ids, end_token_always=False):
    """Token ids -> "w1 w2 .. 0": the ids up to and including the first 0; nothing after it counts.

    reference quirk: a row with no 0 at all (a sample that ran to max_length, or a 16-word label row) gets no end
    token ("array_to_str" of self-critical.pytorch); kept because it changes rewards; end_token_always=True appends it.
    """
    words = []
    for w in ids:
        w = int(w)
        if w == 0:
            break
        words.append(str(w))
    else:
        if not end_token_always:
            return ' '.join(words)
    words.append('0')
    return ' '.join(words)


REWARDS = {}  # name -> RewardScorer subclass, in the order their parts are added up


def register_reward(scorer_class):
    """Class decorator: add a RewardScorer subclass to REWARDS under its name (its option:
    --<name>_reward_weight)."""
    name = scorer_class.name
    if not (isinstance(name, str) and name.isidentifier()) or name in REWARDS:
        raise ValueError(f'reward name {name!r}: an identifier, not already registered')
    REWARDS[name] = scorer_class
    return scorer_class


def reward_option(name):
    """The option (and options Namespace attribute) of reward `name`: '<name>_reward_weight'."""
    return f'{name}_reward_weight'


def default_reward_weights():
    """{name: default weight} of every registered reward (opts.py's defaults: cider 1, bleu 0)."""
    return {name: scorer_class.default_weight for name, scorer_class in REWARDS.items()}


class RewardScorer:
    """One part of the self-critical reward: per-caption scores of the sampled captions against their image's
    references. A subclass sets name, default_weight and help (its --<name>_reward_weight option) and defines
    scores(); SelfCriticalReward builds every registered one, and calls it only when its weight is > 0."""
    name = None
    default_weight = 0.0
    help = ''

    def __init__(self, cached_tokens_path, end_token_always=False, cache_size=None):
        """cached_tokens_path: the prepro_ngrams pickle (--cached_tokens, '.p' optional); end_token_always: see
        ids_to_str; cache_size: reference sets kept in memory (None: every image seen)."""
        self.end_token_always = end_token_always

    def scores(self, hyps, gts, seq_per_img, image_ids):
        """hyps: B*S token-id strings ("w1 w2 .. 0", ids_to_str), sample i of image i // S; gts: B arrays
        (n_refs, 16) of label rows; image_ids: B cache keys, or None. Returns (B*S,) float64."""
        raise NotImplementedError


@register_reward
class CiderReward(RewardScorer):
    """CIDEr-D against all of the image's references, with the train document frequencies of --cached_tokens."""
    name = 'cider'
    default_weight = 1
    help = ('self-critical reward = cider_reward_weight * CIDEr-D + bleu_reward_weight * BLEU-4 '
            '(a part is computed only when its weight is > 0, as the reference)')

    def __init__(self, cached_tokens_path, end_token_always=False, cache_size=None):
        super().__init__(cached_tokens_path, end_token_always, cache_size)
        # reference quirk: the document frequencies are read whatever the weights (a missing file fails here)
        self.cider = CiderD.from_cached_tokens(cached_tokens_path, cache_size=cache_size)

    def _reference_vectors(self, label_rows, key):
        rv = self.cider.lookup(key)
        if rv is None:  # only a cache miss converts the label rows
            refs = [ids_to_str(row, self.end_token_always) for row in label_rows]
            rv = self.cider.reference_vectors(refs, key)
        return rv

    def scores(self, hyps, gts, seq_per_img, image_ids):
        """image_ids: the cache keys (default: each gts array's bytes)."""
        rvs = []
        for b in range(len(gts)):
            label_rows = np.asarray(gts[b])
            key = image_ids[b] if image_ids is not None else (label_rows.shape, label_rows.dtype.str,
                                                               label_rows.tobytes())
            rvs.append(self._reference_vectors(label_rows, key))
        return self.cider.score_groups(hyps, rvs, [seq_per_img] * len(gts))


@register_reward
class BleuReward(RewardScorer):
    """Per-sentence BLEU-4 of each caption against its image's label rows, as the reference:
    pycocoevalcap's Bleu(4).compute_score(gts, res)[1][3] with res = {i: [hyp_i]}, gts = {i: the references of
    image i // S}, all token-id strings. Its progress prints are silenced."""
    name = 'bleu'
    default_weight = 0
    help = "weight of per-sentence BLEU-4 (pycocoevalcap's Bleu(4)) in the self-critical reward"

    def scores(self, hyps, gts, seq_per_img, image_ids):
        refs = [[ids_to_str(row, self.end_token_always) for row in np.asarray(rows)] for rows in gts]
        res = {i: [hyp] for i, hyp in enumerate(hyps)}
        refs_of = {i: refs[i // seq_per_img] for i in range(len(hyps))}
        return np.asarray(bleu_scores(refs_of, res)[3], dtype=np.float64)


class SelfCriticalReward:
    """The weighted sum of the registered rewards and its leave-one-out advantages, for S sampled captions per
    image."""

    def __init__(self, cached_tokens_path, weights=None, end_token_always=False, cache_size=None):
        """cached_tokens_path: the prepro_ngrams pickle (--cached_tokens, '.p' optional).
        weights: {reward name: weight} (LossConfig.reward_weights; a name it lacks: its default weight).
        cache_size: reference sets kept in memory (None: every image seen, about 6 KB each)."""
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(REWARDS))
        if unknown:
            raise ValueError(f"unknown reward(s) {', '.join(unknown)}: registered are {', '.join(REWARDS)}")
        self.weights = {**default_reward_weights(), **weights}
        self.end_token_always = end_token_always
        self.scorers = {name: scorer_class(cached_tokens_path, end_token_always=end_token_always,
                                           cache_size=cache_size)
                        for name, scorer_class in REWARDS.items()}

    def __call__(self, sample_seqs, gts, seq_per_img, image_ids=None):
        """sample_seqs: (B*S, T) token ids, zero after the end (a tensor or an array); gts: B arrays (n_refs, 16)
        of label rows; image_ids: B cache keys (default: each gts array's bytes). Sample i belongs to image i // S.
        Returns (advantage (B*S,) float32, rewards (B*S,) float64)."""
        if hasattr(sample_seqs, 'detach'):  # a torch tensor
            sample_seqs = sample_seqs.detach().cpu().numpy()
        seqs = np.asarray(sample_seqs)
        B, S = len(gts), seq_per_img
        if seqs.shape[0] != B * S:
            raise ValueError('%d samples for %d images x seq_per_img %d' % (seqs.shape[0], B, S))
        hyps = [ids_to_str(row, self.end_token_always) for row in seqs]
        rewards = np.zeros(B * S)  # (B*S,) float64
        for name, scorer in self.scorers.items():
            if self.weights[name] > 0:  # as the reference: a part with weight 0 is not computed
                rewards = rewards + self.weights[name] * scorer.scores(hyps, gts, S, image_ids)
        per_image = rewards.reshape(B, S)  # (B, S)
        if S > 1:
            baseline = (per_image.sum(axis=1, keepdims=True) - per_image) / (S - 1)  # (B, S) leave-one-out mean
        else:
            baseline = np.zeros_like(per_image)
        advantage = (per_image - baseline).reshape(-1).astype(np.float32)  # (B*S,)
        return advantage, rewards


def bleu_scores(gts, res):
    """pycocoevalcap's Bleu(4).compute_score(gts, res)[1] (per-sentence BLEU-1..4 lists) without its prints."""
    from pycocoevalcap.bleu.bleu import Bleu  # (pycocoevalcap: only with --bleu_reward_weight > 0)
    scorer = Bleu(4)
    if 'verbose' in inspect.signature(scorer.compute_score).parameters:
        return scorer.compute_score(gts, res, verbose=0)[1]
    with contextlib.redirect_stdout(io.StringIO()):  # versions that always print {'testlen': ..} and the ratio
        return scorer.compute_score(gts, res)[1]

