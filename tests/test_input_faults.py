"""Issue 28, input files: every input file kind checked where it is opened (a corrupted copy of each, through its
entry point: exit 2, one 'error: ...' line naming the file, no traceback, before any long work), and ensembles whose
members read the data as each was trained (their order changes nothing; weights finite and > 0)."""
import json
import os
import pickle
import shutil

import h5py
import numpy as np
import pytest
import torch

import eval as eval_script
import eval_ensemble
from misc.files.atomic import save_pickle
from misc.files.safe_load import load_pickle
from models.ensemble import EnsembleModel
from scripts import make_demo_data, prepro_labels, prepro_labels_seqKD, prepro_ngrams, prepro_reference_json
from tests.helpers import assert_one_line_error, masked_batch, run_main, targs, tiny_checkpoint, tiny_sat


@pytest.fixture(scope='module')
def checkpoint(tiny_dataset, tmp_path_factory):
    return tiny_checkpoint(tiny_dataset, str(tmp_path_factory.mktemp('ckpt')))


# ---- corruptions: (name, kind, corrupt(ds, folder) -> bad file) -------------------------------------------------
def _h5(ds, folder, change):
    path = os.path.join(folder, 'labels.h5')
    shutil.copy(ds.label_h5, path)
    with h5py.File(path, 'r+') as f:
        change(f)
    return path


def _replace(f, key, value):
    del f[key]
    f[key] = value


def _json(folder, name, data, text=None):
    path = os.path.join(folder, name)
    with open(path, 'w') as f:
        f.write(text if text is not None else json.dumps(data))
    return path


def _edited_json(src, folder, name, change):
    with open(src) as f:
        data = json.load(f)
    change(data)
    return _json(folder, name, data)


def _pickle(folder, name, obj):
    path = os.path.join(folder, name)
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=2)
    return path


def _pop(key):
    return lambda data: [a.pop(key) for a in data['annotations']]


LABEL_H5 = {
    'labels 1-d': lambda f: _replace(f, 'labels', f['labels'][()].reshape(-1)),
    'labels float ids': lambda f: _replace(f, 'labels', f['labels'][()].astype(np.float32) + 0.5),
    'labels 0 words wide': lambda f: _replace(f, 'labels', np.zeros((len(f['labels']), 0), np.uint32)),
    'label_start_ix 2-d': lambda f: _replace(f, 'label_start_ix', f['label_start_ix'][()].reshape(-1, 1)),
    'label_end_ix float': lambda f: _replace(f, 'label_end_ix', f['label_end_ix'][()].astype(np.float64)),
    'no labels dataset': lambda f: f.__delitem__('labels'),
    'labels a group': lambda f: (f.__delitem__('labels'), f.create_group('labels')),
}
VOCAB_JSON = {
    'ix_to_word a list': lambda d: d.__setitem__('ix_to_word', list(d['ix_to_word'].values())),
    'ix_to_word keys from 0': lambda d: d.__setitem__('ix_to_word', {str(int(k) - 1): w
                                                                     for k, w in d['ix_to_word'].items()}),
    'ix_to_word numbers as words': lambda d: d.__setitem__('ix_to_word', {k: 1 for k in d['ix_to_word']}),
    'images a dict': lambda d: d.__setitem__('images', {}),
    'an image without id': lambda d: d['images'][0].pop('id'),
    'an image id a list': lambda d: d['images'][0].__setitem__('id', [1]),
}
REF_JSON = {
    'truncated': None,
    'a list': [1, 2],
    'no annotations': {'images': []},
    'references without image_id': _pop('image_id'),
    'references without caption': _pop('caption'),
    'a caption that is a number': lambda d: d['annotations'][0].__setitem__('caption', 3),
    'images without id': lambda d: [i.pop('id') for i in d['images']],
}


def _ref(ds, folder, how):
    if how is None:
        return _json(folder, 'ref.json', None, open(ds.ref_json).read()[:120])
    if callable(how):
        return _edited_json(ds.ref_json, folder, 'ref.json', how)
    return _json(folder, 'ref.json', how)


def _train(ds, tmp_path, flag, path, *extra):
    return run_main(targs(ds, tmp_path / 'run', '--max_iters', '1', flag, path, *extra), tmp_path)


def _karpathy(change):
    return lambda ds, folder: _edited_json(ds.dataset_json, folder, 'dataset.json', change)


CASES = []
for name, change in LABEL_H5.items():
    CASES.append((f'label h5: {name}', 'train --input_label_h5',
                  lambda ds, folder, c=change: _h5(ds, folder, c)))
