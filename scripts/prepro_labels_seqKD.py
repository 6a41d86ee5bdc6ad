"""Label h5 for sequence-level knowledge distillation: train images get a teacher's beam captions.

data/README.md. The teacher json is what `eval.py --seq_kd 1 --split train --beam_size 5` writes:
[{"image_id": int, "caption": [5 strings]}, ..]. Every train/restval image present there gets those captions
instead of its ground truth; val/test images (and train images the teacher skipped) keep their ground truth.
The vocabulary is the one of --dict_json (cocotalk.json): words outside it become UNK. The h5 has the same format and
vocabulary attrs as prepro_labels.py's, and the images in the same order as --dict_json.

  python scripts/prepro_labels_seqKD.py --input_json data/dataset_coco.json --dict_json data/cocotalk.json \
      --teacher_json vis/nsc-transformer-baseline-b5_seq_kd.json
"""
import argparse
import os
import sys

if __package__ in (None, ''):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from misc.errors import SaticError
from misc.console.cli import run_cli
from misc.files.readers import image_id, read_json
from misc.options.optspec import at_least, checked
from scripts.prepro_labels import check_max_length, check_outputs, encode_captions, load_dataset_images, read_vocabulary, write_label_h5


def load_teacher(path):
    """{image_id: [token lists]} from a teacher captions json."""
    data = read_json(path, 'teacher captions json')
    if not isinstance(data, list):
        raise SaticError(f'{path}: expected a list of {{"image_id", "caption"}} entries (eval.py --seq_kd 1 output)')
    teacher = {}
    for entry in data:
        if not isinstance(entry, dict) or 'image_id' not in entry or 'caption' not in entry:
            raise SaticError(f'{path}: entry {str(entry)[:60]} lacks image_id/caption (expected eval.py --seq_kd 1 output)')
        iid, caps = entry['image_id'], entry['caption']
        if isinstance(iid, str) and iid.isdigit():
            iid = int(iid)
        if isinstance(iid, bool) or not isinstance(iid, int):
            raise SaticError(f'{path}: image_id {iid!r} is not an integer (expected eval.py --seq_kd 1 output)')
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise SaticError(f'{path}: image {iid} has a caption that is not a string or a list of strings '
                             f'({str(caps)[:40]}; expected eval.py --seq_kd 1 output)')
        if not caps:
            raise SaticError(f'{path}: image {iid} has an empty caption list')
        teacher[iid] = [c.split() for c in caps]
    return teacher


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--input_json', default='data/dataset_coco.json', help='Karpathy-format dataset_coco.json')
    p.add_argument('--dict_json', default='data/cocotalk.json', help='the vocabulary (prepro_labels.py output)')
    p.add_argument('--teacher_json', default='vis/nsc-transformer-baseline-b5_seq_kd.json',
                   help='teacher captions: eval.py --seq_kd 1 --split train --beam_size 5 output')
    p.add_argument('--output_h5', default='data/cocotalk_seq-kd-from-nsc-transformer-baseline-b5',
                   help="label file prefix ('_label.h5' is appended)")
    p.add_argument('--max_length', default=16, type=int, help='captions are cut to this many words')
    return checked(p.parse_args(argv), max_length=at_least(1))


def run(args):
    check_max_length(args.max_length)
    check_outputs([args.output_h5 + '_label.h5'], ['--output_h5'])
    images = load_dataset_images(args.input_json)
    vocab_json, ix_to_word = read_vocabulary(args.dict_json)
    dict_images = vocab_json.get('images', [])
    ids = [image_id(img, args.input_json) for img in images]
    if [d.get('id') for d in dict_images] != ids:
        raise SaticError(f'{args.dict_json} and {args.input_json} list different images: '
                         'use the dataset json that --dict_json was built from')
    wtoi = {w: int(i) for i, w in ix_to_word.items()}
    teacher = load_teacher(args.teacher_json)
    captions, replaced = [], 0
    for img, iid in zip(images, ids):
        if img['split'] in ('train', 'restval') and iid in teacher:
            captions.append(teacher[iid])
            replaced += 1
        else:
            captions.append([s['tokens'] for s in img.get('sentences', [])])
    unused = len(teacher) - replaced
    labels, start_ix, end_ix, lengths = encode_captions(
        captions, wtoi, args.max_length, lambda i: f'{args.input_json}: image {ids[i]}')
    h5_path = args.output_h5 + '_label.h5'
    write_label_h5(h5_path, labels, start_ix, end_ix, lengths, ix_to_word)
    print(f'wrote {h5_path}: {replaced} train images with teacher captions, '
          f'{len(images) - replaced} with ground truth' + (f'; {unused} teacher entries unused (not train images)'
                                                           if unused else ''))


def main(argv=None):
    return run_cli(parse_args, run, argv)


if __name__ == '__main__':
    sys.exit(main())
