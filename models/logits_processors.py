"""The decoding options as steps on one token position's log-probabilities, shared by every search.

A step ("logits processor") is given the log-probs (R, V) of R rows at position t and the words chosen so far
(`History`) and returns adjusted log-probs. The generation loop (models.decoding, the one place that applies them)
asks `Steps.for_search(config, search.kind)` for a search's (models.search) and applies them in `PROCESSORS` order:
- the steps that shape the distribution (`reported = True`) first: the chosen word's log-prob is read from their
  output, as the reference (`Steps.adjust`);
- then those that only steer the choice (`reported = False`: the sampling temperature, the diversity penalty of
  beam ranking), whose output picks the word but is never stored (`Steps.steer`).
A step that reads the words before t (`needs_history`) makes greedy/sampling choose a group's K positions one
after the other; without one, a whole group (B, K, V) is chosen at once and `history` is None.

Adding a decoding option: a `DecodeConfig` field (models.decode_config), its line in opts.add_decoding_options,
one step class here listed in `PROCESSORS`, and its test in tests/test_decoding.py.

Shapes: R rows (B images, or B*W beams), B images, W beams per group, V vocabulary + 1, T max_length.
"""
import dataclasses

import torch

GREEDY, BEAM = 'greedy', 'beam'  # greedy covers sampling: both choose each row's word alone

# reference quirk: trigram blocking is a soft penalty, ln(1/2) * alpha with alpha = 2, per remembered occurrence.
TRIGRAM_PENALTY = -0.693
TRIGRAM_ALPHA = 2.0


@dataclasses.dataclass(frozen=True)
class History:
    """What a step may read at position t: seq (R, T), each row's words (those before t are chosen); earlier:
    diverse beam search, each earlier group's words at t, (B, W') per group (empty elsewhere)."""
    t: int
    seq: torch.Tensor
    earlier: tuple = ()


class LogitsProcessor:
    """One adjustment of one position's log-probs: `from_config` builds it when its option is on."""
    searches = (GREEDY, BEAM)  # the searches that apply it
    reported = True  # False: steers the choice only; the stored log-probs are those before it
    needs_history = True  # reads History (the words before t); False: history may be None

    @classmethod
    def from_config(cls, config):
        """This step for a models.decode_config.DecodeConfig, or None when its option is off."""
        raise NotImplementedError

    def __call__(self, logprobs, history):
        """logprobs (R, V) at history.t -> adjusted (R, V); (..., V) when needs_history is False."""
        raise NotImplementedError


class PreviousWordBan(LogitsProcessor):
    """--decoding_constraint: the word just before position t gets -inf (every position but the first)."""

    @classmethod
    def from_config(cls, config):
        return cls() if config.decoding_constraint else None

    def __call__(self, logprobs, history):
        if history.t == 0:
            return logprobs
        # A copy of the index: seq is written in place after this step, and autograd keeps scatter's index.
        previous = history.seq[:, history.t - 1:history.t].clone()  # (R, 1)
        return logprobs.scatter(1, previous, float('-inf'))


class TrigramPenalty(LogitsProcessor):
    """--block_trigrams: from t >= 3, each remembered follower of the pair (w[t-2], w[t-1]) costs ln(1/2) * 2 per
    occurrence. Greedy and sampling only, as the reference."""
    searches = (GREEDY,)

    @classmethod
    def from_config(cls, config):
        return cls() if config.block_trigrams else None

    def __call__(self, logprobs, history):
        if history.t < 3:
            return logprobs
        return logprobs + trigram_penalty(history.seq, history.t, logprobs.size(-1)).to(logprobs.dtype)


def trigram_penalty(seq, t, vocab):
    """(R, V) penalties at position t >= 3 from seq[:, :t] (R, >=t).

    Each row remembers, for every pair of consecutive words, the words that followed it (trigrams ending at
    positions 2 .. t-1); every remembered follower of the pair (w[t-2], w[t-1]) costs ln(1/2) * 2 per occurrence.
    """
    first, second, third = seq[:, 0:t - 2], seq[:, 1:t - 1], seq[:, 2:t]  # (R, t-2) each
    same_pair = (first == seq[:, t - 2:t - 1]) & (second == seq[:, t - 1:t])  # (R, t-2)
    counts = seq.new_zeros(seq.size(0), vocab, dtype=torch.float32)  # (R, V)
    counts.scatter_add_(1, third, same_pair.float())
    return counts * TRIGRAM_PENALTY * TRIGRAM_ALPHA


class DiversityPenalty(LogitsProcessor):
    """--group_size G > 1 --diversity_lambda l: a word that earlier groups' beams hold at position t lowers a
    beam's candidate by l per occurrence, for ranking only (the stored per-word log-probs are unpenalised)."""
    searches = (BEAM,)
    reported = False

    def __init__(self, diversity_lambda):
        self.diversity_lambda = diversity_lambda

    @classmethod
    def from_config(cls, config):
        return cls(config.diversity_lambda) if config.group_size > 1 else None

    def __call__(self, logprobs, history):
        if not history.earlier:
            return logprobs
        batch, vocab = history.earlier[0].size(0), logprobs.size(-1)
        counts = torch.zeros(batch, vocab, device=logprobs.device)  # (B, V)
        for words in history.earlier:
            counts.scatter_add_(1, words, torch.ones_like(words, dtype=counts.dtype))
        penalised = logprobs.view(batch, -1, vocab)  # (B, W, V)
        # One subtraction per occurrence, as the reference: up to one per earlier beam; a count below n subtracts
        # 0.0, which leaves the value unchanged (no host read of counts.max()).
        for n in range(1, sum(words.size(1) for words in history.earlier) + 1):
            penalised = penalised - self.diversity_lambda * (counts >= n).unsqueeze(1).to(penalised.dtype)
        return penalised.view(-1, vocab)  # (R, V)


class Temperature(LogitsProcessor):
    """--sample_max 0 --temperature τ: the draw is from exp(logprobs / τ) (unnormalised when τ != 1); the kept
    log-prob is the model's."""
    searches = (GREEDY,)
    reported = False
    needs_history = False

    def __init__(self, temperature):
        self.temperature = temperature

    @classmethod
    def from_config(cls, config):
        return None if config.sample_max else cls(config.temperature)

    def __call__(self, logprobs, history):
        return logprobs.detach() / self.temperature


# The order in which the steps act (the reference's: constraint, then trigrams, then the choice).
PROCESSORS = (PreviousWordBan, TrigramPenalty, DiversityPenalty, Temperature)


class Steps:
    """The steps of one search, in PROCESSORS order."""

    def __init__(self, processors):
        self.shaping = [p for p in processors if p.reported]
        self.steering = [p for p in processors if not p.reported]
        self.needs_history = any(p.needs_history for p in processors)

    @classmethod
    def for_search(cls, config, search):
        """The steps that `search` (GREEDY or BEAM) applies under `config` (a DecodeConfig)."""
        built = (step.from_config(config) for step in PROCESSORS if search in step.searches)
        return cls([step for step in built if step is not None])

    def adjust(self, logprobs, history):
        """The distribution the chosen word's log-prob is read from."""
        for step in self.shaping:
            logprobs = step(logprobs, history)
        return logprobs

    def steer(self, logprobs, history):
        """What the choice (argmax, draw or beam ranking) is made on, from adjust's output."""
        for step in self.steering:
            logprobs = step(logprobs, history)
        return logprobs