for name, change in VOCAB_JSON.items():
    CASES.append((f'cocotalk json: {name}', 'train --input_json',
                  lambda ds, folder, c=change: _edited_json(ds.input_json, folder, 'cocotalk.json', c)))
CASES.append(('cocotalk json: a folder', 'train --input_json', lambda ds, folder: folder))
CASES.append(('cocotalk json: truncated', 'train --input_json',
              lambda ds, folder: _json(folder, 'c.json', None, open(ds.input_json).read()[:50])))
for name, how in REF_JSON.items():
    CASES.append((f'ref json: {name}', 'eval --ref_json', lambda ds, folder, h=how: _ref(ds, folder, h)))
    CASES.append((f'ref json: {name}', 'train --ref_json', lambda ds, folder, h=how: _ref(ds, folder, h)))
for name, obj in {'a list': [1, 2], 'no opt': {'vocab': {}}, 'opt a dict': {'opt': {}, 'vocab': {}},
                  'not a pickle': None}.items():
    CASES.append((f'infos: {name}', 'eval --infos_path',
                  lambda ds, folder, o=obj: _pickle(folder, 'infos.pkl', o) if o is not None
                  else _json(folder, 'infos.pkl', None, 'not a pickle')))
CASES.append(('infos: a folder', 'eval --infos_path', lambda ds, folder: folder))
FEATURES = {
    'a json file': lambda ds, folder: ds.input_json,
    'an .h5 folder': lambda ds, folder: (os.makedirs(os.path.join(folder, 'att.h5')), os.path.join(folder, 'att.h5'))[1],
    'an .lmdb of junk': lambda ds, folder: _json(folder, 'att.lmdb', None, 'junk' * 100),
    'an .npz that is not one': lambda ds, folder: (shutil.copytree(ds.att_dir, os.path.join(folder, 'att')),
                                                    [open(os.path.join(folder, 'att', n), 'w').write('junk')
                                                     for n in os.listdir(os.path.join(folder, 'att'))],
                                                    os.path.join(folder, 'att'))[2],
}
for name, make in FEATURES.items():
    CASES.append((f'features: {name}', 'train --input_att_dir', make))
for name, obj in {'a list': [1], 'no opt': {'vocab': {}, 'iter': 3}}.items():
    CASES.append((f'infos: {name}', 'train --start_from infos', lambda ds, folder, o=obj: o))
for name, obj in {'a list': [1], 'loss_history a list': {'loss_history': [1.0]}}.items():
    CASES.append((f'histories: {name}', 'train --start_from histories', lambda ds, folder, o=obj: o))
for name, entry in {'non-integer id': {'image_id': 'abc', 'caption': ['a man']},
                    'non-string caption': {'image_id': 1000, 'caption': [3, 4]},
                    'caption a dict': {'image_id': 1000, 'caption': {'a': 1}},
                    'no caption': {'image_id': 1000}}.items():
    CASES.append((f'teacher json: {name}', 'prepro_labels_seqKD --teacher_json',
                  lambda ds, folder, e=entry: _json(folder, 'teacher.json', [e])))
KARPATHY = {
    'a sentence without tokens': lambda d: d['images'][2]['sentences'][0].pop('tokens'),
    'tokens a string': lambda d: d['images'][1]['sentences'][0].__setitem__('tokens', 'a man'),
    'sentences a dict': lambda d: d['images'][0].__setitem__('sentences', {}),
    'an image a list': lambda d: d['images'].__setitem__(0, []),
}
for script in ('prepro_labels', 'prepro_ngrams', 'prepro_labels_seqKD'):
    for name, change in KARPATHY.items():
        CASES.append((f'karpathy json: {name}', f'{script} --input_json', _karpathy(change)))
CASES.append(('karpathy json: a sentence without tokens or raw', 'prepro_reference_json --input_json',
              _karpathy(lambda d: [d['images'][2]['sentences'][0].pop(k) for k in ('tokens', 'raw')])))
CASES.append(('vocabulary json: ix_to_word a list', 'prepro_ngrams --dict_json',
              lambda ds, folder: _edited_json(ds.input_json, folder, 'cocotalk.json', VOCAB_JSON['ix_to_word a list'])))


