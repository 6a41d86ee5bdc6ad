"""The embedded demo dataset: real COCO 2014 captions + synthetic "visual concept" bottom-up features.

Captions: a deterministic subset of the real COCO captions shipped inside pycocoevalcap's SPICE jar (train images
from train2014; val, test, restval and the caption-less "online test" images from val2014), written as a
Karpathy-format dataset_coco.json and a COCO image_info-style json for the online-test images.
Features: bottom-up TSV files in the real format. Each image has one region per content word of its references
(a fixed random vector per word, scaled by how many references use the word, plus noise) and a few distractor
regions, 10-40 boxes in all, --feat_dim dimensions: a small captioner learns to name what it "sees" in minutes.
Then everything goes through the same scripts as real COCO (prepro_labels, make_bu_data, prepro_ngrams,
prepro_reference_json, prepro_cocotest). Outputs in --output_dir (data/demo):
  dataset_coco.json image_info_test.json tsv/ cocotalk.json cocotalk_label.h5 cocobu_att/ cocobu_fc/ cocobu_box/
  coco-train-idxs.p coco-train-words.p captions_demo.json (val/test references) cocotest.json cocotest_bu_att/
  cocotest_bu_fc/ cocotest_bu_box/
Re-running with the same arguments only prints the summary (--force rebuilds).

  python scripts/make_demo_data.py --output_dir data/demo
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time

if __package__ in (None, ''):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

import opts
from misc.errors import SaticError
from scripts import make_bu_data, prepro_cocotest, prepro_labels, prepro_ngrams, prepro_reference_json
from misc.console.cli import run_cli
from misc.files.atomic import write_json
from misc.files.readers import read_json
from misc.options.optspec import at_least, checked

VERSION = 1  # bump when the generated data changes, so existing demo folders are rebuilt
STAMP = '.demo_stamp.json'
OUTPUTS = ('dataset_coco.json', 'image_info_test.json', 'tsv', 'cocotalk.json', 'cocotalk_label.h5', 'cocobu_att',
           'cocobu_fc', 'cocobu_box', 'coco-train-idxs.p', 'coco-train-words.p', 'captions_demo.json',
           'cocotest.json', 'cocotest_bu_att', 'cocotest_bu_fc')

# Words that name no visual concept: they get no region (the decoder learns them from the language alone).
STOPWORDS = frozenset('''
a an the of on in with and is are to at near next by for from its it his her their there this that these those
some while as be being has have up down into onto over under out off top front side other each very who which
what'''.split())


def tokenize(raw):
    """COCO raw caption -> Karpathy-style tokens: lower case, punctuation removed, split on white space."""
    return re.sub(r"[^a-z0-9 ]", '', raw.lower().replace('-', ' ')).split()


def load_coco(name):
    """({image id: image record}, {image id: [raw captions]}) of one COCO captions file from the SPICE jar."""
    with prepro_reference_json.open_coco_captions(name) as f:
        data = json.load(f)
    images = {img['id']: img for img in data['images']}
    captions = {}
    for ann in sorted(data['annotations'], key=lambda a: a['id']):
        captions.setdefault(ann['image_id'], []).append(ann['caption'].strip())
    return images, captions


def pick(ids, n, rng, taken=()):
    """n ids drawn without replacement from sorted(ids) minus `taken` (deterministic given rng)."""
    pool = sorted(set(ids) - set(taken))
    if n > len(pool):
        raise SaticError(f'asked for {n} images but only {len(pool)} are available')
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


class ConceptFeatures:
    """Synthetic region features: a fixed random vector per content word, plus noise and distractors."""

    def __init__(self, dim, seed, min_boxes=10, max_boxes=40, noise=0.3):
        self.dim, self.seed = dim, seed
        self.min_boxes, self.max_boxes, self.noise = min_boxes, max_boxes, noise
        self._vectors = {}

    def vector(self, word):
        """(dim,) standard-normal vector of a word, the same in every image and run."""
        v = self._vectors.get(word)
        if v is None:
            digest = hashlib.sha1(f'{self.seed}/{word}'.encode()).digest()
            v = np.random.default_rng(int.from_bytes(digest[:8], 'little')).standard_normal(self.dim)
            self._vectors[word] = v = v.astype(np.float32)
        return v

    def regions(self, token_lists, rng, width=640, height=480, n_boxes=None):
        """token_lists: the image's references -> (boxes (N, 4) x1 y1 x2 y2, features (N, dim)) float32.

        N: one region per content word and 2-5 distractors, within [min_boxes, max_boxes]; or exactly n_boxes
        (the most used words first).
        """
        df = {}
        for tokens in token_lists:
            for w in set(tokens) - STOPWORDS:
                df[w] = df.get(w, 0) + 1
        words = sorted(df, key=lambda w: (-df[w], w))
        n_distract = int(rng.integers(2, 6))
        if n_boxes is None:
            words = words[:self.max_boxes - n_distract]
            n = min(self.max_boxes, max(self.min_boxes, len(words) + n_distract))
        else:
            n = n_boxes
            words = words[:n]
        feats = rng.standard_normal((n, self.dim)).astype(np.float32)  # distractors stay pure noise
        for k, w in enumerate(words):
            salience = 0.5 + df[w] / max(1, len(token_lists))  # words most references use stand out
            feats[k] = salience * self.vector(w) + self.noise * feats[k]
        feats = feats[rng.permutation(n)]  # region order carries no information
        x1 = rng.uniform(0, width * 0.8, n)
        y1 = rng.uniform(0, height * 0.8, n)
        x2 = np.minimum(width - 1, x1 + rng.uniform(16, width * 0.6, n))
        y2 = np.minimum(height - 1, y1 + rng.uniform(16, height * 0.6, n))
        return np.stack([x1, y1, x2, y2], 1).astype(np.float32), feats


def build_dataset(args):
    """Select the images -> (dataset_coco dict, online-test image records, {id: token lists}, {id: (w, h)})."""
    rng = np.random.default_rng(args.seed)
    train_imgs, train_caps = load_coco('captions_train2014.json')
    val_imgs, val_caps = load_coco('captions_val2014.json')
    train_ids = pick([i for i in train_caps if len(train_caps[i]) >= 5], args.num_train, rng)
    val_pool = [i for i in val_caps if len(val_caps[i]) >= 5]
    test_ids = pick(val_pool, args.num_test, rng)
    val_ids = pick(val_pool, args.num_val, rng, test_ids)
    restval_ids = pick(val_pool, args.num_restval, rng, test_ids + val_ids)
    online_ids = pick(val_pool, args.num_online_test, rng, test_ids + val_ids + restval_ids)

    images, tokens, sizes, sentid = [], {}, {}, 0
    for split, ids, folder, imgs, caps in (('test', test_ids, 'val2014', val_imgs, val_caps),
                                           ('val', val_ids, 'val2014', val_imgs, val_caps),
                                           ('restval', restval_ids, 'val2014', val_imgs, val_caps),
                                           ('train', train_ids, 'train2014', train_imgs, train_caps)):
        for iid in ids:
            imgid = len(images)
            sentences = []
            for raw in caps[iid]:
                sentences.append({'tokens': tokenize(raw), 'raw': raw, 'imgid': imgid, 'sentid': sentid})
                sentid += 1
            tokens[iid] = [s['tokens'] for s in sentences]
            images.append({'filepath': folder, 'filename': imgs[iid]['file_name'], 'imgid': imgid, 'split': split,
                           'cocoid': iid, 'sentids': [s['sentid'] for s in sentences], 'sentences': sentences})
            sizes[iid] = (imgs[iid]['width'], imgs[iid]['height'])
    online = []
    for iid in online_ids:
        img = val_imgs[iid]
        online.append({'id': iid, 'file_name': img['file_name'], 'width': img['width'], 'height': img['height']})
        tokens[iid] = [tokenize(raw) for raw in val_caps[iid]]  # hidden: only the features see them
        sizes[iid] = (img['width'], img['height'])
    return {'images': images, 'dataset': 'coco'}, online, tokens, sizes


def write_tsvs(args, dataset, online, tokens, sizes, tsv_dir):
    """Write the bottom-up TSVs (train in two chunks like the real files); returns boxes-per-image counts."""
    concepts = ConceptFeatures(args.feat_dim, args.seed, args.min_boxes, args.max_boxes)
    by_split = {}
    for img in dataset['images']:
        by_split.setdefault('train' if img['split'] == 'restval' else img['split'], []).append(img)
    half = (len(by_split.get('train', [])) + 1) // 2
    files = {'trainval/demo_train.tsv.0': (by_split.get('train', [])[:half], True),
             'trainval/demo_train.tsv.1': (by_split.get('train', [])[half:], True),
             'trainval/demo_val.tsv': (by_split.get('val', []), True),
             'trainval/demo_test.tsv': (by_split.get('test', []), True),
             # real test2014 rows lack the base64 '=' padding: so do these
             'test2014/demo_test2014.tsv': ([{'cocoid': o['id']} for o in online], False)}
    counts = []
    for name, (imgs, pad) in files.items():
        path = os.path.join(tsv_dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w') as f:
            for img in imgs:
                iid = img['cocoid']
                rng = np.random.default_rng([args.seed, iid])
                width, height = sizes[iid]
                boxes, feats = concepts.regions(tokens[iid], rng, width, height)
                f.write(make_bu_data.format_row(iid, width, height, boxes, feats, pad))
                counts.append(len(boxes))
    return counts


def run_step(module, argv):
    """Run one pipeline script exactly as its command line would (same parser, same code)."""
    module.run(module.parse_args(argv))


def summary(out, box_counts, seed):
    """Dataset summary text: images per split, vocabulary, boxes per image, one decoded batch."""
    from dataloader import DataConfig, DataLoader  # (torch and h5py: only the summary reads a batch)
    with open(os.path.join(out, 'dataset_coco.json')) as f:
        dataset = json.load(f)
    splits = {}
    for img in dataset['images']:
        splits[img['split']] = splits.get(img['split'], 0) + 1
    with open(os.path.join(out, 'cocotest.json')) as f:
        n_online = len(json.load(f)['images'])
    opt = opts.parse_opt(['--input_json', os.path.join(out, 'cocotalk.json'),
                          '--input_label_h5', os.path.join(out, 'cocotalk_label.h5'),
                          '--input_fc_dir', os.path.join(out, 'cocobu_fc'),
                          '--input_att_dir', os.path.join(out, 'cocobu_att'),
                          '--batch_size', '2', '--seq_per_img', '5', '--num_workers', '0', '--seed', str(seed)])
    loader = DataLoader(DataConfig.from_opt(opt))
    try:
        batch = loader.get_batch('val')
    finally:
        loader.close()
    vocab = loader.get_vocab()
    lines = [f'demo data in {out}:',
             '  images: ' + ', '.join(f'{k} {v}' for k, v in sorted(splits.items())) + f', online test {n_online}',
             f'  vocabulary: {loader.vocab_size} words; captions cut to {loader.seq_length}',
             f'  boxes per image: min {min(box_counts)}, mean {np.mean(box_counts):.1f}, max {max(box_counts)}; '
             f'feature dim {batch["att_feats"].shape[-1]}',
             f'  one val batch: att_feats {tuple(batch["att_feats"].shape)}, labels {tuple(batch["labels"].shape)}, '
             f'att_masks {None if batch["att_masks"] is None else tuple(batch["att_masks"].shape)}']
    for k, info in enumerate(batch['infos']):
        row = batch['labels'][k * loader.seq_per_img].tolist()
        words = ' '.join(vocab[str(t)] for t in row[1:] if t > 0)
        lines.append(f'    image {info["id"]} ({info["file_path"]}): "{words}"')
    return '\n'.join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--output_dir', default='data/demo')
    p.add_argument('--num_train', default=3750, type=int, help='train images (train2014)')
    p.add_argument('--num_restval', default=250, type=int, help='restval images (val2014; trained on)')
    p.add_argument('--num_val', default=250, type=int, help='val images (val2014)')
    p.add_argument('--num_test', default=250, type=int, help='test images (val2014)')
    p.add_argument('--num_online_test', default=100, type=int, help='caption-less online-test images (val2014)')
    p.add_argument('--feat_dim', default=64, type=int, help='region feature dimension D')
    p.add_argument('--min_boxes', default=10, type=int)
    p.add_argument('--max_boxes', default=40, type=int)
    p.add_argument('--seed', default=123, type=int)
    p.add_argument('--num_workers', default=min(2, os.cpu_count() or 1), type=int,
                   help='processes for make_bu_data.py')
    p.add_argument('--force', action='store_true', help='rebuild even if the outputs are up to date')
    args = p.parse_args(argv)
    return checked(args, num_train=at_least(1), num_restval=at_least(0), num_val=at_least(1), num_test=at_least(1),
                   num_online_test=at_least(0), feat_dim=at_least(1), min_boxes=at_least(1),
                   max_boxes=at_least(max(1, args.min_boxes)), seed=at_least(0), num_workers=at_least(1))


def build_args(args):
    """The arguments that determine the data (not --force / --num_workers)."""
    keys = ('num_train', 'num_restval', 'num_val', 'num_test', 'num_online_test', 'feat_dim', 'min_boxes',
            'max_boxes', 'seed')
    return {'version': VERSION, **{k: getattr(args, k) for k in keys}}


def read_stamp(path):
    """The stamp of a finished build ({'args', 'summary'}); {} (so the demo is rebuilt, with a note) when it is
    damaged: it is only this script's record that the outputs are complete."""
    try:
        stamp = read_json(path, 'demo stamp', dict, 'an object {args, summary}')
    except SaticError as e:
        print(f'note: {e}; rebuilding the demo data', file=sys.stderr)
        return {}
    return stamp


