"""The search strategies of the one generation loop (models.decoding.generate): at each token position, given that
position's log-probs after the decoding steps (models.logits_processors), which words the hypotheses keep.

A strategy holds one group of hypotheses with its own decoding state (`cache`, the next step's `tokens`); the loop
steps the model, applies the decoding steps and hands each position to `choose`. Two strategies:

- `WidthOne`, greedy (argmax) and sampling: every row is its own hypothesis of width one (rows_per_image rows per
  image, e.g. self-critical's sampled captions). Decoding steps start at t = 0, K, 2K, .. while t + K <= max_length
  (the last whole group). A caption is finished at the first group holding a 0: its later groups are 0 in seq,
  while the words after the 0 inside that group are kept (decode_sequence stops at the first 0 anyway). Without a
  decoding step that reads the words before t, a whole group is chosen at once (`choose_group`).
- `Beam`, the reference's beam_step applied to each position of a group in turn (batched over images):
  - every beam proposes its beam_size best words (the last vocabulary index, UNK, lowered by 1000); candidates are
    ranked by summed log-prob, ties broken by word rank first, then by beam (a stable sort of that order);
  - at the very first position all beams are the same empty caption, so only beam 0 proposes;
  - the distributions of the group's remaining positions follow their parent beam;
  - a beam whose word is 0, or that reaches position max_length-1, is finished with its summed log-prob (length
    penalty optional, none by default) and its running sum becomes -1000 so that it is never extended again.
  Groups start at t = 0, K, 2K, .. while t < max_length: when K does not divide max_length the last group is shorter
  (only its positions below max_length are stepped), as in the reference (greedy decoding stops at the last whole
  group instead).
  Diverse beam search (group_size G > 1, the reference's for K = 1) is G `Beam` groups of beam_size // G beams; the
  loop runs group d d decoding steps (K words each) behind group 0, and its diversity penalty (a decoding step)
  reads the earlier groups' words at the same position (`History.earlier`).

Finished hypotheses, per image: {'seq': (T,) int64, 'logps': (T,) per-word log-probs, 'p': float score}. Their score
is the length penalty of (length, summed log-prob), the end token included: beam search ranks by it; for a width-one
search it is the score of the one path of each row (the penalty cannot change an argmax or a draw, which see one
position at a time, so it changes no caption there).

Shapes: B images, W beams per group, R rows (B * rows per image, or B * W), K group size, V vocabulary + 1,
T max_length.
"""
import torch

from models.logits_processors import BEAM, GREEDY, History

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


def searches_for(model, memory, memory_mask, config, max_length, rows_per_image=1):
    """The hypothesis groups of one decoding (config: models.decode_config.DecodeConfig): one WidthOne for
    beam_size 1 (rows_per_image rows per image), else group_size Beam groups."""
    if config.beam_size == 1:
        return [WidthOne(model, memory, memory_mask, config, max_length, rows_per_image)]
    return [Beam(model, memory, memory_mask, config, max_length) for _ in range(config.group_size)]


