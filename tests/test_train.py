"""train.py end to end (with misc/loss_wrapper, optim, checkpoint): the two stages learn, runs resume after kill -9,
a kill during a save loses nothing, checkpoints go both ways between train.py, eval.py and the reference, bad input
gives one-line errors, and the logs (Noam lr, TensorBoard, histories, infos) are what the reference wrote.

Data: a small "scene" dataset with learnable structure, built in tmp_path through the real scripts: each image shows
a coloured thing at a place ("a red dog on the grass"), with the demo's synthetic concept features (one region per
content word, scripts/make_demo_data.ConceptFeatures). Val CIDEr-D is computed here with misc.eval.cider_d (no Java), the
same maths as pycocoevalcap; the self-critical run also scores with --language_eval 1 when Java is there.
"""
import argparse
import dataclasses
import glob
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import eval as eval_script
import train
from dataloader import DataConfig, DataLoader
from misc.files.safe_load import load_pickle, load_torch
from misc.eval.cider_d import corpus_cider_d
from misc.eval.coco_eval import java_available
from misc.eval.evaluation import evaluate
from misc.train.optim import noam_rate
from models.decode_config import DecodeConfig
from scripts import make_bu_data, prepro_labels, prepro_labels_seqKD, prepro_ngrams, prepro_reference_json
from scripts.make_demo_data import ConceptFeatures
from tests.helpers import assert_one_line_error, needs_shared, run_main, setup_model, shared_path, working_dir

REPO = Path(__file__).resolve().parents[1]
CONFORMANCE = Path(shared_path('conformance'))
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')

COLORS = ('red', 'blue', 'green', 'black', 'white', 'yellow')
THINGS = ('dog', 'cat', 'horse', 'bird', 'man', 'woman', 'car', 'bus')
PLACES = ('grass', 'street', 'beach', 'table', 'field', 'road')
MODEL = ['--caption_model', 'transformer', '--num_layers', '1', '--input_encoding_size', '32', '--rnn_size', '64']


# ----------------------------------------------------------------------------------------------- the scene data
@dataclasses.dataclass
class Scene:
    root: str
    refs: dict  # image id -> its reference captions

    def path(self, name):
        return os.path.join(self.root, name)

    def args(self, checkpoint_path, run_id, *extra, label_h5=None):
        """train.py arguments: this data, a tiny transformer, CPU, no Java."""
        return ['--input_json', self.path('cocotalk.json'),
                '--input_label_h5', label_h5 or self.path('cocotalk_label.h5'),
                '--input_fc_dir', self.path('cocobu_fc'), '--input_att_dir', self.path('cocobu_att'),
                '--cached_tokens', self.path('coco-train-idxs'), '--ref_json', self.path('refs.json'),
                '--att_feat_size', '32', '--fc_feat_size', '32', '--num_workers', '0', '--device', 'cpu',
                *MODEL, '--batch_size', '10', '--seq_per_img', '5', '--language_eval', '0', '--max_epochs', '-1',
                '--losses_log_every', '25', '--checkpoint_path', str(checkpoint_path), '--id', run_id, *extra]


def scene_captions(color, thing, place):
    return [f'a {color} {thing} on the {place}', f'a {color} {thing} is on the {place}',
            f'the {color} {thing} on a {place}', f'a {thing} on the {place}', f'a {color} {thing} near the {place}']


