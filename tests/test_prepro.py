"""scripts/: prepro_labels, prepro_labels_seqKD, prepro_ngrams, make_bu_data, dump_to_lmdb, prepro_cocotest,
prepro_reference_json and make_demo_data, checked field by field on hand-made inputs."""
import json
import os
import pickle
import shutil

import h5py
import numpy as np
import pytest

from misc.errors import SaticError
from scripts import (dump_to_lmdb, make_bu_data, make_demo_data, prepro_cocotest, prepro_labels, prepro_labels_seqKD,
                     prepro_ngrams, prepro_reference_json)
from misc.files.vocabulary import vocab_sha1

LONG = ['a', 'dog'] * 9  # 18 words: cut to 16


def sent(tokens, raw=None):
    return {'tokens': tokens, 'raw': raw or ' '.join(tokens)}


def three_images():
    """3 images; with threshold 1, 'a' and 'dog' survive and runs/sleeps/cat/zebra become UNK."""
    return {'images': [
        {'split': 'train', 'filepath': 'train2014', 'filename': 'x10.jpg', 'cocoid': 10, 'imgid': 0,
         'sentences': [sent(['a', 'dog', 'runs']), sent(['a', 'dog', 'sleeps'])]},
        {'split': 'val', 'filepath': 'val2014', 'filename': 'x20.jpg', 'cocoid': 20, 'imgid': 1,
         'sentences': [sent(['a', 'cat']), sent(LONG)]},
        {'split': 'restval', 'filepath': 'val2014', 'filename': 'x30.jpg', 'cocoid': 30, 'imgid': 2,
         'sentences': [sent(['zebra', 'a', 'dog'])]},
    ], 'dataset': 'coco'}


def write_json(obj, path):
    with open(path, 'w') as f:
        json.dump(obj, f)
    return str(path)


def run_labels(tmp_path, dataset, threshold):
    src = write_json(dataset, tmp_path / 'dataset_coco.json')
    assert prepro_labels.main(['--input_json', src, '--output_json', str(tmp_path / 'cocotalk.json'),
                               '--output_h5', str(tmp_path / 'cocotalk'), '--word_count_threshold', str(threshold)]) == 0
    with open(tmp_path / 'cocotalk.json') as f:
        out = json.load(f)
    with h5py.File(tmp_path / 'cocotalk_label.h5', 'r') as f:
        h5 = {k: f[k][()] for k in f}
        attrs = dict(f.attrs)
    return src, out, h5, attrs


def test_prepro_labels_fields(tmp_path):
    _, out, h5, attrs = run_labels(tmp_path, three_images(), threshold=1)
    assert out['ix_to_word'] == {'1': 'a', '2': 'dog', '3': 'UNK'}  # UNK last, because words were dropped
    assert out['images'] == [{'split': 'train', 'file_path': 'train2014/x10.jpg', 'id': 10},
                             {'split': 'val', 'file_path': 'val2014/x20.jpg', 'id': 20},
                             {'split': 'restval', 'file_path': 'val2014/x30.jpg', 'id': 30}]
    for k in ('labels', 'label_start_ix', 'label_end_ix', 'label_length'):
        assert h5[k].dtype == np.uint32, k
    assert h5['labels'].shape == (5, 16)
    np.testing.assert_array_equal(h5['label_start_ix'], [1, 3, 5])  # 1-indexed, inclusive
    np.testing.assert_array_equal(h5['label_end_ix'], [2, 4, 5])
    np.testing.assert_array_equal(h5['label_length'], [3, 3, 2, 16, 3])
    expect = np.zeros((5, 16), dtype=np.uint32)
    expect[0, :3] = [1, 2, 3]
    expect[1, :3] = [1, 2, 3]
    expect[2, :2] = [1, 3]
    expect[3, :] = [1, 2] * 8  # truncated at 16
    expect[4, :3] = [3, 1, 2]
    np.testing.assert_array_equal(h5['labels'], expect)
    assert attrs['vocab_size'] == 3 and attrs['vocab_sha1'] == vocab_sha1(out['ix_to_word'])


def test_prepro_labels_no_unk_when_nothing_dropped(tmp_path):
    _, out, h5, _ = run_labels(tmp_path, three_images(), threshold=0)
    assert list(out['ix_to_word'].values()) == ['a', 'dog', 'runs', 'sleeps', 'cat', 'zebra']  # first occurrence
    assert 'UNK' not in out['ix_to_word'].values()
    assert h5['labels'].max() == 6


