"""Issue 13 ("a run never loses days"), data side: safe cached-tokens loading, features checked when read,
Ctrl-C and broken Java during the COCO metrics, quiet pycocoevalcap, umask-honouring outputs, progress output."""
import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict

import h5py
import numpy as np
import pytest

import eval as eval_script
from dataloader import DataConfig, DataLoader
from misc.eval import coco_eval
from misc.files.atomic import atomic_write
from misc.eval.cider_d import CiderD, load_cached_tokens
from misc.errors import SaticError
from models.sat import SATModel
from misc.console import progress
from scripts import dump_to_lmdb
from tests.helpers import make_tiny_dataset
from tests.helpers import PREDICTIONS, copy_dataset, fake_java, java_children, one_line_error, tiny_checkpoint, write_reference_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_java = pytest.mark.skipif(not coco_eval.java_available(), reason='java not installed')


# --- 1. --cached_tokens never executes code -------------------------------------------------------------------

class _Exploit:
    """Unpickling it would run `func(*args)`."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _exploit_pickles(marker):
    """Crafted cached-tokens pickles that, loaded with plain pickle.load, would create `marker`."""
    command = 'touch %s' % marker
    code = 'open(%r, "w").close()' % str(marker)
    return {'os.system': _Exploit(os.system, (command,)),
            'builtins.exec': _Exploit(exec, (code,)),
            'builtins.eval': _Exploit(eval, (code,))}


@pytest.mark.parametrize('kind', ['os.system', 'builtins.exec', 'builtins.eval'])
def test_malicious_cached_tokens_do_not_execute(tmp_path, kind):
    marker = tmp_path / 'pwned'
    exploit = _exploit_pickles(marker)[kind]
    path = tmp_path / 'coco-train-idxs.p'
    with open(path, 'wb') as f:  # the payload inside a dict that otherwise looks like a real file
        pickle.dump({'document_frequency': {('a',): 1.0}, 'ref_len': exploit}, f, protocol=2)
    with pytest.raises(SaticError) as err:
        CiderD.from_cached_tokens(str(tmp_path / 'coco-train-idxs'))
    assert not marker.exists()
    message = str(err.value)
    assert str(path) in message and 'refusing' in message and 'prepro_ngrams.py' in message
    assert '\n' not in message


def test_truncated_cached_tokens(tmp_path):
    path = tmp_path / 'coco-train-idxs.p'
    data = pickle.dumps({'document_frequency': {('a', 'b'): 2.0, ('a',): 3.0}, 'ref_len': 4}, protocol=2)
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(SaticError) as err:
        load_cached_tokens(str(path))
    assert str(path) in str(err.value) and '\n' not in str(err.value)
    path.write_bytes(b'')  # empty
    with pytest.raises(SaticError):
        load_cached_tokens(str(path))
    path.write_bytes(pickle.dumps({'document_frequency': {}, 'ref_len': 0}, protocol=2))  # log(0)
    with pytest.raises(SaticError, match='document_frequency/ref_len'):
        load_cached_tokens(str(path))


def test_reference_style_cached_tokens_load(tmp_path):
    """The reference's pickles: protocol 2, a defaultdict(float) of tuple-of-str keys, an int ref_len."""
    df = defaultdict(float)
    df[('1', '5')] += 2.0
    df[('0',)] += 3.0
    path = tmp_path / 'ref.p'
    with open(path, 'wb') as f:
        pickle.dump({'document_frequency': df, 'ref_len': 7}, f, protocol=2)
    loaded, ref_len = load_cached_tokens(str(path))
    assert loaded == {('1', '5'): 2.0, ('0',): 3.0} and ref_len == 7 and isinstance(loaded, defaultdict)


def test_prepro_ngrams_output_loads(tiny_dataset):
    df, ref_len = load_cached_tokens(tiny_dataset.cached_tokens[:-len('.p')])
    assert ref_len == 10 and len(df) > 0  # 8 train + 2 restval
    assert all(isinstance(g, tuple) and all(isinstance(w, str) for w in g) for g in df)
    words, _ = load_cached_tokens(tiny_dataset.cached_tokens.replace('-idxs.p', '-words.p'))
    assert ('<eos>',) in words


