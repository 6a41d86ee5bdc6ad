"""A run never loses days (issue 13): non-finite losses/gradients are skipped and never saved, --start_from resumes
bit for bit on the CPU, a kill at any instant of a save leaves one consistent checkpoint, files of different saves
are refused, Ctrl-C / SIGTERM end between iterations with one line and a resumable save, and bad paths, a full
disk and nonsense options give one line and exit 2.

Data: the session's tiny dataset (tests/conftest.py): 10 training images, batches of 2 (5 iterations per epoch),
a 1-layer transformer with dropout on, CPU, one torch thread.
"""
import errno
import glob
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

import train
from misc.run import checkpoint
from misc.files import atomic
from misc.run.checkpoint import check_infos_match, recover_checkpoint, verify_checkpoint
from misc.files.safe_load import load_pickle, load_torch
from tests.helpers import assert_one_line_error, run_main, targs

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
NEW_FIELDS = ('model_fingerprint', 'optimizer_step', 'K', 'caption_model', 'vocab_sha1', 'rng_states')


def assert_consistent(folder, run_id='run'):
    """The files of folder belong together: infos <-> model.pth (fingerprint), optimizer.pth (step), histories,
    the -best pair; no file differs from the manifest. Returns the infos."""
    folder = str(folder)
    infos = load_pickle(os.path.join(folder, f'infos_{run_id}.pkl'))
    assert set(NEW_FIELDS) <= set(infos)
    check_infos_match(infos, os.path.join(folder, 'model.pth'),
                      optimizer_state=load_torch(os.path.join(folder, 'optimizer.pth')))
    histories = load_pickle(os.path.join(folder, f'histories_{run_id}.pkl'))
    assert max(histories['val_result_history'], default=infos['iter']) <= infos['iter']
    if os.path.isfile(os.path.join(folder, 'model-best.pth')):
        check_infos_match(load_pickle(os.path.join(folder, f'infos_{run_id}-best.pkl')),
                          os.path.join(folder, 'model-best.pth'))
    assert verify_checkpoint(folder, run_id) == []
    state = load_torch(os.path.join(folder, 'model.pth'))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    return infos


# ----------------------------------------------------------------------------------------------- exact resume
def test_stop_then_resume_equals_an_uninterrupted_run_bit_for_bit(tiny_dataset, tmp_path):
    """Dropout on, XE for epochs 0-1 then self-critical sampling: stop at 10 + resume to 20 == 20 straight."""
    common = ['--save_checkpoint_every', '5', '--self_critical_after', '2']
    stopped, straight = tmp_path / 'stopped', tmp_path / 'straight'
    rc, _, err = run_main(targs(tiny_dataset, stopped, '--max_iters', '10', *common), tmp_path)
    assert rc == 0, err
    rc, out, err = run_main(targs(tiny_dataset, stopped, '--max_iters', '20', '--start_from', stopped, *common),
                            tmp_path)
    assert rc == 0, err
    assert f'resuming {stopped} at iteration 10 (epoch 2)' in out and 'random-number state' not in out
    rc, _, err = run_main(targs(tiny_dataset, straight, '--max_iters', '20', *common), tmp_path)
    assert rc == 0, err

    for name in ('model.pth', 'optimizer.pth'):
        a, b = (load_torch(str(folder / name)) for folder in (stopped, straight))
        if name == 'optimizer.pth':
            a = {f"{k}.{n}": v for k, s in a['state'].items() for n, v in s.items()}
            b = {f"{k}.{n}": v for k, s in b['state'].items() for n, v in s.items()}
        assert a.keys() == b.keys() and a
        differing = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differing, f'{name}: {differing[:5]}'
    infos = [load_pickle(str(folder / 'infos_run.pkl')) for folder in (stopped, straight)]
    for key in ('iter', 'epoch', 'iterators', 'split_ix', 'model_fingerprint', 'optimizer_step'):
        assert infos[0][key] == infos[1][key], key
    histories = [load_pickle(str(folder / 'histories_run.pkl')) for folder in (stopped, straight)]
    for it in (15, 20):
        assert histories[0]['val_result_history'][it]['loss'] == histories[1]['val_result_history'][it]['loss']
    assert histories[0]['loss_history'] == histories[1]['loss_history']  # rewards from iteration 11 on


