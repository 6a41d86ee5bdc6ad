"""Decoding options for SAT with K > 1 (our definitions, README "Decoding options"), and DecodeConfig.

For K = 1 the options reproduce the reference exactly (test_conformance_decoding.py); for K > 1 each option acts
per token position, the words of a group chosen in order.
"""
import pytest
import torch

from models.decode_config import DecodeConfig
from models.logits_processors import trigram_penalty
from models.sat import SATModel

VOCAB = 12


def flat_model(k, seed=0, sharpness=1.0):
    """A tiny SAT model whose captions never end (the end token is suppressed); generator scaled by sharpness."""
    torch.manual_seed(seed)
    model = SATModel(vocab_size=VOCAB, K=k, d_model=16, d_ff=32, num_layers=1, att_feat_size=6).eval()
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
        seq, logprobs = model.decode(att, masks, config)
        assert all(repeats(caption(row)) == 0 for row in seq), config
        assert torch.isfinite(logprobs).all()
        if config.beam_size > 1:
            for beams in model.done_beams:
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
    model.decode(att, masks, DecodeConfig(beam_size=4, group_size=2, diversity_lambda=100.0))
    for beams in model.done_beams:
        assert len(beams) == 4
        first, second = beams[:2], beams[2:]
        # A word group 0 holds at a position costs group 1 100 there: its captions share no first word.
        assert {b['seq'][0].item() for b in first}.isdisjoint({b['seq'][0].item() for b in second})
        for group in (first, second):  # each group sorted best first
            assert group[0]['p'] >= group[1]['p']
    # Without the penalty the two groups are the same search.
    model.decode(att, masks, DecodeConfig(beam_size=4, group_size=2, diversity_lambda=0.0))
    no_penalty = [[beam['seq'].tolist() for beam in beams] for beams in model.done_beams]
    assert all(beams[:2] == beams[2:] for beams in no_penalty)


def test_group_size_one_is_plain_beam_search():
    model = flat_model(2, sharpness=2.0)
    att, masks = batch()
    seq_a, _ = model.decode(att, masks, DecodeConfig(beam_size=3))
    beams_a = model.done_beams
    seq_b, _ = model.decode(att, masks, DecodeConfig(beam_size=3, group_size=1, diversity_lambda=7.0))
    assert torch.equal(seq_a, seq_b)
    assert [[b['p'] for b in x] for x in beams_a] == [[b['p'] for b in x] for x in model.done_beams]


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
