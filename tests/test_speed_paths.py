"""The speed paths of issue 11 compute what the reference computed: packed encoder (real regions only) == the
padded encoder, the scored-positions loss == the full log-probs loss, the fixed-shape decoding cache == the
growing cache == uncached decoding, and the opt-in paths (--compile 1; --quantize int8 in tests/test_int8.py).
The kernels under them (layer norm, dropout, fused projections) are tested in tests/test_kernels.py.

Tiny random models on CPU, one thread. The --compile test runs only with SATIC_TEST_COMPILE=1 (it compiles for
about a minute on 2 cores); it is skipped when torch.compile cannot run here.
"""
import argparse
import os

import pytest
import torch

from models.accel import decoding_step
from models.accel.speed import fbgemm_int8_available, quantize_int8
from models.decode_config import DecodeConfig
from models.masks import Packing, target_mask
from tests.helpers import tiny_sat, masked_batch


def tiny(K=2, seed=0, dropout=None, **kw):
    torch.manual_seed(seed)
    model = tiny_sat(vocab_size=15, K=K, d_model=16, d_ff=24, num_layers=2, att_feat_size=6, **kw)
    if dropout is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = dropout
    return model


def batch(counts=(4, 2, 6, 1), n_max=8, feat=6, seed=1, seq_per_img=1):
    g = torch.Generator().manual_seed(seed)
    att, masks = masked_batch(counts, n_max, feat, generator=g)
    rows = len(counts) * seq_per_img
    labels = torch.zeros(rows, 18, dtype=torch.long)
    label_masks = torch.zeros(rows, 18)
    for r in range(rows):
        n = int(torch.randint(1, 17, (1,), generator=g))
        labels[r, 1:n + 1] = torch.randint(1, 16, (n,), generator=g)
        label_masks[r, :n + 2] = 1
    return att, masks, labels, label_masks


def padded_reference(model, att, masks, labels, seq_per_img=1):
    """The reference's teacher forcing, every position padded: att_embed on valid regions scattered into zeros,
    the encoder over the padded batch, cross-attention over the (repeated) padded memory, log-probs everywhere."""
    n = att.size(1) if masks is None else int(masks.sum(1).max())
    att = att[:, :n]
    embedded = model.att_embed(att.reshape(-1, att.size(-1))).view(att.size(0), n, -1)
    mask = None
    if masks is not None:
        valid = masks[:, :n] > 0
        embedded = embedded * valid.unsqueeze(-1)
        mask = valid.unsqueeze(1)
    memory = model.model.encoder(embedded, mask)
    if seq_per_img > 1:
        memory = memory.repeat_interleave(seq_per_img, 0)
        mask = None if mask is None else mask.repeat_interleave(seq_per_img, 0)
    tokens = model.shift_labels(labels)
    out = model.model.decoder(model.model.embed(tokens), memory, mask, target_mask(tokens, model.K))
    return model.model.generator(out[:, :labels.size(1) - 1]), memory


# ---- packed encoder -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('with_masks', [True, False])
def test_packed_encoder_equals_padded_encoder(with_masks):
    model = tiny().eval()
    att, masks, labels, _ = batch()
    if not with_masks:
        att, masks = att[:, :5], None
    with torch.no_grad():
        memory, memory_mask = model.encode(att, masks)  # packed inside, padded on return
        want_logprobs, want_memory = padded_reference(model, att, masks, labels)
        got_logprobs = model(None, att, labels, masks)
    if with_masks:
        valid = memory_mask.squeeze(1)  # (B, N')
        assert memory.shape == want_memory.shape and valid.sum() == masks.sum()
        torch.testing.assert_close(memory[valid], want_memory[valid], atol=1e-5, rtol=1e-5)
        assert not memory[~valid].any()  # padding is never computed
    else:
        assert memory_mask is None
        torch.testing.assert_close(memory, want_memory, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_logprobs, want_logprobs, atol=1e-5, rtol=1e-5)