def test_rng_states_are_saved_per_rank_and_restored(tiny_dataset, tmp_path):
    folder = tmp_path / 'ck'
    rc, _, err = run_main(targs(tiny_dataset, folder, '--max_iters', '3'), tmp_path)
    assert rc == 0, err
    (state,) = load_pickle(str(folder / 'infos_run.pkl'))['rng_states']
    assert {'torch', 'numpy', 'random'} <= set(state)
    torch.manual_seed(0)
    before = torch.rand(3)
    checkpoint.set_rng_state(state, torch.device('cpu'))
    first = (torch.rand(3), __import__('numpy').random.rand(), __import__('random').random())
    checkpoint.set_rng_state(state, torch.device('cpu'))
    again = (torch.rand(3), __import__('numpy').random.rand(), __import__('random').random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:] and not torch.equal(before, first[0])


# ----------------------------------------------------------------------------------------------- non-finite guard
def poison(monkeypatch, batches):
    """A NaN in one region feature of the training batches numbered in `batches` (1-based); returns the image ids
    of each poisoned batch."""
    real, calls, poisoned = train.to_device, [], []

    def poisoning(batch, device):
        calls.append(1)
        if len(calls) in batches:
            batch = dict(batch, att_feats=batch['att_feats'].clone())
            batch['att_feats'][0, 0, 0] = float('nan')
            poisoned.append([info['id'] for info in batch['infos']])
        return real(batch, device)
    monkeypatch.setattr(train, 'to_device', poisoning)
    return poisoned


def test_a_nonfinite_batch_is_skipped_with_a_warning_naming_its_images(tiny_dataset, tmp_path, monkeypatch):
    poisoned = poison(monkeypatch, {3, 7})
    folder = tmp_path / 'ck'
    rc, _, err = run_main(targs(tiny_dataset, folder, '--max_iters', '10', '--save_checkpoint_every', '5'), tmp_path)
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if 'non-finite' in line]
    assert len(warnings) == 2 and 'iteration 3:' in warnings[0] and 'iteration 7:' in warnings[1]
    for line, ids in zip(warnings, poisoned):
        assert 'update skipped' in line and all(str(i) in line for i in ids)
    infos = assert_consistent(folder)
    assert infos['iter'] == 10 and infos['optimizer_step'] == 8  # two updates skipped
    assert load_torch(str(folder / 'optimizer.pth'))['state'][0]['step'] == 8
    loss_history = load_pickle(str(folder / 'histories_run.pkl'))['loss_history']
    assert 3 not in loss_history and 7 not in loss_history and len(loss_history) == 8

    # and it resumes: the skipped steps are part of the record
    rc, out, err = run_main(targs(tiny_dataset, folder, '--max_iters', '12', '--start_from', folder), tmp_path)
    assert rc == 0, err
    assert load_pickle(str(folder / 'infos_run.pkl'))['optimizer_step'] == 10


def test_persistent_nonfinite_stops_with_one_line_and_saves_the_last_good_state(tiny_dataset, tmp_path,
                                                                                monkeypatch):
    poison(monkeypatch, set(range(4, 100)))
    folder = tmp_path / 'ck'
    result = run_main(targs(tiny_dataset, folder, '--max_iters', '50', '--save_checkpoint_every', '1000'), tmp_path)
    assert_one_line_error(result, f'{train.NONFINITE_STOP} consecutive iterations (4-8)', 'non-finite')
    assert result[2].count('update skipped') == train.NONFINITE_STOP
    infos = assert_consistent(folder)
    assert infos['iter'] == 3 and infos['optimizer_step'] == 3 and infos['iterators']['train'] == 6


def test_nonfinite_weights_are_never_saved(tiny_dataset, tmp_path, monkeypatch):
    """Weights broken behind the guard's back (here: after the 7th update) are refused at the next save, which
    leaves the previous checkpoint as it was."""
    real, calls = train.train_step, []

    def breaking(loss_module, *args):
        calls.append(1)
        stats = real(loss_module, *args)
        if len(calls) == 7:
            with torch.no_grad():
                next(loss_module.parameters()).fill_(float('nan'))
        return stats
    monkeypatch.setattr(train, 'train_step', breaking)
    folder = tmp_path / 'ck'
    result = run_main(targs(tiny_dataset, folder, '--max_iters', '10', '--save_checkpoint_every', '5'), tmp_path)
    assert_one_line_error(result, 'refusing to save iteration 10', 'not finite', 'iteration 5')
    assert assert_consistent(folder)['iter'] == 5
    assert not glob.glob(str(folder / '.*.tmp'))