def make_scene_dataset(root, n_train=200, n_val=40, n_test=10, feat_dim=32, seed=0, boxes=6):
    """dataset_coco.json -> prepro_labels, TSV -> make_bu_data, prepro_ngrams, prepro_reference_json (refs.json)."""
    os.makedirs(root, exist_ok=True)
    p = lambda name: os.path.join(root, name)  # noqa: E731
    rng = np.random.default_rng(seed)
    images, refs, sentid = [], {}, 0
    for imgid, split in enumerate(['train'] * n_train + ['val'] * n_val + ['test'] * n_test):
        scene = (COLORS[rng.integers(len(COLORS))], THINGS[rng.integers(len(THINGS))],
                 PLACES[rng.integers(len(PLACES))])
        cocoid = 2000 + imgid
        sentences = []
        for raw in scene_captions(*scene):
            sentences.append({'tokens': raw.split(), 'raw': raw, 'imgid': imgid, 'sentid': sentid})
            sentid += 1
        refs[cocoid] = scene_captions(*scene)
        images.append({'filepath': 'val2014', 'filename': f'COCO_val2014_{cocoid:012d}.jpg', 'imgid': imgid,
                       'split': split, 'cocoid': cocoid, 'sentids': [s['sentid'] for s in sentences],
                       'sentences': sentences})
    with open(p('dataset_coco.json'), 'w') as f:
        json.dump({'images': images, 'dataset': 'coco'}, f)
    prepro_labels.run(prepro_labels.parse_args(['--input_json', p('dataset_coco.json'), '--output_json',
                                                p('cocotalk.json'), '--output_h5', p('cocotalk'),
                                                '--word_count_threshold', '0']))
    concepts = ConceptFeatures(feat_dim, seed)
    os.makedirs(p('tsv'), exist_ok=True)
    with open(p('tsv/scene.tsv'), 'w') as f:
        for img in images:
            boxes_xy, feats = concepts.regions([s['tokens'] for s in img['sentences']],
                                               np.random.default_rng([seed, img['cocoid']]), n_boxes=boxes)
            f.write(make_bu_data.format_row(img['cocoid'], 640, 480, boxes_xy, feats))
    make_bu_data.run(make_bu_data.parse_args(['--downloaded_feats', p('tsv'), '--output_dir', p('cocobu'),
                                              '--num_workers', '1']))
    prepro_ngrams.run(prepro_ngrams.parse_args(['--input_json', p('dataset_coco.json'), '--dict_json',
                                                p('cocotalk.json'), '--output_pkl', p('coco-train')]))
    prepro_reference_json.run(prepro_reference_json.parse_args(['--input_json', p('dataset_coco.json'),
                                                                '--output_json', p('refs.json')]))
    return Scene(root, refs)

@pytest.fixture(scope='module')
def scene(tmp_path_factory):
    return make_scene_dataset(str(tmp_path_factory.mktemp('scene')))



def val_cider(scene, opt, model):
    """Val CIDEr-D of greedy captions (misc.eval.cider_d, document frequencies of the val references as in
    pycocoevalcap) -> (score, captions)."""
    with DataLoader(DataConfig.from_opt(opt)) as loader:
        predictions = evaluate(model, loader, 'val', DecodeConfig()).predictions
    captions = [p['caption'] for p in predictions]
    score, _ = corpus_cider_d(captions, [scene.refs[p['image_id']] for p in predictions])
    return score, captions


def checkpoint_cider(scene, folder, run_id, model_file='model.pth'):
    opt = load_pickle(os.path.join(folder, f'infos_{run_id}.pkl'))['opt']
    model = setup_model(opt)
    model.load_state_dict(load_torch(os.path.join(folder, model_file)))
    return val_cider(scene, opt, model)


# ----------------------------------------------------------------------------------------------- stage 1
STAGE1_ITERS = 300


@pytest.fixture(scope='module')
def stage1(scene, tmp_path_factory):
    """Stage 1 of the README on the scene data: XE with Noam (warm-up 50), validated every 100 iterations.
    Returns (checkpoint folder, run id, stdout)."""
    work = tmp_path_factory.mktemp('stage1')
    folder = str(work / 'scene-xe')
    with working_dir(work):
        rc, out, err = run_main(scene.args(folder, 'scene-xe', '--noamopt', '--noamopt_warmup', '50',
                                                       '--max_iters', str(STAGE1_ITERS),
                                                       '--save_checkpoint_every', '100'))
    assert rc == 0, err
    return folder, 'scene-xe', out


