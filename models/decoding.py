"""The one generation loop of every search: `generate` (SATModel.decode, models.ensemble.EnsembleModel.decode).

One K-word group per `model.step`; the decoding options act on each token position's log-probs as steps
(models.logits_processors), applied here and nowhere else; a search strategy (models.search: greedy and sampling as
width-one searches, beam search, diverse beam search as several beam groups run d steps apart) keeps its words.
When a step reads the words chosen before it, the K words of a group are chosen in order, each seeing the words
chosen before it (models.decode_config); beam search always goes position by position.

Used for evaluation (greedy or beams) and self-critical training (multinomial samples in train mode, with gradients
through the returned log-probs).

Shapes: B images, R rows, K group size, V vocabulary + 1, T = max_length.
"""
import operator

import torch

from models.decode_config import DecodeConfig
from models.logits_processors import Steps
from models.search import searches_for


class Decoded(tuple):
    """(seq, seqLogprobs), the pair every caller unpacks, and `.hypotheses`: per image its finished hypotheses
    [{'seq' (T,), 'logps' (T,), 'p' score}] (models.search: beam search's best first, group after group; a width-one
    search's rows in order)."""
    seq = property(operator.itemgetter(0))  # (B or R, T) int64, zero padded
    logprobs = property(operator.itemgetter(1))  # (B or R, T)

    def __new__(cls, seq, logprobs, hypotheses):
        decoded = super().__new__(cls, (seq, logprobs))
        decoded._hypotheses = hypotheses  # a list, or a function (seq, logprobs) -> the list, called when first read
        return decoded

    @property
    def hypotheses(self):
        if callable(self._hypotheses):
            self._hypotheses = self._hypotheses(self.seq, self.logprobs)
        return self._hypotheses

    def plain(self):
        """Copies that are plain tensors (inference tensors could not be used by later autograd code, e.g. as
        labels)."""
        hypotheses = self._hypotheses
        if not callable(hypotheses):
            hypotheses = [[{'seq': h['seq'].clone(), 'logps': h['logps'].clone(), 'p': h['p']} for h in image]
                          for image in hypotheses]
        return Decoded(self.seq.clone(), self.logprobs.clone(), hypotheses)


def generate(model, att_feats, att_masks=None, config=None, seq_per_img=1):
    """Caption a batch with `model` (a SATModel, or anything with its encode / init_cache / step / K / vocab_size /
    max_length / training) -> Decoded: (seq (B, max_length) int64, seqLogprobs (B, max_length)), zero padded, and
    the finished hypotheses.

    config: models.decode_config.DecodeConfig (default: greedy), checked against the model's vocabulary.
    seq_per_img: rows per image of att_feats (greedy / sampling only: seq then has B * seq_per_img rows). Gradients
    flow into seqLogprobs in train mode only; in eval mode decoding runs under torch.inference_mode.
    """
    config = config or DecodeConfig()
    config.check_vocabulary(model.vocab_size)
    max_length = model.max_length if config.max_length is None else config.max_length
    with torch.inference_mode(not model.training):
        memory, memory_mask = model.encode(att_feats, att_masks)
        searches = searches_for(model, memory, memory_mask, config, max_length, seq_per_img)
        steps = Steps.for_search(config, searches[0].kind)
        starts = searches[0].starts()
        # Group d runs d decoding steps behind group 0 (diverse beam search; the other searches have one group).
        for step in range(len(starts) + len(searches) - 1):
            for d, search in enumerate(searches):
                if 0 <= step - d < len(starts) and not search.stopped:
                    _advance(model, search, starts[step - d], steps, searches[:d], d == len(searches) - 1)
            if all(search.stopped for search in searches):
                break
        decoded = Decoded(*searches[0].collect(searches))
    return decoded if model.training else decoded.plain()


def _advance(model, search, t0, steps, earlier, may_stop):
    """One decoding step of `search` (positions t0 ..): the model's log-probs, the decoding steps on each position,
    the strategy's choice. earlier: the groups ahead of it (diverse beam search); may_stop: it may stop early."""
    logprobs, search.cache = model.step(search.tokens, search.cache)  # (R, K, V)
    logprobs = search.prepare(logprobs)
    if search.per_position or steps.needs_history:
        for j in range(search.span(t0)):
            history = search.history(t0 + j, earlier)
            reported = steps.adjust(logprobs[:, j], history)  # (R, V): the stored log-probs are read from this
            logprobs = search.choose(t0 + j, reported, steps.steer(reported, history), logprobs)
    else:  # no step reads the words before t: the whole group at once
        reported = steps.adjust(logprobs, None)  # (R, K, V)
        search.choose_group(t0, reported, steps.steer(reported, None))
    search.end_step(t0, may_stop)
