"""A run folder belongs to its run (issue 19): one owner at a time (a lock the OS releases, so no stale lock after
kill -9), no fresh run or other --id into a folder that holds a checkpoint unless --overwrite_run 1, the README's
stage 2 (copy_model.sh) as before, and a full disk or a second Ctrl-C inside torch.save end with one line while the
folder keeps one consistent checkpoint.

Every refusal is checked for its exit code, its one line, and the folder's files byte for byte.
Data: the session's tiny dataset (tests/conftest.py), tiny transformer runs on the CPU (tests/helpers.py).
"""
import errno
import fnmatch
import glob
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from misc.run.runfolder import LOCK_NAME
from tests.helpers import assert_one_line_error, run_main, targs
from tests.test_resume import assert_consistent

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


# Files that change while a run writes its folder and are no part of a checkpoint: the TensorBoard log, the
# owner record of the lock, the temp files of the save in progress.
DURING_A_RUN = ('events.out.tfevents.*', LOCK_NAME, '.*.tmp')


def snapshot(folder, skip=()):
    """{name: bytes} of the files in folder (names matching a pattern of skip left out)."""
    return {name: (Path(folder) / name).read_bytes() for name in sorted(os.listdir(folder))
            if (Path(folder) / name).is_file() and not any(fnmatch.fnmatch(name, p) for p in skip)}


def finished_run(ds, folder, cwd, *extra, run_id='run', iters=4):
    """A completed tiny run in folder (saved at iteration 2 and `iters`)."""
    rc, _, err = run_main(targs(ds, folder, '--max_iters', str(iters), '--save_checkpoint_every', '2', *extra,
                                run_id=run_id), cwd)
    assert rc == 0, err
    return snapshot(Path(cwd) / folder)


def refused(result, before, folder, *fragments):
    """The run was refused in one line before any work (nothing on stdout), the folder's files unchanged."""
    line = assert_one_line_error(result, *fragments)
    assert result[1] == '', result[1]
    assert snapshot(folder) == before
    return line


