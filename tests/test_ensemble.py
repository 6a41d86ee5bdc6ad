"""models/ensemble.py, eval_ensemble.py and the attention dump (SATModel.region_attention, eval.py --dump_attention).

Model-level tests use tiny random SATModels; the entry points run in-process on the tiny dataset with tiny
checkpoints, in a temporary working directory.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import eval as eval_script
import eval_ensemble
from misc.files.atomic import save_pickle
from misc.files.safe_load import load_pickle
from models.decode_config import DecodeConfig
from models.ensemble import EnsembleModel
from tests.helpers import assert_one_line_error, masked_batch, run_main, tiny_checkpoint, tiny_sat

VOCAB, FEAT = 12, 12
SEARCHES = {
    'greedy': DecodeConfig(),
    'beam 3': DecodeConfig(beam_size=3),
    'diverse beam 4, 2 groups': DecodeConfig(beam_size=4, group_size=2, diversity_lambda=0.7),
    'greedy, constraint, trigrams': DecodeConfig(decoding_constraint=True, block_trigrams=True),
    'beam 3, constraint, wu_0.5': DecodeConfig(beam_size=3, decoding_constraint=True, length_penalty='wu_0.5'),
    'sampling, temperature 0.7': DecodeConfig(sample_max=False, temperature=0.7),
}


def tiny_model(seed, k=2, layers=1, d_model=16):
    torch.manual_seed(seed)
    return tiny_sat(VOCAB, K=k, d_model=d_model, num_layers=layers, att_feat_size=FEAT).eval()


def decoded(model, config, seed=0):
    torch.manual_seed(seed)  # sampling draws the same numbers for both sides
    return model.decode(*masked_batch(feat=FEAT), config)


# ---- the ensemble's step ------------------------------------------------------------------------------------------
def test_step_is_the_log_of_the_weighted_mean_of_the_members_probabilities():
    members = [tiny_model(0), tiny_model(1, layers=2, d_model=24)]  # sizes may differ
    ensemble = EnsembleModel(members, weights=[1, 3]).eval()
    att, masks = masked_batch(feat=FEAT)
    with torch.no_grad():
        memory, encoding = ensemble.encode(att, masks)
        cache = ensemble.init_cache(memory, encoding, rows_per_image=2)
        member_caches = [m.init_cache(*m.encode(att, masks), rows_per_image=2) for m in members]
        tokens = torch.zeros(att.size(0) * 2, 2, dtype=torch.long)  # (S, K)
        for step in range(3):
            got, cache = ensemble.step(tokens, cache)  # (S, K, V)
            probs = [m.step(tokens, c)[0].exp() for m, c in zip(members, member_caches)]
            expected = ((1 * probs[0] + 3 * probs[1]) / 4).log()
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            # beam search's reorder: every member's cache follows the chosen rows
            index = torch.arange(tokens.size(0)).view(-1, 2).flip(1).reshape(-1)  # swap each image's two rows
            cache.reorder(index)
            for c in member_caches:
                c.reorder(index)
            tokens = torch.randint(1, VOCAB, tokens.shape)


@pytest.mark.parametrize('search', sorted(SEARCHES))
def test_one_model_ensemble_is_that_model(search):
    model = tiny_model(0)
    seq, logprobs = decoded(model, SEARCHES[search])
    ens_seq, ens_logprobs = decoded(EnsembleModel([model]).eval(), SEARCHES[search])
    assert torch.equal(seq, ens_seq)
    torch.testing.assert_close(ens_logprobs, logprobs, rtol=0, atol=0)


@pytest.mark.parametrize('search', sorted(set(SEARCHES) - {'sampling, temperature 0.7'}))
def test_two_model_ensemble_decodes_the_same_with_and_without_the_cache(search):
    """Every search runs on the ensemble; the cached decoding (one cache per member, reordered by beam search)
    decodes what re-decoding the prefix at each step does."""
    members = [tiny_model(0), tiny_model(1, layers=2)]
    ensemble = EnsembleModel(members, weights=[0.3, 0.7]).eval()
    config = SEARCHES[search]
    seq, _ = cached = decoded(ensemble, config)
    uncached, _ = decoded(ensemble, DecodeConfig(**{**config.__dict__, 'use_cache': False}))
    assert torch.equal(seq, uncached)
    assert (seq[:, 0] > 0).all()
    assert len(cached.hypotheses) == seq.size(0)  # per image, returned (no state left on the model)
    assert not hasattr(ensemble, 'done_beams')


def test_ensemble_greedy_follows_the_averaged_distribution():
    """Two members that disagree: the first word is the argmax of the mean probabilities, not of either member."""
    members = [tiny_model(0, k=1), tiny_model(1, k=1)]
    ensemble = EnsembleModel(members).eval()
    att, masks = masked_batch(feat=FEAT)
    seq, _ = ensemble.decode(att, masks)
    with torch.no_grad():
        first = [m.step(torch.zeros(att.size(0), 1, dtype=torch.long), m.init_cache(*m.encode(att, masks)))[0]
                 for m in members]
    expected = (first[0].exp() + first[1].exp()).argmax(-1)[:, 0]
    assert torch.equal(seq[:, 0], expected)


def test_members_of_another_k_or_vocabulary_are_refused():
    with pytest.raises(ValueError, match='one K and one vocabulary'):
        EnsembleModel([tiny_model(0, k=2), tiny_model(1, k=1)])
    with pytest.raises(ValueError, match='one weight per model'):
        EnsembleModel([tiny_model(0)], weights=[1, 2])


# ---- the attention dump ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('k', [1, 2, 3])
def test_region_attention_rows_sum_to_one_over_the_real_regions(k):
    model = tiny_model(0, k=k, layers=2)
    counts = (5, 3, 7, 1)
    att, masks = masked_batch(counts, n_max=8, feat=FEAT)
    for config in (DecodeConfig(), DecodeConfig(beam_size=3)):
        seq, seq_logprobs = model.decode(att, masks, config)
        with torch.no_grad():
            weights, logprobs = model.region_attention(att, masks, seq)
        assert weights.shape == (len(counts), seq.size(1), att.size(1))  # (B, T, N)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]))
        assert (weights * (1 - masks).unsqueeze(1)).abs().max() == 0  # padding gets no weight
        assert (weights[:, :, :1] > 0).all()
        # aligned with the decoding: the words' log-probs are those the decoding gave them
        for b in range(len(counts)):
            length = int((seq[b] > 0).cumprod(0).sum())
            got = logprobs[b, :length].gather(1, seq[b, :length, None]).squeeze(1)
            torch.testing.assert_close(got, seq_logprobs[b, :length], rtol=0, atol=1e-5)


def test_ensemble_attention_is_the_weighted_mean_of_the_members():
    members = [tiny_model(0), tiny_model(1)]
    ensemble = EnsembleModel(members, weights=[1, 3]).eval()
    att, masks = masked_batch(feat=FEAT)
    seq, _ = ensemble.decode(att, masks)
    with torch.no_grad():
        got, _ = ensemble.region_attention(att, masks, seq)
        parts = [m.region_attention(att, masks, seq)[0] for m in members]
    torch.testing.assert_close(got, 0.25 * parts[0] + 0.75 * parts[1])
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:2]))


# ---- the entry points -----------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def checkpoints(tiny_dataset, tmp_path_factory):
    """Two tiny SAT K=2 checkpoints of the tiny dataset's vocabulary, trained a little from different seeds."""
    root = tmp_path_factory.mktemp('ensemble')
    first = tiny_checkpoint(tiny_dataset, str(root / 'a'), train_steps=30)
    torch.manual_seed(5)
    second = tiny_checkpoint(tiny_dataset, str(root / 'b'), train_steps=5)
    return first, second


