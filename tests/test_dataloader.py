"""dataloader.py: the SPEC batch dict, the three feature backends, splits, caption windows, resumable iterators,
sharding, and one-line errors for bad input."""
import copy
import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch

from dataloader import DataConfig, DataLoader, repeat_per_caption
from misc.errors import SaticError
from tests.helpers import copy_dataset, make_tiny_dataset, one_line_error

S = 5


def read_label_file(ds):
    with h5py.File(ds.label_h5, 'r') as f:
        return f['labels'][()], f['label_start_ix'][()], f['label_end_ix'][()]


def batches(loader, split, n, batch_size=None):
    return [loader.get_batch(split, batch_size) for _ in range(n)]


def assert_same_batch(a, b):
    for k in ('fc_feats', 'att_feats', 'att_masks', 'labels', 'masks'):
        if a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None, k
        else:
            assert torch.equal(a[k], b[k]), k
    assert a['infos'] == b['infos'] and a['bounds'] == b['bounds']
    assert len(a['gts']) == len(b['gts']) and all(np.array_equal(x, y) for x, y in zip(a['gts'], b['gts']))


def test_batch_dict(tiny_dataset):
    ds = tiny_dataset
    labels, start, end = read_label_file(ds)
    with DataLoader(DataConfig.from_opt(ds.opt(batch_size=3, use_fc_feats=True))) as loader:
        assert loader.vocab_size == ds.vocab_size and loader.seq_length == 16
        assert loader.fc_feat_size == loader.att_feat_size == ds.feat_dim
        with open(ds.input_json) as f:
            assert loader.get_vocab() == json.load(f)['ix_to_word']
        for split in ('train', 'val', 'test'):
            raw = loader.get_batch(split)  # features once per image
            B, N, D = 3, raw['att_feats'].shape[1], ds.feat_dim
            assert raw['att_feats'].shape == (B, N, D) and raw['fc_feats'].shape == (B, D) and raw['seq_per_img'] == S
            batch = repeat_per_caption(raw)  # the reference's layout: once per caption
            assert batch['fc_feats'].shape == (B * S, D) and batch['fc_feats'].dtype == torch.float32
            assert batch['att_feats'].shape == (B * S, N, D) and batch['att_feats'].dtype == torch.float32
            assert batch['labels'].shape == (B * S, 18) and batch['labels'].dtype == torch.int64
            assert batch['masks'].shape == (B * S, 18) and batch['masks'].dtype == torch.float32
            assert (batch['labels'][:, 0] == 0).all() and (batch['labels'][:, -1] == 0).all()
            n_words = (batch['labels'] > 0).sum(1)
            for r in range(B * S):
                assert batch['masks'][r].tolist() == [1.0] * (n_words[r] + 2) + [0.0] * (16 - n_words[r])
            for b, info in enumerate(batch['infos']):
                ix = info['ix']
                assert set(info) == {'ix', 'id', 'file_path'} and info['id'] == loader.images[ix]['id']
                feat = np.load(os.path.join(ds.att_dir, f"{info['id']}.npz"))['feat']
                rows = slice(b * S, (b + 1) * S)
                assert torch.equal(batch['att_feats'][rows, :len(feat)], torch.from_numpy(feat).expand(S, -1, -1))
                assert (batch['att_feats'][rows, len(feat):] == 0).all()
                if batch['att_masks'] is not None:
                    assert batch['att_masks'][rows].sum(1).tolist() == [float(len(feat))] * S
                np.testing.assert_allclose(batch['fc_feats'][b * S].numpy(), feat.mean(0), rtol=1e-6)
                mine = labels[start[ix] - 1:end[ix]]
                np.testing.assert_array_equal(batch['gts'][b], mine)
                for r in range(b * S, (b + 1) * S):  # every caption row is one of the image's
                    assert any((batch['labels'][r, 1:17].numpy() == m).all() for m in mine)
            n = len(loader.split_ix[split])  # 10 train, 3 val, 3 test: val and test end exactly here
            assert batch['bounds'] == {'it_pos_now': 3 % n, 'it_max': n, 'wrapped': n == 3}