# --- 2-4. COCO metrics: Ctrl-C during METEOR, broken Java, quiet pycocoevalcap ----------------------------------



METEOR_SCRIPT = r'''
import json, random, signal, sys
# Ctrl-C as in a terminal: a job started in the background (CI, nohup) inherits SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, %(repo)r)
from misc.eval import coco_eval
n = 3000  # METEOR busy for several seconds
words = 'a man woman dog cat red blue ball on the grass table with big small riding horse street car'.split()
rng = random.Random(0)
sent = lambda: ' '.join(rng.choice(words) for _ in range(rng.randint(5, 14)))
with open(%(ref)r, 'w') as f:
    json.dump({'images': [{'id': i} for i in range(n)],
               'annotations': [{'image_id': i, 'id': 10 * i + k, 'caption': sent()} for i in range(n) for k in range(5)]}, f)
predictions = [{'image_id': i, 'caption': sent()} for i in range(n)]
compute = coco_eval._Meteor.compute_score
def announced(self, gts, res):
    print('METEOR started', flush=True)
    return compute(self, gts, res)
coco_eval._Meteor.compute_score = announced
coco_eval.language_eval(predictions, %(ref)r, spice=False, verbose=False)
print('METEOR finished', flush=True)
'''


@needs_java
def test_ctrl_c_during_meteor_exits_at_once(tmp_path):
    """pycocoevalcap's Meteor.__del__ waits on the lock an interrupted compute_score holds: the program hung."""
    script = tmp_path / 'meteor.py'
    script.write_text(METEOR_SCRIPT % {'repo': REPO, 'ref': str(tmp_path / 'refs.json')})
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    try:
        assert proc.stdout.readline().strip() == 'METEOR started'
        time.sleep(1.0)  # java is loading its paraphrase table or scoring
        proc.send_signal(signal.SIGINT)  # to python only (a terminal's Ctrl-C also reaches java)
        start = time.time()
        out, err = proc.communicate(timeout=120)  # the bug hung for ever; a loaded machine may take seconds
        assert time.time() - start < 60
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert 'METEOR finished' not in out  # interrupted inside METEOR, not after
    assert 'KeyboardInterrupt' in err and proc.returncode != 0


_fake_java = fake_java


def test_broken_java_is_one_line(tmp_path, monkeypatch):
    java = _fake_java(tmp_path, monkeypatch, 'echo "Error occurred during initialization of VM" >&2; exit 1')
    ref_json = str(tmp_path / 'refs.json')
    write_reference_json(ref_json)
    with pytest.raises(SaticError) as err:
        coco_eval.language_eval(PREDICTIONS, ref_json, spice=False, verbose=False)
    message = str(err.value)
    assert 'PTB tokenizer' in message and java in message and 'initialization of VM' in message
    assert 'java -version' in message and '--language_eval 0' in message and '\n' not in message


def test_unexecutable_java_is_one_line(tmp_path, monkeypatch):
    java = _fake_java(tmp_path, monkeypatch, '')
    with open(java, 'wb') as f:
        f.write(b'\x7fELF garbage')  # exec format error
    monkeypatch.setenv('PATH', os.path.dirname(java))  # else the search goes on to a real java
    with pytest.raises(SaticError, match='PTB tokenizer.*cannot start'):
        coco_eval.ptb_tokenize(['a dog'])


@needs_java
def test_meteor_crash_is_one_line(tmp_path, monkeypatch):
    """Java runs the tokenizer but the METEOR jar crashes at start."""
    real = shutil.which('java')
    _fake_java(tmp_path, monkeypatch, 'case "$*" in *meteor-1.5.jar*) echo "Exception in thread main: '
                                      'java.lang.OutOfMemoryError" >&2; exit 3;; esac\nexec %s "$@"' % real)
    ref_json = str(tmp_path / 'refs.json')
    write_reference_json(ref_json)
    with pytest.raises(SaticError) as err:
        coco_eval.language_eval(PREDICTIONS, ref_json, spice=False, verbose=False)
    message = str(err.value)
    assert 'METEOR' in message and 'exit status 3' in message and 'OutOfMemoryError' in message
    assert '\n' not in message
    assert not java_children()


