"""The self-critical reward (Rennie et al. 2017, "new self-critical" leave-one-out baseline); its loss is
misc.losses.self_critical_loss.

Training with --self_critical_after samples S = seq_per_img captions per image; each one's reward is its CIDEr-D
against ALL of the image's references, with the train document frequencies cached by scripts/prepro_ngrams.py;
its baseline is the mean reward of the image's other S-1 samples. Sentences are scored as token-id strings, the end
token written as "0" (e.g. "1 5 33 0"), the same form prepro_ngrams counted.

As the reference (self-critical.pytorch get_scores): reward = cider_reward_weight * CIDEr-D
+ bleu_reward_weight * BLEU-4, BLEU-4 per sentence from pycocoevalcap's Bleu(4) on the same token-id strings; each
part is computed only when its weight is > 0, and the leave-one-out baseline is taken on the combined reward.
"""
import contextlib
import inspect
import io

import numpy as np
import torch

from misc.cider_d import CiderD


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


class SelfCriticalReward:
    """CIDEr-D rewards and leave-one-out advantages for S sampled captions per image."""

    def __init__(self, cached_tokens_path, cider_weight=1.0, end_token_always=False, cache_size=None,
                 bleu_weight=0.0):
        """cached_tokens_path: the prepro_ngrams pickle (--cached_tokens, '.p' optional).
        cache_size: reference sets kept in memory (None: every image seen, about 6 KB each).
        cider_weight, bleu_weight: --cider_reward_weight, --bleu_reward_weight."""
        self.cider = CiderD.from_cached_tokens(cached_tokens_path, cache_size=cache_size)
        self.cider_weight = cider_weight
        self.bleu_weight = bleu_weight
        self.end_token_always = end_token_always

    def _reference_vectors(self, label_rows, key):
        rv = self.cider.lookup(key)
        if rv is None:  # only a cache miss converts the label rows
            refs = [ids_to_str(row, self.end_token_always) for row in label_rows]
            rv = self.cider.reference_vectors(refs, key)
        return rv

    def __call__(self, sample_seqs, gts, seq_per_img, image_ids=None):
        """sample_seqs: (B*S, T) token ids, zero after the end; gts: B arrays (n_refs, 16) of label rows;
        image_ids: B cache keys (default: each gts array's bytes). Sample i belongs to image i // S.
        Returns (advantage (B*S,) float32, rewards (B*S,) float64)."""
        if torch.is_tensor(sample_seqs):
            sample_seqs = sample_seqs.detach().cpu().numpy()
        seqs = np.asarray(sample_seqs)
        B, S = len(gts), seq_per_img
        if seqs.shape[0] != B * S:
            raise ValueError('%d samples for %d images x seq_per_img %d' % (seqs.shape[0], B, S))
        hyps = [ids_to_str(row, self.end_token_always) for row in seqs]
        rewards = np.zeros(B * S)  # (B*S,) float64
        if self.cider_weight > 0:  # as the reference: a part with weight 0 is not computed
            rvs = []
            for b in range(B):
                label_rows = np.asarray(gts[b])
                key = image_ids[b] if image_ids is not None else (label_rows.shape, label_rows.dtype.str,
                                                                   label_rows.tobytes())
                rvs.append(self._reference_vectors(label_rows, key))
            rewards = rewards + self.cider_weight * self.cider.score_groups(hyps, rvs, [S] * B)
        if self.bleu_weight > 0:
            rewards = rewards + self.bleu_weight * self.bleu4(hyps, gts, S)
        per_image = rewards.reshape(B, S)  # (B, S)
        if S > 1:
            baseline = (per_image.sum(axis=1, keepdims=True) - per_image) / (S - 1)  # (B, S) leave-one-out mean
        else:
            baseline = np.zeros_like(per_image)
        advantage = (per_image - baseline).reshape(-1).astype(np.float32)  # (B*S,)
        return advantage, rewards

    def bleu4(self, hyps, gts, seq_per_img):
        """Per-sentence BLEU-4 of hyps (B*S strings) against their image's label rows, as the reference:
        pycocoevalcap's Bleu(4).compute_score(gts, res)[1][3] with res = {i: [hyp_i]}, gts = {i: the references of
        image i // S}, all token-id strings. Its progress prints are silenced. Returns (B*S,) float64."""
        refs = [[ids_to_str(row, self.end_token_always) for row in np.asarray(rows)] for rows in gts]
        res = {i: [hyp] for i, hyp in enumerate(hyps)}
        refs_of = {i: refs[i // seq_per_img] for i in range(len(hyps))}
        return np.asarray(bleu_scores(refs_of, res)[3], dtype=np.float64)


def bleu_scores(gts, res):
    """pycocoevalcap's Bleu(4).compute_score(gts, res)[1] (per-sentence BLEU-1..4 lists) without its prints."""
    from pycocoevalcap.bleu.bleu import Bleu
    scorer = Bleu(4)
    if 'verbose' in inspect.signature(scorer.compute_score).parameters:
        return scorer.compute_score(gts, res, verbose=0)[1]
    with contextlib.redirect_stdout(io.StringIO()):  # versions that always print {'testlen': ..} and the ratio
        return scorer.compute_score(gts, res)[1]