def run(args):
    if not 1 <= args.min_boxes <= args.max_boxes:
        raise SaticError(f'need 1 <= --min_boxes <= --max_boxes (got {args.min_boxes}, {args.max_boxes})')
    out = args.output_dir
    stamp_path = os.path.join(out, STAMP)
    if not args.force and os.path.exists(stamp_path):
        stamp = read_stamp(stamp_path)
        if stamp.get('args') == build_args(args) and all(os.path.exists(os.path.join(out, o)) for o in OUTPUTS):
            print(f'{out} is up to date (use --force to rebuild)')
            print(stamp.get('summary', ''))
            return
    start = time.time()
    if os.path.exists(stamp_path):
        os.remove(stamp_path)
    for name in OUTPUTS + ('cocotest_bu_box',):  # a rebuild must not mix in stale per-image files
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
    os.makedirs(out, exist_ok=True)
    j = lambda name: os.path.join(out, name)  # noqa: E731

    dataset, online, tokens, sizes = build_dataset(args)
    write_json(dataset, j('dataset_coco.json'))
    write_json({'info': {'description': 'SATIC demo: caption-less online-test images (COCO val2014)'},
               'images': online, 'licenses': [], 'categories': []}, j('image_info_test.json'))
    box_counts = write_tsvs(args, dataset, online, tokens, sizes, j('tsv'))

    workers = str(args.num_workers)
    run_step(prepro_labels, ['--input_json', j('dataset_coco.json'), '--output_json', j('cocotalk.json'),
                             '--output_h5', j('cocotalk')])
    run_step(make_bu_data, ['--downloaded_feats', j('tsv/trainval'), '--output_dir', j('cocobu'),
                            '--num_workers', workers])
    run_step(make_bu_data, ['--downloaded_feats', j('tsv/test2014'), '--output_dir', j('cocotest_bu'),
                            '--num_workers', workers])
    run_step(prepro_ngrams, ['--input_json', j('dataset_coco.json'), '--dict_json', j('cocotalk.json'),
                             '--output_pkl', j('coco-train'), '--split', 'train'])
    run_step(prepro_reference_json, ['--input_json', j('dataset_coco.json'), '--splits', 'val,test',
                                     '--output_json', j('captions_demo.json')])
    run_step(prepro_cocotest, ['--input_json', j('image_info_test.json'), '--output_json', j('cocotest.json'),
                               '--dict_json', j('cocotalk.json'), '--images_dir', 'val2014'])
    text = summary(out, box_counts, args.seed)
    text += f'\n  built in {time.time() - start:.1f} s'
    write_json({'args': build_args(args), 'summary': text}, stamp_path)
    print(text)


def main(argv=None):
    return run_cli(parse_args, run, argv)


if __name__ == '__main__':
    sys.exit(main())