def test_caption_windows_and_replacement(tiny_dataset):
    labels, start, end = read_label_file(tiny_dataset)
    with DataLoader(DataConfig.from_opt(tiny_dataset.opt(batch_size=13))) as loader:
        batch = loader.get_batch('train')
    for b, info in enumerate(batch['infos']):
        ix = info['ix']
        n = end[ix] - start[ix] + 1
        got = batch['labels'][b * S:(b + 1) * S, 1:17].numpy()
        if n >= S:  # a contiguous window of S captions
            offsets = [o for o in range(n - S + 1) if (labels[start[ix] - 1 + o:start[ix] - 1 + o + S] == got).all()]
            assert offsets, f'image {ix}: not a window'


def test_backends_identical(tiny_dataset):
    got = {}
    for backend in ('dir', 'lmdb', 'h5'):
        with DataLoader(DataConfig.from_opt(tiny_dataset.opt(backend, batch_size=4, num_workers=2))) as loader:
            got[backend] = batches(loader, 'train', 5) + batches(loader, 'val', 2)
    for backend in ('lmdb', 'h5'):
        for a, b in zip(got['dir'], got[backend]):
            assert_same_batch(a, b)


def test_att_masks_none_when_box_counts_equal(tmp_path, tiny_dataset):
    equal = make_tiny_dataset(tmp_path, n_train=4, n_val=2, n_test=2, boxes=(5, 5))
    with DataLoader(DataConfig.from_opt(equal.opt(batch_size=3))) as loader:
        assert all(b['att_masks'] is None for b in batches(loader, 'train', 3))
    with DataLoader(DataConfig.from_opt(tiny_dataset.opt(batch_size=10))) as loader:
        batch = loader.get_batch('train')
    assert batch['att_masks'] is not None and batch['att_masks'].shape == batch['att_feats'].shape[:2]
    assert batch['att_masks'].dtype == torch.float32 and set(batch['att_masks'].unique().tolist()) == {0.0, 1.0}


def test_restval_in_train_unless_train_only(tiny_dataset):
    with DataLoader(DataConfig.from_opt(tiny_dataset.opt())) as loader:
        split_of = {ix: img['split'] for ix, img in enumerate(loader.images)}
        assert sorted(split_of[ix] for ix in loader.split_ix['train']).count('restval') == 2
        assert len(loader.split_ix['train']) == 10 and len(loader.split_ix['val']) == 3
    with DataLoader(DataConfig.from_opt(tiny_dataset.opt(train_only=1))) as loader:
        assert {split_of[ix] for ix in loader.split_ix['train']} == {'train'} and len(loader.split_ix['train']) == 8
    with DataLoader(DataConfig.from_opt(tiny_dataset.opt(num_images=2))) as loader:
        assert [len(loader.split_ix[s]) for s in ('train', 'val', 'test')] == [2, 2, 2]


def test_epochs_wrap_and_shuffle(tiny_dataset):
    with DataLoader(DataConfig.from_opt(tiny_dataset.opt(batch_size=4))) as loader:
        seen = []
        for _ in range(5):  # 20 images = 2 epochs of 10
            b = loader.get_batch('train')
            seen += [i['ix'] for i in b['infos']]
        assert sorted(seen[:10]) == sorted(seen[10:20]) == sorted(loader.split_ix['train'])
        assert seen[:10] != seen[10:20]  # reshuffled
        val = [loader.get_batch('val', 2) for _ in range(2)]
        assert [v['bounds']['wrapped'] for v in val] == [False, True]  # 3 val images: the 2nd batch wraps
        assert [i['ix'] for v in val for i in v['infos']] == loader.split_ix['val'] + loader.split_ix['val'][:1]
        assert val[0]['labels'].shape[0] == 2 * S  # val also repeats each image seq_per_img times
        loader.reset_iterator('val')
        assert loader.get_batch('val', 2)['infos'] == val[0]['infos']


@pytest.mark.parametrize('workers', [0, 2])
def test_resume_exact(tiny_dataset, workers):
    opt = tiny_dataset.opt(batch_size=3, num_workers=workers)
    with DataLoader(DataConfig.from_opt(opt)) as a:
        batches(a, 'train', 2)
        a.get_batch('val')
        state = copy.deepcopy(a.state_dict())
        assert set(state) == {'iterators', 'split_ix'}
        expect = batches(a, 'train', 9) + batches(a, 'val', 2)  # crosses epoch boundaries
    with DataLoader(DataConfig.from_opt(opt)) as b:
        b.load_state_dict(state)
        got = batches(b, 'train', 9) + batches(b, 'val', 2)
    for x, y in zip(expect, got):
        assert_same_batch(x, y)


