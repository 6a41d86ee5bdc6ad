"""Greedy and sampled decoding, one K-word group per `SATModel.step`; `decode_batch`, the one entry point of every
search (SATModel.decode, models.ensemble.EnsembleModel.decode).

Used by SATModel.decode for beam_size 1: evaluation (greedy) and self-critical training (multinomial samples in
train mode, with gradients through the returned log-probs). The decoding options are steps on each token
position's log-probs (models.logits_processors); when one reads the words chosen before it, the K words of a group
are chosen in order, each seeing the words chosen before it (models.decode_config).

Shapes: B images, K group size, V vocabulary + 1, T = max_length.
"""
import torch

from models.search import beam_search
from models.decode_config import DecodeConfig
from models.logits_processors import GREEDY, History, Steps


def decode_batch(model, att_feats, att_masks=None, config=None, seq_per_img=1):
    """Caption a batch with `model` (a SATModel, or anything with its encode / init_cache / step / K /
    vocab_size / max_length / training and a done_beams attribute): (seq (B, max_length) int64, seqLogprobs
    (B, max_length)), zero padded.

    config: models.decode_config.DecodeConfig (default: greedy). Greedy / sampling (greedy_or_sample) for
    beam_size 1, else beam search (models.search, which also sets model.done_beams). seq_per_img: rows per
    image of att_feats (greedy / sampling only). Gradients flow into seqLogprobs in train mode only; in eval mode
    decoding runs under torch.inference_mode.
    """
    config = config or DecodeConfig()
    max_length = model.max_length if config.max_length is None else config.max_length
    if config.beam_size > 1 and config.beams_per_group > model.vocab_size + 1:
        raise ValueError(f'beam_size {config.beam_size} (per group {config.beams_per_group}) is larger than the '
                         f'{model.vocab_size + 1} entries of the vocabulary')
    with torch.inference_mode(not model.training):
        memory, memory_mask = model.encode(att_feats, att_masks)
        if config.beam_size > 1:
            model.done_beams = beam_search(model, memory, memory_mask, config, max_length)
            seq = torch.stack([beams[0]['seq'] for beams in model.done_beams])
            logprobs = torch.stack([beams[0]['logps'] for beams in model.done_beams])
        else:  # seq_per_img captions (rows) per image of att_feats, sharing its memory keys/values
            seq, logprobs = greedy_or_sample(model, memory, memory_mask, config, max_length, seq_per_img)
    if not model.training:
        # Plain tensors again: inference tensors could not be used by later autograd code (e.g. as labels).
        seq, logprobs = seq.clone(), logprobs.clone()
        if config.beam_size > 1:
            model.done_beams = [[{'seq': beam['seq'].clone(), 'logps': beam['logps'].clone(), 'p': beam['p']}
                                 for beam in beams] for beams in model.done_beams]
    return seq, logprobs


def greedy_or_sample(model, memory, memory_mask, config, max_length, rows_per_image=1):
    """Decode groups at t = 0, K, 2K, .. while t + K <= max_length (config: models.decode_config.DecodeConfig).

    memory (B, N, D), memory_mask (B, 1, N) or None; rows_per_image rows (e.g. sampled captions) per image, B
    in all, each image's rows one after the other. Returns seq (B, T) int64 and seqLogprobs (B, T). A caption
    is finished at the first group holding a 0; its later groups are 0 in seq, while the words after the 0 inside
    that group are kept (decode_sequence stops at the first 0 anyway).
    """
    batch, k = memory.size(0) * rows_per_image, model.K
    cache = model.init_cache(memory, memory_mask, rows_per_image=rows_per_image, use_cache=config.use_cache,
                             max_length=max_length)
    seq = memory.new_zeros(batch, max_length, dtype=torch.long)  # (B, T)
    seq_logprobs = memory.new_zeros(batch, max_length, dtype=torch.float32)  # (B, T), even under autocast
    tokens = memory.new_zeros(batch, k, dtype=torch.long)  # (B, K): the start group
    unfinished = memory.new_ones(batch, dtype=torch.bool)  # (B,)
    steps = Steps.for_search(config, GREEDY)
    # The reference ran one more group than fits and threw it away; stopping here gives the same output.
    for t in range(0, max_length - k + 1, k):
        logprobs, cache = model.step(tokens, cache)  # (B, K, V)
        if steps.needs_history:
            words, word_logprobs = _choose_in_order(logprobs, seq, t, unfinished, steps, config.sample_max)
        else:
            words, word_logprobs = _choose(logprobs, steps, None, config.sample_max)  # (B, K) each
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


def _choose(logprobs, steps, history, sample_max):
    """Argmax or one multinomial draw per position: logprobs (..., V) -> words, their log-probs (...), read after
    the shaping steps (the reference's order), the choice made after the steering ones too."""
    logprobs = steps.adjust(logprobs, history)
    steered = steps.steer(logprobs, history)
    if sample_max:
        steered_logprobs, words = steered.max(dim=-1)
        if steered is logprobs:
            return words, steered_logprobs
    else:
        probs = torch.exp(steered.detach())  # unnormalised when a step (temperature) rescaled it
        words = torch.multinomial(probs.reshape(-1, probs.size(-1)), 1).view(probs.shape[:-1])
    return words, logprobs.gather(-1, words.unsqueeze(-1)).squeeze(-1)


def _choose_in_order(logprobs, seq, t0, unfinished, steps, sample_max):
    """The group's K positions one after the other, each seeing the words before it (written to seq)."""
    words, word_logprobs = [], []
    for j in range(logprobs.size(1)):
        t = t0 + j
        word, word_logprob = _choose(logprobs[:, j], steps, History(t, seq), sample_max)  # (B,) each
        seq[:, t] = word * unfinished  # finished captions emit zeros
        words.append(seq[:, t])
        word_logprobs.append(word_logprob)
    return torch.stack(words, 1), torch.stack(word_logprobs, 1)  # (B, K) each