class _FakeMeteor:
    def compute_score(self, gts, res):
        return 0.25, [0.25] * len(gts)

    def close(self):
        pass


@needs_java
@pytest.mark.parametrize('toolkit_verbose', [False, True])
def test_pycocoevalcap_debug_prints_only_when_verbose(tmp_path, monkeypatch, capsys, toolkit_verbose):
    monkeypatch.setattr(coco_eval, '_Meteor', _FakeMeteor)
    ref_json = str(tmp_path / 'refs.json')
    write_reference_json(ref_json)
    coco_eval.language_eval(PREDICTIONS, ref_json, spice=False, toolkit_verbose=toolkit_verbose)
    out = capsys.readouterr().out
    assert 'Bleu_4: ' in out and 'CIDEr: ' in out  # the project's own lines stay
    assert ("'testlen'" in out) == toolkit_verbose and ('ratio:' in out) == toolkit_verbose


# --- 5. features checked when read ------------------------------------------------------------------------------




def _later_image(ds, split='train', k=3):
    """Image id and position of the k-th image of a split (not the first: that one is read when the loader opens)."""
    with DataLoader(DataConfig.from_opt(ds.opt(num_workers=0))) as loader:
        return loader.images[loader.split_ix[split][k]]['id']


def _read_until_error(loader, split, batches=20, batch_size=2):
    with pytest.raises(SaticError) as err:
        for _ in range(batches):
            loader.get_batch(split, batch_size)
    return err


def _rewrite_att(root, iid, change):
    path = os.path.join(root, 'cocobu_att', f'{iid}.npz')
    with np.load(path) as data:
        feat = data['feat']
    np.savez_compressed(path, feat=change(feat))
    return path


@pytest.mark.parametrize('value', [np.nan, np.inf])
def test_nan_region_feature_is_named(tmp_path, tiny_dataset, value):
    root = copy_dataset(tiny_dataset, tmp_path)
    iid = _later_image(tiny_dataset)

    def poison(feat):
        feat = feat.copy()
        feat[1, 2] = value
        return feat
    path = _rewrite_att(root, iid, poison)
    opt = tiny_dataset.opt(input_att_dir=os.path.join(root, 'cocobu_att'), num_workers=2)  # through the prefetch
    with DataLoader(DataConfig.from_opt(opt)) as loader:
        err = _read_until_error(loader, 'train')
    one_line_error(err, path, f'image {iid}', 'NaN/inf', 'regenerate')


def test_nan_fc_feature_in_lmdb_is_named(tmp_path, tiny_dataset):
    root = copy_dataset(tiny_dataset, tmp_path)
    iid = _later_image(tiny_dataset)
    fc_path = os.path.join(root, 'cocobu_fc', f'{iid}.npy')
    np.save(fc_path, np.full(tiny_dataset.feat_dim, np.nan, dtype=np.float32))
    lmdb_path = str(tmp_path / 'fc.lmdb')
    dump_to_lmdb.run(dump_to_lmdb.parse_args(['--folder', os.path.join(root, 'cocobu_fc'),
                                              '--output_file', lmdb_path]))
    with DataLoader(DataConfig.from_opt(tiny_dataset.opt('lmdb', input_fc_dir=lmdb_path, num_workers=2, use_fc_feats=True))) as loader:
        err = _read_until_error(loader, 'train')
    one_line_error(err, lmdb_path, f"entry '{iid}'", f'image {iid}', 'NaN/inf')