def test_prefetch_does_not_change_content(tiny_dataset):
    runs = []
    for workers in (0, 3):
        with DataLoader(DataConfig.from_opt(tiny_dataset.opt(batch_size=3, num_workers=workers))) as loader:
            runs.append(batches(loader, 'train', 8) + batches(loader, 'test', 2, batch_size=2))
    for x, y in zip(*runs):
        assert_same_batch(x, y)


def test_sharding(tiny_dataset):
    loaders = [DataLoader(DataConfig.from_opt(tiny_dataset.opt(batch_size=5)), rank=r, world_size=2) for r in range(2)]
    try:
        assert loaders[0].split_ix['train'] == loaders[1].split_ix['train']  # same shuffled order everywhere
        first = [[i['ix'] for i in l.get_batch('train')['infos']] for l in loaders]
        assert not set(first[0]) & set(first[1]) and set(first[0] + first[1]) == set(loaders[0].split_ix['train'])
        assert loaders[0].get_batch('val', 3)['infos'] == loaders[1].get_batch('val', 3)['infos']  # val is whole
    finally:
        for l in loaders:
            l.close()


def test_label_h5_none(tiny_dataset):
    with DataLoader(DataConfig.from_opt(tiny_dataset.opt(input_label_h5='none', batch_size=2))) as loader:
        batch = loader.get_batch('test')
        assert loader.seq_length == 16
    assert batch['labels'] is None and batch['masks'] is None and batch['gts'] is None
    assert batch['att_feats'].shape[0] == 2 and repeat_per_caption(batch)['att_feats'].shape[0] == 2 * S


# ---- bad input: one line naming the file (and image) ----

def train_image_id(ds, k=3):
    with DataLoader(DataConfig.from_opt(ds.opt())) as loader:
        return loader.images[loader.split_ix['train'][k]]['id']


def test_error_missing_feature_file(tmp_path, tiny_dataset):
    root = copy_dataset(tiny_dataset, tmp_path)
    iid = train_image_id(tiny_dataset)
    os.remove(os.path.join(root, 'cocobu_att', f'{iid}.npz'))
    opt = tiny_dataset.opt(input_att_dir=os.path.join(root, 'cocobu_att'), batch_size=10, num_workers=2)
    with DataLoader(DataConfig.from_opt(opt)) as loader, pytest.raises(SaticError) as e:
        loader.get_batch('train')
    one_line_error(e, os.path.join(root, 'cocobu_att', f'{iid}.npz'), f'image {iid}')


def test_error_image_absent_from_h5(tmp_path, tiny_dataset):
    iid = train_image_id(tiny_dataset)
    path = str(tmp_path / 'att.h5')
    with h5py.File(tiny_dataset.att_h5, 'r') as src, h5py.File(path, 'w') as dst:
        for key in src:
            if key != str(iid):
                dst.create_dataset(key, data=src[key][()])
    with DataLoader(DataConfig.from_opt(tiny_dataset.opt('h5', input_att_dir=path, batch_size=10))) as loader, \
            pytest.raises(SaticError) as e:
        loader.get_batch('train')
    one_line_error(e, path, f'image {iid}')


def test_error_truncated_feature_h5(tmp_path, tiny_dataset):
    path = str(tmp_path / 'att.h5')
    data = open(tiny_dataset.att_h5, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])
    with pytest.raises(SaticError) as e:
        DataLoader(DataConfig.from_opt(tiny_dataset.opt('h5', input_att_dir=path)))
    one_line_error(e, path, 'image ')


def test_error_truncated_feature_file(tmp_path, tiny_dataset):
    root = copy_dataset(tiny_dataset, tmp_path)
    iid = train_image_id(tiny_dataset)
    path = os.path.join(root, 'cocobu_att', f'{iid}.npz')
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])
    with DataLoader(DataConfig.from_opt(tiny_dataset.opt(input_att_dir=os.path.join(root, 'cocobu_att'), batch_size=10))) as loader, \
            pytest.raises(SaticError) as e:
        loader.get_batch('train')
    one_line_error(e, path, f'image {iid}')


