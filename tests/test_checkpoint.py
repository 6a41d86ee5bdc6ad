"""misc/run/checkpoint.py: atomic writes, safe loading of infos/histories, fixture infos readable."""
import argparse
import collections
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from misc.run.checkpoint import CheckpointSaver, ResumePoint, save_checkpoint
from misc.options.configs import ModelConfig
from misc.files.atomic import save_pickle, save_torch
from misc.files.safe_load import load_pickle, load_torch
from misc.errors import SaticError
from tests.helpers import needs_shared, shared_path

CONFORMANCE = Path(shared_path('conformance'))


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
    assert names == ['checkpoint_run.json', 'histories_run.pkl', 'infos_run-best.pkl', 'infos_run.pkl',
                     'model-best.pth', 'model.pth', 'optimizer.pth']  # the reference's files + our manifest
    assert load_pickle(str(tmp_path / 'infos_run-best.pkl'))['iter'] == 3
    assert set(load_torch(str(tmp_path / 'model.pth'))) == {'weight', 'bias'}


@pytest.mark.parametrize('history', [False, True], ids=['plain', 'save_history_ckpt'])
def test_checkpoint_saver_records_the_options_it_is_given_and_reads_only_its_arguments(tmp_path, history):
    """CheckpointSaver reads save_history_ckpt from its argument; the recorded options are data (infos['opt'], a
    Namespace copy), whatever they say (here a save_history_ckpt that disagrees)."""
    model = torch.nn.Linear(2, 2)
    recorded = argparse.Namespace(caption_model='sat', K=2, save_history_ckpt=int(not history))
    saver = CheckpointSaver(str(tmp_path), 'run', model, torch.optim.Adam(model.parameters()), {'1': 'a'},
                            recorded_options=vars(recorded), config=ModelConfig(K=2), save_history_ckpt=history)
    infos = saver.save(ResumePoint(4, 1, {'iterators': {'train': 2}, 'split_ix': {'train': [0]}}, {}), 1.5,
                       {'loss_history': {}}, rng_states=None)
    saved = load_pickle(str(tmp_path / 'infos_run.pkl'))
    assert isinstance(saved['opt'], argparse.Namespace) and vars(saved['opt']) == vars(recorded)
    assert saved['opt'] is not recorded and saved['iter'] == infos['iter'] == 4 and saved['vocab'] == {'1': 'a'}
    assert (tmp_path / 'model-4.pth').exists() == history == (tmp_path / 'infos_run-4.pkl').exists()


@needs_shared('conformance', 'sat-2', 'infos_sat-2.pkl')
@pytest.mark.parametrize('name', ['transformer', 'sat-2', 'sat-4'])
def test_reference_infos_and_models_load_safely(name):
    infos = load_pickle(str(CONFORMANCE / name / f'infos_{name}.pkl'))
    assert isinstance(infos['opt'], argparse.Namespace)
    assert infos['opt'].K == {'transformer': 1, 'sat-2': 2, 'sat-4': 4}[name]
    state = load_torch(str(CONFORMANCE / name / 'model.pth'))
    assert 'model.generator.proj.weight' in state


# ----------------------------------------------------------------------------------------------- issue 13
def _tiny_run(tmp_path, iteration=3, best=True):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    for _ in range(iteration):
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
    infos = {'iter': iteration, 'opt': argparse.Namespace(caption_model='sat', K=2), 'vocab': {'1': 'a', '2': 'dog'}}
    return model, optimizer, save_checkpoint(str(tmp_path), 'run', model, optimizer, infos, {}, best=best)


@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    from misc.files.atomic import atomic_write
    old = os.umask(umask)
    try:
        _tiny_run(tmp_path)
        atomic_write(str(tmp_path / 'vis.json'), lambda f: f.write(b'{}'))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert len(modes) == 8 and set(modes.values()) == {mode}, modes