def test_packed_training_gradients_equal_padded_gradients():
    """Train mode, dropout 0: the packed forward's loss and every parameter gradient are the padded one's."""
    att, masks, labels, label_masks = batch(seq_per_img=2)
    grads = []
    for packed in (True, False):
        model = tiny(dropout=0.0).train()
        if packed:
            logprobs = model.forward_xe(att, labels, masks, seq_per_img=2)
        else:
            logprobs = padded_reference(model, att, masks, labels, seq_per_img=2)[0]
        sel = label_masks[:, 1:] > 0
        loss = -logprobs.gather(2, labels[:, 1:, None]).squeeze(2)[sel].mean()
        loss.backward()
        grads.append((float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    assert abs(grads[0][0] - grads[1][0]) < 1e-6
    assert grads[0][1].keys() == grads[1][1].keys()
    for key, grad in grads[0][1].items():
        torch.testing.assert_close(grad, grads[1][1][key], atol=1e-5, rtol=1e-4, msg=key)


def test_packed_encoder_ignores_padding_content_and_strides():
    """Garbage in padded regions changes nothing; a strided batch view (att[::2]) gives the same memory."""
    model = tiny().eval()
    att, masks, labels, _ = batch()
    noisy = att + (1 - masks).unsqueeze(-1) * 100 * torch.randn_like(att)
    doubled = torch.stack([att, torch.randn_like(att)], 1).flatten(0, 1)  # rows 0, 2, 4.. are att
    with torch.no_grad():
        want = model(None, att, labels, masks)
        torch.testing.assert_close(model(None, noisy, labels, masks), want)
        torch.testing.assert_close(model(None, doubled[::2], labels, masks), want)


# ---- scored positions -----------------------------------------------------------------------------------------
@pytest.mark.parametrize('K', [1, 2, 4])
def test_scored_logprobs_are_the_masked_rows_of_forward(K):
    model = tiny(K=K).eval()
    att, masks, labels, label_masks = batch()
    with torch.no_grad():
        full = model(None, att, labels, masks)  # (S, L-1, V)
        rows, targets = model.scored_logprobs(att, labels, masks, label_masks)
    sel = label_masks[:, 1:] > 0
    torch.testing.assert_close(rows, full[sel], atol=1e-6, rtol=1e-6)
    assert torch.equal(targets, labels[:, 1:][sel])


@pytest.mark.parametrize('smoothing', [0.0, 0.2])
def test_scored_loss_equals_full_logprobs_loss(smoothing):
    from misc.train.losses import build_criterion
    crit = build_criterion(smoothing)
    att, masks, labels, label_masks = batch(seq_per_img=3)
    model = tiny().eval()
    with torch.no_grad():
        full = crit(model(None, att, labels, masks, seq_per_img=3), labels[:, 1:], label_masks[:, 1:])
        scored = crit.scored(*model.scored_logprobs(att, labels, masks, label_masks, seq_per_img=3))
    assert abs(float(full) - float(scored)) < 1e-6


# ---- decoding cache -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('K', [1, 2, 3])
def test_fixed_shape_cache_equals_growing_cache_and_uncached(K):
    model = tiny(K=K).eval()
    att, masks, _, _ = batch()
    tokens = torch.randint(1, 16, (4, 6 * K))
    outs = {}
    for name in ('fixed', 'masked', 'growing', 'uncached'):
        # 'masked': the fixed layout as the compiled step runs it, attending over the whole buffer under a mask
        model.__dict__['_compiled'] = {'step': model.cached_step} if name == 'masked' else {}
        with torch.set_grad_enabled(name == 'growing'):  # the growing layout is the one used with gradients
            memory, memory_mask = model.encode(att, masks)
            cache = model.init_cache(memory, memory_mask, use_cache=name != 'uncached', max_length=5 * K + 1)
            assert cache.fixed == (name in ('fixed', 'masked'))
            steps = []
            for t in range(0, 6 * K, K):
                steps.append(model.step(tokens[:, t:t + K], cache)[0].detach())
                if cache.fixed:
                    assert cache.layers[0].key.shape[2] == 6 * K  # max_length rounded up to whole groups
            outs[name] = torch.cat(steps, 1)
    model.__dict__['_compiled'] = {}
    for name in ('fixed', 'masked', 'growing'):
        torch.testing.assert_close(outs[name], outs['uncached'], atol=1e-5, rtol=1e-5, msg=name)


def test_fixed_cache_grows_past_its_capacity():
    model = tiny(K=2).eval()
    att, masks, _, _ = batch()
    tokens = torch.randint(1, 16, (4, 8))
    with torch.no_grad():
        memory, memory_mask = model.encode(att, masks)
        small = model.init_cache(memory, memory_mask, max_length=3)  # capacity 4 positions, 8 are decoded
        ref = model.init_cache(memory, memory_mask, use_cache=0)
        got = torch.cat([model.step(tokens[:, t:t + 2], small)[0] for t in range(0, 8, 2)], 1)
        want = torch.cat([model.step(tokens[:, t:t + 2], ref)[0] for t in range(0, 8, 2)], 1)
    assert small.capacity == 8
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sampled_rows_share_their_images_memory():
    """decode(seq_per_img=S) folds an image's S rows onto one set of memory keys/values: same as repeating."""
    model = tiny().eval()
    att, masks, _, _ = batch()
    with torch.no_grad():
        once = model.decode(att, masks, seq_per_img=3)
        repeated = model.decode(att.repeat_interleave(3, 0), masks.repeat_interleave(3, 0))
    assert torch.equal(once[0], repeated[0])
    torch.testing.assert_close(once[1], repeated[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_loss_wrapper_xe_scores_only_the_masked_positions(smoothing):
    """LossWrapper's XE (scored positions only) == the criterion over the reference call's full log-probs."""
    from misc.train.loss_wrapper import LossConfig, LossWrapper
    from misc.train.losses import build_criterion
    att, masks, labels, label_masks = batch(seq_per_img=2)
    model = tiny().eval()
    opt = argparse.Namespace(label_smoothing=smoothing, seq_per_img=2, cached_tokens='', encode_per_image=0)
    data = {'fc_feats': None, 'att_feats': att.repeat_interleave(2, 0), 'att_masks': masks.repeat_interleave(2, 0),
            'labels': labels, 'masks': label_masks}
    with torch.no_grad():
        got = float(LossWrapper(model, LossConfig.from_opt(opt))(data)['loss'])
        want = float(build_criterion(smoothing)(model(None, data['att_feats'], labels, data['att_masks']),
                                                labels[:, 1:], label_masks[:, 1:]))
    assert abs(got - want) < 1e-6


# ---- --compile 1 (opt-in: SATIC_TEST_COMPILE=1) ------------------------------------------------------------------
@pytest.mark.skipif(os.environ.get('SATIC_TEST_COMPILE') != '1',
                    reason='compiles for 1-4 minutes on 2 CPU cores: set SATIC_TEST_COMPILE=1 to run it')
def test_compiled_model_equals_eager():
    from models.accel.speed import compile_available, compile_model
    ok, why = compile_available()
    if not ok:
        pytest.skip(f'torch.compile cannot run here: {why}')
    att, masks, labels, label_masks = batch(seq_per_img=2)
    eager = tiny(dropout=0.0)
    compiled = compile_model(tiny(dropout=0.0))
    assert decoding_step(compiled, torch.zeros(1), True, 20).fn is compiled._compiled['step']  # compiled in use
    for model in (eager, compiled):
        model.eval()
    with torch.no_grad():
        for seed in (1, 2):  # a second batch shape: no wrong reuse of the first compilation
            a, m, l, lm = batch(seed=seed, seq_per_img=2, counts=(4, 2, 6, 1) if seed == 1 else (3, 7, 5, 2))
            want = eager.scored_logprobs(a, l, m, lm, seq_per_img=2)[0]
            torch.testing.assert_close(compiled.scored_logprobs(a, l, m, lm, seq_per_img=2)[0], want,
                                       atol=1e-5, rtol=1e-5)
            assert torch.equal(compiled.decode(a, m)[0], eager.decode(a, m)[0])
    grads = []
    for model in (eager, compiled):  # train mode, dropout 0: the compiled backward's gradients
        model.train()
        logprobs, targets = model.scored_logprobs(att, labels, masks, label_masks, seq_per_img=2)
        (-logprobs.gather(1, targets[:, None]).mean()).backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-5, rtol=1e-4, msg=key)

    if fbgemm_int8_available():  # --quantize int8 --compile 1: the int8 layers are opaque calls in the graph
        int8 = quantize_int8(eager.eval())
        with torch.no_grad():
            want = int8.decode(att, masks)
            got = compile_model(int8, training=False).decode(att, masks)
        assert decoding_step(int8, torch.zeros(1), True, 20).fn is int8._compiled['step']
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


# ---- attention per group of images of similar region counts ----------------------------------------------------
GROUPED = dict(counts=(14, 1, 3, 16, 2, 15, 5, 1, 13, 4, 2, 16), n_max=16)


def test_images_are_grouped_by_region_count():
    from models.masks import Packing
    att, masks, _, _ = batch(**GROUPED)
    packing = Packing(masks > 0).grouped()
    assert packing.groups and 2 <= len(packing.groups) <= 4
    images = torch.cat([g.images for g in packing.groups])
    assert sorted(images.tolist()) == list(range(12))  # every image in one group
    rows = torch.cat([g.rows for g in packing.groups])
    assert sorted(rows.tolist()) == list(range(int(masks.sum())))  # every real region once
    area = sum(g.batch * g.length for g in packing.groups)
    assert area <= 0.75 * 12 * 16
    for g in packing.groups:  # each group padded to its own longest image
        assert g.length == int(masks[g.images].sum(1).max())
    assert Packing(masks[:4] > 0).grouped().groups is None  # small batches: one attention


def test_attention_groups_are_formed_on_the_cpu_only():
    """On a GPU each group adds kernel launches and host reads to every decoding step: padded there."""
    att, masks, _, _ = batch(seq_per_img=1, **GROUPED)
    model = tiny().eval()
    assert model.real_regions(att, masks)[1].groups  # the batch does gain from groups on the CPU
    valid = masks > 0
    on_meta = Packing(batch=valid.size(0), length=valid.size(1), index=torch.empty(0, device='meta'),
                      attn_mask=valid[:, None, None, :].to('meta'))
    assert model._grouped(on_meta) is on_meta and on_meta.groups is None


def test_grouped_attention_equals_one_padded_attention():
    att, masks, labels, label_masks = batch(seq_per_img=2, **GROUPED)
    model = tiny().eval()
    with torch.no_grad():
        grouped = model(None, att, labels, masks, seq_per_img=2)
        memory, memory_mask = model.encode(att, masks)
        seq = model.decode(att, masks)
        beams = model.decode(att, masks, config=DecodeConfig(beam_size=3))
        model.group_regions = False
        torch.testing.assert_close(grouped, model(None, att, labels, masks, seq_per_img=2), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(memory, model.encode(att, masks)[0], atol=1e-5, rtol=1e-5)
        plain = model.decode(att, masks)
        assert torch.equal(seq[0], plain[0])
        torch.testing.assert_close(seq[1], plain[1], atol=1e-5, rtol=1e-5)
        plain_beams = model.decode(att, masks, config=DecodeConfig(beam_size=3))
        assert torch.equal(beams[0], plain_beams[0])
    reference, _ = padded_reference(model, att, masks, labels, seq_per_img=2)
    torch.testing.assert_close(grouped, reference, atol=1e-5, rtol=1e-5)
    grads = []  # train mode, dropout 0: the same gradients grouped or not
    for group_regions in (True, False):
        model = tiny(dropout=0.0).train()
        model.group_regions = group_regions
        logprobs, targets = model.scored_logprobs(att, labels, masks, label_masks, seq_per_img=2)
        (-logprobs.gather(1, targets[:, None]).mean()).backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], atol=1e-5, rtol=1e-4, msg=key)