def test_stage1_learns_then_self_critical_raises_val_cider(scene, stage1, tmp_path, capsys):
    folder, run_id, _ = stage1
    histories = load_pickle(os.path.join(folder, f'histories_{run_id}.pkl'))
    losses = [histories['loss_history'][k] for k in sorted(histories['loss_history'])]
    opt = load_pickle(os.path.join(folder, f'infos_{run_id}.pkl'))['opt']
    torch.manual_seed(opt.seed)
    untrained, _ = val_cider(scene, opt, setup_model(opt))
    stage1_cider, stage1_captions = checkpoint_cider(scene, folder, run_id)

    # Stage 2 as the README: copy_model.sh, then self-critical from the copy (epoch 15 >= --self_critical_after 15);
    # for comparison, as many more XE iterations at the same lr (--self_critical_after -1).
    save = tmp_path / 'save'
    shutil.copytree(folder, save / 'scene-xe')
    for copy in ('nsc-scene', 'xe-more'):
        subprocess.run(['bash', str(REPO / 'save' / 'copy_model.sh'), 'scene-xe', copy], cwd=save, check=True,
                       capture_output=True)
    nsc, xe_more = str(save / 'nsc-scene'), str(save / 'xe-more')
    language_eval = '1' if java_available() else '0'
    stage2 = ['--learning_rate', '5e-4', '--max_iters', str(STAGE1_ITERS + 60), '--save_checkpoint_every', '1000',
              '--losses_log_every', '5']
    with working_dir(tmp_path):
        rc, out, err = run_main(scene.args(nsc, 'nsc-scene', *stage2, '--self_critical_after', '15',
                                                       '--language_eval', language_eval, '--start_from', nsc))
        assert rc == 0, err
        rc, _, err = run_main(scene.args(xe_more, 'xe-more', *stage2, '--start_from', xe_more))
        assert rc == 0, err
    stage2_cider, stage2_captions = checkpoint_cider(scene, nsc, 'nsc-scene')
    xe_more_cider, _ = checkpoint_cider(scene, xe_more, 'xe-more')
    rewards = load_pickle(os.path.join(nsc, 'histories_nsc-scene.pkl'))['loss_history']
    with capsys.disabled():
        print(f'\n[stage 1/2 on the scene data] train loss {losses[0]:.3f} -> {losses[-1]:.3f}; val CIDEr-D: '
              f'untrained {untrained:.3f}, stage 1 (XE, {STAGE1_ITERS} it) {stage1_cider:.3f}, '
              f'stage 2 (+60 self-critical it) {stage2_cider:.3f} (+60 XE it instead: {xe_more_cider:.3f})'
              f'\n  stage 1: {stage1_captions[:2]}\n'
              f'  stage 2: {stage2_captions[:2]}')
    assert losses[-1] < 0.5 * losses[0]
    assert untrained < 0.5 and stage1_cider > untrained + 2.0
    assert stage2_cider > stage1_cider + 0.15 and stage2_cider > xe_more_cider + 0.3
    # stage 2's loss history continues stage 1's, with the mean sample reward (CIDEr-D) where SC ran
    assert 'reward' in out and min(rewards) == 25 and max(rewards) == STAGE1_ITERS + 60
    assert min(rewards[k] for k in rewards if k > STAGE1_ITERS) > 2.0  # from the first iteration of epoch 15 on
    final = load_pickle(os.path.join(nsc, 'histories_nsc-scene.pkl'))['val_result_history'][STAGE1_ITERS + 60]
    if language_eval == '1':  # train.py's own validation (pycocoevalcap) agrees with our CIDEr-D
        assert final['lang_stats']['CIDEr'] == pytest.approx(stage2_cider, rel=1e-3)
        # --spice auto: validation leaves SPICE out, and says so once per run (not at every validation)
        assert out.count('SPICE') == 1 and 'SPICE: not computed at validation (--spice auto;' in out
        assert 'SPICE' not in final['lang_stats']
        infos = load_pickle(os.path.join(nsc, 'infos_nsc-scene.pkl'))
        assert infos['best_val_score'] == final['lang_stats']['CIDEr']
        with open(tmp_path / 'eval_results' / 'nsc-scene_val.json') as f:  # as the reference: the last validation
            written = json.load(f)
        assert written['overall'] == final['lang_stats'] and len(written['imgToEval']) == len(final['predictions'])
    assert os.path.isfile(os.path.join(nsc, 'infos_nsc-scene-best.pkl'))
    tags = scalar_tags(nsc)
    assert {'train_loss', 'learning_rate', 'avg_reward', 'validation loss'} <= tags
    assert language_eval == '0' or {'CIDEr', 'Bleu_4', 'METEOR'} <= tags