class WidthOne:
    """Greedy (config.sample_max) or sampled decoding: each row's word is its argmax, or one draw from the steered
    distribution (the kept log-prob is the model's, read after the shaping steps)."""
    kind = GREEDY  # the decoding steps that apply (models.logits_processors)
    per_position = False  # a whole group at once unless a decoding step reads the words before t

    def __init__(self, model, memory, memory_mask, config, max_length, rows_per_image=1):
        rows, self.k = memory.size(0) * rows_per_image, model.K
        self.rows_per_image, self.max_length = rows_per_image, max_length
        self.sample_max, self.penalty = config.sample_max, length_penalty_fn(config.length_penalty)
        self.cache = model.init_cache(memory, memory_mask, rows_per_image=rows_per_image, use_cache=config.use_cache,
                                      max_length=max_length)
        self.seq = memory.new_zeros(rows, max_length, dtype=torch.long)  # (R, T)
        self.seq_logprobs = memory.new_zeros(rows, max_length, dtype=torch.float32)  # (R, T), even under autocast
        self.tokens = memory.new_zeros(rows, self.k, dtype=torch.long)  # (R, K): the start group
        self.unfinished = memory.new_ones(rows, dtype=torch.bool)  # (R,)
        self.words = None  # (R, K) the group chosen at once (choose_group)
        self.stopped = False

    def starts(self):
        # The reference ran one more group than fits and threw it away; stopping here gives the same output.
        return range(0, self.max_length - self.k + 1, self.k)

    def span(self, t0):
        return self.k

    def prepare(self, logprobs):
        return logprobs

    def history(self, t, earlier):
        return History(t, self.seq)

    def _pick(self, reported, ranked):
        """Argmax or one multinomial draw per position: (..., V) -> words, their log-probs (...)."""
        if self.sample_max:
            ranked_logprobs, words = ranked.max(dim=-1)
            if ranked is reported:
                return words, ranked_logprobs
        else:
            probs = torch.exp(ranked.detach())  # unnormalised when a step (temperature) rescaled it
            words = torch.multinomial(probs.reshape(-1, probs.size(-1)), 1).view(probs.shape[:-1])
        return words, reported.gather(-1, words.unsqueeze(-1)).squeeze(-1)

    def choose(self, t, reported, ranked, logprobs):
        """Position t: reported / ranked (R, V). Written to seq at once (the next position's history reads it)."""
        word, word_logprob = self._pick(reported, ranked)  # (R,) each
        self.seq[:, t] = word * self.unfinished  # finished captions emit zeros
        # reference quirk: seqLogprobs keeps the log-prob of the model's choice even for finished captions
        # (zero padding starts only where the whole batch had finished).
        self.seq_logprobs[:, t] = word_logprob
        return logprobs

    def choose_group(self, t0, reported, ranked):
        """The K positions from t0 at once: reported / ranked (R, K, V)."""
        words, word_logprobs = self._pick(reported, ranked)  # (R, K) each
        self.words = words * self.unfinished.unsqueeze(1)  # finished captions emit zeros
        self.seq[:, t0:t0 + self.k] = self.words
        self.seq_logprobs[:, t0:t0 + self.k] = word_logprobs  # (the quirk of choose)

    def end_step(self, t0, may_stop):
        # The step's words (R, K) as a tensor of their own: seq changes in place later, and autograd keeps the
        # embedding's index.
        words = self.seq[:, t0:t0 + self.k].clone() if self.words is None else self.words
        self.words = None
        self.unfinished = self.unfinished & (words > 0).all(dim=1)
        self.stopped = not self.unfinished.any()  # one host read per decoding step
        self.tokens = words

    @staticmethod
    def collect(searches):
        """(seq (R, T), seqLogprobs (R, T), hypotheses): per image its rows' hypotheses in row order, scored when
        first read (a host read that greedy evaluation and sampling do not pay unless they ask)."""
        (search,) = searches
        decoded = len(search.starts()) * search.k  # positions of the whole groups decoded

        def hypotheses(seq, logprobs):
            return _row_hypotheses(seq, logprobs, decoded, search.rows_per_image, search.penalty)
        return search.seq, search.seq_logprobs, hypotheses


def _row_hypotheses(seq, logprobs, decoded, rows_per_image, penalty):
    """Each row of seq (R, T) as a hypothesis scored over its words up to the first 0 (included) among the
    `decoded` positions; grouped per image."""
    rows = seq.size(0)
    before_end = (seq[:, :decoded] == 0).cumsum(1) == 0  # (R, T'): positions before the first 0
    length = (before_end.sum(1) + 1).clamp(max=decoded)  # (R,): the end token included
    kept = torch.arange(decoded, device=seq.device) < length.unsqueeze(1)  # (R, T')
    total = (logprobs[:, :decoded].detach().double() * kept).sum(1)  # (R,) in float64, as beam scores
    scores = [penalty(n, s) if n > 0 else 0.0 for n, s in zip(length.tolist(), total.tolist())]
    found = [{'seq': seq[r], 'logps': logprobs[r], 'p': scores[r]} for r in range(rows)]
    return [found[i:i + rows_per_image] for i in range(0, rows, rows_per_image)]