def test_infos_record_what_they_belong_to(tmp_path):
    from misc.run.checkpoint import check_infos_match, state_fingerprint
    from misc.files.vocabulary import vocab_sha1
    model, optimizer, infos = _tiny_run(tmp_path)
    saved = load_pickle(str(tmp_path / 'infos_run.pkl'))
    assert saved['model_fingerprint'] == state_fingerprint(model.state_dict()) == infos['model_fingerprint']
    assert saved['optimizer_step'] == 3 and saved['K'] == 2 and saved['caption_model'] == 'sat'
    assert saved['vocab_sha1'] == vocab_sha1({'1': 'a', '2': 'dog'})
    # the file, the state_dict loaded from it, and the model all match; another model does not
    check_infos_match(saved, str(tmp_path / 'model.pth'), optimizer_state=optimizer.state_dict(),
                      vocab={'1': 'a', '2': 'dog'}, config=ModelConfig(caption_model='sat', K=2))
    check_infos_match(saved, load_torch(str(tmp_path / 'model-best.pth')))
    with pytest.raises(SaticError, match=r'is not the model infos_run.pkl was saved with \(iteration 3\)'):
        check_infos_match(saved, torch.nn.Linear(2, 2).state_dict(), infos_path='infos_run.pkl')
    with pytest.raises(SaticError, match='has made 4 optimiser steps but infos says 3'):
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        check_infos_match(saved, optimizer_state=optimizer.state_dict(), infos_path='infos')
    with pytest.raises(SaticError, match='another vocabulary'):
        check_infos_match(saved, vocab={'1': 'a', '2': 'cat'})
    with pytest.raises(SaticError, match='K=2, not K=4'):
        check_infos_match(saved, config=ModelConfig(caption_model='sat', K=4))
    # infos of the original code have none of the fields: everything passes, the optimizer step is the iteration
    old = {'iter': 4, 'opt': saved['opt'], 'vocab': saved['vocab']}
    check_infos_match(old, torch.nn.Linear(2, 2).state_dict(), optimizer_state=optimizer.state_dict(),
                      vocab={'9': 'x'}, config=ModelConfig(caption_model='transformer', K=6))
    with pytest.raises(SaticError, match='has made 4 optimiser steps but infos says 3'):
        check_infos_match(dict(old, iter=3), optimizer_state=optimizer.state_dict(), infos_path='infos')


def test_nonfinite_weights_are_refused_and_the_previous_files_kept(tmp_path):
    from misc.run.checkpoint import CheckpointError
    model, optimizer, _ = _tiny_run(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        model.bias[1] = float('inf')
    with pytest.raises(CheckpointError, match=r'refusing to save iteration 4 .*not finite \(nan or inf in bias\); '
                                              r'.* keeps its previous checkpoint \(iteration 3\)'):
        save_checkpoint(str(tmp_path), 'run', model, optimizer, {'iter': 4}, {})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_save_cut_after_its_commit_is_completed_by_recover(tmp_path, monkeypatch):
    """The manifest's rename is the commit: a kill after it (here an exception that skips all clean-up, as kill -9
    would) leaves temp files that recover_checkpoint renames into place; before it, the previous save stands."""
    from misc.run.checkpoint import (check_infos_match, read_manifest, recover_checkpoint, recover_folder,
                                     verify_checkpoint)

    class Killed(BaseException):
        pass
    model, optimizer, _ = _tiny_run(tmp_path, iteration=3)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # the manifest, model.pth, then killed before optimizer.pth
            raise Killed
        return real_replace(src, dst)
    monkeypatch.setattr(os, 'replace', dying_replace)
    with pytest.raises(Killed):
        save_checkpoint(str(tmp_path), 'run', model, optimizer, {'iter': 4}, {}, best=True)
    monkeypatch.undo()
    assert read_manifest(str(tmp_path), 'run')['iter'] == 4
    assert load_pickle(str(tmp_path / 'infos_run.pkl'))['iter'] == 3  # not renamed yet ...
    assert verify_checkpoint(str(tmp_path), 'run')  # ... so the files do not match the committed manifest
    assert set(recover_folder(str(tmp_path))) == {'run'}  # (recover_checkpoint(folder, 'run') for each run id)
    assert verify_checkpoint(str(tmp_path), 'run') == []
    assert recover_checkpoint(str(tmp_path), 'run')['iter'] == 4  # nothing left to do
    infos = load_pickle(str(tmp_path / 'infos_run.pkl'))
    assert infos['iter'] == 4
    check_infos_match(infos, str(tmp_path / 'model.pth'), optimizer_state=load_torch(str(tmp_path / 'optimizer.pth')))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]


def test_a_damaged_manifest_is_one_line(tmp_path):
    from misc.run.checkpoint import recover_checkpoint
    _tiny_run(tmp_path)
    (tmp_path / 'checkpoint_run.json').write_text('{"files": [{"name": "../../etc/passwd", "temp": "x"}]}')
    with pytest.raises(SaticError, match='checkpoint_run.json is damaged.*remove it'):
        recover_checkpoint(str(tmp_path), 'run')


