"""Cross-entropy losses over teacher-forced log-probabilities (SPEC.md section 4)."""
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


def build_criterion(label_smoothing):
    return LabelSmoothing(label_smoothing) if label_smoothing > 0 else LanguageModelCriterion()