class Beam:
    """beam_size // group_size beams per image with their own decoding state (see the module docstring)."""
    kind = BEAM
    per_position = True

    def __init__(self, model, memory, memory_mask, config, max_length):
        self.k, self.max_length = model.K, max_length
        self.batch, self.width = memory.size(0), config.beams_per_group
        self.penalty = length_penalty_fn(config.length_penalty)
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
        self.tokens = torch.zeros(b * w, self.k, dtype=torch.long, device=device)  # (R, K): the start group
        # The best score a finished beam restarted from -1000 could ever reach.
        self.worst = max(self.penalty(length, FINISHED) for length in range(1, max_length + 1))
        self.parents = None  # (B, W): during a decoding step, each beam's row at the step's start
        self.stopped = False

    def starts(self):
        return range(0, self.max_length, self.k)

    def span(self, t0):
        return min(self.k, self.max_length - t0)

    def prepare(self, logprobs):
        """A step's log-probs (R, K, V) -> float copies with UNK suppressed."""
        b, w = self.batch, self.width
        logprobs = logprobs.detach().float().view(b, w, self.k, -1).clone()  # (B, W, K, V)
        # reference quirk: the last index is suppressed as "UNK" even when the vocabulary has no UNK.
        logprobs[..., -1] -= UNK_PENALTY
        self.parents = torch.arange(w, device=logprobs.device).expand(b, w)  # (B, W): row of the group's start
        return logprobs.view(b * w, self.k, -1)

    def history(self, t, earlier):
        return History(t, self.seq.view(self.batch * self.width, -1), tuple(g.seq[:, :, t] for g in earlier))

    def choose(self, t, reported, ranked, logprobs):
        """The reference's beam_step at position t: reported / ranked (R, V), logprobs the step's (R, K, V).
        Returns logprobs re-ordered by parent beam."""
        b, w = self.batch, self.width
        word_logprobs, ranked = reported.view(b, w, -1), ranked.view(b, w, -1)  # (B, W, V)
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
        self.parents = self.parents.gather(1, parent)
        self.seq = self.seq.gather(1, parent.unsqueeze(-1).expand_as(self.seq))
        self.logps = self.logps.gather(1, parent.unsqueeze(-1).expand_as(self.logps))
        self.seq[:, :, t] = words
        self.logps[:, :, t] = in_order(top_logprobs).gather(1, order)
        # The group's remaining positions follow their parent beam.
        logprobs = logprobs.view(b, w, self.k, -1)  # (B, W, K, V)
        logprobs = logprobs.gather(1, parent.view(b, w, 1, 1).expand_as(logprobs)).view(b * w, self.k, -1)

        finished = (words == 0) if t < self.max_length - 1 else torch.ones_like(words, dtype=torch.bool)
        # The score in float64, as the reference's Python floats (length penalty included).
        score = self.penalty(t + 1, self.sum.double())  # (B, W)
        # self.seq and self.logps are new tensors at every position (gather above), so the record needs no copy.
        self.finished.append((self.seq, self.logps, score, finished))
        self.good += (finished & (score > self.worst)).sum(1)
        self.sum = self.sum.masked_fill(finished, FINISHED)
        return logprobs

    def end_step(self, t0, may_stop):
        """After the positions of the step at t0: stop, or follow the surviving beams."""
        b, w, k = self.batch, self.width, self.k
        if t0 + k >= self.max_length:
            self.stopped = True
            return
        # reference quirk: the reference goes on extending finished beams (from -1000) to max_length. Once every
        # beam is finished and each image holds its beams above anything such a beam could score, the returned
        # lists can no longer change: stop there (only the last group: the earlier ones' beams feed the diversity
        # penalty). One host read per decoding step, for this question only.
        if may_stop and bool(((self.sum <= FINISHED).all() & (self.good >= w).all())):
            self.stopped = True
            return
        self.cache.reorder((self.rows + self.parents).view(-1))
        self.tokens = self.seq[:, :, t0:t0 + k].reshape(b * w, k)  # (R, K)

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

    @staticmethod
    def collect(groups):
        """(seq (B, T), seqLogprobs (B, T), hypotheses): per image, group after group, that group's beams best
        first; the caption is the first (group 0's best)."""
        per_group = [group.results() for group in groups]  # G lists of B lists
        hypotheses = [sum((done[b] for done in per_group), []) for b in range(groups[0].batch)]
        seq = torch.stack([beams[0]['seq'] for beams in hypotheses])
        logprobs = torch.stack([beams[0]['logps'] for beams in hypotheses])
        return seq, logprobs, hypotheses
