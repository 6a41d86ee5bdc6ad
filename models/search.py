"""Beam search for SATIC, batched over images; only uses `SATModel.step` and `DecoderCache.reorder`.

Each decoding step gives K distributions at once; the beams then advance K token-level steps from them, the
reference's beam_step applied to each position of the group in turn:
- every beam proposes its beam_size best words (the last vocabulary index, UNK, lowered by 1000); candidates are
  ranked by summed log-prob, ties broken by word rank first, then by beam (a stable sort of that order);
- at the very first position all beams are the same empty caption, so only beam 0 proposes;
- the distributions of the group's remaining positions follow their parent beam;
- a beam whose word is 0, or that reaches position max_length-1, is finished with its summed log-prob (length
  penalty optional, none by default) and its running sum becomes -1000 so that it is never extended again.
Groups start at t = 0, K, 2K, .. while t < max_length: when K does not divide max_length the last group is shorter
(only its positions below max_length are stepped), as in the reference (greedy decoding stops at the last whole
group instead).

Diverse beam search (group_size G > 1, the reference's for K = 1): G groups of beam_size // G beams, each with its
own decoding state; group d runs d decoding steps (K words each) behind group 0, and at each position every word
that an earlier group's beams hold at that position lowers the candidate by diversity_lambda per occurrence
before ranking (the stored per-word log-probs are the unpenalised ones, the running sum the penalised).
The decoding options act at every token position as steps on the beams' log-probs (models.logits_processors:
--decoding_constraint; the diversity penalty), after the UNK suppression.
The finished beams of each image, best first and cut to the group's width, are returned group after group
(SATModel.done_beams).

Shapes: B images, W beams per group, S = B*W rows, K group size, V vocabulary + 1, T max_length.
"""
import torch

from models.logits_processors import BEAM, History, Steps

UNK_PENALTY = 1000.0
FINISHED = -1000.0


def length_penalty_fn(spec):
    """'' (none), 'wu_<alpha>' (GNMT) or 'avg_<alpha>' (per-word average) -> f(length, logprob_sum)."""
    if not spec:
        return lambda length, logprob: logprob
    kind, _, alpha = spec.partition('_')
    try:
        alpha = float(alpha)
    except ValueError:
        kind = None
    if kind == 'wu':
        return lambda length, logprob: logprob / (((5 + length) ** alpha) / ((5 + 1) ** alpha))
    if kind == 'avg':
        return lambda length, logprob: logprob / length
    raise ValueError(f"unknown length penalty {spec!r}: use '', 'wu_<alpha>' or 'avg_<alpha>'")


def beam_search(model, memory, memory_mask, config, max_length):
    """memory (B, N, D), memory_mask (B, 1, N) -> done_beams: per image, group after group, that group's beams
    best first: {'seq': (T,) int64, 'logps': (T,) per-word log-probs, 'p': float score}.

    config: models.decode_config.DecodeConfig (beam_size, group_size, diversity_lambda, decoding_constraint,
    length_penalty, use_cache)."""
    groups = [_BeamGroup(model, memory, memory_mask, config, max_length) for _ in range(config.group_size)]
    starts = range(0, max_length, model.K)
    for step in range(len(starts) + len(groups) - 1):
        for d, group in enumerate(groups):
            if 0 <= step - d < len(starts) and not group.stopped:
                # Only the last group may stop early: the earlier ones' beams feed the diversity penalty.
                group.advance(starts[step - d], groups[:d], may_stop=d == len(groups) - 1)
    per_group = [group.results() for group in groups]  # G lists of B lists
    return [sum((done[b] for done in per_group), []) for b in range(memory.size(0))]