def test_nan_first_image_fails_when_the_loader_opens(tmp_path, tiny_dataset):
    iid = _later_image(tiny_dataset, 'val', 0)
    path = str(tmp_path / 'att.h5')
    with h5py.File(tiny_dataset.att_h5, 'r') as src, h5py.File(path, 'w') as dst:
        for key in src:
            data = src[key][()]
            if key == str(iid):
                data[0, 0] = np.nan
            dst.create_dataset(key, data=data)
    with pytest.raises(SaticError) as err:
        DataLoader(DataConfig.from_opt(tiny_dataset.opt('h5', input_att_dir=path)))
    one_line_error(err, path, f"dataset '{iid}'", f'image {iid}', 'NaN/inf')


@pytest.mark.parametrize('kind', ['att', 'fc'])
def test_wrong_dimension_in_a_later_image_is_named(tmp_path, tiny_dataset, kind):
    """Was: `could not broadcast input array from shape (5,7) into shape (5,8)` while collating."""
    root = copy_dataset(tiny_dataset, tmp_path)
    iid = _later_image(tiny_dataset)
    D = tiny_dataset.feat_dim
    if kind == 'att':
        path = _rewrite_att(root, iid, lambda feat: feat[:, :-1])
    else:
        path = os.path.join(root, 'cocobu_fc', f'{iid}.npy')
        np.save(path, np.ones(D + 1, dtype=np.float32))
    opt = tiny_dataset.opt(input_att_dir=os.path.join(root, 'cocobu_att'), input_fc_dir=os.path.join(root, 'cocobu_fc'),
                           num_workers=2, use_fc_feats=kind == 'fc')
    with DataLoader(DataConfig.from_opt(opt)) as loader:
        err = _read_until_error(loader, 'train')
    one_line_error(err, path, f'image {iid}', f'{D}-d', f'has {D - 1 if kind == "att" else D + 1}-d')


def test_zero_box_image_is_named(tmp_path, tiny_dataset):
    """Was: `cannot reshape tensor of 0 elements` in the model at evaluation."""
    root = copy_dataset(tiny_dataset, tmp_path)
    iid = _later_image(tiny_dataset, 'test', 1)
    path = _rewrite_att(root, iid, lambda feat: feat[:0])
    np.save(os.path.join(root, 'cocobu_fc', f'{iid}.npy'), np.zeros(0, dtype=np.float32))
    opt = tiny_dataset.opt(input_att_dir=os.path.join(root, 'cocobu_att'), input_fc_dir=os.path.join(root, 'cocobu_fc'),
                           num_workers=1)
    with DataLoader(DataConfig.from_opt(opt)) as loader:
        err = _read_until_error(loader, 'test', batch_size=1)
    one_line_error(err, path, f'image {iid}', '0 boxes', 'regenerate')


# --- 6. outputs honour the umask --------------------------------------------------------------------------------

def _atomic_write_honours_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / 'probe'), lambda f: f.write(b'x'))
    finally:
        os.umask(old)
    return (os.stat(tmp_path / 'probe').st_mode & 0o777) == 0o644


@pytest.mark.parametrize('umask', [0o022, 0o027])
def test_script_outputs_honour_the_umask(tmp_path, monkeypatch, umask):
    assert _atomic_write_honours_umask(tmp_path), 'misc.files.atomic.atomic_write does not honour the umask'
    old = os.umask(umask)
    try:
        ds = make_tiny_dataset(tmp_path / 'data', n_train=3, n_val=1, n_test=1, feat_dim=4,
                               backends=('dir', 'lmdb', 'h5'))
        monkeypatch.setattr(coco_eval, '_Meteor', _FakeMeteor)
        out_path = str(tmp_path / 'eval_results' / 'x_test.json')
        if coco_eval.java_available():
            coco_eval.language_eval(PREDICTIONS, _refs(tmp_path), spice=False, verbose=False, out_path=out_path)
    finally:
        os.umask(old)
    outputs = [ds.input_json, ds.label_h5, ds.cached_tokens, ds.cached_tokens.replace('-idxs', '-words'), ds.ref_json,
               ds.fc_lmdb, ds.att_lmdb, ds.fc_h5, ds.att_h5]
    outputs += [os.path.join(folder, os.listdir(folder)[0]) for folder in (ds.fc_dir, ds.att_dir, ds.box_dir)]
    if coco_eval.java_available():
        outputs.append(out_path)
    expected = 0o666 & ~umask
    modes = {p: oct(os.stat(p).st_mode & 0o777) for p in outputs}
    assert all(m == oct(expected) for m in modes.values()), modes
    leftovers = [n for n in os.listdir(os.path.dirname(ds.input_json)) if n.endswith('.tmp')]
    assert not leftovers


