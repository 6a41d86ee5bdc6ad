"""The training losses: cross-entropy (or label smoothing) over teacher-forced log-probabilities, and the
self-critical policy-gradient loss (README, "The COCO recipe").

The criteria's forward(logprobs (S, T, V), target, mask) is the reference's form; scored(logprobs (M, V),
target (M,)) takes only the M scored positions (SATModel.scored_logprobs) and gives the same value.
"""
import math

import torch
from torch import nn


class LanguageModelCriterion(nn.Module):
    """Masked NLL averaged over the mask's tokens."""

    def forward(self, logprobs, target, mask):
        """logprobs (S, T, V); target (S, >=T) ids; mask (S, >=T) 1/0. Returns a scalar."""
        T = logprobs.size(1)
        target, mask = target[:, :T], mask[:, :T].to(logprobs.dtype)
        nll = -logprobs.gather(2, target.unsqueeze(2)).squeeze(2)  # (S, T)
        return (nll * mask).sum() / mask.sum()

    def scored(self, logprobs, target):
        """The same loss from the scored positions only (SATModel.scored_logprobs): logprobs (M, V), target (M,)."""
        return -logprobs.gather(1, target.unsqueeze(1)).mean()


class LabelSmoothing(nn.Module):
    """KL divergence to a smoothed target: 1-e on the word, e/(V-1) on every other entry (token 0 included)."""

    def __init__(self, smoothing=0.0):
        super().__init__()
        self.smoothing = smoothing
        self.confidence = 1.0 - smoothing

    def forward(self, logprobs, target, mask):
        """logprobs (S, T, V); target (S, >=T) ids; mask (S, >=T) 1/0. Returns a scalar."""
        T, V = logprobs.size(1), logprobs.size(2)
        target, mask = target[:, :T], mask[:, :T].to(logprobs.dtype)
        true_dist = torch.full_like(logprobs, self.smoothing / (V - 1))  # (S, T, V)
        true_dist.scatter_(2, target.unsqueeze(2), self.confidence)
        # KL(true || model) per position, with 0 * log 0 = 0 as in nn.KLDivLoss
        kl = torch.where(true_dist > 0, true_dist * (true_dist.log() - logprobs), torch.zeros_like(logprobs))
        return (kl.sum(2) * mask).sum() / mask.sum()

    def scored(self, logprobs, target):
        """The same loss from the scored positions only (SATModel.scored_logprobs): logprobs (M, V), target (M,).

        The KL per position in closed form, without the (M, V) smoothed target: with t = e/(V-1) off the word and
        c = 1-e on it, sum_j t_j (log t_j - lp_j) = (V-1) t log t + c log c - t (sum_j lp_j - lp_y) - c lp_y.
        """
        vocab = logprobs.size(1)
        other, conf = self.smoothing / (vocab - 1), self.confidence
        entropy = sum(p * math.log(p) * n for p, n in ((other, vocab - 1), (conf, 1)) if p > 0)  # 0 log 0 = 0
        word = logprobs.gather(1, target.unsqueeze(1)).squeeze(1)  # (M,)
        kl = entropy - other * (logprobs.sum(1) - word) - conf * word  # (M,)
        return kl.mean()


def build_criterion(label_smoothing):
    return LabelSmoothing(label_smoothing) if label_smoothing > 0 else LanguageModelCriterion()


def self_critical_loss(sample_logprobs, sample_seqs, advantage):
    """-sum(logp * advantage * mask) / sum(mask), mask = [1, (seq > 0)[:, :-1]] (the first end token counts).

    sample_logprobs: (B*S, T) log-probabilities of the sampled tokens; sample_seqs: (B*S, T);
    advantage: (B*S,) numpy array or tensor (misc.train.rewards.SelfCriticalReward). Returns a scalar tensor."""
    advantage = torch.as_tensor(advantage, dtype=sample_logprobs.dtype, device=sample_logprobs.device)
    mask = (sample_seqs > 0).to(sample_logprobs.dtype)  # (B*S, T)
    mask = torch.cat([mask.new_ones(mask.size(0), 1), mask[:, :-1]], dim=1)  # (B*S, T)
    return -(sample_logprobs * advantage[:, None] * mask).sum() / mask.sum()