def test_disk_full_while_writing_is_one_line_and_keeps_the_previous_save(tmp_path, monkeypatch):
    import errno
    from misc.run.checkpoint import CheckpointError
    model, optimizer, _ = _tiny_run(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full(obj, f, *args, **kwargs):
        f.write(b'some bytes')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(pickle, 'dump', full)
    with pytest.raises(CheckpointError, match=f'No space left on device writing {tmp_path}/histories_run.pkl; '
                                              f'{tmp_path} keeps its previous checkpoint \\(iteration 3\\)'):
        save_checkpoint(str(tmp_path), 'run', model, optimizer, {'iter': 4}, {})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# ----------------------------------------------------------------------------------------------- one reader, one writer
REPO = Path(__file__).resolve().parents[1]
PRODUCT = ['train.py', 'eval.py', 'eval_cocotest.py', 'eval_ensemble.py', 'evaluator.py', 'captioner.py', 'opts.py',
           'dataloader.py'] + \
    [str(p.relative_to(REPO)) for folder in ('misc', 'models') for p in sorted((REPO / folder).rglob('*.py'))]
READERS = ('run/checkpoint.py', 'run/infos.py', 'files/atomic.py', 'files/safe_load.py')  # misc's checkpoint io


def _calls(names):
    """{file: [lines]} of the product files (misc's READERS excepted) that call names."""
    found = {}
    for name in PRODUCT:
        if name.startswith('misc/') and name[len('misc/'):] in READERS:
            continue
        lines = [line for line in (REPO / name).read_text().splitlines()
                 if any(f'{n}(' in line for n in names)]
        if lines:
            found[name] = lines
    return found


def test_only_the_checkpoint_module_loads_checkpoint_files():
    # misc/eval/cider_d.py reads the --cached_tokens document frequencies (not a checkpoint file) with load_pickle.
    assert _calls(['load_pickle', 'load_torch', 'torch.load']) == {'misc/eval/cider_d.py': [
        line for line in (REPO / 'misc/eval/cider_d.py').read_text().splitlines() if 'load_pickle(' in line]}
    assert _calls(['save_pickle', 'save_torch', 'torch.save']) == {}


def test_read_infos_refuses_what_is_not_an_infos_file_in_one_line(tmp_path):
    from misc.run.infos import read_infos as load_infos
    path = str(tmp_path / 'infos_x.pkl')
    save_pickle({'opt': argparse.Namespace(K=2)}, path)  # no vocab
    with pytest.raises(SaticError) as error:
        load_infos(path)
    assert str(error.value) == (f'{path} is not an infos file (a dict with opt and vocab): pass the infos_<id>.pkl '
                                'saved with the checkpoint')
    with pytest.raises(SaticError, match=r'^teacher infos .* as --teacher_infos$'):
        load_infos(path, name=f'teacher infos {path}', advice='pass the infos_<id>.pkl saved with m.pth as --teacher_infos')


def test_written_checkpoint_files_load_back(tmp_path):
    from misc.run.checkpoint import load_model_state, write_checkpoint_files
    from misc.run.infos import FIELDS, loaded_line, make_infos, model_config, read_infos as load_infos
    opt = {'caption_model': 'sat', 'K': 2}
    infos = make_infos(opt, ModelConfig(K=2), {'1': 'a'}, iteration=7, epoch=1)
    # what must be there (the schema's required fields, and those a resume reads), not the exact key list
    assert {f.name for f in FIELDS if f.required} | {'iter', 'epoch', 'format', 'model_config'} <= set(infos)
    assert set(infos) <= {f.name for f in FIELDS}  # every field written is named in the schema
    assert isinstance(infos['opt'], argparse.Namespace) and vars(infos['opt']) == opt  # the reference's format
    assert model_config(infos) == ModelConfig(K=2)
    line = loaded_line(infos, 'm.pth')  # (what must be there: a field shown later may add to it)
    assert line.startswith('checkpoint m.pth: iteration 7, epoch 1') and 'best validation score' not in line
    assert ', best validation score 0.1235' in loaded_line(dict(infos, best_val_score=0.123456), 'm.pth')
    model_path = write_checkpoint_files(str(tmp_path), 'run', {'w': torch.ones(2)}, infos, best=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['infos_run-best.pkl', 'infos_run.pkl', 'model-best.pth',
                                                          'model.pth']
    assert torch.equal(load_model_state(model_path)['w'], torch.ones(2))
    back = load_infos(str(tmp_path / 'infos_run-best.pkl'))
    assert back['iter'] == 7 and back['opt'].K == 2 and back['vocab'] == {'1': 'a'}


@pytest.mark.parametrize('name', ['sat-2', 'sat-4', 'transformer'])
def test_reference_infos_read_through_the_schema(name):
    """The reference's infos (format 1: no format, no model_config) pass the one reader, and their opt becomes the
    ModelConfig once (the K rule applied: the reference's transformer carries K = 6)."""
    from misc.run.infos import format_version, model_config, read_infos
    path = shared_path('conformance', name, f'infos_{name}.pkl')
    if not os.path.exists(path):
        pytest.skip('../shared/conformance not present')
    infos = read_infos(path)
    config = model_config(infos)
    assert format_version(infos) == 1 and 'model_config' not in infos
    assert config.caption_model == infos['opt'].caption_model
    assert config.K == (1 if name == 'transformer' else int(name.split('-')[1]))
    assert config.input_encoding_size == infos['opt'].input_encoding_size