def test_prepro_labels_image_without_captions(tmp_path, capsys):
    data = three_images()
    data['images'][1]['sentences'] = []
    src = write_json(data, tmp_path / 'd.json')
    assert prepro_labels.main(['--input_json', src, '--output_h5', str(tmp_path / 'x'),
                               '--output_json', str(tmp_path / 'x.json')]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and src in err and 'image 20' in err and '\n' not in err


def brute_force_df(dataset, wtoi):
    """n-gram -> set of images, by explicit loops over every train/restval reference."""
    df, n_images = {}, 0
    for img in dataset['images']:
        if img['split'] not in ('train', 'restval'):
            continue
        n_images += 1
        for s in img['sentences']:
            ids = [str(wtoi.get(w, wtoi.get('UNK'))) for w in s['tokens']] + ['0']
            for n in (1, 2, 3, 4):
                for i in range(len(ids) - n + 1):
                    df.setdefault(tuple(ids[i:i + n]), set()).add(img['cocoid'])
    return {g: float(len(v)) for g, v in df.items()}, n_images


def test_prepro_ngrams_matches_brute_force(tmp_path):
    dataset = three_images()
    src, out, _, _ = run_labels(tmp_path, dataset, threshold=1)
    assert prepro_ngrams.main(['--input_json', src, '--dict_json', str(tmp_path / 'cocotalk.json'),
                               '--output_pkl', str(tmp_path / 'coco-train'), '--split', 'train']) == 0
    raw = (tmp_path / 'coco-train-idxs.p').read_bytes()
    assert raw[:2] == b'\x80\x02'  # pickle protocol 2
    data = pickle.loads(raw)
    wtoi = {w: int(i) for i, w in out['ix_to_word'].items()}
    expect, n_images = brute_force_df(dataset, wtoi)
    assert data['ref_len'] == n_images == 2  # train + restval images, not captions
    assert dict(data['document_frequency']) == expect
    assert data['document_frequency'][('1', '2', '3', '0')] == 1.0  # 'a dog runs' -> OOV 'runs' is UNK (3)
    assert data['document_frequency'][('1', '2')] == 2.0  # 'a dog' in both images (3 references): df 2
    assert all(isinstance(g, tuple) and all(isinstance(t, str) for t in g) for g in data['document_frequency'])
    # a tiny dataset's 16+ word captions are not cut
    words = pickle.loads((tmp_path / 'coco-train-words.p').read_bytes())
    assert words['ref_len'] == 2 and words['document_frequency'][('UNK', 'a', 'dog', '<eos>')] == 1.0


def test_prepro_labels_seqkd(tmp_path):
    dataset = three_images()
    src, out, h5, attrs = run_labels(tmp_path, dataset, threshold=1)
    teacher = [{'image_id': 10, 'caption': ['a dog', 'a a dog', 'dog', 'a dog dog', 'zzz dog']},
               {'image_id': 20, 'caption': ['dog dog', 'dog']}]  # val: keeps its ground truth
    tj = write_json(teacher, tmp_path / 'teacher.json')
    assert prepro_labels_seqKD.main(['--input_json', src, '--dict_json', str(tmp_path / 'cocotalk.json'),
                                     '--teacher_json', tj, '--output_h5', str(tmp_path / 'kd')]) == 0
    with h5py.File(tmp_path / 'kd_label.h5', 'r') as f:
        kd = {k: f[k][()] for k in f}
        kd_attrs = dict(f.attrs)
    assert kd_attrs['vocab_sha1'] == attrs['vocab_sha1']
    np.testing.assert_array_equal(kd['label_start_ix'], [1, 6, 8])
    np.testing.assert_array_equal(kd['label_end_ix'], [5, 7, 8])
    np.testing.assert_array_equal(kd['labels'][:5, :3], [[1, 2, 0], [1, 1, 2], [2, 0, 0], [1, 2, 2], [3, 2, 0]])
    np.testing.assert_array_equal(kd['labels'][5:], h5['labels'][2:])  # val and restval without teacher: ground truth
    assert kd['labels'].dtype == np.uint32


def tsv_line(iid, boxes, feats, pad=True):
    return make_bu_data.format_row(iid, 640, 480, boxes, feats, pad)


def test_make_bu_data_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / 'feats').mkdir()
    rows = {}
    with open(tmp_path / 'feats' / 'a.tsv', 'w') as f:
        for iid, n, d, pad in ((1, 1, 5, True), (2, 1, 7, False), (3, 2, 5, False)):
            boxes = rng.uniform(0, 100, (n, 4)).astype(np.float32)
            feats = rng.standard_normal((n, d)).astype(np.float32)
            line = tsv_line(iid, boxes, feats, pad)
            if not pad:  # these byte counts (16, 28, 32, 40) need '=' padding, which the row lacks
                fields = line.rstrip('\n').split('\t')
                assert len(fields[4]) % 4 and len(fields[5]) % 4 and '=' not in fields[4] + fields[5]
            rows[iid] = (boxes, feats)
            f.write(line)
    out = str(tmp_path / 'bu')
    assert make_bu_data.main(['--downloaded_feats', str(tmp_path / 'feats'), '--output_dir', out,
                              '--num_workers', '1']) == 0
    for iid, (boxes, feats) in rows.items():
        with np.load(f'{out}_att/{iid}.npz') as z:
            np.testing.assert_array_equal(z['feat'], feats)
            assert z['feat'].dtype == np.float32
        np.testing.assert_allclose(np.load(f'{out}_fc/{iid}.npy'), feats.mean(0), rtol=1e-6)
        np.testing.assert_array_equal(np.load(f'{out}_box/{iid}.npy'), boxes)


