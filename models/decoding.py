"""Greedy and sampled decoding, one K-word group per `SATModel.step`.

Used by SATModel.decode for beam_size 1: evaluation (greedy) and self-critical training (multinomial samples in
train mode, with gradients through the returned log-probs).

Shapes: B images, K group size, V vocabulary + 1, T = max_length.
"""
import torch


def greedy_or_sample(model, memory, memory_mask, max_length, sample_max=True, temperature=1.0, use_cache=None):
    """Decode groups at t = 0, K, 2K, .. while t + K <= max_length.

    Returns seq (B, T) int64 and seqLogprobs (B, T). A caption is finished at the first group holding a 0; its
    later groups are 0 in seq, while the words after the 0 inside that group are kept (decode_sequence stops at
    the first 0 anyway).
    """
    batch, k = memory.size(0), model.K
    cache = model.init_cache(memory, memory_mask, beam=1, use_cache=use_cache)
    seq = memory.new_zeros(batch, max_length, dtype=torch.long)  # (B, T)
    seq_logprobs = memory.new_zeros(batch, max_length, dtype=torch.float32)  # (B, T), even under autocast
    tokens = memory.new_zeros(batch, k, dtype=torch.long)  # (B, K): the start group
    unfinished = memory.new_ones(batch, dtype=torch.bool)  # (B,)
    # The reference ran one more group than fits and threw it away; stopping here gives the same output.
    for t in range(0, max_length - k + 1, k):
        logprobs, cache = model.step(tokens, cache)  # (B, K, V)
        if sample_max:
            word_logprobs, words = logprobs.max(dim=-1)  # (B, K) each
        else:
            probs = torch.exp(logprobs.detach() / temperature)  # (B, K, V), unnormalised when temperature != 1
            words = torch.multinomial(probs.reshape(-1, probs.size(-1)), 1).view(batch, k)  # (B, K)
            word_logprobs = logprobs.gather(-1, words.unsqueeze(-1)).squeeze(-1)  # (B, K)
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