def changed_infos(infos_path, folder, change):
    """A copy of a checkpoint's two files in folder with change(infos) applied to the infos."""
    os.makedirs(folder, exist_ok=True)
    model_path = os.path.join(folder, 'model.pth')
    shutil.copy(os.path.join(os.path.dirname(infos_path), 'model.pth'), model_path)
    infos = load_pickle(infos_path)
    change(infos)
    path = os.path.join(folder, 'infos_tiny.pkl')
    save_pickle(infos, path)
    return model_path, path


def vis(tmp_path, run_id):
    with open(tmp_path / 'vis' / f'{run_id}.json') as f:
        return json.load(f)


COMMON = ['--language_eval', '0', '--batch_size', '2', '--device', 'cpu', '--num_workers', '0']


@pytest.mark.parametrize('beam', ['1', '3'])
def test_one_model_ensemble_writes_evals_captions(checkpoints, tmp_path, beam):
    (model, infos), _ = checkpoints
    flags = COMMON + ['--beam_size', beam]
    rc, _, err = run_main(['--model', model, '--infos_path', infos, '--id', 'single', *flags], tmp_path,
                          main=eval_script.main)
    assert rc == 0, err
    rc, out, err = run_main(['--models', model, '--infos_paths', infos, '--id', 'ens', *flags], tmp_path,
                            main=eval_ensemble.main)
    assert rc == 0, err
    assert 'ensemble of 1 models' in out
    assert vis(tmp_path, 'ens') == vis(tmp_path, 'single')


