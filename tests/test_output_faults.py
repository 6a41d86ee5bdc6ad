"""Issue 28, no silent replacement: copy_model.sh refuses a destination holding a run unless told to replace it (and
then replaces it whole), prepro_labels.py's json + h5 appear together or not at all, and a validation cut short by
Ctrl-C is redone when the run resumes (model-best and the histories are the uninterrupted run's)."""
import os
import pickle
import signal
import subprocess
from pathlib import Path

import h5py
import pytest
import torch

import train
from misc.files import atomic
from misc.files.safe_load import load_pickle, load_torch
from misc.run.interrupts import Interrupted
from scripts import prepro_labels
from tests.helpers import assert_one_line_error, run_main, targs

REPO = Path(__file__).resolve().parents[1]
COPY = str(REPO / 'save' / 'copy_model.sh')


def files(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def fake_run(folder, run_id, tag):
    """A folder holding a run's files (contents: tag)."""
    folder.mkdir(parents=True)
    for name in ('model.pth', 'model-best.pth', 'optimizer.pth', f'infos_{run_id}.pkl', f'infos_{run_id}-best.pkl',
                 f'histories_{run_id}.pkl', f'checkpoint_{run_id}.json', f'events.out.tfevents.{tag}'):
        (folder / name).write_text(f'{tag} {name}')


def copy_model(cwd, *args, **env):
    proc = subprocess.run(['bash', COPY, *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, **env))
    return proc.returncode, proc.stdout, proc.stderr


def test_copy_model_refuses_a_destination_holding_a_run(tmp_path):
    fake_run(tmp_path / 'A', 'A', 'a')
    fake_run(tmp_path / 'B', 'B', 'b')
    before = files(tmp_path / 'B')
    rc, out, err = copy_model(tmp_path, 'A', 'B')
    assert rc == 2 and err.count('\n') == 1 and err.startswith('error: ') and "'B' already holds a run" in err
    assert '-f' in err and files(tmp_path / 'B') == before
    assert [p for p in os.listdir(tmp_path) if p.startswith('.')] == []  # no staging folder left


@pytest.mark.parametrize('how', [['-f'], ['--replace'], 'env'])
def test_copy_model_replace_removes_the_old_run_whole(tmp_path, how):
    fake_run(tmp_path / 'A', 'A', 'a')
    fake_run(tmp_path / 'B', 'B', 'b')
    (tmp_path / 'B' / 'notes.txt').write_text('mine')
    args, env = (how, {}) if how != 'env' else ([], {'SATIC_REPLACE': '1'})
    rc, out, err = copy_model(tmp_path, *args, 'A', 'B', **env)
    assert rc == 0, err
    got = files(tmp_path / 'B')
    assert got.pop('notes.txt') == b'mine'  # not a run file: kept
    assert all(content.startswith(b'a ') for content in got.values())  # nothing of B's run is left
    assert set(got) == {'model.pth', 'model-best.pth', 'optimizer.pth', 'infos_B.pkl', 'infos_B-best.pkl',
                        'histories_B.pkl', 'checkpoint_A.json', 'events.out.tfevents.a'}
    assert files(tmp_path / 'A')['infos_A.pkl'] == b'a infos_A.pkl'


def test_copy_model_never_replaces_a_live_run(tmp_path):
    fake_run(tmp_path / 'A', 'A', 'a')
    fake_run(tmp_path / 'B', 'B', 'b')
    lock = tmp_path / 'B' / '.satic.lock'
    with open(lock, 'w') as f:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_EX)
        rc, _, err = copy_model(tmp_path, '-f', 'A', 'B')
    assert rc == 2 and 'a training run is writing into' in err
    assert files(tmp_path / 'B')['model.pth'] == b'b model.pth'


def test_copy_model_into_a_new_or_empty_folder_as_before(tmp_path):
    fake_run(tmp_path / 'A', 'A', 'a')
    (tmp_path / 'C').mkdir()
    for dst in ('B', 'C'):
        rc, _, err = copy_model(tmp_path, 'A', dst)
        assert rc == 0, err
        assert f'infos_{dst}.pkl' in files(tmp_path / dst)


# ---- prepro_labels.py: the json + h5 pair ---------------------------------------------------------------------------
def _pair(tmp_path, tiny_dataset):
    out = tmp_path / 'out'
    out.mkdir()
    args = ['--input_json', tiny_dataset.dataset_json, '--output_json', str(out / 'cocotalk.json'),
            '--output_h5', str(out / 'cocotalk'), '--word_count_threshold', '0']
    assert run_main(args, tmp_path, prepro_labels.main)[0] == 0
    return out, args


def test_prepro_labels_unwritable_json_leaves_the_pair_whole(tmp_path, tiny_dataset):
    out, args = _pair(tmp_path, tiny_dataset)
    before = files(out)
    (tmp_path / 'a_file').write_text('x')
    for bad in (str(tmp_path / 'a_file' / 'cocotalk.json'), str(tmp_path)):  # folder cannot be made; a folder
        argv = args[:3] + [bad] + args[4:] + ['--max_length', '8']
        result = run_main(argv, tmp_path, prepro_labels.main)
        assert_one_line_error(result, '--output_json', bad)
        assert files(out) == before


