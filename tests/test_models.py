"""models/: masks, the reference building blocks, cached == uncached decoding, group semantics, beam search.

Tiny random models on CPU; the reference checkpoints are tested in test_conformance_model.py.
"""
import argparse
import math

import pytest
import torch

import models
from misc.errors import SaticError
from models.decode_config import DecodeConfig
from models.masks import group_mask, subsequent_mask, target_mask
from models.transformer import LayerNorm
from tests.helpers import masked_batch, setup_model, tiny_sat

VOCAB = 20  # words; V = 21 outputs


def tiny_opt(**overrides):
    opt = dict(caption_model='sat', K=2, vocab_size=VOCAB, seq_length=16, input_encoding_size=32, rnn_size=48,
               num_layers=2, att_feat_size=12, drop_prob_lm=0.5, use_bn=0, norm_att_feat=0)
    opt.update(overrides)
    return argparse.Namespace(**opt)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = setup_model(tiny_opt(**overrides))
    model.eval()
    # Random weights give near-uniform outputs: sharpen the generator, then shift the end token's bias so that
    # the greedy captions of masked_batch(seed=seed) end at as many different lengths as possible.
    proj = model.model.generator.proj
    with torch.no_grad():
        proj.weight.mul_(8)
        proj.bias[0] = -1e4
        att, masks = masked_batch(feat=model.att_embed[0].in_features, seed=seed)  # the tests' usual batch
        seq, _ = model.decode(att, masks)  # greedy; no caption ends: a path through every position
        memory, memory_mask = model.encode(att, masks)
        tokens = torch.cat([seq.new_zeros(seq.size(0), model.K), seq], dim=1)[:, :20]
        logits = proj(model.model.decode(memory, memory_mask, tokens, group_mask(20, model.K)))  # (B, 20, V)
        margin = logits[..., 0] + 1e4 - logits[..., 1:].max(-1).values  # (B, 20): end token behind, bias aside

        def distinct_ends(bias):
            return len({int((row + bias > 0).nonzero()[0]) if (row + bias > 0).any() else 20 for row in margin})
        proj.bias[0] = max((-m + 1e-3 for m in margin.flatten().tolist()), key=distinct_ends)
    return model