def _start_from(ds, tmp_path, which, obj):
    """A finished 1-iteration run whose infos or histories is replaced by obj, resumed."""
    folder = tmp_path / 'run'
    assert run_main(targs(ds, folder, '--max_iters', '1'), tmp_path)[0] == 0
    path = str(folder / f'{which}_run.pkl')
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=2)
    return path, run_main(targs(ds, folder, '--max_iters', '2', '--start_from', str(folder)), tmp_path)


def _run(ds, checkpoint, tmp_path, entry, bad):
    w = str(tmp_path / 'out')
    model, infos = checkpoint
    if entry.startswith('train --start_from'):
        return _start_from(ds, tmp_path, entry.split()[-1], bad)
    if entry == 'train --ref_json':
        return bad, _train(ds, tmp_path, '--ref_json', bad, '--language_eval', '1')
    if entry.startswith('train '):
        return bad, _train(ds, tmp_path, entry.split()[1], bad)
    if entry == 'eval --ref_json':
        argv = ['--model', model, '--infos_path', infos, '--language_eval', '1', '--ref_json', bad]
        return bad, run_main(argv, tmp_path, eval_script.main)
    if entry == 'eval --infos_path':
        return bad, run_main(['--model', model, '--infos_path', bad], tmp_path, eval_script.main)
    script, flag = entry.split()
    args = {'--input_json': ds.dataset_json, '--dict_json': ds.input_json}
    args[flag] = bad
    argv = {'prepro_labels': ['--input_json', args['--input_json'], '--output_json', w + '.json', '--output_h5', w],
            'prepro_ngrams': ['--input_json', args['--input_json'], '--dict_json', args['--dict_json'],
                              '--output_pkl', w],
            'prepro_reference_json': ['--input_json', args['--input_json'], '--output_json', w + '.json'],
            'prepro_labels_seqKD': ['--input_json', args['--input_json'], '--dict_json', args['--dict_json'],
                                    '--teacher_json', args.get('--teacher_json', _json(str(tmp_path), 't.json', [])),
                                    '--output_h5', w]}[script]
    module = {'prepro_labels': prepro_labels, 'prepro_ngrams': prepro_ngrams,
              'prepro_reference_json': prepro_reference_json, 'prepro_labels_seqKD': prepro_labels_seqKD}[script]
    return bad, run_main(argv, tmp_path, module.main)


@pytest.mark.parametrize('name, entry, corrupt', CASES, ids=[f'{e} | {n}' for n, e, _ in CASES])
def test_corrupted_input_file_is_one_line_naming_it(tiny_dataset, checkpoint, tmp_path, monkeypatch, name, entry,
                                                    corrupt):
    from models.sat import SATModel as Model

    def no_decoding(*args, **kwargs):
        raise AssertionError('decoding started before the bad file was refused')
    if entry.startswith('eval'):
        monkeypatch.setattr(Model, 'decode', no_decoding)
    folder = tmp_path / 'bad'
    folder.mkdir()
    bad = corrupt(tiny_dataset, str(folder))
    path, result = _run(tiny_dataset, checkpoint, tmp_path, entry, bad)
    assert_one_line_error(result, str(path))
    assert not os.path.exists(tmp_path / 'out_label.h5') and not os.path.exists(tmp_path / 'out.json')


def test_max_length_below_one_is_refused(tiny_dataset, tmp_path):
    for module, extra in ((prepro_labels, ['--output_json', str(tmp_path / 'o.json')]),
                          (prepro_labels_seqKD, ['--dict_json', tiny_dataset.input_json, '--teacher_json', 'x'])):
        for value in ('-1', '0'):
            result = run_main(['--input_json', tiny_dataset.dataset_json, '--output_h5', str(tmp_path / 'o'),
                               '--max_length', value, *extra], tmp_path, module.main)
            assert_one_line_error(result, f'--max_length {value}')
    assert os.listdir(tmp_path) == []


def test_a_truncated_demo_stamp_rebuilds(tmp_path, monkeypatch, capsys):
    """The stamp only records a finished build: a damaged one is noted and the demo rebuilt (no traceback)."""
    out = tmp_path / 'demo'
    out.mkdir()
    (out / make_demo_data.STAMP).write_text('{"args": {"vers')
    built = []
    monkeypatch.setattr(make_demo_data, 'build_dataset', lambda args: built.append(1) or (_ for _ in ()).throw(
        KeyboardInterrupt))
    args = make_demo_data.parse_args(['--output_dir', str(out)])
    with pytest.raises(KeyboardInterrupt):
        make_demo_data.run(args)
    assert built and 'demo stamp' in capsys.readouterr().err


