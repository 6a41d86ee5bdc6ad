"""The self-critical reward (Rennie et al. 2017, "new self-critical" leave-one-out baseline) and its loss.

Training with --self_critical_after samples S = seq_per_img captions per image; each one's reward is its CIDEr-D
against ALL of the image's references, with the train document frequencies cached by scripts/prepro_ngrams.py;
its baseline is the mean reward of the image's other S-1 samples. Sentences are scored as token-id strings, the end
token written as "0" (e.g. "1 5 33 0"), the same form prepro_ngrams counted.
"""
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

    def __init__(self, cached_tokens_path, cider_weight=1.0, end_token_always=False, cache_size=None):
        """cached_tokens_path: the prepro_ngrams pickle (--cached_tokens, '.p' optional).
        cache_size: reference sets kept in memory (None: every image seen, about 6 KB each)."""
        self.cider = CiderD.from_cached_tokens(cached_tokens_path, cache_size=cache_size)
        self.cider_weight = cider_weight
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
        rvs = []
        for b in range(B):
            label_rows = np.asarray(gts[b])
            key = image_ids[b] if image_ids is not None else (label_rows.shape, label_rows.dtype.str,
                                                               label_rows.tobytes())
            rvs.append(self._reference_vectors(label_rows, key))
        hyps = [ids_to_str(row, self.end_token_always) for row in seqs]
        rewards = self.cider_weight * self.cider.score_groups(hyps, rvs, [S] * B)  # (B*S,)
        per_image = rewards.reshape(B, S)  # (B, S)
        if S > 1:
            baseline = (per_image.sum(axis=1, keepdims=True) - per_image) / (S - 1)  # (B, S) leave-one-out mean
        else:
            baseline = np.zeros_like(per_image)
        advantage = (per_image - baseline).reshape(-1).astype(np.float32)  # (B*S,)
        return advantage, rewards


def self_critical_loss(sample_logprobs, sample_seqs, advantage):
    """-sum(logp * advantage * mask) / sum(mask), mask = [1, (seq > 0)[:, :-1]] (the first end token counts).

    sample_logprobs: (B*S, T) log-probabilities of the sampled tokens; sample_seqs: (B*S, T);
    advantage: (B*S,) numpy array or tensor. Returns a scalar tensor."""
    advantage = torch.as_tensor(advantage, dtype=sample_logprobs.dtype, device=sample_logprobs.device)
    mask = (sample_seqs > 0).to(sample_logprobs.dtype)  # (B*S, T)
    mask = torch.cat([mask.new_ones(mask.size(0), 1), mask[:, :-1]], dim=1)  # (B*S, T)
    return -(sample_logprobs * advantage[:, None] * mask).sum() / mask.sum()