# ----------------------------------------------------------------------------------------------- kill at any instant
def test_a_kill_at_any_point_of_a_save_leaves_one_consistent_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    """The folder as a kill -9 would leave it before each file operation of the second save (temp file created,
    fsync, rename, removal) and after it: each copy recovers to the first save or to the second, complete, and
    --start_from resumes from it."""
    folder, images = tmp_path / 'ck', []
    state = {'save': 0, 'busy': False}

    def snap(label):
        if state['save'] != 2 or state['busy']:
            return
        state['busy'] = True
        try:
            target = tmp_path / 'images' / f'{len(images):02d}'
            shutil.copytree(folder, target)
            images.append((label, target))
        finally:
            state['busy'] = False

    def hooked(label, function):
        def call(*args, **kwargs):
            snap(label)
            return function(*args, **kwargs)
        return call

    for module, name in ((os, 'replace'), (os, 'remove'), (os, 'fsync'), (tempfile, 'mkstemp')):
        monkeypatch.setattr(module, name, hooked(name, getattr(module, name)))
    real_save = checkpoint.save_checkpoint

    def counting_save(*args, **kwargs):
        state['save'] += 1
        result = real_save(*args, **kwargs)
        snap('done')
        return result
    monkeypatch.setattr(checkpoint, 'save_checkpoint', counting_save)
    rc, _, err = run_main(targs(tiny_dataset, folder, '--max_iters', '10', '--save_checkpoint_every', '5',
                                '--save_history_ckpt', '1'), tmp_path)
    assert rc == 0, err
    monkeypatch.undo()
    labels = [label for label, _ in images]
    # 6 or 8 files (with the -best pair) and the manifest: each created, fsync'ed, renamed; the folder fsync'ed twice
    files = labels.count('mkstemp') - 1
    assert files in (6, 8) and labels.count('replace') == files + 1 and labels.count('fsync') == files + 3, labels
    assert labels[-1] == 'done'

    iters = []
    for label, image in images:
        recover_checkpoint(str(image), 'run')
        infos = assert_consistent(image)
        iters.append(infos['iter'])
    commit = labels.index('replace') + 1  # the first rename is the manifest's: from the next image on, iteration 10
    assert iters == [5] * commit + [10] * (len(images) - commit), list(zip(labels, iters))
    for (label, image), it in zip(images, iters):
        rc, out, err = run_main(targs(tiny_dataset, image, '--max_iters', '12', '--start_from', image), tmp_path)
        assert rc == 0, (label, err)
        assert f'resuming {image} at iteration {it} ' in out
        assert assert_consistent(image)['iter'] == 12
        assert not glob.glob(str(image / '.*.tmp'))


# ----------------------------------------------------------------------------------------------- mismatched files
def test_files_of_different_saves_are_refused(tiny_dataset, tmp_path):
    folder = tmp_path / 'ck'
    rc, _, err = run_main(targs(tiny_dataset, folder, '--max_iters', '10', '--save_checkpoint_every', '5',
                                '--save_history_ckpt', '1'), tmp_path)
    assert rc == 0, err
    resume = targs(tiny_dataset, folder, '--max_iters', '12', '--start_from', folder)
    shutil.copy(folder / 'infos_run-5.pkl', folder / 'infos_run.pkl')  # the infos of an older save
    assert_one_line_error(run_main(resume, tmp_path), f'{folder}/model.pth is not the model', 'infos_run.pkl',
                          '(iteration 5)')
    shutil.copy(folder / 'model-5.pth', folder / 'model.pth')  # model and infos of 5, optimizer.pth of 10
    assert_one_line_error(run_main(resume, tmp_path), f'{folder}/optimizer.pth has made 10 optimiser steps',
                          'says 5', 'remove')
    os.remove(folder / 'optimizer.pth')  # as the message says: a fresh optimiser state
    rc, out, err = run_main(resume + ['--seed', '7'], tmp_path)
    assert rc == 0, err
    assert f'resuming {folder} at iteration 5 ' in out
    assert "note: --seed 7 is not the checkpoint's 123" in out  # (the loader's draws depend on the seed)


def test_infos_without_the_new_fields_still_resume(tiny_dataset, tmp_path):
    """Infos of the original code (and of this one before issue 13) lack the fingerprints and RNG states."""
    folder = tmp_path / 'ck'
    rc, _, err = run_main(targs(tiny_dataset, folder, '--max_iters', '5'), tmp_path)
    assert rc == 0, err
    infos = load_pickle(str(folder / 'infos_run.pkl'))
    atomic.save_pickle({k: v for k, v in infos.items() if k not in NEW_FIELDS}, str(folder / 'infos_run.pkl'))
    os.remove(folder / 'checkpoint_run.json')
    rc, out, err = run_main(targs(tiny_dataset, folder, '--max_iters', '7', '--start_from', folder), tmp_path)
    assert rc == 0, err
    assert 'at iteration 5 ' in out and 'no random-number state' in out
    assert assert_consistent(folder)['iter'] == 7


