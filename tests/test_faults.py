"""Issue 19, a fault campaign's findings: bad input is one 'error: ...' line naming the file or flag (exit 2, files
that existed before unchanged), silent cases are refused or noted before any work, and a killed preprocessing
script leaves outputs that are whole or absent, that the loader tells apart and that the next run cleans up."""
import os
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

import eval as eval_script
import eval_cocotest
from dataloader import DataConfig, DataLoader
from misc.eval.cider_d import load_cached_tokens
from misc.errors import SaticError
from misc.files.folders import UNFINISHED_MARKER
from models.sat import SATModel
from scripts import dump_to_lmdb, make_bu_data, prepro_ngrams
from tests.helpers import assert_one_line_error, copy_dataset, one_line_error, run_main, targs, tiny_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(*roots):
    """{path: bytes} of every file under roots (or of the files themselves)."""
    files = {}
    for root in roots:
        if os.path.isfile(root):
            files[root] = open(root, 'rb').read()
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                with open(path, 'rb') as f:
                    files[path] = f.read()
    return files


def unchanged(before):
    assert {p: open(p, 'rb').read() for p in before if os.path.exists(p)} == before
    assert all(os.path.exists(p) for p in before)


def train_refuses(ds, tmp_path, extra, *fragments, data=None):
    before = snapshot(data or ds.root)
    result = run_main(targs(ds, tmp_path / 'run', '--max_iters', '1', *extra), tmp_path)
    line = assert_one_line_error(result, *fragments)
    unchanged(before)
    return line


# --- 1-2. damaged LMDB files ------------------------------------------------------------------------------------

def test_truncated_lmdb_is_one_line_not_sigbus(tmp_path, tiny_dataset):
    """Was: Bus error (exit 135): the environment maps pages past the end of the cut file."""
    path = str(tmp_path / 'att.lmdb')
    shutil.copy(tiny_dataset.att_lmdb, path)
    os.truncate(path, os.path.getsize(path) - 4096)  # the meta pages survive: lmdb.open succeeds
    before = snapshot(path)
    # A subprocess: the crash this guards against (SIGBUS) would kill the test process itself.
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'train.py'),
                           *targs(tiny_dataset, tmp_path / 'run', '--max_iters', '1', '--input_att_dir', path)],
                          cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    line = assert_one_line_error((proc.returncode, proc.stdout, proc.stderr), path, 'truncated', 'dump_to_lmdb.py')
    assert '--input_att_dir' in line
    unchanged(before)


def test_garbled_lmdb_pages_are_one_line(tmp_path, tiny_dataset):
    """Was: lmdb.CorruptedError traceback."""
    path = str(tmp_path / 'att.lmdb')  # (fc features are not read by training: DataConfig.use_fc_feats)
    shutil.copy(tiny_dataset.att_lmdb, path)
    with open(path, 'r+b') as f:
        f.seek(2 * 4096)  # past the two meta pages: every tree page
        f.write(b'\xab' * (os.path.getsize(path) - 2 * 4096))
    train_refuses(tiny_dataset, tmp_path, ['--input_att_dir', path], path, 'corrupt', 'CorruptedError', data=path)


# --- 3. label h5 with -1 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('field', ['labels', 'label_start_ix', 'label_end_ix'])
def test_label_h5_with_minus_one_is_one_line_at_load(tmp_path, tiny_dataset, field):
    """A word id of -1 was an IndexError in the embedding at the first step; -1 indices are refused too."""
    path = str(tmp_path / 'labels.h5')
    shutil.copy(tiny_dataset.label_h5, path)
    with h5py.File(path, 'r+') as f:
        data = f[field][()].astype(np.int64)
        data[(3, 2) if field == 'labels' else 3] = -1
        del f[field]
        f[field] = data
    line = train_refuses(tiny_dataset, tmp_path, ['--input_label_h5', path], path, 'prepro_labels.py', data=path)
    assert ('word id -1' if field == 'labels' else f'{field} -1') in line


