"""Decoding options for SAT with K > 1 (our definitions, README "Decoding options"), the steps that implement them
(models.logits_processors, each against a hand computation), DecodeConfig and eval.py's ownership of the options.

For K = 1 the options reproduce the reference exactly (test_conformance_decoding.py); for K > 1 each option acts
per token position, the words of a group chosen in order.
"""
import argparse

import pytest
import torch

import opts
from misc.errors import SaticError
from models.decode_config import DecodeConfig
from models.logits_processors import (BEAM, GREEDY, DiversityPenalty, History, PreviousWordBan, Steps, Temperature,
                                      TrigramPenalty, trigram_penalty)
from tests.helpers import tiny_sat

VOCAB = 12


def flat_model(k, seed=0, sharpness=1.0):
    """A tiny SAT model whose captions never end (the end token is suppressed); generator scaled by sharpness."""
    torch.manual_seed(seed)
    model = tiny_sat(vocab_size=VOCAB, K=k, att_feat_size=6).eval()
    with torch.no_grad():
        model.model.generator.proj.weight.mul_(sharpness)
        model.model.generator.proj.bias.zero_()
        model.model.generator.proj.bias[0] = -1e4
    return model


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    att = torch.randn(4, 5, 6, generator=g)
    masks = torch.tensor([[1., 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    return att, masks


def caption(row):
    row = row.tolist()
    return row[:row.index(0)] if 0 in row else row


def repeats(words):
    return sum(a == b for a, b in zip(words, words[1:]))


@pytest.mark.parametrize('k', [2, 3, 4])
def test_decoding_constraint_never_repeats_the_previous_word(k):
    # A generator that loves one word: without the constraint the captions are that word again and again.
    model = flat_model(k, sharpness=0.1)
    with torch.no_grad():
        model.model.generator.proj.bias[5] = 5.0
    att, masks = batch()
    plain, _ = model.decode(att, masks)
    assert sum(repeats(caption(row)) for row in plain) > 0
    for config in (DecodeConfig(decoding_constraint=True),
                   DecodeConfig(decoding_constraint=True, sample_max=False, temperature=0.7),
                   DecodeConfig(decoding_constraint=True, beam_size=3)):
        torch.manual_seed(0)
        seq, logprobs = decoded = model.decode(att, masks, config)
        assert all(repeats(caption(row)) == 0 for row in seq), config
        assert torch.isfinite(logprobs).all()
        if config.beam_size > 1:
            for beams in decoded.hypotheses:
                assert all(repeats(caption(beam['seq'])) == 0 for beam in beams)


@pytest.mark.parametrize('k', [1, 2, 3])
def test_block_trigrams_leaves_no_repeated_trigram(k):
    """With near-flat distributions (every log-prob gap below the 1.386 penalty) no trigram repeats."""
    model = flat_model(k, sharpness=0.01)
    with torch.no_grad():
        model.model.generator.proj.bias[1:4] = 0.5  # three favourite words: plain decoding cycles through them
    att, masks = batch()

    def repeated_trigrams(seq):
        total = 0
        for row in seq:
            words = caption(row)
            trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
            total += len(trigrams) - len(set(trigrams))
        return total
    plain, _ = model.decode(att, masks)
    assert repeated_trigrams(plain) > 0
    blocked, _ = model.decode(att, masks, DecodeConfig(block_trigrams=True))
    assert repeated_trigrams(blocked) == 0


def test_trigram_penalty_counts_each_remembered_follower():
    seq = torch.tensor([[4, 5, 6, 4, 5, 6, 4, 5, 7, 4, 5]])  # (4, 5) was followed by 6, 6 and 7
    penalty = trigram_penalty(seq, seq.size(1), 10)  # next after (4, 5)
    expected = torch.zeros(1, 10)
    expected[0, 6], expected[0, 7] = 2 * -0.693 * 2.0, -0.693 * 2.0
    torch.testing.assert_close(penalty, expected)


@pytest.mark.parametrize('k', [1, 2, 3])
def test_diverse_groups_differ(k):
    model = flat_model(k, sharpness=2.0)
    att, masks = batch()
    hypotheses = model.decode(att, masks, DecodeConfig(beam_size=4, group_size=2, diversity_lambda=100.0)).hypotheses
    for beams in hypotheses:
        assert len(beams) == 4
        first, second = beams[:2], beams[2:]
        # A word group 0 holds at a position costs group 1 100 there: its captions share no first word.
        assert {b['seq'][0].item() for b in first}.isdisjoint({b['seq'][0].item() for b in second})
        for group in (first, second):  # each group sorted best first
            assert group[0]['p'] >= group[1]['p']
    # Without the penalty the two groups are the same search.
    hypotheses = model.decode(att, masks, DecodeConfig(beam_size=4, group_size=2, diversity_lambda=0.0)).hypotheses
    no_penalty = [[beam['seq'].tolist() for beam in beams] for beams in hypotheses]
    assert all(beams[:2] == beams[2:] for beams in no_penalty)


def test_group_size_one_is_plain_beam_search():
    model = flat_model(2, sharpness=2.0)
    att, masks = batch()
    seq_a, _ = a = model.decode(att, masks, DecodeConfig(beam_size=3))
    seq_b, _ = b = model.decode(att, masks, DecodeConfig(beam_size=3, group_size=1, diversity_lambda=7.0))
    assert torch.equal(seq_a, seq_b)
    assert [[h['p'] for h in x] for x in a.hypotheses] == [[h['p'] for h in x] for x in b.hypotheses]


def test_reference_opt_refuses_unknown_keys():
    model = flat_model(2)
    att, masks = batch()
    with pytest.raises(ValueError, match='block_trigram'):
        model(None, att, masks, opt={'block_trigram': 1}, mode='sample')  # misspelt
    config, per_img = DecodeConfig.from_reference_opt({'beam_size': 3, 'group_size': 3, 'seq_per_img': 5,
                                                       'remove_bad_endings': 1})
    assert config.beams_per_group == 1 and per_img == 5


@pytest.mark.parametrize('kwargs', [dict(beam_size=0), dict(beam_size=2, group_size=3), dict(group_size=0),
                                    dict(sample_max=False, temperature=0.0), dict(length_penalty='wu'),
                                    dict(max_length=0)])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        DecodeConfig(**kwargs)


def test_beam_larger_than_the_vocabulary_is_refused():
    model = flat_model(2)
    att, masks = batch()
    with pytest.raises(ValueError, match='larger than'):
        model.decode(att, masks, DecodeConfig(beam_size=VOCAB + 2))


def test_previous_word_ban_sets_the_word_before_t_to_minus_inf():
    logprobs = torch.log_softmax(torch.arange(10.).view(2, 5), dim=1)  # (R=2, V=5)
    seq = torch.tensor([[3, 1, 0], [2, 4, 0]])  # (R, T)
    assert PreviousWordBan()(logprobs, History(0, seq)) is logprobs  # nothing before the first position
    expected = logprobs.clone()
    expected[0, 1] = expected[1, 4] = float('-inf')  # the words at t - 1 = 1
    assert torch.equal(PreviousWordBan()(logprobs, History(2, seq)), expected)


def test_trigram_penalty_step_adds_the_penalty_from_t_3():
    logprobs = torch.zeros(1, 8)
    seq = torch.tensor([[4, 5, 6, 4, 5, 0]])  # at t = 5 the pair (4, 5) was followed by 6 once
    assert TrigramPenalty()(logprobs, History(2, seq)) is logprobs
    expected = torch.zeros(1, 8)
    expected[0, 6] = -0.693 * 2.0
    assert torch.equal(TrigramPenalty()(logprobs, History(5, seq)), expected)
    assert TrigramPenalty()(logprobs.bfloat16(), History(5, seq)).dtype == torch.bfloat16  # the step's dtype


def test_diversity_penalty_lowers_each_earlier_word_once_per_occurrence():
    logprobs = torch.full((4, 5), -1.0)  # B=2 images x W=2 beams
    earlier = (torch.tensor([[2, 2], [0, 3]]), torch.tensor([[1, 2], [3, 3]]))  # two earlier groups, (B, W') each
    assert DiversityPenalty(0.25)(logprobs, History(0, torch.zeros(4, 3, dtype=torch.long))) is logprobs
    out = DiversityPenalty(0.25)(logprobs, History(0, torch.zeros(4, 3, dtype=torch.long), earlier))
    image_0 = [-1.0, -1.25, -1.75, -1.0, -1.0]  # word 2 three times, word 1 once
    image_1 = [-1.25, -1.0, -1.0, -1.75, -1.0]  # word 3 three times, word 0 once
    assert out.tolist() == [image_0, image_0, image_1, image_1]


def test_temperature_divides_and_detaches():
    logprobs = torch.tensor([[-1.0, -2.0, -4.0]], requires_grad=True)
    out = Temperature(0.5)(logprobs, None)
    assert out.tolist() == [[-2.0, -4.0, -8.0]] and not out.requires_grad
    assert Temperature.from_config(DecodeConfig()) is None  # argmax: no temperature


def test_each_search_takes_its_steps_in_order():
    config = DecodeConfig(sample_max=False, decoding_constraint=True, block_trigrams=True, group_size=2,
                          beam_size=4)
    greedy, beam = Steps.for_search(config, GREEDY), Steps.for_search(config, BEAM)
    assert [type(s) for s in greedy.shaping] == [PreviousWordBan, TrigramPenalty]
    assert [type(s) for s in greedy.steering] == [Temperature] and greedy.needs_history
    assert [type(s) for s in beam.shaping] == [PreviousWordBan]  # trigram blocking: greedy and sampling only
    assert [type(s) for s in beam.steering] == [DiversityPenalty]
    plain = Steps.for_search(DecodeConfig(), GREEDY)
    assert not plain.shaping and not plain.steering and not plain.needs_history


def test_sampling_with_the_constraint_backpropagates():
    model = flat_model(2).train()
    att, masks = batch()
    _, logprobs = model(None, att, masks, opt={'sample_max': 0, 'decoding_constraint': 1, 'block_trigrams': 1,
                                               'seq_per_img': 2}, mode='sample')
    logprobs.sum().backward()
    assert model.model.generator.proj.weight.grad.abs().sum() > 0


def test_config_reads_each_field_with_its_conversion():
    config = DecodeConfig.from_values({'sample_max': 0, 'beam_size': '3', 'max_length': None, 'use_cache': 1,
                                       'length_penalty': None, 'decoding_constraint': 1, 'unrelated': 'x'})
    assert config == DecodeConfig(sample_max=False, beam_size=3, max_length=None, use_cache=True,
                                  length_penalty='', decoding_constraint=True)
    assert DecodeConfig.from_reference_opt({'max_length': 7})[0].max_length == 7


def test_every_config_field_is_an_option():
    assert set(DecodeConfig.option_names()) <= set(vars(opts.fill_defaults(argparse.Namespace())))
    with pytest.raises(SaticError, match='add_decoding_options'):
        opts.decode_config(argparse.Namespace(beam_size=1))


def _eval_options(argv=()):
    infos_opt = opts.fill_defaults(argparse.Namespace())
    for name in opts.decoding_option_names():
        setattr(infos_opt, name, 'from the infos')  # a value eval.py must never keep
    eval_opt = opts.parse_eval_opt(list(argv))
    return eval_opt, opts.resolve_eval_options(eval_opt, {'opt': infos_opt, 'vocab': {'1': 'a', '2': 'b'}})


def test_eval_takes_every_decoding_option_from_its_command_line(monkeypatch):
    eval_opt, opt = _eval_options(['--beam_size', '2', '--block_trigrams', '1'])
    assert {name: getattr(opt, name) for name in opts.decoding_option_names()} == \
        {name: getattr(eval_opt, name) for name in opts.decoding_option_names()}
    # A new option line in the group is eval.py's with nothing else to keep in sync.
    add = opts.add_decoding_options

    def with_a_new_option(parser, beam_size=1):
        add(parser, beam_size)
        parser.add_argument('--new_option', type=int, default=0)
    monkeypatch.setattr(opts, 'add_decoding_options', with_a_new_option)
    eval_opt, opt = _eval_options(['--new_option', '3'])
    assert opt.new_option == 3


# ---- the one generation loop: returned hypotheses, sequence-level options for every search ----------------------
@pytest.mark.parametrize('config', [DecodeConfig(), DecodeConfig(sample_max=False), DecodeConfig(beam_size=3),
                                    DecodeConfig(beam_size=4, group_size=2)], ids=['greedy', 'sampling', 'beam', 'diverse'])
def test_decode_returns_its_hypotheses_and_leaves_no_state_on_the_model(config):
    model = flat_model(2, sharpness=2.0)
    att, masks = batch()
    torch.manual_seed(0)
    seq, logprobs = decoded = model.decode(att, masks, config)  # still the (seq, seqLogprobs) pair
    assert decoded.seq is seq and decoded.logprobs is logprobs
    assert not hasattr(model, 'done_beams')
    assert len(decoded.hypotheses) == att.size(0)
    for row, image in zip(seq, decoded.hypotheses):
        assert len(image) == config.beam_size
        assert torch.equal(image[0]['seq'], row)  # the caption is the first hypothesis


def test_width_one_hypotheses_are_each_rows_path_scored_up_to_its_end():
    model = flat_model(2, sharpness=2.0)
    with torch.no_grad():
        model.model.generator.proj.bias[0] = 0.0  # captions may end
    att, masks = batch()
    torch.manual_seed(0)
    seq, logprobs = decoded = model.decode(att, masks, DecodeConfig(sample_max=False), seq_per_img=3)
    assert seq.size(0) == 12 and [len(image) for image in decoded.hypotheses] == [3] * 4
    rows = [h for image in decoded.hypotheses for h in image]
    assert any(0 in h['seq'].tolist() for h in rows)
    for r, h in enumerate(rows):
        assert torch.equal(h['seq'], seq[r]) and torch.equal(h['logps'], logprobs[r])
        words = h['seq'].tolist()
        n = words.index(0) + 1 if 0 in words else len(words)  # the end token included
        assert abs(h['p'] - float(logprobs[r, :n].double().sum())) < 1e-6


@pytest.mark.parametrize('k', [1, 2])
def test_length_penalty_scores_greedy_without_changing_its_captions(k):
    """Width one: the penalty acts on the score of the finished path; argmax sees one position at a time."""
    model = flat_model(k, sharpness=2.0)
    att, masks = batch()
    plain = model.decode(att, masks, DecodeConfig())
    penalised = model.decode(att, masks, DecodeConfig(length_penalty='avg_0'))
    assert torch.equal(plain.seq, penalised.seq) and torch.equal(plain.logprobs, penalised.logprobs)
    for a, b in zip(plain.hypotheses, penalised.hypotheses):
        n = 20 // k * k  # these captions never end
        assert abs(b[0]['p'] - a[0]['p'] / n) < 1e-9


def test_the_beam_against_vocabulary_check_is_one_function():
    with pytest.raises(ValueError, match='larger than the 13 entries'):
        DecodeConfig(beam_size=14).check_vocabulary(VOCAB)
    DecodeConfig(beam_size=14, group_size=2).check_vocabulary(VOCAB)  # 7 beams per group fit
    with pytest.raises(SaticError, match='decoding options: beam_size 14 .* larger than the 13 entries'):
        opts.decode_config(opts.fill_defaults(argparse.Namespace(beam_size=14)), VOCAB)


def test_a_decoding_option_of_the_command_line_reaches_decode_config_by_itself():
    """A new per-token option is its line in DecodingOptions plus its step class: DecodeConfig takes every decoding
    option it does not declare itself, under the option's name, type and default."""
    import dataclasses
    from misc.options.configs import DecodingOptions
    from models import decode_config

    @dataclasses.dataclass(frozen=True)
    class WithMinLength(DecodingOptions):
        min_length: int = 0

    extra = decode_config._further_options(WithMinLength)
    assert [name for name, _, _ in extra] == ['min_length']
    config_class = dataclasses.make_dataclass('C', extra, bases=(decode_config._DecodeFields,), frozen=True)
    config = config_class.from_values({'min_length': '3', 'beam_size': 2, 'remove_bad_endings': 1})
    assert config.min_length == 3 and config.beam_size == 2