def test_prepro_labels_failure_while_writing_the_second_file_leaves_the_pair_whole(tmp_path, tiny_dataset,
                                                                                    monkeypatch):
    out, args = _pair(tmp_path, tiny_dataset)
    before = files(out)
    real = atomic.temp_file

    def failing(path):
        if path.endswith('.json'):
            raise OSError(28, 'No space left on device')
        return real(path)
    monkeypatch.setattr(atomic, 'temp_file', failing)
    result = run_main(args + ['--max_length', '8'], tmp_path, prepro_labels.main)
    assert_one_line_error(result, 'No space left', 'cocotalk.json')
    assert files(out) == before  # the new h5 (8 words wide) was not renamed in
    with h5py.File(out / 'cocotalk_label.h5', 'r') as f:
        assert f['labels'].shape[1] == 16


# ---- an interrupted validation is redone on resume ------------------------------------------------------------------
def test_validation_cut_short_is_redone_on_resume(tiny_dataset, tmp_path, monkeypatch):
    common = ['--save_checkpoint_every', '3', '--max_iters', '9']
    straight, cut = tmp_path / 'straight', tmp_path / 'cut'
    assert run_main(targs(tiny_dataset, straight, *common), tmp_path)[0] == 0
    real, calls = train.validate, []

    def ctrl_c_in_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the validation of iteration 6: Ctrl-C (Signals raise Interrupted in that phase)
            raise Interrupted(signal.SIGINT)
        return real(*args, **kwargs)
    monkeypatch.setattr(train, 'validate', ctrl_c_in_the_second)
    rc, _, err = run_main(targs(tiny_dataset, cut, *common), tmp_path)
    assert rc == 130 and 'after iteration 6 is saved' in err, err
    assert load_pickle(str(cut / 'infos_run.pkl'))['validation_pending'] == 6
    monkeypatch.setattr(train, 'validate', real)
    rc, out, err = run_main(targs(tiny_dataset, cut, *common, '--start_from', cut), tmp_path)
    assert rc == 0, err
    assert 'the validation of iteration 6 was interrupted: redoing it' in out
    for name in ('model.pth', 'model-best.pth'):
        a, b = load_torch(str(straight / name)), load_torch(str(cut / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    h = [load_pickle(str(folder / 'histories_run.pkl'))['val_result_history'] for folder in (straight, cut)]
    assert sorted(h[1]) == [3, 6, 9] and {k: v['loss'] for k, v in h[0].items()} == {k: v['loss'] for k, v in h[1].items()}
    infos = [load_pickle(str(folder / 'infos_run-best.pkl')) for folder in (straight, cut)]
    assert infos[0]['iter'] == infos[1]['iter'] and infos[0]['best_val_score'] == infos[1]['best_val_score']
    assert 'validation_pending' not in load_pickle(str(cut / 'infos_run.pkl'))


# ---- the viewer: a folder where a file is expected, a file where its pictures go -------------------------------------
def _viewer_case(tmp_path, case):
    """(argv, text the one line must hold) of make_viewer.py for a bad path."""
    (tmp_path / 'images').mkdir()
    (tmp_path / 'images' / 'a.jpg').write_bytes(b'jpg')
    (tmp_path / 'run.json').write_text('[{"image_id": 1, "caption": "a dog", "file_path": "a.jpg"}]')
    (tmp_path / 'folder').mkdir()
    (tmp_path / 'a_file').write_text('x')
    run, out = ['--runs', 'run.json'], ['--output', 'out/page.html']
    pictures = ['--image_root', 'images']
    if case == 'imgs is a file':
        (tmp_path / 'out').mkdir()
        (tmp_path / 'out' / 'imgs').write_text('x')
    if case == 'a picture path is a folder':
        (tmp_path / 'out' / 'imgs' / '1.jpg').mkdir(parents=True)
    return {
        '--runs a folder': (['--runs', 'folder', *out], 'folder is a folder'),
        '--scores a folder': ([*run, '--scores', 'folder', *out], 'folder is a folder'),
        '--ref_json a folder': ([*run, '--ref_json', 'folder', *out], 'folder is a folder'),
        '--images_json a folder': ([*run, '--images_json', 'folder', *out], 'folder is a folder'),
        '--output a folder': ([*run, '--output', 'folder'], '--output folder'),
        '--output under a file': ([*run, '--output', 'a_file/page.html'], 'a_file'),
        '--image_root a file': ([*run, '--image_root', 'a_file', *out], '--image_root a_file'),
        'imgs is a file': ([*run, *pictures, *out], 'imgs'),
        'a picture path is a folder': ([*run, *pictures, *out], '1.jpg is a folder'),
    }[case]


@pytest.mark.parametrize('case', ['--runs a folder', '--scores a folder', '--ref_json a folder',
                                  '--images_json a folder', '--output a folder', '--output under a file',
                                  '--image_root a file', 'imgs is a file', 'a picture path is a folder'])
def test_viewer_bad_paths_are_one_line(tmp_path, case):
    from scripts import make_viewer
    argv, fragment = _viewer_case(tmp_path, case)
    assert_one_line_error(run_main(argv, tmp_path, make_viewer.main), fragment)
    assert not (tmp_path / 'out' / 'page.html').exists()