def scalar_tags(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = set()
    for path in glob.glob(os.path.join(folder, 'events.out.tfevents.*')):
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        tags |= set(accumulator.Tags()['scalars'])
    return tags


def test_noam_lr_logs_histories_infos(stage1):
    folder, run_id, out = stage1
    histories = load_pickle(os.path.join(folder, f'histories_{run_id}.pkl'))
    assert set(histories) == {'val_result_history', 'loss_history', 'lr_history', 'ss_prob_history'}
    assert sorted(histories['lr_history']) == list(range(25, STAGE1_ITERS + 1, 25))
    for step, lr in histories['lr_history'].items():  # lr = D^-0.5 min(t^-0.5, t warmup^-1.5), D = 32, warmup 50
        assert lr == pytest.approx(32 ** -0.5 * min(step ** -0.5, step * 50 ** -1.5), rel=1e-9)
        assert lr == pytest.approx(noam_rate(step, 32, 1.0, 50))
        assert f'iter {step} (epoch ' in out and f'lr {lr:.3g} ' in out  # the progress line shows it
    assert sorted(histories['val_result_history']) == [100, 200, 300]
    assert {'loss', 'lang_stats', 'predictions'} <= set(histories['val_result_history'][100])
    infos = load_pickle(os.path.join(folder, f'infos_{run_id}.pkl'))
    assert {'iter', 'epoch', 'iterators', 'split_ix', 'vocab', 'opt', 'best_val_score'} <= set(infos)
    assert isinstance(infos['opt'], argparse.Namespace) and infos['opt'].noamopt and infos['opt'].vocab_size > 0
    assert infos['iter'] == STAGE1_ITERS and infos['epoch'] == STAGE1_ITERS * 10 // 200
    assert infos['best_val_score'] == max(-v['loss'] for v in histories['val_result_history'].values())
    with open(os.path.join(folder, f'infos_{run_id}.pkl'), 'rb') as f:
        assert f.read(2) == b'\x80\x02'  # pickle protocol 2, as the reference
    for name in ('model.pth', 'model-best.pth', 'optimizer.pth', f'infos_{run_id}-best.pkl'):
        assert os.path.isfile(os.path.join(folder, name)), name
    assert load_torch(os.path.join(folder, 'optimizer.pth'))['_step'] == STAGE1_ITERS  # Noam's step, as reference
    assert glob.glob(os.path.join(folder, 'events.out.tfevents.*'))
    assert {'train_loss', 'learning_rate', 'validation loss'} <= scalar_tags(folder)


def test_train_checkpoint_loads_in_eval(scene, stage1, tmp_path):
    folder, run_id, _ = stage1
    with working_dir(tmp_path):
        rc, out, err = run_main([
            '--model', os.path.join(folder, 'model-best.pth'),
            '--infos_path', os.path.join(folder, f'infos_{run_id}-best.pkl'),
            '--language_eval', '0', '--split', 'test', '--batch_size', '4', '--id', 'from-train'], main=eval_script.main)
        assert rc == 0, err
        with open('vis/from-train.json') as f:
            captions = json.load(f)
    assert [c['image_id'] for c in captions] == sorted(scene.refs)[-10:]  # the 10 test images
    assert all(c['caption'] for c in captions) and 'ms per image' in out


# ----------------------------------------------------------------------------------------------- resuming
def read_infos_when(path, condition, proc, timeout=120):
    """Poll an infos pickle (written atomically) until condition(infos); the process must still run."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isfile(path):
            infos = load_pickle(path)
            if condition(infos):
                return infos
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f'{path} did not reach the condition in {timeout} s')


def test_kill_9_then_start_from_continues_exactly(scene, tmp_path):
    killed = str(tmp_path / 'killed')
    args = scene.args(killed, 'run', '--max_iters', '5000', '--save_checkpoint_every', '20')
    proc = subprocess.Popen([sys.executable, str(REPO / 'train.py'), *args], cwd=tmp_path, env=SUBPROCESS_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        read_infos_when(os.path.join(killed, 'infos_run.pkl'), lambda infos: infos['iter'] >= 60, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    infos = load_pickle(os.path.join(killed, 'infos_run.pkl'))
    n, position = infos['iter'], infos['iterators']['train']
    assert n % 20 == 0 and position == n * 10 % 200

    with working_dir(tmp_path):
        rc, out, err = run_main(scene.args(killed, 'run', '--max_iters', str(n + 15),
                                                       '--save_checkpoint_every', '20', '--start_from', killed))
        assert rc == 0, err
        assert (f"resuming {killed} at iteration {n} (epoch {infos['epoch']}), train position {position}, "
                f"best score val loss {-infos['best_val_score']:.4f}") in out  # rounded for people
        done = [line for line in out.splitlines() if line.startswith('done: ')]  # one summary line, at the end
        assert len(done) == 1 and out.rstrip().endswith(done[0]), out[-500:]
        assert re.match(rf'done: {n + 15} iterations \(epoch \d+\); best val loss \d+\.\d{{4}} at iteration \d+; '
                        rf'best model {re.escape(killed)}/model-best.pth', done[0]), done[0]
        uninterrupted = str(tmp_path / 'uninterrupted')
        rc, _, err = run_main(scene.args(uninterrupted, 'run', '--max_iters', str(n + 15),
                                                     '--save_checkpoint_every', '20'))
        assert rc == 0, err
    resumed, reference = (load_pickle(os.path.join(f, 'infos_run.pkl')) for f in (killed, uninterrupted))
    assert resumed['iter'] == reference['iter'] == n + 15
    assert resumed['epoch'] == reference['epoch']
    assert resumed['iterators'] == reference['iterators']  # the same loader position ...
    assert resumed['split_ix'] == reference['split_ix']  # ... in the same shuffled order
    histories = load_pickle(os.path.join(killed, 'histories_run.pkl'))
    assert min(histories['val_result_history']) == 20 and max(histories['val_result_history']) == n + 15


KILL_DURING_SECOND_SAVE = '''
import os, signal, sys
sys.path.insert(0, {repo!r})
from misc.files import atomic
import train

mode = os.environ['KILL_MODE']
original_write, original_replace, state = atomic.write_temp_files, os.replace, dict(saves=0, committed=0, renames=0)


def write_temps(items, note=''):
    """'writing': in the second checkpoint, two files fully written to their temp files, the third half, kill -9."""
    if len(items) > 1:  # the files of a checkpoint (the manifest is written alone)
        state['saves'] += 1
        if mode == 'writing' and state['saves'] == 2:
            path, write = items[2]

            def half_then_die(f):
                f.write(b'half a file')
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            items = items[:2] + [(path, half_then_die)] + items[3:]
    return original_write(items, note)


def replace(src, dst, *args, **kwargs):
    """'renaming': in the second checkpoint, after its manifest (the commit) and one file's rename, kill -9."""
    if mode == 'renaming' and state['saves'] == 2:
        if dst.endswith('checkpoint_run.json'):
            state['committed'] = 1
        elif state['committed']:
            state['renames'] += 1
            if state['renames'] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
    return original_replace(src, dst, *args, **kwargs)


atomic.write_temp_files, os.replace = write_temps, replace
sys.exit(train.main(sys.argv[1:]))
'''


@pytest.mark.parametrize('mode', ['writing', 'renaming'])
def test_kill_during_save_keeps_one_consistent_checkpoint(scene, tmp_path, mode):
    """kill -9 while the second save writes its files: the first checkpoint is kept; after its commit (between two
    renames, where model.pth is already the new one and infos the old): --start_from completes the second."""
    from misc.run.checkpoint import check_infos_match, verify_checkpoint
    folder = str(tmp_path / 'ck')
    script = tmp_path / 'die_in_save.py'
    script.write_text(KILL_DURING_SECOND_SAVE.format(repo=str(REPO)))
    proc = subprocess.run([sys.executable, str(script), *scene.args(folder, 'run', '--max_iters', '30',
                                                                     '--save_checkpoint_every', '10')],
                          cwd=tmp_path, env=dict(SUBPROCESS_ENV, KILL_MODE=mode), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert glob.glob(os.path.join(folder, '.*.tmp'))  # the killed save's temp files
    infos = load_pickle(os.path.join(folder, 'infos_run.pkl'))
    assert infos['iter'] == 10  # not renamed yet in either case
    if mode == 'writing':  # every file is the first checkpoint's
        assert load_pickle(os.path.join(folder, 'infos_run-best.pkl'))['iter'] == 10
        assert max(load_pickle(os.path.join(folder, 'histories_run.pkl'))['val_result_history']) == 10
        model, best = (load_torch(os.path.join(folder, name)) for name in ('model.pth', 'model-best.pth'))
        assert all(torch.equal(model[k], best[k]) for k in model)
        check_infos_match(infos, os.path.join(folder, 'model.pth'),
                          optimizer_state=load_torch(os.path.join(folder, 'optimizer.pth')))
        assert verify_checkpoint(folder, 'run') == []
        resumed_at = 10
    else:  # model.pth is the second save's: as they lie, the files do not belong together
        assert verify_checkpoint(folder, 'run')
        with pytest.raises(Exception, match='is not the model'):
            check_infos_match(infos, os.path.join(folder, 'model.pth'))
        resumed_at = 20

    with working_dir(tmp_path):
        rc, out, err = run_main(scene.args(folder, 'run', '--max_iters', '25',
                                                       '--save_checkpoint_every', '10', '--start_from', folder))
    assert rc == 0, err
    assert f'at iteration {resumed_at} (epoch ' in out
    assert ('completed the save of iteration 20' in out) == (mode == 'renaming')
    assert load_pickle(os.path.join(folder, 'infos_run.pkl'))['iter'] == 25
    assert not glob.glob(os.path.join(folder, '.*.tmp'))  # the next save cleans up
    assert verify_checkpoint(folder, 'run') == []


def test_interrupt_saves_the_last_complete_iteration(scene, tmp_path, monkeypatch):
    """A KeyboardInterrupt (or an error) in the middle of an iteration saves the state after the previous one; main
    says so on one line and exits 130. (A real Ctrl-C waits for the iteration: tests/test_resume.py.)"""
    folder = str(tmp_path / 'ck')
    real_step, calls = train.train_step, []

    def interrupted_step(*args):
        calls.append(1)
        if len(calls) == 13:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(train, 'train_step', interrupted_step)
    with working_dir(tmp_path):
        rc, _, err = run_main(scene.args(folder, 'run', '--max_iters', '100',
                                                     '--save_checkpoint_every', '50'))
    assert rc == 130 and 'Traceback' not in err
    assert err.strip().splitlines() == [f'interrupted by SIGINT: the state after iteration 12 is saved in {folder}; '
                                        f'resume with --start_from {folder}']
    infos = load_pickle(os.path.join(folder, 'infos_run.pkl'))
    assert infos['iter'] == 12 and infos['iterators']['train'] == 120  # not one batch ahead


# ----------------------------------------------------------------------------------------------- reference checkpoint
@needs_shared('conformance', 'sat-2', 'model.pth')
def test_reference_checkpoint_resumes_xe_and_self_critical(tmp_path):
    """The reference's sat-2 checkpoint (no optimizer.pth, no histories) continues in train.py: XE, then SC."""
    data = tmp_path / 'data'
    shutil.copytree(CONFORMANCE / 'data', data)
    for path in data.rglob('*'):
        path.chmod(0o755 if path.is_dir() else 0o644)
    with open(data / 'cocotalk.json') as f:
        cocotalk = json.load(f)
    for k, img in enumerate(cocotalk['images']):  # the fixture's 24 test images: 16 train, 4 val, 4 test
        img['split'] = 'train' if k < 16 else 'val' if k < 20 else 'test'
    with open(data / 'cocotalk.json', 'w') as f:
        json.dump(cocotalk, f)
    with h5py.File(data / 'cocotalk_label.h5', 'r') as f:  # CIDEr-D document frequencies of the train references
        labels, start, end = f['labels'][()], f['label_start_ix'][()], f['label_end_ix'][()]
    refs = []
    for k in range(16):
        rows = labels[start[k] - 1:end[k]]
        refs.append([[str(w) for w in row if w > 0] + ['0'] for row in rows])
    with open(tmp_path / 'coco-train-idxs.p', 'wb') as f:
        pickle.dump({'document_frequency': prepro_ngrams.document_frequency(refs), 'ref_len': len(refs)}, f,
                    protocol=2)
    run = tmp_path / 'sat-2'
    shutil.copytree(CONFORMANCE / 'sat-2', run)
    for path in run.iterdir():
        path.chmod(0o644)
    reference = load_pickle(str(run / 'infos_sat-2.pkl'))
    common = ['--input_json', str(data / 'cocotalk.json'), '--input_label_h5', str(data / 'cocotalk_label.h5'),
              '--input_fc_dir', str(data / 'fc'), '--input_att_dir', str(data / 'att'),
              '--cached_tokens', str(tmp_path / 'coco-train-idxs'), '--caption_model', 'sat', '--K', '2',
              '--num_layers', '2', '--input_encoding_size', '64', '--rnn_size', '128', '--att_feat_size', '48',
              '--fc_feat_size', '48', '--batch_size', '4', '--seq_per_img', '3', '--language_eval', '0',
              '--num_workers', '0', '--device', 'cpu', '--max_epochs', '-1', '--losses_log_every', '1',
              '--save_checkpoint_every', '1000', '--start_from', str(run), '--checkpoint_path', str(run),
              '--id', 'sat-2']
    start = reference['iter']
    with working_dir(tmp_path):
        rc, out, err = run_main(common + ['--max_iters', str(start + 3)])
        assert rc == 0, err
        assert f'resuming {run} at iteration {start}' in out and f'iter {start + 3} ' in out
        rc, out, err = run_main(common + ['--max_iters', str(start + 6), '--self_critical_after', '0'])
        assert rc == 0, err
    assert 'reward' in out and f'iter {start + 6} ' in out
    infos = load_pickle(str(run / 'infos_sat-2.pkl'))
    assert infos['iter'] == start + 6 and infos['opt'].K == 2
    assert set(load_pickle(str(run / 'histories_sat-2.pkl'))['loss_history']) == set(range(start + 1, start + 7))


# ----------------------------------------------------------------------------------------------- bad input
def test_missing_cached_tokens_says_which_command_builds_them(scene, tmp_path):
    result = run_main(scene.args(tmp_path / 'ck', 'run', '--self_critical_after', '0',
                                             '--cached_tokens', str(tmp_path / 'nowhere' / 'coco-train-idxs')))
    assert_one_line_error(result, 'nowhere/coco-train-idxs', 'python scripts/prepro_ngrams.py')
    assert not os.path.exists(tmp_path / 'ck' / 'model.pth')  # it failed before training, not epochs later


def test_label_h5_of_other_images_is_refused(scene, tmp_path):
    with open(scene.path('dataset_coco.json')) as f:
        dataset = json.load(f)
    dataset['images'] = dataset['images'][:-1]
    with open(tmp_path / 'fewer.json', 'w') as f:
        json.dump(dataset, f)
    prepro_labels.run(prepro_labels.parse_args(['--input_json', str(tmp_path / 'fewer.json'), '--output_json',
                                                str(tmp_path / 'fewer_talk.json'), '--output_h5',
                                                str(tmp_path / 'fewer'), '--word_count_threshold', '0']))
    result = run_main(scene.args(tmp_path / 'ck', 'run',
                                             label_h5=str(tmp_path / 'fewer_label.h5')))
    assert_one_line_error(result, 'fewer_label.h5', 'has 249 images', 'has 250')


def test_seq_kd_h5_of_another_vocabulary_is_refused(scene, tmp_path):
    with open(scene.path('cocotalk.json')) as f:
        other = json.load(f)
    words = other['ix_to_word']
    words['1'], words['2'] = words['2'], words['1']  # the same words, numbered differently
    with open(tmp_path / 'other_vocab.json', 'w') as f:
        json.dump(other, f)
    teacher = [{'image_id': 2000, 'caption': ['a red dog on the grass'] * 5}]
    with open(tmp_path / 'teacher.json', 'w') as f:
        json.dump(teacher, f)
    prepro_labels_seqKD.run(prepro_labels_seqKD.parse_args([
        '--input_json', scene.path('dataset_coco.json'), '--dict_json', str(tmp_path / 'other_vocab.json'),
        '--teacher_json', str(tmp_path / 'teacher.json'), '--output_h5', str(tmp_path / 'kd')]))
    result = run_main(scene.args(tmp_path / 'ck', 'run', label_h5=str(tmp_path / 'kd_label.h5')))
    assert_one_line_error(result, 'kd_label.h5', 'another vocabulary')


def test_start_from_with_another_k_is_refused(scene, tmp_path):
    folder = str(tmp_path / 'sat')
    sat = ['--caption_model', 'sat', '--init_from', 'none', '--save_checkpoint_every', '1000']
    with working_dir(tmp_path):
        rc, _, err = run_main(scene.args(folder, 'run', *sat, '--K', '2', '--max_iters', '2'))
        assert rc == 0, err
        result = run_main(scene.args(folder, 'run', *sat, '--K', '4', '--max_iters', '4',
                                                 '--start_from', folder))
    assert_one_line_error(result, '--K 4', 'K=2', folder)


def test_sat_without_its_autoregressive_checkpoint_names_init_from_none(scene, tmp_path):
    missing = str(tmp_path / 'save' / 'nsc-transformer-baseline' / 'model-best.pth')
    result = run_main(scene.args(tmp_path / 'ck', 'run', '--caption_model', 'sat', '--K', '2',
                                             '--init_from', missing))
    assert_one_line_error(result, f'--init_from {missing}: not found', '--init_from none')


def test_feature_size_mismatch_is_one_line(scene, tmp_path):
    args = scene.args(tmp_path / 'ck', 'run')
    args[args.index('--att_feat_size') + 1] = '2048'
    assert_one_line_error(run_main(args), '--att_feat_size says 2048', 'or --att_feat_size 32')


# ----------------------------------------------------------------------------------------------- optimiser state
def test_noam_resumed_without_optimizer_state_continues_its_schedule(scene, stage1, tmp_path):
    """As the reference: Noam's step is the resumed iteration even when optimizer.pth is missing."""
    folder, run_id, _ = stage1
    copy = str(tmp_path / 'copy')
    shutil.copytree(folder, copy)
    os.remove(os.path.join(copy, 'optimizer.pth'))
    with working_dir(tmp_path):
        rc, _, err = run_main(scene.args(copy, run_id, '--noamopt', '--noamopt_warmup', '50',
                                                     '--max_iters', str(STAGE1_ITERS + 25), '--start_from', copy))
    assert rc == 0, err
    lr = load_pickle(os.path.join(copy, f'histories_{run_id}.pkl'))['lr_history'][STAGE1_ITERS + 25]
    assert lr == pytest.approx(noam_rate(STAGE1_ITERS + 25, 32, 1.0, 50))


def test_plateau_optimizer_keeps_the_options_lr_over_a_plain_state():
    from misc.train.optim import PlateauOpt, get_lr
    params = [torch.nn.Parameter(torch.ones(2))]
    saved = torch.optim.Adam(params, lr=0.5).state_dict()
    plateau = PlateauOpt(torch.optim.Adam(params, lr=1e-3))
    plateau.load_state_dict(saved)
    assert get_lr(plateau) == 1e-3


def test_cider_reward_weight_scales_the_reward(scene):
    import opts
    from misc.train.loss_wrapper import LossConfig, LossWrapper
    opt = opts.parse_opt(scene.args('unused', 'run'))
    with DataLoader(DataConfig.from_opt(opt)) as loader:
        opt.vocab_size = loader.vocab_size
        batch = loader.get_batch('train')
    torch.manual_seed(0)
    model = setup_model(opt)
    rewards = []
    for weight in (1.0, 2.5):
        opt.cider_reward_weight = weight
        torch.manual_seed(1)
        rewards.append(LossWrapper(model, LossConfig.from_opt(opt))(batch, sc_flag=True)['reward'])
    assert rewards[0] > 0 and rewards[1] == pytest.approx(2.5 * rewards[0])


def test_transformer_infos_with_any_k_resume_as_k1(scene, stage1, tmp_path):
    """A reference transformer's infos may carry the default --K: it is still the K=1 model."""
    from misc.files.atomic import save_pickle
    folder, run_id, _ = stage1
    copy = str(tmp_path / 'copy')
    shutil.copytree(folder, copy)
    infos = load_pickle(os.path.join(copy, f'infos_{run_id}.pkl'))
    infos['opt'].K = 6
    save_pickle(infos, os.path.join(copy, f'infos_{run_id}.pkl'))
    with working_dir(tmp_path):
        rc, _, err = run_main(scene.args(copy, run_id, '--max_iters', str(STAGE1_ITERS + 2),
                                                     '--start_from', copy))
    assert rc == 0, err


def test_data_without_val_images_is_refused_before_training(scene, tmp_path):
    with open(scene.path('cocotalk.json')) as f:
        cocotalk = json.load(f)
    for img in cocotalk['images']:
        img['split'] = 'train' if img['split'] == 'val' else img['split']
    with open(tmp_path / 'no_val.json', 'w') as f:
        json.dump(cocotalk, f)
    args = scene.args(tmp_path / 'ck', 'run')
    args[args.index('--input_json') + 1] = str(tmp_path / 'no_val.json')
    assert_one_line_error(run_main(args), 'no_val.json has no val images')


# ---- what a person sees (issue 29): it/s of training alone, one summary line, rounded numbers ----

def test_progress_rate_counts_training_time_only(monkeypatch, capsys):
    now = [100.0]
    monkeypatch.setattr(train.time, 'time', lambda: now[0])
    line = train.ProgressLine(0, 100, validate_every=25)
    now[0] = 102.0
    line(20, 0, {'loss': 2.0}, 5e-4)  # 20 iterations in 2 s
    assert ' 10.00 it/s ETA 0:08' in capsys.readouterr().out
    line.exclude(6.0)  # a validation and save of 6 s
    now[0] = 110.0
    line(40, 0, {'loss': 2.0}, 5e-4)  # 40 iterations in 10 s, 6 of them validating: 4 s of training
    out = capsys.readouterr().out
    # 10 it/s as before the validation; ETA: 60 iterations (6 s) and 3 validations still due (18 s)
    assert ' 10.00 it/s ETA 0:24' in out, out


def test_summary_line_rounds_the_best_score_and_names_the_model():
    import argparse
    opt = argparse.Namespace(checkpoint_path='save/demo', id='demo', language_eval=1)
    point = train.ResumePoint(3000, 30, None, None)
    state = train.TrainState(point, point, 0.17409540565054418, 2500)
    assert train.summary_line(opt, state) == ('done: 3000 iterations (epoch 30); best CIDEr 0.1741 at iteration '
                                              '2500; best model save/demo/model-best.pth (infos '
                                              'save/demo/infos_demo-best.pkl)')
    opt.language_eval = 0
    state.best_val_score = -2.345678
    assert 'best val loss 2.3457 at iteration 2500' in train.summary_line(opt, state)


def test_best_iteration_of_a_resumed_run_comes_from_its_history():
    histories = train.histories_of(None)
    histories['val_result_history'] = {20: {'loss': 2.5, 'lang_stats': {'CIDEr': 0.1}},
                                       40: {'loss': 2.0, 'lang_stats': {'CIDEr': 0.3}},
                                       60: {'loss': 2.2, 'lang_stats': None}}
    assert train.best_of(histories, 0.3) == 40 and train.best_of(histories, -2.2) == 60
    assert train.best_of(histories, None) is None and train.best_of(histories, 0.7) is None
