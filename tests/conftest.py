"""Shared fixtures. `tiny_dataset`: one tiny dataset (tests/helpers.py) per test session, read-only."""
import pytest

from tests.helpers import make_tiny_dataset


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory):
    """8 train + 2 restval, 3 val, 3 test images, D=8, dir/lmdb/h5 features. Do not modify its files."""
    return make_tiny_dataset(tmp_path_factory.mktemp('tiny'), n_train=8, n_val=3, n_test=3, n_restval=2,
                             feat_dim=8, backends=('dir', 'lmdb', 'h5'))