# --- 4. eval.py --split bogus -----------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def checkpoint(tiny_dataset, tmp_path_factory):
    return tiny_checkpoint(tiny_dataset, str(tmp_path_factory.mktemp('ckpt')))


def _no_work(monkeypatch):
    """Loading the data or decoding fails the test: the refusal must come first."""
    def fail(*args, **kwargs):
        raise AssertionError('work started before the refusal')
    monkeypatch.setattr(DataLoader, '__init__', fail)
    monkeypatch.setattr(SATModel, 'decode', fail)


@pytest.mark.parametrize('main', [eval_script.main, eval_cocotest.main], ids=['eval', 'eval_cocotest'])
def test_eval_unknown_split_lists_the_valid_ones(tmp_path, checkpoint, monkeypatch, main):
    _no_work(monkeypatch)
    before = snapshot(os.path.dirname(checkpoint[0]))
    result = run_main(['--model', checkpoint[0], '--infos_path', checkpoint[1], '--split', 'bogus'], tmp_path, main)
    assert_one_line_error(result, "--split 'bogus'", 'train, val, test')
    unchanged(before)
    assert os.listdir(tmp_path) == []


# --- 5. unwritable output folders of the data scripts -----------------------------------------------------------

def _blocked_folder(tmp_path):
    """A folder path that cannot be created, whoever runs the test (root included): under a regular file."""
    (tmp_path / 'a_file').write_text('x')
    return tmp_path / 'a_file' / 'out'


def test_make_bu_data_unwritable_output_before_any_work(tmp_path, tiny_dataset, monkeypatch):
    monkeypatch.setattr(make_bu_data, 'convert_row', lambda job: pytest.fail('rows converted before the check'))
    out = _blocked_folder(tmp_path)
    before = snapshot(tmp_path)
    result = run_main(['--downloaded_feats', os.path.join(tiny_dataset.root, 'tsv'), '--output_dir', out / 'bu',
                       '--num_workers', '1'], tmp_path, make_bu_data.main)
    assert_one_line_error(result, '--output_dir', str(tmp_path / 'a_file'), 'not a folder')
    assert snapshot(tmp_path) == before


def test_dump_to_lmdb_unwritable_output_before_any_work(tmp_path, tiny_dataset, monkeypatch):
    monkeypatch.setattr(dump_to_lmdb, 'feature_files', lambda *a: pytest.fail('features read before the check'))
    out = _blocked_folder(tmp_path)
    before = snapshot(tmp_path)
    result = run_main(['--folder', tiny_dataset.att_dir, '--output_file', out / 'att.lmdb'], tmp_path,
                      dump_to_lmdb.main)
    assert_one_line_error(result, '--output_file', str(tmp_path / 'a_file'))
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes to read-only folders')
def test_make_bu_data_read_only_output(tmp_path, tiny_dataset):
    folder = tmp_path / 'ro'
    folder.mkdir()
    folder.chmod(0o500)
    try:
        result = run_main(['--downloaded_feats', os.path.join(tiny_dataset.root, 'tsv'), '--output_dir',
                           folder / 'bu', '--num_workers', '1'], tmp_path, make_bu_data.main)
    finally:
        folder.chmod(0o700)
    assert_one_line_error(result, '--output_dir', str(folder))
    assert os.listdir(folder) == []


# --- 6-7. training options that did nothing or climbed the loss -------------------------------------------------

@pytest.mark.parametrize('args, flag', [
    (['--max_epochs', '0'], '--max_epochs'),
    (['--max_iters', '0'], '--max_iters'),
    (['--noamopt', '--noamopt_factor', '-1'], '--noamopt_factor'),
    (['--learning_rate_decay_start', '0', '--learning_rate_decay_rate', '-1'], '--learning_rate_decay_rate'),
    (['--learning_rate_decay_every', '0'], '--learning_rate_decay_every'),
    (['--learning_rate', '-0.1'], '--learning_rate'),
    (['--optim_alpha', '1.5'], '--optim_alpha'),
    (['--optim_beta', '-0.5'], '--optim_beta'),
])
def test_schedule_options_refused_before_any_work(tmp_path, tiny_dataset, args, flag):
    line = train_refuses(tiny_dataset, tmp_path, args, flag)
    assert args[-1] in line
    assert not (tmp_path / 'run').exists()  # refused before the checkpoint folder is made


