"""Beam search for SATIC, batched over images; only uses `SATModel.step` and `DecoderCache.reorder`.

Each decoding step gives K distributions at once; the beams then advance K token-level steps from them, the
reference's beam_step applied to each position of the group in turn:
- every beam proposes its beam_size best words (the last vocabulary index, UNK, lowered by 1000); candidates are
  ranked by summed log-prob, ties broken by word rank first, then by beam (a stable sort of that order);
- at the very first position all beams are the same empty caption, so only beam 0 proposes;
- the distributions of the group's remaining positions follow their parent beam;
- a beam whose word is 0, or that reaches the last position, is finished with its summed log-prob (length
  penalty optional, none by default) and its running sum becomes -1000 so that it is never extended again.
The finished beams of each image, best first and cut to beam_size, are returned (SATModel.done_beams).

Shapes: B images, W beam width, S = B*W rows, K group size, V vocabulary + 1, T max_length.
"""
import torch

UNK_PENALTY = 1000.0
FINISHED = -1000.0


def length_penalty_fn(spec):
    """'' (none), 'wu_<alpha>' (GNMT) or 'avg_<alpha>' (per-word average) -> f(length, logprob_sum)."""
    if not spec:
        return lambda length, logprob: logprob
    kind, alpha = spec.split('_')
    alpha = float(alpha)
    if kind == 'wu':
        return lambda length, logprob: logprob / (((5 + length) ** alpha) / ((5 + 1) ** alpha))
    if kind == 'avg':
        return lambda length, logprob: logprob / length
    raise ValueError(f"unknown length penalty {spec!r}: use '', 'wu_<alpha>' or 'avg_<alpha>'")


def beam_search(model, memory, memory_mask, beam_size, max_length, use_cache=None, length_penalty=''):
    """memory (B, N, D), memory_mask (B, 1, N) -> done_beams: per image a list of beam_size dicts, best first,
    {'seq': (T,) int64, 'logps': (T,) per-word log-probs, 'p': float score}."""
    batch, w, k = memory.size(0), beam_size, model.K
    penalty = length_penalty_fn(length_penalty)
    device = memory.device
    last_start = max_length - k  # last group start that fits
    last_pos = last_start // k * k + k - 1 if last_start >= 0 else -1  # last position decoded
    cache = model.init_cache(memory, memory_mask, beam=w, use_cache=use_cache)
    rows = torch.arange(batch, device=device).unsqueeze(1) * w  # (B, 1): first row of each image
    worst = max(penalty(length, FINISHED) for length in range(1, max_length + 1))  # best score from a dead beam

    beam_seq = torch.zeros(batch, w, max_length, dtype=torch.long, device=device)  # (B, W, T)
    beam_logps = torch.zeros(batch, w, max_length, device=device)  # (B, W, T)
    beam_sum = torch.zeros(batch, w, device=device)  # (B, W) running summed log-probs
    done = [[] for _ in range(batch)]
    tokens = torch.zeros(batch * w, k, dtype=torch.long, device=device)  # (S, K): the start group

    for t0 in range(0, last_start + 1, k):
        logprobs, cache = model.step(tokens, cache)  # (S, K, V)
        logprobs = logprobs.detach().float().view(batch, w, k, -1).clone()  # (B, W, K, V)
        # reference quirk: the last index is suppressed as "UNK" even when the vocabulary has no UNK.
        logprobs[..., -1] -= UNK_PENALTY
        parents = torch.arange(w, device=device).expand(batch, w)  # (B, W): row of the group's start
        for j in range(k):
            t = t0 + j
            word_logprobs = logprobs[:, :, j]  # (B, W, V)
            top_logprobs, top_words = word_logprobs.topk(w, dim=-1)  # (B, W beams, W ranks), sorted
            candidates = beam_sum.unsqueeze(-1) + top_logprobs  # (B, W beams, W ranks)
            if t == 0:
                candidates[:, 1:] = float('-inf')  # all beams are the same empty caption: expand beam 0 only
            # Candidates in the reference's order (word rank, then beam), stable-sorted by summed log-prob.
            def in_order(x):
                return x.transpose(1, 2).reshape(batch, w * w)  # (B, W*W), index = rank * W + beam
            beam_sum, order = in_order(candidates).sort(dim=1, descending=True, stable=True)
            beam_sum, order = beam_sum[:, :w].contiguous(), order[:, :w]  # (B, W) new beams
            words = in_order(top_words).gather(1, order)  # (B, W)
            parent = order % w  # (B, W): the beam each new beam extends
            beam_seq = beam_seq.gather(1, parent.unsqueeze(-1).expand_as(beam_seq))
            beam_logps = beam_logps.gather(1, parent.unsqueeze(-1).expand_as(beam_logps))
            beam_seq[:, :, t] = words
            beam_logps[:, :, t] = in_order(top_logprobs).gather(1, order)
            # The group's remaining positions follow their parent beam.
            logprobs = logprobs.gather(1, parent.view(batch, w, 1, 1).expand_as(logprobs))
            parents = parents.gather(1, parent)

            finished = (words == 0) if t < last_pos else torch.ones_like(words, dtype=torch.bool)
            if finished.any():
                _collect(done, finished, beam_seq, beam_logps, beam_sum, penalty, t)
                beam_sum = beam_sum.masked_fill(finished, FINISHED)
        if t0 + k > last_start:
            break
        # reference quirk: the reference goes on extending finished beams (from -1000) to max_length. Once every
        # beam is finished and each image holds beam_size results above anything such a beam could score, the
        # returned lists can no longer change: stop there.
        if bool((beam_sum <= FINISHED).all()) and all(
                sum(beam['p'] > worst for beam in beams) >= w for beams in done):
            break
        cache.reorder((rows + parents).view(-1))
        tokens = beam_seq[:, :, t0:t0 + k].reshape(batch * w, k)  # (S, K)
    if not all(done):  # max_length < K: no group fits, every caption is empty
        empty = {'seq': beam_seq.new_zeros(max_length), 'logps': beam_logps.new_zeros(max_length), 'p': 0.0}
        done = [beams or [dict(empty)] for beams in done]
    return [sorted(beams, key=lambda beam: -beam['p'])[:w] for beams in done]


def _collect(done, finished, beam_seq, beam_logps, beam_sum, penalty, t):
    """Append the finished beams (B, W) mask to each image's done list, in beam order."""
    images, beams = finished.nonzero(as_tuple=True)
    seqs, logps = beam_seq[images, beams], beam_logps[images, beams]  # (F, T) each
    scores = beam_sum[images, beams].tolist()
    for n, (b, score) in enumerate(zip(images.tolist(), scores)):
        done[b].append({'seq': seqs[n], 'logps': logps[n], 'p': penalty(t + 1, score)})
