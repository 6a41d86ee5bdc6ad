"""Shared fixtures: one torch thread for every test, `tiny_dataset` (tests/helpers.py), one per test session, and
`cached_tokens` (document frequencies for the CIDEr-D reward)."""
import argparse
import os
import pickle
import signal

import pytest
import torch

from misc import coco_eval
from misc.cider_d import ngram_counts
from misc.rewards import ids_to_str

from tests.helpers import REWARD_GTS, label_rows, make_tiny_dataset, share_one_meteor


# Decoding may pick bfloat16 by itself (SATIC_BF16=auto in the environment, models.accel.bf16.decode_bf16): the tests' outputs must not
# depend on the CPU, so eval.py runs in the tests (in-process or not) keep fp32 unless a test asks otherwise.
os.environ.setdefault('SATIC_BF16', '0')


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda (pytest.ini) are skipped on machines without a GPU."""
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
    train = REWARD_GTS + [label_rows([[1, 5, 9], [2, 3, 14]]), label_rows([[4, 4, 4, 1], [7, 8]])]
    df = {}
    for rows in train:
        for g in set(g for row in rows for g in ngram_counts(ids_to_str(row, end_token_always=True))):
            df[g] = df.get(g, 0.0) + 1.0
    path = tmp_path / 'train-idxs.p'
    with open(path, 'wb') as f:
        pickle.dump({'document_frequency': df, 'ref_len': len(train)}, f, protocol=2)
    return str(tmp_path / 'train-idxs')