def test_reference_readme_options_still_accepted():
    """The values the original README's commands pass (and -1 = no limit) are not refused."""
    from opts import parse_opt
    parse_opt(['--noamopt', '--noamopt_warmup', '20000', '--label_smoothing', '0.0', '--seq_per_img', '5',
               '--batch_size', '10', '--learning_rate', '5e-4', '--learning_rate_decay_start', '0',
               '--scheduled_sampling_start', '0', '--max_epochs', '15', '--K', '2'])
    parse_opt(['--learning_rate', '1e-5', '--self_critical_after', '10', '--max_epochs', '40', '--K', '2'])
    opt = parse_opt(['--max_epochs', '-1', '--max_iters', '-1'])
    assert (opt.max_epochs, opt.max_iters) == (-1, -1)


# --- 8. captions drawn with replacement -------------------------------------------------------------------------

def test_seq_per_img_above_the_captions_is_noted_once(tmp_path, tiny_dataset):
    rc, out, err = run_main(targs(tiny_dataset, tmp_path / 'run', '--seq_per_img', '12', '--max_iters', '1',
                                  '--save_checkpoint_every', '100'), tmp_path)
    assert rc == 0, err
    notes = [line for line in (out + err).splitlines() if line.startswith('note:')]
    assert len(notes) == 1 and '--seq_per_img 12' in notes[0] and 'with replacement' in notes[0], notes
    with DataLoader(DataConfig.from_opt(tiny_dataset.opt(seq_per_img=3))) as loader:  # every image has 3 or more captions
        assert loader.caption_sampling_note() is None


# --- 9. 1-d region features -------------------------------------------------------------------------------------

def test_one_dimensional_region_features_are_refused(tmp_path, tiny_dataset):
    """Was: read as one region of D features."""
    root = copy_dataset(tiny_dataset, tmp_path)
    with DataLoader(DataConfig.from_opt(tiny_dataset.opt())) as loader:
        iid = loader.images[loader.split_ix['val'][0]]['id']  # read when the loader opens
    path = os.path.join(root, 'cocobu_att', f'{iid}.npz')
    with np.load(path) as z:
        np.savez_compressed(path, feat=z['feat'].mean(0))  # (D,)
    with pytest.raises(SaticError) as err:
        DataLoader(DataConfig.from_opt(tiny_dataset.opt(input_att_dir=os.path.join(root, 'cocobu_att'))))
    one_line_error(err, path, f'image {iid}', '2-d', f'({tiny_dataset.feat_dim},)')


# --- 10. NaN in a TSV row ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('value', [np.nan, np.inf])
def test_make_bu_data_refuses_nan_rows(tmp_path, value):
    (tmp_path / 'tsv').mkdir()
    feats = np.ones((2, 4), np.float32)
    bad = feats.copy()
    bad[1, 3] = value
    boxes = np.zeros((2, 4), np.float32)
    (tmp_path / 'tsv' / 'a.tsv').write_text(make_bu_data.format_row(11, 9, 9, boxes, feats)
                                            + make_bu_data.format_row(12, 9, 9, boxes, bad))
    old = tmp_path / 'bu_att'
    old.mkdir()
    (old / '1.npz').write_bytes(b'an earlier run')
    before = snapshot(tmp_path)
    result = run_main(['--downloaded_feats', tmp_path / 'tsv', '--output_dir', tmp_path / 'bu', '--num_workers', '1'],
                      tmp_path, make_bu_data.main)
    assert_one_line_error(result, 'a.tsv:2', 'image 12', 'NaN/inf')
    assert snapshot(tmp_path) == before  # nothing written, no staging folder left
    assert sorted(os.listdir(tmp_path)) == ['bu_att', 'tsv']


