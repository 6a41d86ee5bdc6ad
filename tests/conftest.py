"""Shared fixtures: one torch thread for every test, `tiny_dataset` (tests/helpers.py), one per test session, and
`cached_tokens` (document frequencies for the CIDEr-D reward)."""
import argparse
import os
import pickle
import signal

import pytest
import torch

from misc.eval import coco_eval
from misc.eval.cider_d import ngram_counts
from misc.train.rewards import ids_to_str

from tests.helpers import REWARD_GTS, caption_rows, make_tiny_dataset, share_one_meteor


# The slow tests (pytest.ini's `slow` marker; `make test-fast` runs the others in about a minute): a test file, or a
# file::test-name prefix, with why. About a second or more each on a busy 2-core machine.
SLOW = {
    'test_ddp.py': 'torchrun, two ranks', 'test_ddp_resume.py': 'torchrun', 'test_ddp_validation.py': 'torchrun',
    'test_notebook.py': 'runs example.ipynb', 'test_viewer.py::test_browser_': 'headless chromium',
    'test_spice.py::test_real_java': 'java SPICE', 'test_coco_eval.py::test_language_eval_equals_cocoevalcap': 'java',
    'test_eval.py::test_language_eval_and_viewer_match_pycocoevalcap': 'java',
    'test_eval.py::test_eval_into_a_file_prints_progress_lines': 'subprocess eval.py',
    'test_train.py::test_stage1_learns_then_self_critical': 'two training stages',
    'test_train.py::test_kill_': 'subprocess trainings killed and resumed',
    'test_resume.py::test_a_kill_at_any_point': 'subprocess trainings', 'test_resume.py::test_ctrl_c': 'subprocess',
    'test_resume.py::test_a_second_ctrl_c': 'subprocess', 'test_resume.py::test_a_signal_stops': 'subprocess',
    'test_resume.py::test_stop_then_resume': 'trainings', 'test_run_folder.py::test_a_second_run_into': 'subprocess',
    'test_run_folder.py::test_no_stale_lock_after_kill_9': 'subprocess', 'test_int8.py::test_the_avx2_kernel': 'int8',
    'test_int8.py::test_int8_model_scores': 'int8', 'test_int8.py::test_quantize_int8_eval_end_to_end': 'subprocess',
    'test_int8.py::test_int8_layers_are_within': 'int8', 'test_prepro.py::test_make_demo_data_end_to_end': 'scripts',
    'test_captioner.py::test_own_images_same_captions': 'ResNet features, torch.hub',
    'test_prepro_feats.py::test_prepro_feats_resnet101_at_full_depth': 'a full-depth ResNet',
    'test_faults.py::test_truncated_lmdb': 'subprocess', 'test_reliability_data.py::test_ctrl_c_during_meteor': 'java',
    'test_job_faults.py::test_lmdb_cut_while_being_read': 'killed', 'test_job_faults.py::test_meteor_that': 'timeout',
    'test_job_faults.py::test_spice_that': 'timeout', 'test_job_faults.py::test_tokenizer_that': 'timeout',
    'test_seq_kd.py::test_beam_lists_become_the_seq_kd_labels_and_train_sat': 'eval, prepro and a training',
}


def is_slow(nodeid):
    name = nodeid.split('/')[-1]
    return any(name == prefix or name.startswith(prefix if '::' in prefix else prefix + '::') for prefix in SLOW)


# Decoding may pick bfloat16 by itself (SATIC_BF16=auto in the environment, models.accel.bf16.decode_bf16): the tests' outputs must not
# depend on the CPU, so eval.py runs in the tests (in-process or not) keep fp32 unless a test asks otherwise.
os.environ.setdefault('SATIC_BF16', '0')


def pytest_collection_modifyitems(config, items):
    """Tests of SLOW get the slow marker; tests marked cuda (pytest.ini) are skipped on machines without a GPU."""
    for item in items:
        if is_slow(item.nodeid):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope='session')
def one_thread():
    """Tiny matrices gain nothing from threads, and threads stall when the test machine is busy (module- and
    session-scoped fixtures that train a tiny model included)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """A test that runs train.py in-process must not leave SIGINT/SIGTERM changed for the next ones (a subprocess
    inherits an ignored SIGINT)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        if signal.getsignal(signum) is not handler:
            signal.signal(signum, handler)


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory):
    """8 train + 2 restval, 3 val, 3 test images, D=8, dir/lmdb/h5 features. Do not modify its files."""
    return make_tiny_dataset(tmp_path_factory.mktemp('tiny'), n_train=8, n_val=3, n_test=3, n_restval=2,
                             feat_dim=8, backends=('dir', 'lmdb', 'h5'))


@pytest.fixture
def one_meteor_process(monkeypatch):
    """eval.py and COCOEvalCap share one METEOR java process (its start-up, loading the paraphrase table, can take
    15 s on busy cores), closed at the end of the test."""
    real_close = coco_eval._Meteor.close
    started = share_one_meteor(monkeypatch)
    monkeypatch.setattr(coco_eval._Meteor, 'close', lambda self: None)
    yield started
    if started:
        real_close(argparse.Namespace(scorer=started[0]))


@pytest.fixture
def cached_tokens(tmp_path):
    """Train document frequencies in prepro_ngrams' format, from a few made-up images."""
    train = REWARD_GTS + [caption_rows([[1, 5, 9], [2, 3, 14]]), caption_rows([[4, 4, 4, 1], [7, 8]])]
    df = {}
    for rows in train:
        for g in set(g for row in rows for g in ngram_counts(ids_to_str(row, end_token_always=True))):
            df[g] = df.get(g, 0.0) + 1.0
    path = tmp_path / 'train-idxs.p'
    with open(path, 'wb') as f:
        pickle.dump({'document_frequency': df, 'ref_len': len(train)}, f, protocol=2)
    return str(tmp_path / 'train-idxs')
