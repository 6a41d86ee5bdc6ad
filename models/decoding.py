"""Greedy and sampled decoding, one K-word group per `SATModel.step`.

Used by SATModel.decode for beam_size 1: evaluation (greedy) and self-critical training (multinomial samples in
train mode, with gradients through the returned log-probs). The reference's decoding options (decoding constraint,
trigram blocking) act per token position; for K > 1 the words of a group are chosen in order, each seeing the
words chosen before it (models.decode_config).

Shapes: B images, K group size, V vocabulary + 1, T = max_length.
"""
import torch

# reference quirk: trigram blocking is a soft penalty, ln(1/2) * alpha with alpha = 2, per remembered occurrence.
TRIGRAM_PENALTY = -0.693
TRIGRAM_ALPHA = 2.0


def previous_word_mask(logprobs, previous):
    """--decoding_constraint: the word just before (B,) gets -inf in logprobs (B, V)."""
    return logprobs.scatter(1, previous.unsqueeze(1), float('-inf'))


def trigram_penalty(seq, t, vocab):
    """--block_trigrams at position t >= 3: (B, V) penalties from seq[:, :t] (B, >=t).

    Each row remembers, for every pair of consecutive words, the words that followed it (trigrams ending at
    positions 2 .. t-1); every remembered follower of the pair (w[t-2], w[t-1]) costs ln(1/2) * 2 per occurrence.
    """
    first, second, third = seq[:, 0:t - 2], seq[:, 1:t - 1], seq[:, 2:t]  # (B, t-2) each
    same_pair = (first == seq[:, t - 2:t - 1]) & (second == seq[:, t - 1:t])  # (B, t-2)
    counts = seq.new_zeros(seq.size(0), vocab, dtype=torch.float32)  # (B, V)
    counts.scatter_add_(1, third, same_pair.float())
    return counts * TRIGRAM_PENALTY * TRIGRAM_ALPHA


def greedy_or_sample(model, memory, memory_mask, config, max_length, rows_per_image=1):
    """Decode groups at t = 0, K, 2K, .. while t + K <= max_length (config: models.decode_config.DecodeConfig).

    memory (B, N, D), memory_mask (B, 1, N) or None; rows_per_image rows (e.g. sampled captions) per image, B
    in all, each image's rows one after the other. Returns seq (B, T) int64 and seqLogprobs (B, T). A caption
    is finished at the first group holding a 0; its later groups are 0 in seq, while the words after the 0 inside
    that group are kept (decode_sequence stops at the first 0 anyway).
    """
    batch, k = memory.size(0) * rows_per_image, model.K
    cache = model.init_cache(memory, memory_mask, beam=rows_per_image, use_cache=config.use_cache,
                             max_length=max_length)
    seq = memory.new_zeros(batch, max_length, dtype=torch.long)  # (B, T)
    seq_logprobs = memory.new_zeros(batch, max_length, dtype=torch.float32)  # (B, T), even under autocast
    tokens = memory.new_zeros(batch, k, dtype=torch.long)  # (B, K): the start group
    unfinished = memory.new_ones(batch, dtype=torch.bool)  # (B,)
    per_position = config.decoding_constraint or config.block_trigrams
    # The reference ran one more group than fits and threw it away; stopping here gives the same output.
    for t in range(0, max_length - k + 1, k):
        logprobs, cache = model.step(tokens, cache)  # (B, K, V)
        if per_position:
            words, word_logprobs = _choose_in_order(logprobs, seq, t, unfinished, config)
        else:
            words, word_logprobs = _choose(logprobs, config)  # (B, K) each
            words = words * unfinished.unsqueeze(1)  # finished captions emit zeros
            seq[:, t:t + k] = words
        # reference quirk: seqLogprobs keeps the log-prob of the model's choice even for finished captions
        # (zero padding starts only where the whole batch had finished).
        seq_logprobs[:, t:t + k] = word_logprobs
        unfinished = unfinished & (words > 0).all(dim=1)
        if not unfinished.any():
            break
        tokens = words
    return seq, seq_logprobs


def _choose(logprobs, config):
    """Argmax or one multinomial draw per position: logprobs (..., V) -> words, their log-probs (...)."""
    if config.sample_max:
        word_logprobs, words = logprobs.max(dim=-1)
        return words, word_logprobs
    probs = torch.exp(logprobs.detach() / config.temperature)  # unnormalised when temperature != 1
    words = torch.multinomial(probs.reshape(-1, probs.size(-1)), 1).view(probs.shape[:-1])
    return words, logprobs.gather(-1, words.unsqueeze(-1)).squeeze(-1)


def _choose_in_order(logprobs, seq, t0, unfinished, config):
    """The group's K positions one after the other, each constrained by the words before it (written to seq).

    As the reference, the chosen word's log-prob is read from the constrained distribution."""
    k, vocab = logprobs.size(1), logprobs.size(2)
    words, word_logprobs = [], []
    for j in range(k):
        t = t0 + j
        lp = logprobs[:, j]  # (B, V)
        if config.decoding_constraint and t > 0:
            lp = previous_word_mask(lp, seq[:, t - 1])
        if config.block_trigrams and t >= 3:
            lp = lp + trigram_penalty(seq, t, vocab).to(lp.dtype)
        word, word_logprob = _choose(lp, config)  # (B,) each
        seq[:, t] = word * unfinished  # finished captions emit zeros
        words.append(seq[:, t])
        word_logprobs.append(word_logprob)
    return torch.stack(words, 1), torch.stack(word_logprobs, 1)  # (B, K) each