class _BeamGroup:
    """beam_size // group_size beams per image with their own decoding state."""

    def __init__(self, model, memory, memory_mask, config, max_length):
        self.model, self.config, self.max_length = model, config, max_length
        self.batch, self.width = memory.size(0), config.beams_per_group
        self.penalty = length_penalty_fn(config.length_penalty)
        self.steps = Steps.for_search(config, BEAM)
        device = memory.device
        b, w = self.batch, self.width
        self.cache = model.init_cache(memory, memory_mask, rows_per_image=w, use_cache=config.use_cache,
                                      max_length=max_length)
        self.rows = torch.arange(b, device=device).unsqueeze(1) * w  # (B, 1): first row of each image
        self.seq = torch.zeros(b, w, max_length, dtype=torch.long, device=device)  # (B, W, T)
        self.logps = torch.zeros(b, w, max_length, device=device)  # (B, W, T)
        self.sum = torch.zeros(b, w, device=device)  # (B, W) running summed (penalised) log-probs
        # Finished beams stay on the device until results(): one record per token position (seq, logps, score,
        # finished mask), read back to the host once. good: per image, finished beams scoring above `worst`.
        self.finished = []
        self.good = torch.zeros(b, dtype=torch.long, device=device)  # (B,)
        self.tokens = torch.zeros(b * w, model.K, dtype=torch.long, device=device)  # (S, K): the start group
        # The best score a finished beam restarted from -1000 could ever reach.
        self.worst = max(self.penalty(length, FINISHED) for length in range(1, max_length + 1))
        self.stopped = False

    def advance(self, t0, earlier, may_stop):
        """One decoding step (positions t0 .. t0+K-1, cut at max_length) for every image."""
        b, w, k = self.batch, self.width, self.model.K
        logprobs, self.cache = self.model.step(self.tokens, self.cache)  # (S, K, V)
        logprobs = logprobs.detach().float().view(b, w, k, -1).clone()  # (B, W, K, V)
        # reference quirk: the last index is suppressed as "UNK" even when the vocabulary has no UNK.
        logprobs[..., -1] -= UNK_PENALTY
        parents = torch.arange(w, device=logprobs.device).expand(b, w)  # (B, W): row of the group's start
        for j in range(min(k, self.max_length - t0)):
            logprobs, parent = self._token_step(logprobs[:, :, j], t0 + j, earlier, logprobs)
            parents = parents.gather(1, parent)
        if t0 + k >= self.max_length:
            self.stopped = True
            return
        # reference quirk: the reference goes on extending finished beams (from -1000) to max_length. Once every
        # beam is finished and each image holds its beams above anything such a beam could score, the returned
        # lists can no longer change: stop there.
        # One host read per decoding step, for this question only.
        if may_stop and bool(((self.sum <= FINISHED).all() & (self.good >= w).all())):
            self.stopped = True
            return
        self.cache.reorder((self.rows + parents).view(-1))
        self.tokens = self.seq[:, :, t0:t0 + k].reshape(b * w, k)  # (S, K)

    def _token_step(self, word_logprobs, t, earlier, group_logprobs):
        """The reference's beam_step at position t: word_logprobs (B, W, V). Returns the group's log-probs
        re-ordered by parent beam and the parent of each new beam (B, W)."""
        b, w = self.batch, self.width
        history = History(t, self.seq.view(b * w, -1), tuple(g.seq[:, :, t] for g in earlier))
        rows = word_logprobs.reshape(b * w, -1)  # (S, V)
        rows = self.steps.adjust(rows, history)
        word_logprobs, ranked = rows.view(b, w, -1), self.steps.steer(rows, history).view(b, w, -1)  # (B, W, V)
        top_ranked, top_words = ranked.topk(w, dim=-1)  # (B, W beams, W ranks), sorted
        top_logprobs = word_logprobs.gather(2, top_words)  # unpenalised, stored per word
        candidates = self.sum.unsqueeze(-1) + top_ranked  # (B, W beams, W ranks)
        if t == 0:
            candidates[:, 1:] = float('-inf')  # all beams are the same empty caption: expand beam 0 only

        def in_order(x):  # candidates in the reference's order: word rank, then beam
            return x.transpose(1, 2).reshape(b, w * w)  # (B, W*W), index = rank * W + beam
        new_sum, order = in_order(candidates).sort(dim=1, descending=True, stable=True)
        self.sum, order = new_sum[:, :w].contiguous(), order[:, :w]  # (B, W) new beams
        words = in_order(top_words).gather(1, order)  # (B, W)
        parent = order % w  # (B, W): the beam each new beam extends
        self.seq = self.seq.gather(1, parent.unsqueeze(-1).expand_as(self.seq))
        self.logps = self.logps.gather(1, parent.unsqueeze(-1).expand_as(self.logps))
        self.seq[:, :, t] = words
        self.logps[:, :, t] = in_order(top_logprobs).gather(1, order)
        # The group's remaining positions follow their parent beam.
        group_logprobs = group_logprobs.gather(1, parent.view(b, w, 1, 1).expand_as(group_logprobs))

        finished = (words == 0) if t < self.max_length - 1 else torch.ones_like(words, dtype=torch.bool)
        # The score in float64, as the reference's Python floats (length penalty included).
        score = self.penalty(t + 1, self.sum.double())  # (B, W)
        # self.seq and self.logps are new tensors at every position (gather above), so the record needs no copy.
        self.finished.append((self.seq, self.logps, score, finished))
        self.good += (finished & (score > self.worst)).sum(1)
        self.sum = self.sum.masked_fill(finished, FINISHED)
        return group_logprobs, parent

    def results(self):
        """Per image, its finished beams, best first, cut to the group's width (one copy to the host)."""
        if not self.finished:  # nothing was decoded (max_length 0): one empty caption each
            empty = {'seq': self.seq.new_zeros(self.max_length), 'logps': self.logps.new_zeros(self.max_length),
                     'p': 0.0}
            return [[dict(empty)] for _ in range(self.batch)]
        seqs, logps, scores, finished = zip(*self.finished)
        # (2, B, P, W) for P recorded positions: the finished mask and the scores, read back at once.
        host = torch.stack([torch.stack(finished, 1).double(), torch.stack(scores, 1)]).cpu().numpy()
        done = [[] for _ in range(self.batch)]
        # nonzero's order is image, then position, then beam: the order in which the reference collects them.
        for b, i, w in zip(*(index.tolist() for index in host[0].nonzero())):
            done[b].append({'seq': seqs[i][b, w], 'logps': logps[i][b, w], 'p': float(host[1, b, i, w])})
        return [sorted(beams, key=lambda beam: -beam['p'])[:self.width] for beams in done]