# ----------------------------------------------------------------------------------------------- signals
DRIVER = '''
import os, sys, time
sys.path.insert(0, {repo!r})
import train
from misc.run import checkpoint
from misc.files import atomic

mode = os.environ.get('DRIVER_MODE', '')
real_validate, real_save = train.validate, checkpoint.save_checkpoint


def slow_validate(*args, **kwargs):
    print('VALIDATING', flush=True)
    time.sleep(600)
    return real_validate(*args, **kwargs)


def slow_save(*args, **kwargs):
    print('SAVING', flush=True)
    time.sleep(float(os.environ['SAVE_SECONDS']))
    return real_save(*args, **kwargs)


if mode == 'slow_validate':
    train.validate = slow_validate
if mode == 'slow_save':
    checkpoint.save_checkpoint = slow_save
sys.exit(train.main(sys.argv[1:]))
'''


# "At once": well under the 600 s that the slow validation and slow save wait, and not a bound a loaded 2-core
# machine can miss (starting python and torch there alone can take tens of seconds).
PROMPT = 60


class Run:
    """train.py in a subprocess (through DRIVER), its stdout read line by line."""

    def __init__(self, tmp_path, argv, **env):
        script = tmp_path / 'driver.py'
        script.write_text(DRIVER.format(repo=str(REPO)))
        self.proc = subprocess.Popen([sys.executable, str(script), *map(str, argv)], cwd=tmp_path,
                                     env=dict(ENV, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines, self.out = queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, text, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                assert self.proc.poll() is None, ''.join(self.out) + self.proc.stderr.read()
                continue
            self.out.append(line)
            if text in line:
                return
        raise AssertionError(f'{text!r} not printed in {timeout} s: {"".join(self.out)[-2000:]}')

    def signal_and_wait(self, signum, timeout=2 * PROMPT):
        """Send signum; (return code, seconds until exit, stderr)."""
        start = time.time()
        self.proc.send_signal(signum)
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return self.proc.returncode, time.time() - start, self.proc.stderr.read()


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_between_iterations_with_one_line_and_a_resumable_save(tiny_dataset, tmp_path, signum):
    folder = tmp_path / 'ck'
    run = Run(tmp_path, targs(tiny_dataset, folder, '--max_iters', '100000', '--save_checkpoint_every', '1000'))
    run.wait_for('iter 5 (')
    rc, seconds, err = run.signal_and_wait(signum)
    assert rc == 128 + signum and seconds < PROMPT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in err, err
    name = signal.Signals(signum).name
    assert lines[0].startswith(f'interrupted by {name}: the state after iteration ') and str(folder) in lines[0]
    infos = assert_consistent(folder)
    assert f'after iteration {infos["iter"]} is saved' in lines[0] and infos['iter'] >= 5
    rc, out, err = run_main(targs(tiny_dataset, folder, '--max_iters', str(infos['iter'] + 2),
                                  '--start_from', folder), tmp_path)
    assert rc == 0 and f'at iteration {infos["iter"]} ' in out, err


def test_ctrl_c_during_validation_ends_at_once_and_saves_the_iteration(tiny_dataset, tmp_path):
    folder = tmp_path / 'ck'
    run = Run(tmp_path, targs(tiny_dataset, folder, '--max_iters', '100', '--save_checkpoint_every', '5'),
              DRIVER_MODE='slow_validate')
    run.wait_for('VALIDATING')  # (a validation of 60 s)
    rc, seconds, err = run.signal_and_wait(signal.SIGINT)
    assert rc == 130 and seconds < PROMPT, err
    assert err.strip().splitlines() == [f'interrupted by SIGINT: the state after iteration 5 is saved in {folder}; '
                                        f'resume with --start_from {folder}']
    assert assert_consistent(folder)['iter'] == 5


def test_ctrl_c_during_a_save_lets_it_finish(tiny_dataset, tmp_path):
    folder = tmp_path / 'ck'
    run = Run(tmp_path, targs(tiny_dataset, folder, '--max_iters', '100', '--save_checkpoint_every', '5'),
              DRIVER_MODE='slow_save', SAVE_SECONDS='2')
    run.wait_for('SAVING')
    rc, seconds, err = run.signal_and_wait(signal.SIGINT)
    assert rc == 130 and seconds < PROMPT, err
    assert err.strip().splitlines() == [f'interrupted by SIGINT: the state after iteration 5 is saved in {folder}; '
                                        f'resume with --start_from {folder}']
    assert assert_consistent(folder)['iter'] == 5


def test_a_second_ctrl_c_aborts_at_once(tiny_dataset, tmp_path):
    folder = tmp_path / 'ck'
    run = Run(tmp_path, targs(tiny_dataset, folder, '--max_iters', '100', '--save_checkpoint_every', '5'),
              DRIVER_MODE='slow_save', SAVE_SECONDS='600')
    run.wait_for('SAVING')  # the first save (iteration 5) hangs: Ctrl-C waits for it, a second Ctrl-C does not
    run.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    rc, seconds, err = run.signal_and_wait(signal.SIGINT)
    assert rc == 130 and seconds < PROMPT, err
    assert err.strip().splitlines() == ['interrupted by SIGINT: stopped at once by a second signal; the save of '
                                        'iteration 5 (a new best model) was abandoned; nothing was saved by this run']
    assert not os.path.exists(folder / 'infos_run.pkl') and not glob.glob(str(folder / '.*.tmp'))


# ----------------------------------------------------------------------------------------------- one-line errors
def test_unwritable_checkpoint_path_is_one_line(tiny_dataset, tmp_path):
    (tmp_path / 'a_file').write_text('')
    folder = tmp_path / 'a_file' / 'ck'
    assert_one_line_error(run_main(targs(tiny_dataset, folder), tmp_path), f'--checkpoint_path {folder}',
                          'not writable')
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / 'locked'
        locked.mkdir(mode=0o500)
        assert_one_line_error(run_main(targs(tiny_dataset, locked / 'ck'), tmp_path), 'Permission denied')


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def filling_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # model, optimizer, model-best of the first save; model.pth of the second, then full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, 'save', filling_disk)
    folder = tmp_path / 'ck'
    result = run_main(targs(tiny_dataset, folder, '--max_iters', '10', '--save_checkpoint_every', '5'), tmp_path)
    assert_one_line_error(result, f'No space left on device writing {folder}/optimizer.pth',
                          'previous checkpoint (iteration 5)')
    monkeypatch.undo()
    assert assert_consistent(folder)['iter'] == 5
    assert not glob.glob(str(folder / '.*.tmp'))


@pytest.mark.parametrize('argv, fragment', [
    (['--max_epochs', '-5'], '--max_epochs -5: must be -1'),
    (['--max_iters', '0'], '--max_iters 0: must be -1'),
    (['--save_checkpoint_every', '0'], '--save_checkpoint_every 0: must be > 0'),
    (['--losses_log_every', '-1'], '--losses_log_every -1: must be > 0'),
    (['--K', '0'], '--K 0: must be >= 1'),
    (['--noamopt', '--reduce_on_plateau'], '--reduce_on_plateau cannot be combined with --noamopt'),
    (['--val_batch_size', '-1'], '--val_batch_size -1: must be >= 0'),
    (['--dist_timeout_minutes', '0'], '--dist_timeout_minutes 0.0: must be > 0'),
])
def test_nonsense_options_exit_2_with_one_line(argv, fragment, tmp_path):
    assert_one_line_error(run_main(argv, tmp_path), fragment)


def test_argparse_errors_exit_2(tmp_path):
    rc, _, err = run_main(['--max_epochs', 'five'], tmp_path)
    assert rc == 2 and 'invalid int value' in err


def test_init_from_a_checkpoint_of_another_vocabulary_is_refused(tiny_dataset, tmp_path):
    """A same-size vocabulary in another order would load silently: the infos beside --init_from is checked."""
    import json
    from tests.helpers import assert_one_line_error, run_main, targs, tiny_checkpoint
    with open(tiny_dataset.input_json) as f:
        vocab = json.load(f)['ix_to_word']
    words = list(vocab.values())
    permuted = dict(zip(vocab, words[1:] + words[:1]))
    args = ['--caption_model', 'sat', '--K', '2', '--max_iters', '1']
    for name, saved_vocab, fits in (('same', vocab, True), ('permuted', permuted, False)):
        model_path, _ = tiny_checkpoint(tiny_dataset, str(tmp_path / name), vocab=saved_vocab)
        result = run_main(targs(tiny_dataset, tmp_path / f'run-{name}', *args, '--init_from', model_path), tmp_path)
        if fits:
            assert result[0] == 0, result[2]
        else:
            assert_one_line_error(result, f'--init_from {model_path}', 'another vocabulary')
