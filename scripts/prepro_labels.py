"""Karpathy dataset_coco.json -> vocabulary + image list (cocotalk.json) and encoded captions (<output_h5>_label.h5).

First step of the data pipeline (data/README.md); dataloader.py reads both outputs.

Vocabulary: words counted over the tokens of ALL splits; a word is kept when its count > --word_count_threshold,
in order of first occurrence; the rest map to 'UNK', appended last only if some word was dropped. Index 0 is
reserved (BOS/EOS/pad). Captions are cut to --max_length words.

cocotalk_label.h5 (all uint32): labels (M, max_length) zero padded; label_start_ix / label_end_ix (N,), 1-indexed
and inclusive (image i owns rows start-1 .. end-1); label_length (M,). Our addition: attrs vocab_size and
vocab_sha1, so the loader can refuse a label file built with another vocabulary.

  python scripts/prepro_labels.py --input_json data/dataset_coco.json --output_json data/cocotalk.json \
      --output_h5 data/cocotalk
"""
import argparse
import io
import json
import os
import sys

if __package__ in (None, ''):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import h5py
import numpy as np

from misc.errors import SaticError
from misc.console.cli import run_cli
from misc.console.progress import progress
from misc.files.atomic import atomic_write, atomic_write_many
from misc.files.folders import check_output_folder
from misc.files.readers import image_id, read_json
from misc.files.vocabulary import check_vocabulary, vocab_sha1
from misc.options.optspec import at_least, checked

UNK = 'UNK'


def build_vocab(images, count_threshold):
    """Words with count > count_threshold in first-occurrence order (+ 'UNK' if any word was dropped)."""
    counts = {}
    for img in images:
        for sent in img.get('sentences', []):
            for w in sent['tokens']:
                counts[w] = counts.get(w, 0) + 1
    vocab = [w for w, n in counts.items() if n > count_threshold]
    dropped = [w for w, n in counts.items() if n <= count_threshold]
    total = sum(counts.values())
    if total:
        n_unk = sum(counts[w] for w in dropped)
        print(f'vocabulary: {len(vocab)} of {len(counts)} words kept (count > {count_threshold}); '
              f'{len(dropped)} words ({100.0 * n_unk / total:.2f}% of tokens) become {UNK}')
    if dropped:
        vocab.append(UNK)
    return vocab


def encode_tokens(tokens, wtoi, max_length, where):
    """Token list -> (max_length,) uint32 ids, OOV -> UNK; returns (ids, length = min(len, max_length))."""
    row = np.zeros(max_length, dtype=np.uint32)
    unk = wtoi.get(UNK)
    for k, w in enumerate(tokens[:max_length]):
        ix = wtoi.get(w, unk)
        if ix is None:
            raise SaticError(f'{where}: word {w!r} is not in the vocabulary, which has no {UNK}: '
                             'rebuild the vocabulary from this dataset')
        row[k] = ix
    return row, min(max_length, len(tokens))


def encode_captions(captions_per_image, wtoi, max_length, where):
    """captions_per_image: N lists of token lists, in dataset order -> (labels, start_ix, end_ix, lengths), uint32.

    where(i): text naming image i for error messages.
    """
    n = len(captions_per_image)
    start_ix = np.zeros(n, dtype=np.uint32)
    end_ix = np.zeros(n, dtype=np.uint32)
    rows, lengths = [], []
    counter = 1  # 1-indexed, inclusive (reference format)
    for i, captions in enumerate(progress(captions_per_image, desc='encoding captions', unit='images')):
        if not captions:
            raise SaticError(f'{where(i)} has no captions: every image needs at least one '
                             '(use --input_label_h5 none for caption-less images)')
        for tokens in captions:
            row, length = encode_tokens(tokens, wtoi, max_length, where(i))
            rows.append(row)
            lengths.append(length)
        start_ix[i] = counter
        end_ix[i] = counter + len(captions) - 1
        counter += len(captions)
    labels = np.stack(rows) if rows else np.zeros((0, max_length), dtype=np.uint32)
    return labels, start_ix, end_ix, np.asarray(lengths, dtype=np.uint32)


def write_label_h5(path, labels, start_ix, end_ix, lengths, ix_to_word):
    """Write the label h5 (uint32 datasets) with the vocabulary attrs; atomically (built in memory: about 40 MB on
    COCO, then misc.files.atomic.atomic_write)."""
    buffer = label_h5_bytes(labels, start_ix, end_ix, lengths, ix_to_word)
    atomic_write(path, lambda out: out.write(buffer.getbuffer()))


def label_h5_bytes(labels, start_ix, end_ix, lengths, ix_to_word):
    """The label h5 file (uint32 datasets, vocabulary attrs) in memory: a BytesIO."""
    buffer = io.BytesIO()
    with h5py.File(buffer, 'w') as f:
        f.create_dataset('labels', dtype='uint32', data=labels)
        f.create_dataset('label_start_ix', dtype='uint32', data=start_ix)
        f.create_dataset('label_end_ix', dtype='uint32', data=end_ix)
        f.create_dataset('label_length', dtype='uint32', data=lengths)
        f.attrs['vocab_size'] = len(ix_to_word)
        f.attrs['vocab_sha1'] = vocab_sha1(ix_to_word)
    return buffer


def check_outputs(paths, flags):
    """Each output path's folder writable (or creatable) and the path not a folder: before any work, so that no
    output is written when another cannot be."""
    for path, flag in zip(paths, flags):
        check_output_folder(os.path.dirname(os.path.abspath(path)), f'{flag} {path}')
        if os.path.isdir(path):
            raise SaticError(f'{flag} {path} is a folder: give a file path')