def test_eval_ensemble_by_ids_writes_vis_and_the_server_json(checkpoints, tiny_dataset, tmp_path):
    for name, (model, infos) in zip(('run-a', 'run-b'), checkpoints):
        os.makedirs(tmp_path / 'save' / name)
        shutil.copy(model, tmp_path / 'save' / name / 'model-best.pth')
        shutil.copy(infos, tmp_path / 'save' / name / f'infos_{name}-best.pkl')
    rc, out, err = run_main(['--ids', 'run-a,run-b', '--weights', '2', '1', *COMMON, '--beam_size', '2',
                             '--dump_attention', '2', '--input_box_dir', tiny_dataset.box_dir], tmp_path,
                            main=eval_ensemble.main)
    assert rc == 0, err
    predictions = vis(tmp_path, 'run-a2+run-b1')  # the reference's id: names and weights
    assert len(predictions) == 3 and all(p['caption'] for p in predictions)
    assert 'weights 0.667, 0.333' in out
    for p in predictions:
        assert len(p['attention']) == len(p['words']) == len(p['caption'].split())
        assert all(1 <= len(regions) <= 2 for regions in p['attention'])
        assert all(0 <= r < len(p['boxes']) and 0 < w <= 1 for regions in p['attention'] for r, w in regions)
    rc, _, err = run_main(['--ids', 'run-a', 'run-b', *COMMON, '--server_json', '1', '--id', 'server',
                           '--input_label_h5', 'ignored'], tmp_path, main=eval_ensemble.main)
    assert rc == 0, err
    server = vis(tmp_path, 'server')
    assert [set(p) for p in server] == [{'image_id', 'caption'}] * 3
    assert all(isinstance(p['image_id'], int) for p in server)


def test_eval_dumps_attention_and_boxes(checkpoints, tiny_dataset, tmp_path):
    (model, infos), _ = checkpoints
    rc, _, err = run_main(['--model', model, '--infos_path', infos, *COMMON, '--id', 'att', '--dump_attention', '3',
                           '--input_box_dir', tiny_dataset.box_dir], tmp_path, main=eval_script.main)
    assert rc == 0, err
    for p in vis(tmp_path, 'att'):
        boxes = np.load(os.path.join(tiny_dataset.box_dir, f"{p['image_id']}.npy"))
        np.testing.assert_allclose(p['boxes'], boxes, atol=0.01)
        assert p['words'] == p['caption'].split()
        for regions in p['attention']:
            weights = [w for _, w in regions]
            assert len(regions) == min(3, len(boxes)) and weights == sorted(weights, reverse=True)
            assert all(0 <= r < len(boxes) for r, _ in regions)
    # without --dump_attention, no attention keys (the plain output is unchanged)
    rc, _, err = run_main(['--model', model, '--infos_path', infos, *COMMON, '--id', 'plain'], tmp_path,
                          main=eval_script.main)
    assert rc == 0, err
    assert [set(p) for p in vis(tmp_path, 'plain')] == [{'image_id', 'caption'}] * 3
    assert_one_line_error(run_main(['--model', model, '--infos_path', infos, *COMMON, '--dump_attention', '2',
                                    '--dump_json', '0'], tmp_path, main=eval_script.main), '--dump_json 1')
    assert_one_line_error(run_main(['--model', model, '--infos_path', infos, *COMMON, '--dump_attention', '2',
                                    '--input_box_dir', str(tmp_path / 'nowhere')], tmp_path, main=eval_script.main),
                          '--input_box_dir', 'does not exist')


def test_ensembles_of_another_k_or_vocabulary_are_refused_naming_both_files(checkpoints, tmp_path):
    (model, infos), _ = checkpoints
    other_k = changed_infos(infos, str(tmp_path / 'k3'), lambda i: setattr(i['opt'], 'K', 3))
    line = assert_one_line_error(run_main(['--models', model, other_k[0], '--infos_paths', infos, other_k[1],
                                           *COMMON], tmp_path, main=eval_ensemble.main), 'K=2', 'K=3', 'same K')
    assert model in line and other_k[0] in line

    def swap_two_words(i):
        i['vocab'] = dict(i['vocab'], **{'1': i['vocab']['2'], '2': i['vocab']['1']})
    other_vocab = changed_infos(infos, str(tmp_path / 'vocab'), swap_two_words)
    line = assert_one_line_error(run_main(['--models', f'{model},{other_vocab[0]}',
                                           '--infos_paths', f'{infos},{other_vocab[1]}', *COMMON], tmp_path,
                                          main=eval_ensemble.main), 'different vocabularies')
    assert model in line and other_vocab[0] in line
    assert_one_line_error(run_main(['--models', model, '--infos_paths', infos, '--weights', '1', '2', *COMMON],
                                   tmp_path, main=eval_ensemble.main), 'one weight per model')
    assert_one_line_error(run_main(['--models', model, *COMMON], tmp_path, main=eval_ensemble.main),
                          '--infos_paths')