# --- 11-13. killed preprocessing --------------------------------------------------------------------------------

def run_until_blocked(script, args, point):
    """Run scripts/<script> until it reaches fault_point `point` (misc.run.faults), then SIGKILL it; returns stdout."""
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'scripts', script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, SATIC_TEST_BLOCK_AT=point))
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith('blocked at'):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, lines  # it reached the point
    return ''.join(lines)


def temps(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith('.'))


def test_killed_prepro_ngrams_is_named_and_cleaned_up(tmp_path, tiny_dataset):
    out = tmp_path / 'coco-train'
    args = ['--input_json', tiny_dataset.dataset_json, '--dict_json', tiny_dataset.input_json, '--output_pkl', out]
    run_until_blocked('prepro_ngrams.py', args, 'renamed@1')  # -words.p renamed into place, -idxs.p not yet
    assert [n for n in os.listdir(tmp_path) if not n.startswith('.')] == ['coco-train-words.p']
    assert len(temps(tmp_path)) == 1  # the -idxs.p temp of the killed run
    with pytest.raises(SaticError) as err:
        load_cached_tokens(str(out) + '-idxs')
    one_line_error(err, f'{out}-idxs.p', f'{out}-words.p', 'interrupted', 'prepro_ngrams.py')
    result = run_main(args, tmp_path, prepro_ngrams.main)
    assert result[0] == 0, result
    assert sorted(os.listdir(tmp_path)) == ['coco-train-idxs.p', 'coco-train-words.p']  # leftovers removed
    assert open(f'{out}-idxs.p', 'rb').read() == open(tiny_dataset.cached_tokens, 'rb').read()


def test_killed_prepro_ngrams_before_renaming_leaves_nothing_under_final_names(tmp_path, tiny_dataset):
    out = tmp_path / 'coco-train'
    (tmp_path / 'coco-train-idxs.p').write_bytes(b'previous')
    (tmp_path / 'coco-train-words.p').write_bytes(b'previous words')
    before = snapshot(tmp_path)
    args = ['--input_json', tiny_dataset.dataset_json, '--dict_json', tiny_dataset.input_json, '--output_pkl', out]
    run_until_blocked('prepro_ngrams.py', args, 'prepro_ngrams:written')
    assert {p: b for p, b in snapshot(tmp_path).items() if not os.path.basename(p).startswith('.')} == before


def _tsv_rows(ds):
    return sum(1 for line in open(os.path.join(ds.root, 'tsv', 'tiny.tsv')) if line.strip())


def test_killed_make_bu_data_first_run(tmp_path, tiny_dataset):
    """Killed after 3 of the rows: no output folder, a hidden staging folder that the loader names; the next run
    removes it and writes whole folders."""
    out = tmp_path / 'bu'
    args = ['--downloaded_feats', os.path.join(tiny_dataset.root, 'tsv'), '--output_dir', out, '--num_workers', '1']
    run_until_blocked('make_bu_data.py', args, 'make_bu_data@3')
    assert not [n for n in os.listdir(tmp_path) if not n.startswith('.')]
    assert len(temps(tmp_path)) == 3  # .bu_att.<pid>-partial, _fc, _box
    with pytest.raises(SaticError) as err:
        DataLoader(DataConfig.from_opt(tiny_dataset.opt(input_att_dir=f'{out}_att')))
    one_line_error(err, '--input_att_dir', f'{out}_att', 'interrupted', 'run it again')
    rc, printed, _ = run_main(args, tmp_path, make_bu_data.main)
    assert rc == 0 and printed.count('left by an interrupted run') == 3
    assert sorted(os.listdir(tmp_path)) == ['bu_att', 'bu_box', 'bu_fc']
    assert len(os.listdir(f'{out}_att')) == _tsv_rows(tiny_dataset)
    with DataLoader(DataConfig.from_opt(tiny_dataset.opt(input_att_dir=f'{out}_att', input_fc_dir=f'{out}_fc'))) as loader:
        loader.get_batch('train')