def image_entry(img, images_root='', path='the dataset json'):
    """The cocotalk.json record of one dataset image: split, file_path, id (+ width/height with --images_root)."""
    entry = {'split': img['split']}
    if 'filename' in img:
        entry['file_path'] = os.path.join(img.get('filepath', ''), img['filename'])
    entry['id'] = image_id(img, path)
    if images_root:
        from PIL import Image  # (Pillow: optional, only with --images_root)
        with Image.open(os.path.join(images_root, img.get('filepath', ''), img['filename'])) as im:
            entry['width'], entry['height'] = im.size
    return entry


def read_vocabulary(dict_json):
    """(the cocotalk.json dict, its ix_to_word) of a --dict_json written by this script; one line when it has none."""
    vocab_json = read_json(dict_json, 'vocabulary json')
    ix_to_word = vocab_json.get('ix_to_word') if isinstance(vocab_json, dict) else None
    if not ix_to_word:
        raise SaticError(f'{dict_json} has no ix_to_word: pass the cocotalk.json written by prepro_labels.py')
    check_vocabulary(ix_to_word, f'vocabulary json {dict_json}')
    return vocab_json, ix_to_word


def load_dataset_images(path, need_tokens=True):
    """images[] of a Karpathy-format dataset json, checked for the fields the scripts need: split, and sentences[]
    whose tokens are lists of strings (need_tokens=False: tokens or a raw string)."""
    data = read_json(path, 'dataset json')
    images = data.get('images') if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise SaticError(f'{path} has no images[] list: expected a Karpathy-format dataset_coco.json')
    karpathy = 'expected a Karpathy-format dataset_coco.json'
    for img in images:
        if not isinstance(img, dict):
            raise SaticError(f'{path}: an image entry is a {type(img).__name__} ({str(img)[:40]}): {karpathy}')
        if 'split' not in img:
            raise SaticError(f'{path}: image {image_id(img, path)} has no split: {karpathy}')
        sentences = img.get('sentences', [])
        if not isinstance(sentences, list):
            raise SaticError(f'{path}: image {image_id(img, path)} has sentences that are not a list: {karpathy}')
        for n, sent in enumerate(sentences):
            tokens = sent.get('tokens') if isinstance(sent, dict) else None
            good = isinstance(tokens, list) and all(isinstance(w, str) for w in tokens)
            if not good and not (not need_tokens and isinstance(sent, dict) and isinstance(sent.get('raw'), str)
                                 and tokens is None):
                problem = 'no tokens' if tokens is None else 'tokens that are not a list of words'
                raise SaticError(f'{path}: image {image_id(img, path)}, sentence {n} has {problem}: {karpathy} '
                                 '(every sentence: {"tokens": [words], "raw": text})')
    return images


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--input_json', required=True, help='Karpathy-format dataset_coco.json')
    p.add_argument('--output_json', default='data/cocotalk.json', help='vocabulary + image list')
    p.add_argument('--output_h5', default='data/cocotalk', help="label file prefix ('_label.h5' is appended)")
    p.add_argument('--images_root', default='', help='if set, record each image width/height (reads the images)')
    p.add_argument('--max_length', default=16, type=int, help='captions are cut to this many words')
    p.add_argument('--word_count_threshold', default=5, type=int, help='words seen this many times or fewer -> UNK')
    return checked(p.parse_args(argv), max_length=at_least(1), word_count_threshold=at_least(0))


def check_max_length(max_length):
    """--max_length: the words per caption row of the label h5 (its labels' width), at least 1."""
    if max_length < 1:
        raise SaticError(f'--max_length {max_length}: captions are cut to this many words, the width of the label '
                         'h5; give at least 1 (the reference used 16)')


def run(args):
    check_max_length(args.max_length)
    h5_path = args.output_h5 + '_label.h5'
    check_outputs([args.output_json, h5_path], ['--output_json', '--output_h5'])
    images = load_dataset_images(args.input_json)
    vocab = build_vocab(images, args.word_count_threshold)
    ix_to_word = {str(i + 1): w for i, w in enumerate(vocab)}
    wtoi = {w: i + 1 for i, w in enumerate(vocab)}
    captions = [[s['tokens'] for s in img.get('sentences', [])] for img in images]
    labels, start_ix, end_ix, lengths = encode_captions(
        captions, wtoi, args.max_length, lambda i: f'{args.input_json}: image {image_id(images[i])}')
    h5 = label_h5_bytes(labels, start_ix, end_ix, lengths, ix_to_word)
    if args.images_root:  # reads every image: slow
        images_iter = progress(images, desc=f'reading image sizes in {args.images_root}', unit='images')
    else:
        images_iter = images
    out = {'ix_to_word': ix_to_word,
           'images': [image_entry(img, args.images_root, args.input_json) for img in images_iter]}
    text = json.dumps(out)
    # The two files belong together (the h5 records the json's vocabulary): both written to temp files first,
    # then both renamed; a failure before the renames leaves the previous pair whole.
    atomic_write_many([(h5_path, lambda f: f.write(h5.getbuffer())),
                       (args.output_json, lambda f: f.write(text.encode('utf-8')))])
    print(f'wrote {args.output_json} ({len(images)} images, vocabulary {len(ix_to_word)}) and '
          f'{h5_path} ({labels.shape[0]} captions)')


def main(argv=None):
    return run_cli(parse_args, run, argv)


if __name__ == '__main__':
    sys.exit(main())