# ---- ensembles ------------------------------------------------------------------------------------------------------
def _normed_infos(checkpoint, folder, norm):
    os.makedirs(folder, exist_ok=True)
    model_path = os.path.join(folder, 'model.pth')
    shutil.copy(checkpoint[0], model_path)
    infos = load_pickle(checkpoint[1])
    infos['opt'].norm_att_feat = norm
    save_pickle(infos, os.path.join(folder, 'infos_tiny.pkl'))
    return model_path, os.path.join(folder, 'infos_tiny.pkl')


@pytest.fixture(scope='module')
def two_members(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp('members')
    torch.manual_seed(3)
    a = tiny_checkpoint(tiny_dataset, str(root / 'a0'), train_steps=20)
    torch.manual_seed(4)
    b = tiny_checkpoint(tiny_dataset, str(root / 'b0'), train_steps=20)
    return _normed_infos(a, str(root / 'a'), 1), _normed_infos(b, str(root / 'b'), 0)


ENSEMBLE = ['--language_eval', '0', '--batch_size', '3', '--device', 'cpu', '--num_workers', '0', '--split', 'train',
            '--num_images', '10', '--beam_size', '2']


def _captions(tmp_path, run_id):
    with open(tmp_path / 'vis' / f'{run_id}.json') as f:
        return {p['image_id']: p['caption'] for p in json.load(f)}


def test_member_order_does_not_change_the_captions(two_members, tmp_path):
    """Was: the loader took the first member's --norm_att_feat, so the other member got features it was not
    trained on."""
    (ma, ia), (mb, ib) = two_members
    for run_id, models, infos, weights in (('ab', [ma, mb], [ia, ib], ['1', '3']),
                                           ('ba', [mb, ma], [ib, ia], ['3', '1'])):
        rc, out, err = run_main(['--models', *models, '--infos_paths', *infos, '--weights', *weights, '--id', run_id,
                                 *ENSEMBLE], tmp_path, eval_ensemble.main)
        assert rc == 0, err
    assert _captions(tmp_path, 'ab') == _captions(tmp_path, 'ba')


def test_member_normalising_its_features_matches_the_loader():
    """EnsembleModel's per-member normalisation is the loader's --norm_att_feat 1: a one-member ensemble that
    normalises decodes as the member on normalised features."""
    torch.manual_seed(0)
    member = tiny_sat(att_feat_size=12).eval()
    att, masks = masked_batch(feat=12)
    norm = att.norm(dim=-1, keepdim=True)
    normalised = att / torch.where(norm > 0, norm, torch.ones_like(norm))
    with torch.no_grad():
        expected, _ = member.decode(normalised, masks)
        got, _ = EnsembleModel([member], normalise=[True]).decode(att, masks)
        plain, _ = EnsembleModel([member], normalise=[False]).decode(att, masks)
    assert torch.equal(got, expected)
    assert not torch.isnan(normalised).any()
    assert plain.shape == got.shape


@pytest.mark.parametrize('weights', [['nan', '1'], ['inf', '1'], ['0', '1'], ['-1', '2']])
def test_weights_must_be_finite_and_positive(two_members, tmp_path, weights):
    (ma, ia), (mb, ib) = two_members
    result = run_main(['--models', ma, mb, '--infos_paths', ia, ib, '--weights', *weights, *ENSEMBLE], tmp_path,
                      eval_ensemble.main)
    assert_one_line_error(result, '--weights', 'finite number > 0')


def test_huge_weights_are_normalised_without_overflow(two_members, tmp_path):
    (ma, ia), (mb, ib) = two_members
    rc, out, err = run_main(['--models', ma, mb, '--infos_paths', ia, ib, '--weights', '1e308', '1e308', '--id', 'big',
                             *ENSEMBLE], tmp_path, eval_ensemble.main)
    assert rc == 0, err
    assert 'weights 0.5, 0.5' in out
    assert all(_captions(tmp_path, 'big').values())


def test_members_reading_other_feature_files_are_refused(two_members, tmp_path):
    (ma, ia), (mb, ib) = two_members
    other = _normed_infos((mb, ib), str(tmp_path / 'c'), 0)
    infos = load_pickle(other[1])
    infos['opt'].input_att_dir = str(tmp_path / 'elsewhere')
    save_pickle(infos, other[1])
    result = run_main(['--models', ma, other[0], '--infos_paths', ia, other[1], *ENSEMBLE], tmp_path,
                      eval_ensemble.main)
    assert_one_line_error(result, '--input_att_dir', ma, other[0])
