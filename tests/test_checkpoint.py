"""misc/checkpoint.py: atomic writes, safe loading of infos/histories, fixture infos readable."""
import argparse
import collections
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from misc.checkpoint import load_pickle, load_torch, save_checkpoint, save_pickle, save_torch
from misc.errors import SaticError

CONFORMANCE = Path(__file__).resolve().parents[1].parent / 'shared' / 'conformance'


def test_pickle_round_trip_protocol_2(tmp_path):
    obj = {'opt': argparse.Namespace(K=2, id='x'), 'arr': np.arange(5, dtype=np.int64), 'f': np.float32(1.5),
           'dd': collections.defaultdict(list, a=[1]), 'od': collections.OrderedDict(b=2), 'b': b'bytes',
           'nested': {'t': (1, 2.0, None), 's': {3}}}
    path = tmp_path / 'infos_x.pkl'
    save_pickle(obj, str(path))
    assert path.read_bytes()[:2] == b'\x80\x02'  # protocol 2, as the reference
    back = load_pickle(str(path))
    assert back['opt'].K == 2 and back['dd']['a'] == [1] and back['b'] == b'bytes'
    np.testing.assert_array_equal(back['arr'], obj['arr'])


class _Evil:
    def __reduce__(self):
        return (os.system, ('echo unsafe',))


def test_refuses_code_in_pickles(tmp_path):
    path = tmp_path / 'infos_evil.pkl'
    with open(path, 'wb') as f:
        pickle.dump({'opt': _Evil()}, f, protocol=2)
    with pytest.raises(SaticError, match='refusing to unpickle posix.system|refusing to unpickle nt.system'):
        load_pickle(str(path))


def test_damaged_files_give_one_line_errors(tmp_path):
    path = tmp_path / 'infos_x.pkl'
    save_pickle({'a': list(range(100))}, str(path))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(SaticError, match='damaged'):
        load_pickle(str(path))
    bad = tmp_path / 'model.pth'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(SaticError, match='model.pth'):
        load_torch(str(bad))
    with pytest.raises(SaticError, match='not found'):
        load_torch(str(tmp_path / 'missing.pth'))


def test_atomic_write_keeps_previous_file_when_interrupted(tmp_path):
    path = tmp_path / 'model.pth'
    save_torch({'w': torch.ones(2)}, str(path))

    class Boom:
        def __reduce__(self):
            raise KeyboardInterrupt  # interrupted while serialising

    with pytest.raises(KeyboardInterrupt):
        save_torch({'w': Boom()}, str(path))
    assert torch.equal(load_torch(str(path))['w'], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ['model.pth']  # no temp file left behind


def test_save_checkpoint_layout(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    save_checkpoint(str(tmp_path), 'run', model, optimizer, {'iter': 3}, {'loss_history': {}}, best=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ['histories_run.pkl', 'infos_run-best.pkl', 'infos_run.pkl', 'model-best.pth', 'model.pth',
                     'optimizer.pth']
    assert load_pickle(str(tmp_path / 'infos_run-best.pkl'))['iter'] == 3
    assert set(load_torch(str(tmp_path / 'model.pth'))) == {'weight', 'bias'}


@pytest.mark.skipif(not CONFORMANCE.is_dir(), reason='../shared/conformance not available')
@pytest.mark.parametrize('name', ['transformer', 'sat-2', 'sat-4'])
def test_reference_infos_and_models_load_safely(name):
    infos = load_pickle(str(CONFORMANCE / name / f'infos_{name}.pkl'))
    assert isinstance(infos['opt'], argparse.Namespace)
    assert infos['opt'].K == {'transformer': 1, 'sat-2': 2, 'sat-4': 4}[name]
    state = load_torch(str(CONFORMANCE / name / 'model.pth'))
    assert 'model.generator.proj.weight' in state
