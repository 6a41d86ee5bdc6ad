"""Issue 28, jobs and the files under them: an LMDB cut while a job reads it ends with one line (never SIGBUS); a
Java tool that starts but never answers is stopped after its timeout, named in one line."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from misc.eval import coco_eval
from misc.errors import SaticError
from tests.helpers import PREDICTIONS, fake_java, java_children, write_reference_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Reads a batch, cuts the LMDB (as a rewrite in place would), reads on: one 'error:' line and exit 2 expected.
READER = r'''
import os, sys
sys.path.insert(0, sys.argv[1])
from dataloader import DataConfig, DataLoader
from misc.errors import SaticError
path = sys.argv[3]
config = DataConfig(input_json=sys.argv[2], input_label_h5='none', input_att_dir=path, batch_size=2,
                    num_workers=int(sys.argv[4]))
loader = DataLoader(config)
loader.get_batch('train')
print('read a batch', flush=True)
os.truncate(path, 8192)  # the two meta pages stay: the environment still opens
try:
    for _ in range(20):
        loader.get_batch('train')
except SaticError as e:
    print('error: %s' % e, file=sys.stderr)
    sys.exit(2)
print('read on without noticing', flush=True)
'''


@pytest.mark.parametrize('workers', ['0', '2'])
def test_lmdb_cut_while_being_read_is_one_line_not_sigbus(tiny_dataset, tmp_path, workers):
    path = str(tmp_path / 'att.lmdb')
    shutil.copy(tiny_dataset.att_lmdb, path)
    # A subprocess: SIGBUS would kill the test process itself.
    proc = subprocess.run([sys.executable, '-c', READER, REPO, tiny_dataset.input_json, path, workers],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])  # not -7 (SIGBUS)
    assert 'read a batch' in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1 and 'Traceback' not in proc.stderr
    assert path in lines[0] and 'truncated' in lines[0] and 'while this job was reading it' in lines[0]


# ---- Java tools that never answer ----------------------------------------------------------------------------------
_fake_java = fake_java


def test_tokenizer_that_never_answers_times_out(tmp_path, monkeypatch):
    _fake_java(tmp_path, monkeypatch, 'exec sleep 60')
    monkeypatch.setenv('SATIC_JAVA_TIMEOUT', '1')
    start = time.monotonic()
    with pytest.raises(SaticError) as err:
        coco_eval.ptb_tokenize(['a dog on the grass'])
    assert time.monotonic() - start < 20
    message = str(err.value)
    assert 'PTB tokenizer' in message and 'did not answer within 1 s' in message and 'SATIC_JAVA_TIMEOUT' in message
    assert '\n' not in message


@pytest.mark.skipif(not coco_eval.java_available(), reason='java not installed')
def test_meteor_that_never_answers_times_out(tmp_path, monkeypatch):
    """The tokenizer is the real one; METEOR's java starts and then reads nothing and answers nothing."""
    real = shutil.which('java')
    _fake_java(tmp_path, monkeypatch, 'case "$*" in *meteor-1.5.jar*) exec sleep 60;; esac\nexec %s "$@"' % real)
    monkeypatch.setitem(coco_eval.JAVA_TIMEOUTS, 'meteor', 2.0)
    ref_json = str(tmp_path / 'refs.json')
    write_reference_json(ref_json)
    start = time.monotonic()
    with pytest.raises(SaticError) as err:
        coco_eval.language_eval(PREDICTIONS, ref_json, spice=False, verbose=False)
    assert time.monotonic() - start < 60
    message = str(err.value)
    assert 'METEOR' in message and 'did not answer within 2 s' in message and '\n' not in message
    assert not java_children()


def test_spice_that_never_answers_times_out(tmp_path, monkeypatch):
    _fake_java(tmp_path, monkeypatch, 'exec sleep 60')
    monkeypatch.setitem(coco_eval.JAVA_TIMEOUTS, 'spice', 1.0)
    with pytest.raises(SaticError) as err:
        coco_eval.run_spice({1: ['a dog']}, {1: ['a dog']}, {'java_major': 17, 'js_jar': None},
                            cache_dir=str(tmp_path / 'cache'))
    message = str(err.value)
    assert 'SPICE' in message and 'did not answer within 1 s' in message and '\n' not in message


def test_bad_timeout_setting_is_one_line(monkeypatch):
    monkeypatch.setenv('SATIC_JAVA_TIMEOUT', 'soon')
    with pytest.raises(SaticError, match='SATIC_JAVA_TIMEOUT=soon'):
        coco_eval.java_timeout('ptb')


def test_lmdb_cut_between_the_size_check_and_the_read_is_one_line(tiny_dataset, tmp_path):
    """The race the size check cannot close: the file is cut after the check, during the read. The mapping lives in
    the reader process, which dies of SIGBUS; the job gets one SaticError naming the file, and lives on."""
    from dataloader import LmdbFeatures
    path = str(tmp_path / 'att.lmdb')
    shutil.copy(tiny_dataset.att_lmdb, path)
    features = LmdbFeatures(path, '.npz', '--input_att_dir')
    key = next(iter(features._env.begin().cursor().iternext(values=False))).decode()
    assert features.locate(key)[0].getbuffer().nbytes > 0
    os.truncate(path, 8192)
    features._check_unchanged = lambda: None  # as if the cut came right after the check
    with pytest.raises(SaticError) as error:
        features.locate(key)
    message = str(error.value)
    assert path in message and 'truncated while this job was reading it' in message and 'SIGBUS' in message
    assert '\n' not in message
    with pytest.raises(SaticError):  # and every later read says so too
        features.locate(key)
    features.close()
