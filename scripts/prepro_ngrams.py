"""Document frequencies of the training references, for the CIDEr-D reward of self-critical training.

data/README.md. Each reference of a --split image (train also takes restval) -> all its tokens (not cut at 16)
plus an end token, OOV -> UNK. df(ngram) = number of IMAGES whose references contain the n-gram, n = 1..4;
ref_len = number of images (the reward takes its log, as CIDEr-D does). Written twice, pickle protocol 2:
  <output_pkl>-words.p  n-grams of words, end token '<eos>'
  <output_pkl>-idxs.p   n-grams of vocabulary ids as strings, end token '0' (what the reward sees: "1 5 33 0")
each {'document_frequency': defaultdict(float, {tuple_of_str: float}), 'ref_len': int}.

  python scripts/prepro_ngrams.py --input_json data/dataset_coco.json --dict_json data/cocotalk.json \
      --output_pkl data/coco-train --split train
"""
import argparse
import os
import pickle
import sys
from collections import defaultdict

if __package__ in (None, ''):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from misc.errors import SaticError
from misc.console.cli import run_cli
from misc.console.progress import progress
from misc.files.atomic import atomic_write_many
from misc.files.folders import check_output_folder, remove_stale_temps
from misc.files.readers import image_id
from misc.run.faults import fault_point
from scripts.prepro_labels import UNK, load_dataset_images, read_vocabulary

EOS_WORD = '<eos>'
MAX_N = 4


def ngrams(tokens, max_n=MAX_N):
    """Set of the 1..max_n-grams (tuples) of a token list."""
    return {tuple(tokens[i:i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1)}


def document_frequency(refs_per_image, desc='prepro_ngrams: document frequencies'):
    """refs_per_image: list (one per image) of lists of token lists -> defaultdict(float) n-gram -> #images."""
    df = defaultdict(float)
    for refs in progress(refs_per_image, desc=desc, unit='images'):
        seen = set()
        for tokens in refs:
            seen |= ngrams(tokens)
        for g in seen:
            df[g] += 1.0
    return df


def in_split(img_split, split):
    return split == 'all' or img_split == split or (split == 'train' and img_split == 'restval')


def reference_tokens(images, wtoi, split, path):
    """(word refs, id refs): per selected image, its references with the end token, OOV -> UNK."""
    refs_words, refs_idxs = [], []
    for img in images:
        if not in_split(img['split'], split):
            continue
        words_i, idxs_i = [], []
        for sent in img.get('sentences', []):
            tokens = []
            for w in sent['tokens']:
                if w not in wtoi:
                    if UNK not in wtoi:
                        raise SaticError(f'{path}: image {image_id(img, path)}: word {w!r} is not in the vocabulary, '
                                         f'which has no {UNK}: use the --dict_json built from this dataset')
                    w = UNK
                tokens.append(w)
            words_i.append(tokens + [EOS_WORD])
            idxs_i.append([str(wtoi[w]) for w in tokens] + ['0'])
        refs_words.append(words_i)
        refs_idxs.append(idxs_i)
    return refs_words, refs_idxs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--input_json', default='data/dataset_coco.json', help='Karpathy-format dataset_coco.json')
    p.add_argument('--dict_json', default='data/cocotalk.json', help='the vocabulary (prepro_labels.py output)')
    p.add_argument('--output_pkl', default='data/coco-train', help="output prefix ('-idxs.p', '-words.p' appended)")
    p.add_argument('--split', default='train', help="train (with restval) | val | test | all")
    return p.parse_args(argv)


def run(args):
    check_output_folder(os.path.dirname(args.output_pkl), '--output_pkl')
    for suffix in ('-words.p', '-idxs.p'):
        remove_stale_temps(args.output_pkl + suffix)  # what a killed run left
    images = load_dataset_images(args.input_json)
    vocab_json, ix_to_word = read_vocabulary(args.dict_json)
    wtoi = {w: int(i) for i, w in ix_to_word.items()}
    refs_words, refs_idxs = reference_tokens(images, wtoi, args.split, args.input_json)
    if not refs_idxs:
        raise SaticError(f'{args.input_json} has no {args.split!r} images: check --split')
    ref_len = len(refs_idxs)
    # Both files or neither: written to temp files, then renamed -words.p first, so that an -idxs.p (what the reward
    # reads) always has its -words.p; load_cached_tokens names a lone -words.p.
    items = []
    for suffix, refs in (('-words.p', refs_words), ('-idxs.p', refs_idxs)):
        df = document_frequency(refs, f'prepro_ngrams: {args.output_pkl}{suffix}')
        data = pickle.dumps({'document_frequency': df, 'ref_len': ref_len}, protocol=2)
        items.append((args.output_pkl + suffix, data))
    atomic_write_many([(path, lambda f, n=n, data=data: (fault_point('prepro_ngrams:written', n), f.write(data)))
                       for n, (path, data) in enumerate(items)])
    print(f'wrote {args.output_pkl}-idxs.p and -words.p: document frequencies over {ref_len} {args.split} images')


def main(argv=None):
    return run_cli(parse_args, run, argv)


if __name__ == '__main__':
    sys.exit(main())