def test_error_missing_lmdb_entry(tmp_path, tiny_dataset):
    from scripts import dump_to_lmdb
    root = copy_dataset(tiny_dataset, tmp_path)
    iid = train_image_id(tiny_dataset)
    os.remove(os.path.join(root, 'cocobu_fc', f'{iid}.npy'))
    path = str(tmp_path / 'fc.lmdb')
    dump_to_lmdb.run(dump_to_lmdb.parse_args(['--folder', os.path.join(root, 'cocobu_fc'), '--output_file', path]))
    with DataLoader(DataConfig.from_opt(tiny_dataset.opt('lmdb', input_fc_dir=path, batch_size=10, use_fc_feats=True))) as loader, \
            pytest.raises(SaticError) as e:
        loader.get_batch('train')
    one_line_error(e, path, f'image {iid}')


def test_error_truncated_label_h5(tmp_path, tiny_dataset):
    path = str(tmp_path / 'label.h5')
    data = open(tiny_dataset.label_h5, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])
    with pytest.raises(SaticError) as e:
        DataLoader(DataConfig.from_opt(tiny_dataset.opt(input_label_h5=path)))
    one_line_error(e, path)


def test_error_label_h5_from_other_dataset(tmp_path, tiny_dataset):
    other = make_tiny_dataset(tmp_path, n_train=3, n_val=1, n_test=1)
    with pytest.raises(SaticError) as e:
        DataLoader(DataConfig.from_opt(tiny_dataset.opt(input_label_h5=other.label_h5)))
    one_line_error(e, other.label_h5, tiny_dataset.input_json)


def test_error_label_vocabulary(tmp_path, tiny_dataset):
    path = str(tmp_path / 'label.h5')
    shutil.copy(tiny_dataset.label_h5, path)
    with h5py.File(path, 'a') as f:
        del f.attrs['vocab_sha1']  # a reference-made file: no attrs, so only the id range is checked
        labels = f['labels'][()]
        labels[4, 0] = tiny_dataset.vocab_size + 1
        f['labels'][...] = labels
    with pytest.raises(SaticError) as e:
        DataLoader(DataConfig.from_opt(tiny_dataset.opt(input_label_h5=path)))
    one_line_error(e, path, f'word id {tiny_dataset.vocab_size + 1}')
    shutil.copy(tiny_dataset.label_h5, path)
    with h5py.File(path, 'a') as f:
        f.attrs['vocab_sha1'] = '0' * 40
    with pytest.raises(SaticError, match='another vocabulary'):
        DataLoader(DataConfig.from_opt(tiny_dataset.opt(input_label_h5=path)))


def test_fc_features_are_read_only_when_asked(tmp_path, tiny_dataset, monkeypatch):
    """By default (DataConfig.use_fc_feats False: no model takes them) the loader never opens --input_fc_dir: a data
    folder without fc features works, batches hold fc_feats None and everything else is as with them."""
    import dataloader
    opened, real_reader = [], dataloader.FeatureReader

    def reader(path, ext, flag):
        opened.append(flag)
        return real_reader(path, ext, flag)
    monkeypatch.setattr(dataloader, 'FeatureReader', reader)
    assert DataConfig().use_fc_feats is False
    missing = str(tmp_path / 'no_fc_here')
    with DataLoader(DataConfig.from_opt(tiny_dataset.opt(input_fc_dir=missing, batch_size=3, num_workers=2))) as without, \
            DataLoader(DataConfig.from_opt(tiny_dataset.opt(batch_size=3, num_workers=2, use_fc_feats=True))) as with_fc:
        assert without.fc_feat_size is None and with_fc.fc_feat_size == without.att_feat_size == tiny_dataset.feat_dim
        for split in ('train', 'val', 'train', 'test'):
            a, b = without.get_batch(split), with_fc.get_batch(split)
            assert a['fc_feats'] is None and b['fc_feats'] is not None
            assert_same_batch({**a, 'fc_feats': None}, {**b, 'fc_feats': None})
            assert repeat_per_caption(a)['fc_feats'] is None
    assert opened == ['--input_att_dir', '--input_fc_dir', '--input_att_dir']


def test_error_missing_paths(tmp_path, tiny_dataset):
    with pytest.raises(SaticError) as e:
        DataLoader(DataConfig.from_opt(tiny_dataset.opt(input_fc_dir=str(tmp_path / 'nope'), use_fc_feats=True)))
    one_line_error(e, str(tmp_path / 'nope'), '--input_fc_dir')
    with pytest.raises(SaticError) as e:
        DataLoader(DataConfig.from_opt(tiny_dataset.opt(input_json=str(tmp_path / 'nope.json'))))
    one_line_error(e, str(tmp_path / 'nope.json'))
