"""Shared fixtures: one torch thread for every test, and `tiny_dataset` (tests/helpers.py), one per test session."""
import pytest
import torch

from tests.helpers import make_tiny_dataset


@pytest.fixture(autouse=True, scope='session')
def one_thread():
    """Tiny matrices gain nothing from threads, and threads stall when the test machine is busy (module- and
    session-scoped fixtures that train a tiny model included)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory):
    """8 train + 2 restval, 3 val, 3 test images, D=8, dir/lmdb/h5 features. Do not modify its files."""
    return make_tiny_dataset(tmp_path_factory.mktemp('tiny'), n_train=8, n_val=3, n_test=3, n_restval=2,
                             feat_dim=8, backends=('dir', 'lmdb', 'h5'))