def _refs(tmp_path):
    path = str(tmp_path / 'refs.json')
    write_reference_json(path)
    return path


# --- 7. progress output of the data scripts ---------------------------------------------------------------------

def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch, capsys):
    """Log files get plain periodic lines (here: every update, PROGRESS_SECONDS = 0); a short run at the default
    interval prints none."""
    make_tiny_dataset(tmp_path / 'quiet', n_train=2, n_val=1, n_test=1, feat_dim=4, backends=('dir', 'lmdb'))
    assert ' left' not in capsys.readouterr().err
    monkeypatch.setattr(progress, 'PROGRESS_SECONDS', 0.0)
    make_tiny_dataset(tmp_path / 'loud', n_train=2, n_val=1, n_test=1, feat_dim=4, backends=('dir', 'lmdb', 'h5'))
    err = capsys.readouterr().err
    lines = err.splitlines()
    for prefix in ('make_bu_data: TSV read: ', 'encoding captions: ', 'prepro_ngrams: ', 'dump_to_lmdb: '):
        assert any(line.startswith(prefix) for line in lines), (prefix, err)
    tsv = [line for line in lines if line.startswith('make_bu_data')]
    assert '(100.0%)' in tsv[-1] and 'B/s' in tsv[-1]  # the byte estimate of each row is exact for ASCII TSV
    assert any('/4 images (25.0%)' in line and 'about' in line and 'left' in line for line in lines), err
    assert '\r' not in err  # no bar redraws in a log file


def test_progress_bar_on_a_terminal(monkeypatch):

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    monkeypatch.setattr(sys, 'stderr', term)
    assert list(progress.progress(range(5), desc='demo', unit='images')) == list(range(5))
    assert 'demo: 100%' in term.getvalue() and '5/5' in term.getvalue()


@needs_java
@pytest.mark.parametrize('verbose', ['0', '1'])
def test_eval_verbose_shows_pycocoevalcap_prints(tiny_dataset, tmp_path, monkeypatch, capsys, verbose):
    """eval.py: the metric lines always, pycocoevalcap's {'testlen': ..} / ratio lines only with --verbose 1."""
    model, infos = tiny_checkpoint(tiny_dataset, str(tmp_path / 'ckpt'))
    monkeypatch.setattr(coco_eval, '_Meteor', _FakeMeteor)
    monkeypatch.chdir(tmp_path)
    assert eval_script.main(['--model', model, '--infos_path', infos, '--language_eval', '1', '--ref_json',
                             tiny_dataset.ref_json, '--verbose', verbose, '--id', 'v']) == 0
    out = capsys.readouterr().out
    assert 'CIDEr: ' in out and 'Bleu_4: ' in out
    assert ("'testlen'" in out) == (verbose == '1') and ('ratio:' in out) == (verbose == '1')


def test_broken_java_fails_eval_before_decoding(tiny_dataset, tmp_path, monkeypatch, capsys):
    """A java that is on PATH but does not start stops eval.py (and train.py) before any work, in one line."""
    model, infos = tiny_checkpoint(tiny_dataset, str(tmp_path / 'ckpt'))
    java = _fake_java(tmp_path, monkeypatch, 'echo "Error: Could not reserve enough space for object heap" >&2; exit 1')

    def must_not_decode(*args, **kwargs):
        raise AssertionError('decoding started before the Java check')
    monkeypatch.setattr(SATModel, 'decode', must_not_decode)
    monkeypatch.chdir(tmp_path)
    assert eval_script.main(['--model', model, '--infos_path', infos, '--language_eval', '1',
                             '--ref_json', tiny_dataset.ref_json]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err
    assert err.startswith('error: `java -Xmx2G -version` failed') and java in err and 'object heap' in err