def test_make_bu_data_bad_byte_count(tmp_path, capsys):
    (tmp_path / 'feats').mkdir()
    good = tsv_line(5, np.zeros((2, 4), np.float32), np.ones((2, 6), np.float32))
    fields = good.rstrip('\n').split('\t')
    fields[3] = '3'  # num_boxes says 3, the bytes hold 2 boxes
    path = tmp_path / 'feats' / 'bad.tsv.0'
    path.write_text(good + '\t'.join(fields) + '\n')
    rc = make_bu_data.main(['--downloaded_feats', str(tmp_path / 'feats'), '--output_dir', str(tmp_path / 'bu'),
                            '--num_workers', '1'])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith('error: ') and '\n' not in err
    assert f'{path}:2' in err and 'image 5' in err and 'num_boxes 3' in err


def test_dump_to_lmdb_stores_file_bytes(tmp_path, tiny_dataset):
    import lmdb
    out = str(tmp_path / 'att.lmdb')
    assert dump_to_lmdb.main(['--folder', tiny_dataset.att_dir, '--output_file', out]) == 0
    env = lmdb.open(out, subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        keys = [k.decode() for k, _ in txn.cursor()]
        value = txn.get(keys[0].encode())
    env.close()
    assert sorted(keys) == sorted(n[:-4] for n in os.listdir(tiny_dataset.att_dir))
    assert value == open(os.path.join(tiny_dataset.att_dir, keys[0] + '.npz'), 'rb').read()


@pytest.mark.parametrize('ext', ['.lmdb', '.h5'])
def test_dump_to_lmdb_never_leaves_a_partial_file(tmp_path, tiny_dataset, ext, capsys):
    """A feature file that fails half-way through the dump: one-line error, the previous output untouched, no temp
    or lock files left."""
    folder = tmp_path / 'att'
    shutil.copytree(tiny_dataset.att_dir, folder)
    names = sorted(os.listdir(folder))
    bad = names[len(names) // 2]
    os.remove(folder / bad)
    os.mkdir(folder / bad)  # unreadable for both writers (the LMDB stores raw bytes, HDF5 parses the arrays)
    out = tmp_path / f'att{ext}'
    out.write_bytes(b'the previous dump')
    assert dump_to_lmdb.main(['--folder', str(folder), '--output_file', str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and bad in err
    assert out.read_bytes() == b'the previous dump'
    assert sorted(os.listdir(tmp_path)) == ['att', f'att{ext}']

    os.rmdir(folder / bad)  # the dump again, complete this time: umask permissions, not LMDB's executable 0755
    old = os.umask(0o027)
    try:
        assert dump_to_lmdb.main(['--folder', str(folder), '--output_file', str(out)]) == 0
    finally:
        os.umask(old)
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o640)
    assert sorted(os.listdir(tmp_path)) == ['att', f'att{ext}']


def test_prepro_cocotest(tmp_path, tiny_dataset):
    info = {'images': [{'id': 7, 'file_name': 'COCO_test2014_000000000007.jpg'}, {'id': 3, 'file_name': 'b.jpg'}]}
    src = write_json(info, tmp_path / 'image_info_test2014.json')
    out = str(tmp_path / 'cocotest.json')
    assert prepro_cocotest.main(['--input_json', src, '--output_json', out, '--dict_json', tiny_dataset.input_json]) == 0
    with open(out) as f:
        data = json.load(f)
    assert data['images'] == [{'id': 7, 'file_path': 'test2014/COCO_test2014_000000000007.jpg', 'split': 'test'},
                              {'id': 3, 'file_path': 'test2014/b.jpg', 'split': 'test'}]
    with open(tiny_dataset.input_json) as f:
        assert data['ix_to_word'] == json.load(f)['ix_to_word']


def test_prepro_reference_json_from_dataset(tmp_path):
    src = write_json(three_images(), tmp_path / 'd.json')
    out = str(tmp_path / 'ref.json')
    assert prepro_reference_json.main(['--input_json', src, '--output_json', out, '--splits', 'val,restval']) == 0
    from pycocotools.coco import COCO
    coco = COCO(out)
    assert sorted(coco.getImgIds()) == [20, 30]
    assert sorted(a['caption'] for a in coco.loadAnns(coco.getAnnIds(imgIds=[20]))) == ['a cat', ' '.join(LONG)]
    assert len({a['id'] for a in coco.dataset['annotations']}) == 3


def test_prepro_reference_json_extracts_real_coco(tmp_path):
    out = str(tmp_path / 'annotations' / 'captions_val2014.json')
    assert prepro_reference_json.main(['--output_json', out]) == 0
    with open(out) as f:
        data = json.load(f)
    assert len(data['images']) == 40504 and len(data['annotations']) > 200000
    assert {'image_id', 'id', 'caption'} <= set(data['annotations'][0])


def test_make_demo_data_end_to_end(tmp_path, capsys):
    out = str(tmp_path / 'demo')
    argv = ['--output_dir', out, '--num_train', '24', '--num_restval', '4', '--num_val', '5', '--num_test', '5',
            '--num_online_test', '3', '--feat_dim', '16', '--num_workers', '1']
    assert make_demo_data.main(argv) == 0
    printed = capsys.readouterr().out
    assert 'train 24' in printed and 'restval 4' in printed and 'online test 3' in printed
    for name in make_demo_data.OUTPUTS:
        assert os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, 'dataset_coco.json')) as f:
        dataset = json.load(f)
    img = dataset['images'][0]
    assert {'filepath', 'filename', 'imgid', 'split', 'cocoid', 'sentids', 'sentences'} <= set(img)
    for im in dataset['images']:
        assert im['filepath'] == ('train2014' if im['split'] == 'train' else 'val2014')
        for s in im['sentences']:
            assert s['tokens'] and all(t == t.lower() and t.isalnum() for t in s['tokens'])
    test_tsv = open(os.path.join(out, 'tsv', 'test2014', 'demo_test2014.tsv')).read().splitlines()
    assert len(test_tsv) == 3
    ids = [int(line.split('\t')[0]) for line in test_tsv]
    for iid in ids:
        feat = np.load(os.path.join(out, 'cocotest_bu_att', f'{iid}.npz'))['feat']
        assert feat.shape[1] == 16 and 10 <= feat.shape[0] <= 40
    with open(os.path.join(out, 'cocotest.json')) as f:
        assert [im['id'] for im in json.load(f)['images']] == ids
    # second run: up to date, nothing rebuilt
    stamp = os.path.getmtime(os.path.join(out, 'cocotalk.json'))
    assert make_demo_data.main(argv) == 0
    assert 'up to date' in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, 'cocotalk.json')) == stamp


def test_scripts_name_missing_inputs(tmp_path, capsys):
    missing = str(tmp_path / 'nope.json')
    assert prepro_labels.main(['--input_json', missing]) == 2
    err = capsys.readouterr().err
    assert missing in err and err.count('\n') == 1
    with pytest.raises(SaticError, match='no \\*.tsv\\* files'):
        make_bu_data.run(make_bu_data.parse_args(['--downloaded_feats', str(tmp_path)]))