def labels_batch(batch=4, seed=2):
    """labels (B, 18) = [0, w1..wn, 0...] with n in 1..16."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(batch, 18, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(1, 17, (1,), generator=g))
        labels[i, 1:n + 1] = torch.randint(1, VOCAB + 1, (n,), generator=g)
    return labels


def sample(model, att, masks, **opt):
    return model(None, att, masks, opt=opt, mode='sample')


# ---- masks and building blocks ------------------------------------------------------------------------------
@pytest.mark.parametrize('k', [1, 2, 3, 4, 6])
def test_group_mask_sees_own_group_and_earlier_groups(k):
    mask = group_mask(13, k)[0]
    for i in range(13):
        for j in range(13):
            assert bool(mask[i, j]) == (j // k <= i // k)
    if k == 1:
        assert torch.equal(mask, torch.tril(torch.ones(13, 13, dtype=torch.bool)))
    assert torch.equal(subsequent_mask(5), group_mask(5, 1))


def test_target_mask_hides_padding_but_never_position_zero():
    tokens = torch.tensor([[0, 0, 5, 6, 0, 0]])
    mask = target_mask(tokens, 2)[0]
    assert mask[:, 0].all()  # the first start zero is always a key
    assert not mask[:, 1].any()  # the other start zero is padding while training (reference quirk)
    assert not mask[:, 4:].any()
    assert mask[2, 3] and not mask[1, 2]  # position 2 sees its group partner; group 0 does not see group 1


def test_layer_norm_is_the_reference_formula():
    torch.manual_seed(0)
    norm = LayerNorm(10)
    with torch.no_grad():
        norm.a_2.uniform_()
        norm.b_2.uniform_()
    x = torch.randn(3, 4, 10)
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True)  # unbiased
    torch.testing.assert_close(norm(x), norm.a_2 * (x - mean) / (std + 1e-6) + norm.b_2)


def test_state_dict_layout_and_positional_buffer():
    model = tiny_model()
    state = model.state_dict()
    assert state['model.tgt_embed.1.pe'].shape == (1, 5000, 32)
    assert state['model.generator.proj.weight'].shape == (VOCAB + 1, 32)
    assert all(key.startswith(('att_embed.', 'model.')) for key in state)
    bn = setup_model(tiny_opt(use_bn=1)).state_dict()
    assert bn['att_embed.0.running_mean'].shape == (12,) and bn['att_embed.1.weight'].shape == (32, 12)
    assert setup_model(tiny_opt(use_bn=2)).state_dict()['att_embed.4.weight'].shape == (32,)
    assert model.vocab_size == VOCAB and model.K == 2 and model.max_length == 20


@pytest.mark.parametrize('use_bn', [1, 2])
def test_batch_norm_sees_only_valid_regions(use_bn):
    torch.manual_seed(0)
    model = setup_model(tiny_opt(use_bn=use_bn)).eval()
    with torch.no_grad():
        model.att_embed[0].running_mean.uniform_()
    att, masks = masked_batch()
    labels = labels_batch()
    with torch.no_grad():
        batched = model(None, att, labels, masks)
        alone = model(None, att[:1, :5], labels[:1], None)
    torch.testing.assert_close(alone, batched[:1], atol=1e-5, rtol=1e-5)


def test_transformer_is_sat_with_k1():
    opt = tiny_opt(caption_model='transformer', K=6)
    assert setup_model(opt).K == 1
    sat, transformer = tiny_model(K=1), setup_model(opt).eval()
    transformer.load_state_dict(sat.state_dict())
    att, masks = masked_batch()
    labels = labels_batch()
    with torch.no_grad():
        torch.testing.assert_close(sat(None, att, labels, masks), transformer(None, att, labels, masks))
    for beam in (1, 3):
        assert torch.equal(sample(sat, att, masks, beam_size=beam)[0],
                           sample(transformer, att, masks, beam_size=beam)[0])


# ---- teacher forcing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('k', [1, 2, 3, 4, 5])
def test_teacher_forcing_shape_and_group_causality(k):
    model = tiny_model(K=k)
    att, masks = masked_batch()
    labels = labels_batch()
    with torch.no_grad():
        logprobs = model(None, att, labels, masks)
    assert logprobs.shape == (4, 17, VOCAB + 1)
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(4, 17))
    # Output i predicts labels[i+1]; it must not depend on labels[i+1] or any later word.
    changed = labels.clone()
    changed[:, 9:] = torch.where(changed[:, 9:] > 0, changed[:, 9:] % VOCAB + 1, changed[:, 9:])
    with torch.no_grad():
        after = model(None, att, changed, masks)
    # Word 9 sits at shifted position 9+k-1, in group (9+k-1)//k; outputs before that group are unaffected.
    first_affected = (9 + k - 1) // k * k
    torch.testing.assert_close(logprobs[:, :first_affected], after[:, :first_affected])


def test_padding_regions_do_not_matter():
    model = tiny_model()
    att, masks = masked_batch()
    labels = labels_batch()
    noisy = att + (1 - masks).unsqueeze(-1) * torch.randn_like(att)
    with torch.no_grad():
        torch.testing.assert_close(model(None, att, labels, masks), model(None, noisy, labels, masks))
        # One image with its own boxes and no mask == the same image inside a padded batch.
        alone = model(None, att[2:3, :7], labels[2:3], None)
        torch.testing.assert_close(alone, model(None, att, labels, masks)[2:3], atol=1e-5, rtol=1e-5)


# ---- decoding ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('k', [1, 2, 3, 4, 5])
@pytest.mark.parametrize('beam', [1, 3])
def test_cached_equals_uncached(k, beam):
    model = tiny_model(seed=k, K=k)
    att, masks = masked_batch(seed=k)
    cached, cached_lp = decoded = sample(model, att, masks, beam_size=beam, use_cache=1)
    cached_beams = decoded.hypotheses
    uncached, uncached_lp = decoded = sample(model, att, masks, beam_size=beam, use_cache=0)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_lp, uncached_lp, atol=1e-5, rtol=1e-5)
    if beam > 1:
        for a, b in zip(cached_beams, decoded.hypotheses):
            assert [x['seq'].tolist() for x in a] == [x['seq'].tolist() for x in b]


def test_step_logprobs_match_teacher_forcing():
    """Decoding one group at a time gives the training distributions when the start zeros are all visible."""
    model = tiny_model(K=3)
    att, masks = masked_batch()
    with torch.no_grad():
        seq, _ = sample(model, att, masks)
        memory, memory_mask = model.encode(att, masks)
        cache = model.init_cache(memory, memory_mask)
        tokens = torch.cat([torch.zeros(4, 3, dtype=torch.long), seq[:, :15]], dim=1)  # (B, 18) shifted input
        steps = [model.step(tokens[:, t:t + 3], cache)[0] for t in range(0, 18, 3)]
        full = model.model.generator(model.model.decode(memory, memory_mask, tokens, group_mask(18, 3)))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


class ScriptedSteps:
    """Stands in for model.step: returns fixed words per group and records the tokens it was given."""

    def __init__(self, groups, vocab=VOCAB + 1):
        self.groups, self.vocab, self.inputs = groups, vocab, []

    def __call__(self, tokens, cache):
        self.inputs.append(tokens.clone())
        words = torch.tensor(self.groups[len(self.inputs) - 1])  # (B, K)
        logprobs = torch.full((*words.shape, self.vocab), -10.0)
        logprobs.scatter_(-1, words.unsqueeze(-1), -0.5)
        return logprobs, cache


def test_caption_ends_at_the_first_group_holding_a_zero(monkeypatch):
    model = tiny_model(K=3)
    steps = ScriptedSteps([[[5, 0, 7], [4, 4, 4]],
                           [[9, 9, 9], [4, 4, 4]],
                           [[1, 2, 3], [0, 0, 0]],
                           [[1, 1, 1], [1, 1, 1]]])
    monkeypatch.setattr(model, 'step', steps)
    seq, logprobs = sample(model, *masked_batch(counts=(2, 4)))
    assert seq[0].tolist() == [5, 0, 7] + [0] * 17  # the word after the 0 inside its group is kept
    assert seq[1].tolist() == [4] * 6 + [0] * 14
    # The group holding the 0 is fed as it is, then a finished caption feeds zeros; the loop stops once every
    # caption is finished.
    assert len(steps.inputs) == 3
    assert steps.inputs[1].tolist() == [[5, 0, 7], [4, 4, 4]]
    assert steps.inputs[2].tolist() == [[0, 0, 0], [4, 4, 4]]
    # reference quirk: seqLogprobs keeps the model's choice past the end of a caption, until the batch is done.
    assert logprobs[0, :9].tolist() == [-0.5] * 9 and logprobs[:, 9:].abs().sum() == 0


@pytest.mark.parametrize('k,groups', [(3, 6), (6, 3), (7, 2), (4, 5)])
def test_max_length_respected_when_k_does_not_divide_it(k, groups, monkeypatch):
    model = tiny_model(K=k)
    steps = ScriptedSteps([[[3] * k]] * 10)
    monkeypatch.setattr(model, 'step', steps)
    seq, logprobs = sample(model, *masked_batch(counts=(2,)))
    assert seq.shape == logprobs.shape == (1, 20)
    assert len(steps.inputs) == groups
    assert seq[0].tolist() == [3] * (groups * k) + [0] * (20 - groups * k)
    seq, _ = sample(model, *masked_batch(counts=(2,)), max_length=9)
    assert seq.shape == (1, 9)


@pytest.mark.parametrize('k', [3, 6])
def test_max_length_with_real_steps(k):
    """Greedy stops at the last whole group; beam search runs a last, shorter group up to max_length - 1."""
    model = tiny_model(K=k)
    with torch.no_grad():  # no caption may end, so every group is decoded
        model.model.generator.proj.bias[0] = -1e4
    att, masks = masked_batch()
    seq, _ = sample(model, att, masks)
    assert seq.shape == (4, 20)
    assert (seq[:, :20 // k * k] > 0).all() and (seq[:, 20 // k * k:] == 0).all()
    seq, _ = sample(model, att, masks, beam_size=2)
    assert seq.shape == (4, 20) and (seq > 0).all()


def test_sampling_in_train_mode_carries_gradients():
    model = tiny_model(K=2).train()
    att, masks = masked_batch()
    torch.manual_seed(0)
    seq, logprobs = sample(model, att, masks, sample_max=0, temperature=0.8)
    assert seq.dtype == torch.int64 and seq.shape == (4, 20) and logprobs.requires_grad
    mask = torch.cat([torch.ones(4, 1), (seq > 0).float()[:, :-1]], dim=1)
    (-(logprobs * mask).sum()).backward()
    assert model.model.generator.proj.weight.grad.abs().sum() > 0
    # Eval-mode decoding returns plain (non-inference) tensors usable as training labels.
    model.eval()
    seq, logprobs = sample(model, att, masks)
    assert not seq.is_inference() and not logprobs.requires_grad


def test_beam_search_bookkeeping():
    model = tiny_model(K=2)
    att, masks = masked_batch()
    seq, logprobs = decoded = sample(model, att, masks, beam_size=3)
    assert len(decoded.hypotheses) == 4
    for b, beams in enumerate(decoded.hypotheses):
        assert len(beams) == 3
        scores = [beam['p'] for beam in beams]
        assert scores == sorted(scores, reverse=True)
        assert torch.equal(beams[0]['seq'], seq[b]) and torch.equal(beams[0]['logps'], logprobs[b])
        for beam in beams:
            assert beam['seq'].shape == beam['logps'].shape == (20,)
            assert math.isclose(beam['p'], float(beam['logps'].sum()), abs_tol=1e-4)  # no length penalty
            words = beam['seq'].tolist()
            end = words.index(0) if 0 in words else 20
            assert all(w == 0 for w in words[end:])  # beams hold nothing after their 0


def test_beam_search_batched_equals_one_image_at_a_time():
    model = tiny_model(K=2)
    counts = (5, 3, 7, 1)
    att, masks = masked_batch(counts)
    seq, _ = decoded = sample(model, att, masks, beam_size=3)
    batched = decoded.hypotheses
    for b, n in enumerate(counts):
        alone, _ = decoded = sample(model, att[b:b + 1, :n], None, beam_size=3)
        assert torch.equal(alone[0], seq[b])
        assert [x['seq'].tolist() for x in decoded.hypotheses[0]] == [x['seq'].tolist() for x in batched[b]]


def literal_beam_search(model, att, beam, max_length=20):
    """The reference's per-image beam search, written out literally: candidate dicts, Python's stable sort, beams
    forked by copying, the whole prefix re-decoded at every group. att (1, N, F) -> sorted done beams."""
    k = model.K
    memory, memory_mask = model.encode(att, None)
    memory = memory.expand(beam, -1, -1)
    last_pos = max_length - 1
    beam_seq = torch.zeros(max_length, beam, dtype=torch.long)
    beam_logps = torch.zeros(max_length, beam)
    beam_sum = torch.zeros(beam)
    done = []
    for t0 in range(0, max_length, k):
        prefix = torch.cat([torch.zeros(beam, k, dtype=torch.long), beam_seq[:t0].t()], dim=1)
        out = model.model.decode(memory, None, prefix, group_mask(t0 + k, k))
        logprobs = model.model.generator(out[:, -k:]).clone()  # (beam, K, V)
        logprobs[..., -1] -= 1000
        for t in range(t0, min(t0 + k, max_length)):
            ys, ix = torch.sort(logprobs[:, t - t0], 1, True)
            candidates = [{'c': ix[q, c].item(), 'q': q, 'p': beam_sum[q] + ys[q, c].item(), 'r': ys[q, c]}
                          for c in range(beam) for q in range(1 if t == 0 else beam)]
            candidates = sorted(candidates, key=lambda x: -x['p'])
            prev_seq, prev_logps, prev_logprobs = beam_seq.clone(), beam_logps.clone(), logprobs.clone()
            for v, cand in enumerate(candidates[:beam]):
                beam_seq[:t, v], beam_logps[:t, v] = prev_seq[:t, cand['q']], prev_logps[:t, cand['q']]
                logprobs[v] = prev_logprobs[cand['q']]
                beam_seq[t, v], beam_logps[t, v], beam_sum[v] = cand['c'], cand['r'], cand['p']
            for v in range(beam):
                if beam_seq[t, v] == 0 or t == last_pos:
                    done.append({'seq': beam_seq[:, v].clone(), 'logps': beam_logps[:, v].clone(),
                                 'p': beam_sum[v].item()})
                    beam_sum[v] = -1000
    return sorted(done, key=lambda x: -x['p'])[:beam]


@pytest.mark.parametrize('k', [1, 2, 3, 4])
@pytest.mark.parametrize('beam', [2, 3, 5])
def test_beam_search_equals_the_literal_reference(k, beam):
    model = tiny_model(seed=k, K=k)
    counts = (5, 3, 7, 1)
    att, masks = masked_batch(counts, seed=k)
    with torch.no_grad():
        hypotheses = sample(model, att, masks, beam_size=beam).hypotheses
        for b, n in enumerate(counts):
            expected = literal_beam_search(model, att[b:b + 1, :n], beam)
            got = hypotheses[b]
            assert [x['seq'].tolist() for x in got] == [x['seq'].tolist() for x in expected]
            for x, y in zip(got, expected):
                assert math.isclose(x['p'], y['p'], abs_tol=1e-4)
                torch.testing.assert_close(x['logps'], y['logps'], atol=1e-5, rtol=1e-5)


def test_beam_search_when_every_real_beam_scores_below_minus_1000():
    """A pathological model (the end token wins by 1e4): finished beams, restarted from -1000, outrank the real
    ones and are extended to max_length, exactly as in the reference."""
    model = tiny_model(K=2)
    with torch.no_grad():
        model.model.generator.proj.bias[0] = 1e4
        att, masks = masked_batch()
        hypotheses = sample(model, att, masks, beam_size=3).hypotheses
        for b, n in enumerate((5, 3, 7, 1)):
            expected = literal_beam_search(model, att[b:b + 1, :n], 3)
            assert [x['seq'].tolist() for x in hypotheses[b]] == [x['seq'].tolist() for x in expected]


def test_beam_search_first_position_expands_one_beam_and_suppresses_unk():
    """All beams start as the same empty caption: the first word comes from beam 0 alone (three different words,
    not three copies of the best one). UNK (the last index) is never chosen."""
    att, masks = masked_batch()
    for k, max_length in ((1, 1), (2, 20)):
        model = tiny_model(K=k)
        with torch.no_grad():
            model.model.generator.proj.bias[0] = -1e4  # no caption ends: every beam runs to the end
            model.model.generator.proj.bias[-1] = 50.0  # UNK would win everywhere
            done = model.decode(att, masks, DecodeConfig(beam_size=3, max_length=max_length)).hypotheses
        for beams in done:
            assert len(beams) == 3 and all(VOCAB not in beam['seq'].tolist() for beam in beams)
            if max_length == 1:
                firsts = [beam['seq'][0].item() for beam in beams]
                assert len(set(firsts)) == 3 and 0 not in firsts


def test_length_penalty_option():
    model = tiny_model(K=2)
    att, masks = masked_batch()
    for beam_size in (3, 1):  # beam search ranks by the score; greedy scores its one path per image
        hypotheses = sample(model, att, masks, beam_size=beam_size, length_penalty='avg_0').hypotheses
        for beams in hypotheses:
            assert len(beams) == beam_size
            for beam in beams:
                n = next((i + 1 for i, w in enumerate(beam['seq'].tolist()) if w == 0), 20)
                assert math.isclose(beam['p'], float(beam['logps'][:n].sum()) / n, abs_tol=1e-4)


# ---- checkpoints ---------------------------------------------------------------------------------------------
def test_load_weights_loads_strict():
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    models.load_weights(model, other.state_dict(), 'save/x/model.pth')
    for key, value in other.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


@pytest.mark.parametrize('overrides,words', [
    ({'vocab_size': 30}, 'vocabulary of 20 words but the options/infos say 30'),
    ({'input_encoding_size': 16}, 'd_model'),
    ({'att_feat_size': 10}, 'att_feat_size 12'),
    ({'num_layers': 3}, 'encoder layers'),
    ({'rnn_size': 40}, 'rnn_size'),
    ({'use_bn': 1}, 'does not fit this model'),
])
def test_load_weights_mismatch_is_one_line(overrides, words):
    state = tiny_model().state_dict()
    with pytest.raises(SaticError) as error:
        models.load_weights(setup_model(tiny_opt(**overrides)), state, 'save/x/model.pth')
    message = str(error.value)
    assert '\n' not in message and 'save/x/model.pth' in message and words in message


def test_encode_once_per_image_equals_encoding_every_copy():
    """forward_xe / sampling with one row per image and seq_per_img equal the repeated-rows call (eval mode)."""
    torch.manual_seed(0)
    model = tiny_sat(num_layers=2).eval()
    S = 3
    att = torch.randn(2, 5, 8)
    masks = torch.tensor([[1., 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.randint(1, 12, (2 * S, 18))
    full = model.forward_xe(att.repeat_interleave(S, 0), labels, masks.repeat_interleave(S, 0))
    once = model.forward_xe(att, labels, masks, seq_per_img=S)
    assert torch.allclose(full, once, atol=1e-6)
    seq_full, _ = model.decode(att.repeat_interleave(S, 0), masks.repeat_interleave(S, 0))
    seq_once, _ = model.decode(att, masks, seq_per_img=S)
    assert torch.equal(seq_full, seq_once)


def test_loss_wrapper_encode_per_image_gives_the_same_xe_loss():
    """--encode_per_image 1 changes only where the encoder runs: in eval mode the XE loss is identical."""
    import argparse
    from misc.train.loss_wrapper import LossConfig, LossWrapper
    torch.manual_seed(0)
    model = tiny_sat().eval()
    S = 5
    att = torch.randn(2, 4, 8).repeat_interleave(S, 0)
    labels = torch.cat([torch.zeros(2 * S, 1, dtype=torch.long), torch.randint(1, 12, (2 * S, 16)),
                        torch.zeros(2 * S, 1, dtype=torch.long)], 1)
    batch = {'fc_feats': None, 'att_feats': att, 'att_masks': None, 'labels': labels,
             'masks': torch.ones(2 * S, 18)}
    losses = []
    for flag in (0, 1):
        opt = argparse.Namespace(label_smoothing=0, seq_per_img=S, cached_tokens='', encode_per_image=flag)
        losses.append(float(LossWrapper(model, LossConfig.from_opt(opt))(batch)['loss'].detach()))
    assert abs(losses[0] - losses[1]) < 1e-6