def start_train(tmp_path, argv):
    """train.py as a separate process (its output in tmp_path/first.log)."""
    log = open(tmp_path / 'first.log', 'w')
    proc = subprocess.Popen([sys.executable, str(REPO / 'train.py'), *map(str, argv)], cwd=tmp_path, env=ENV,
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def wait_until(condition, proc, tmp_path, timeout=90):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, (tmp_path / 'first.log').read_text()
        assert time.time() < deadline, (tmp_path / 'first.log').read_text()
        time.sleep(0.01)


def lock_names(folder, pid):
    try:
        return f'"pid": {pid},' in (Path(folder) / LOCK_NAME).read_text()
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------- one owner
def test_a_second_run_into_a_busy_folder_is_refused_naming_the_first(tiny_dataset, tmp_path):
    folder = tmp_path / 'ck'
    first = start_train(tmp_path, targs(tiny_dataset, folder, '--max_iters', '30', '--save_checkpoint_every', '10'))
    try:
        wait_until(lambda: lock_names(folder, first.pid), first, tmp_path)
        os.kill(first.pid, signal.SIGSTOP)  # the first holds the folder for as long as this test needs
        before = snapshot(folder)
        for extra in ([], ['--start_from', folder]):  # a fresh run, and a resume of the folder, alike
            line = refused(run_main(targs(tiny_dataset, folder, '--max_iters', '4', *extra), tmp_path), before,
                           folder, f'--checkpoint_path {folder} is in use by another run (pid {first.pid} on ',
                           'started ', 'wait for it to end, or choose another --checkpoint_path')
            assert re.search(r'started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d', line), line
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(90) == 0, (tmp_path / 'first.log').read_text()
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
            first.wait()
    assert assert_consistent(folder)['iter'] == 30  # the first run finished undisturbed
    assert (folder / LOCK_NAME).read_text() == ''  # released cleanly: the owner record is cleared


def test_no_stale_lock_after_kill_9(tiny_dataset, tmp_path):
    folder = tmp_path / 'ck'
    first = start_train(tmp_path, targs(tiny_dataset, folder, '--max_iters', '100000', '--save_checkpoint_every',
                                        '3'))
    try:
        wait_until(lambda: (folder / 'infos_run.pkl').exists(), first, tmp_path)
    finally:
        first.kill()  # SIGKILL: no clean-up runs
        first.wait()
    assert first.returncode == -signal.SIGKILL
    assert lock_names(folder, first.pid)  # the lock file still names the dead owner...
    saved = assert_consistent(folder)['iter']
    rc, out, err = run_main(targs(tiny_dataset, folder, '--max_iters', str(saved + 2), '--start_from', folder),
                            tmp_path)
    assert rc == 0, err  # ...but the OS released its lock
    assert f'resuming {folder} at iteration {saved} ' in out
    assert assert_consistent(folder)['iter'] == saved + 2


# ----------------------------------------------------------------------------------------------- one run per folder
def test_a_fresh_run_into_a_finished_runs_folder_is_refused_unless_overwrite_run(tiny_dataset, tmp_path):
    folder = tmp_path / 'ck'
    before = finished_run(tiny_dataset, folder, tmp_path)
    refused(run_main(targs(tiny_dataset, folder, '--max_iters', '4', '--save_checkpoint_every', '2'), tmp_path),
            before, folder, f"--checkpoint_path {folder} holds the checkpoint of a run (run 'run' at iteration 4): "
            f'resume it with --start_from {folder}', '--overwrite_run 1')

    # on purpose: the first save replaces the folder's checkpoint, here another id's, which then is gone
    rc, out, err = run_main(targs(tiny_dataset, folder, '--max_iters', '2', '--save_checkpoint_every', '2',
                                  '--overwrite_run', '1', run_id='again'), tmp_path)
    assert rc == 0, err
    assert f"--overwrite_run 1: the checkpoint in {folder} (run 'run' at iteration 4) is replaced" in out
    assert not glob.glob(str(folder / '*_run*')) and not (folder / 'checkpoint_run.json').exists()
    assert assert_consistent(folder, 'again')['iter'] == 2
    assert (folder / 'model-best.pth').read_bytes() != before['model-best.pth']
    rc, _, err = run_main(targs(tiny_dataset, folder, '--max_iters', '4', '--start_from', folder, run_id='again'),
                          tmp_path)
    assert rc == 0, err  # the folder is the new run's alone


def test_another_id_is_refused_even_with_start_from(tiny_dataset, tmp_path):
    folder = tmp_path / 'ck'
    before = finished_run(tiny_dataset, folder, tmp_path, '--save_history_ckpt', '1', run_id='sat-2-k')
    for extra in ([], ['--start_from', folder]):
        refused(run_main(targs(tiny_dataset, folder, '--max_iters', '4', *extra, run_id='sat-2'), tmp_path), before,
                folder, f"--checkpoint_path {folder} holds another run's checkpoint (infos_sat-2-k.pkl, run "
                "'sat-2-k' at iteration 4): --id sat-2 would overwrite its model.pth and optimizer.pth",
                'choose another --checkpoint_path', '--overwrite_run 1')
    # its own id resumes (infos_sat-2-k-2.pkl, -4.pkl and -best.pkl are its history and best copies)
    rc, _, err = run_main(targs(tiny_dataset, folder, '--max_iters', '6', '--start_from', folder, run_id='sat-2-k'),
                          tmp_path)
    assert rc == 0, err


def test_resuming_into_another_folder_obeys_the_same_rule(tiny_dataset, tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    finished_run(tiny_dataset, a, tmp_path)
    before_b = finished_run(tiny_dataset, b, tmp_path, iters=2)
    refused(run_main(targs(tiny_dataset, b, '--max_iters', '6', '--start_from', a), tmp_path), before_b, b,
            f"--checkpoint_path {b} holds the checkpoint of another run (run 'run' at iteration 2) than "
            f'--start_from {a}', f'continue that run with --start_from {b}', '--overwrite_run 1')
    before_a = snapshot(a)
    rc, out, err = run_main(targs(tiny_dataset, tmp_path / 'c', '--max_iters', '6', '--start_from', a), tmp_path)
    assert rc == 0 and f'resuming {a} at iteration 4 ' in out, err  # into an empty folder: fine
    assert snapshot(a) == before_a and assert_consistent(tmp_path / 'c')['iter'] == 6


def test_the_readme_stage_2_copy_model_flow_works_as_before(tiny_dataset, tmp_path):
    """Stage 1 into save/sat-2-from-nsc-seqkd, `cd save; ./copy_model.sh A B`, stage 2 from save/B into save/B,
    with the README's relative paths."""
    a, b = 'sat-2-from-nsc-seqkd', 'nsc-sat-2-from-nsc-seqkd'
    save = tmp_path / 'save'
    stage1 = finished_run(tiny_dataset, f'save/{a}', tmp_path, '--save_history_ckpt', '1', run_id=a)
    subprocess.run(['bash', str(REPO / 'save' / 'copy_model.sh'), a, b], cwd=save, check=True, capture_output=True)
    rc, out, err = run_main(targs(tiny_dataset, f'save/{b}', '--max_iters', '6', '--start_from', f'save/{b}',
                                  run_id=b), tmp_path)
    assert rc == 0, err
    assert f'resuming save/{b} at iteration 4 ' in out
    assert assert_consistent(save / b, b)['iter'] == 6
    assert snapshot(save / a) == stage1  # stage 1's folder untouched


# ----------------------------------------------------------------------------------------------- inside torch.save
def failing_inside_torch_save(monkeypatch, call, fail, on_first_save_call=None):
    """torch.save whose `call`-th use (1-based) writes through a file that calls fail(bytes written so far) before
    every write: an error raised there reaches torch's stream writer, which wraps it (as a full disk or a Ctrl-C
    inside torch.save do). on_first_save_call(): run at the start of the save that call belongs to (call - 1)."""
    real_save, calls = torch.save, []

    class Failing:
        def __init__(self, f):
            self.f, self.size = f, 0

        def write(self, data):
            fail(self.size)
            self.size += len(data)
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == call - 1 and on_first_save_call:
            on_first_save_call()
        return real_save(obj, Failing(f) if len(calls) == call else f, *args, **kwargs)
    monkeypatch.setattr(torch, 'save', save)


def test_a_full_disk_inside_torch_save_is_one_line_and_keeps_the_previous_checkpoint(tiny_dataset, tmp_path,
                                                                                    monkeypatch):
    folder, before = tmp_path / 'ck', {}

    def disk_full(size):
        if size > 200:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    # calls: model, optimizer, model-best of the save at 2; model.pth, then optimizer.pth of the save at 4
    failing_inside_torch_save(monkeypatch, 5, disk_full,
                              lambda: before.update(snapshot(folder, skip=DURING_A_RUN)))
    result = run_main(targs(tiny_dataset, folder, '--max_iters', '6', '--save_checkpoint_every', '2'), tmp_path)
    line = assert_one_line_error(result, f'error: No space left on device writing {folder}/optimizer.pth; {folder} '
                                         'keeps its previous checkpoint (iteration 2); a save needs ')
    assert 'Traceback' not in result[2] and len(result[2].strip().splitlines()) == 1, result[2]
    monkeypatch.undo()
    assert snapshot(folder, skip=DURING_A_RUN) == before and 'model.pth' in before
    assert not glob.glob(str(folder / '.*.tmp'))
    assert assert_consistent(folder)['iter'] == 2
    # the space a save needs: the sum of its files' sizes (model, optimizer, infos, histories, perhaps the -best
    # pair), as written by the save before it
    number, unit = re.search(r'a save needs ([\d.]+) (B|KB|MB) free', line).groups()
    needed = float(number) * {'B': 1, 'KB': 1024, 'MB': 1024 ** 2}[unit]
    sizes = {name: len(data) for name, data in before.items()}
    least = sizes['model.pth'] + sizes['optimizer.pth'] + sizes['infos_run.pkl']
    assert least <= needed * 1.05 and needed <= sum(sizes.values()) * 1.05, (needed, sizes)


def handled_here():
    """Entering a Python function runs the pending signal handlers."""


def test_a_second_ctrl_c_inside_torch_save_abandons_it_in_one_line(tiny_dataset, tmp_path, monkeypatch):
    """Two SIGINTs while torch.save writes the second save's optimizer.pth: the first waits for the save, the
    second abandons it (README), no RuntimeError traceback; the folder keeps the save before, byte for byte."""
    folder, before, sent = tmp_path / 'ck', {}, []

    def ctrl_c_twice(size):
        if len(sent) < 2:  # (the first two writes: the second one fails inside the writer of data.pkl)
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)
            handled_here()  # (a Python call: the handler runs now, inside torch's writer, not after it returns)
    failing_inside_torch_save(monkeypatch, 5, ctrl_c_twice,
                              lambda: before.update(snapshot(folder, skip=DURING_A_RUN)))
    rc, _, err = run_main(targs(tiny_dataset, folder, '--max_iters', '6', '--save_checkpoint_every', '2'), tmp_path)
    monkeypatch.undo()
    assert rc == 130 and len(sent) == 2, err
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    assert re.fullmatch(
        rf'interrupted by SIGINT: stopped at once by a second signal; the save of iteration 4( \(a new best model\))? '
        rf'was abandoned; {re.escape(str(folder))} holds its last completed save \(iteration 2\); resume with '
        rf'--start_from {re.escape(str(folder))}', err.strip()), err
    assert snapshot(folder, skip=DURING_A_RUN) == before and 'model-best.pth' in before
    assert not glob.glob(str(folder / '.*.tmp'))
    assert assert_consistent(folder)['iter'] == 2
    rc, out, err = run_main(targs(tiny_dataset, folder, '--max_iters', '4', '--start_from', folder), tmp_path)
    assert rc == 0 and f'resuming {folder} at iteration 2 ' in out, err