def test_killed_make_bu_data_adding_to_a_folder(tmp_path, tiny_dataset):
    """A second run into existing folders (the reference added to them) killed while moving its files in: the
    folder carries the unfinished marker, which the loader refuses; the next run completes it. A folder without the
    marker (the original code's) loads."""
    root = copy_dataset(tiny_dataset, tmp_path)
    att = os.path.join(root, 'cocobu_att')
    with DataLoader(DataConfig.from_opt(tiny_dataset.opt(input_att_dir=att))):
        pass  # no marker: loads
    args = ['--downloaded_feats', os.path.join(root, 'tsv'), '--output_dir', os.path.join(root, 'cocobu'),
            '--num_workers', '1']
    run_until_blocked('make_bu_data.py', args, 'make_bu_data:moving@2')
    assert os.path.exists(os.path.join(att, UNFINISHED_MARKER))
    with pytest.raises(SaticError) as err:
        DataLoader(DataConfig.from_opt(tiny_dataset.opt(input_att_dir=att)))
    one_line_error(err, att, 'unfinished', 'interrupted', 'run it again')
    assert run_main(args, tmp_path, make_bu_data.main)[0] == 0
    assert not [n for n in os.listdir(root) if n.startswith('.')]
    assert sorted(os.listdir(att)) == sorted(os.listdir(tiny_dataset.att_dir))
    with DataLoader(DataConfig.from_opt(tiny_dataset.opt(input_att_dir=att))) as loader:
        loader.get_batch('train')


@pytest.mark.parametrize('previous', [False, True])
def test_killed_dump_to_lmdb_temp_is_cleaned_up(tmp_path, tiny_dataset, previous):
    out = tmp_path / 'att.lmdb'
    if previous:
        out.write_bytes(b'the previous dump')
    args = ['--folder', tiny_dataset.att_dir, '--output_file', out]
    run_until_blocked('dump_to_lmdb.py', args, 'dump_to_lmdb@3')
    assert temps(tmp_path)  # the killed dump's temp file (and its lock file)
    assert out.exists() == previous and (not previous or out.read_bytes() == b'the previous dump')
    rc, printed, err = run_main(args, tmp_path, dump_to_lmdb.main)
    assert rc == 0, err
    assert 'left by an interrupted run' in printed
    assert sorted(os.listdir(tmp_path)) == ['att.lmdb']
    assert os.path.getsize(out) > 1000


# --- 14. eval output folders checked first ----------------------------------------------------------------------

@pytest.mark.parametrize('blocked, args, fragment', [
    ('vis', [], 'vis/ (--dump_json 1)'),
    ('eval_results', ['--language_eval', '1'], 'eval_results/'),
    ('out', ['--dump_json', '0', '--timing_json', 'out/t.json'], '--timing_json out/t.json'),
    ('beams', ['--dump_json', '0', '--seq_kd', '1', '--seq_kd_path', 'beams/b.json'], '--seq_kd_path beams/b.json'),
])
def test_eval_checks_its_outputs_before_loading(tmp_path, checkpoint, monkeypatch, blocked, args, fragment):
    _no_work(monkeypatch)
    (tmp_path / blocked).write_text('a file where a folder goes')
    before = snapshot(tmp_path)
    result = run_main(['--model', checkpoint[0], '--infos_path', checkpoint[1], '--language_eval', '0', *args],
                      tmp_path, eval_script.main)
    assert_one_line_error(result, fragment, 'not a folder')
    assert snapshot(tmp_path) == before


def test_eval_cocotest_checks_vis_before_loading(tmp_path, checkpoint, monkeypatch):
    _no_work(monkeypatch)
    (tmp_path / 'vis').write_text('x')
    result = run_main(['--model', checkpoint[0], '--infos_path', checkpoint[1]], tmp_path, eval_cocotest.main)
    assert_one_line_error(result, 'vis/', 'not a folder')
