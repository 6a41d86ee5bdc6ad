"""The COCO-format reference captions that offline evaluation scores against.

data/README.md. Without --input_json: extract the real COCO file (captions_val2014.json, or --coco_file
captions_train2014.json) from the SPICE jar of the installed pycocoevalcap package. With --input_json (any
Karpathy-format dataset json): write the same format - images [{id, file_name}], annotations [{image_id, id,
caption}] from each sentence's raw text - for the images of --splits.

  python scripts/prepro_reference_json.py        # -> coco-caption/annotations/captions_val2014.json
  python scripts/prepro_reference_json.py --input_json data/demo/dataset_coco.json --splits val,test \
      --output_json data/demo/captions_demo.json
"""
import argparse
import os
import shutil
import sys
import zipfile

if __package__ in (None, ''):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from misc.errors import SaticError
from misc.console.cli import run_cli
from misc.files.atomic import atomic_write, write_json
from misc.files.readers import image_id
from scripts.prepro_labels import load_dataset_images

DEFAULT_OUTPUT = 'coco-caption/annotations/captions_val2014.json'
COCO_FILES = ('captions_val2014.json', 'captions_train2014.json')


def spice_jar():
    """Path of the SPICE jar inside the installed pycocoevalcap package."""
    try:
        import pycocoevalcap  # (optional here: a missing package is this function's one-line error)
    except ImportError:
        raise SaticError('pycocoevalcap is not installed: pip install -r requirements.txt') from None
    jar = os.path.join(list(pycocoevalcap.__path__)[0], 'spice', 'spice-1.0.jar')  # a namespace package
    if not os.path.isfile(jar):
        raise SaticError(f'{jar} is missing: reinstall pycocoevalcap (pip install --force-reinstall pycocoevalcap==1.2)')
    return jar


def open_coco_captions(name='captions_val2014.json'):
    """A binary file object reading the real COCO captions json shipped in pycocoevalcap's SPICE jar."""
    jar = spice_jar()
    try:
        archive = zipfile.ZipFile(jar)
        return archive.open(f'coco/annotations/{name}')
    except (zipfile.BadZipFile, KeyError) as e:
        raise SaticError(f'{jar} does not hold coco/annotations/{name} ({e}): reinstall pycocoevalcap') from None


def extract(name, output_json):
    with open_coco_captions(name) as src:
        atomic_write(output_json, lambda dst: shutil.copyfileobj(src, dst, 1 << 20))


def reference_json(images, splits, path):
    """COCO captions format for the dataset images of `splits` (None: all)."""
    out_images, annotations = [], []
    next_id = 0
    for img in images:
        if splits is not None and img['split'] not in splits:
            continue
        iid = image_id(img, path)
        out_images.append({'id': iid, 'file_name': img.get('filename', str(iid))})
        for sent in img.get('sentences', []):
            sid = sent.get('sentid', next_id)
            next_id = max(next_id, sid) + 1
            caption = sent.get('raw') or ' '.join(sent.get('tokens') or [])
            annotations.append({'image_id': iid, 'id': sid, 'caption': caption})
    return {'info': {'description': f'reference captions built from {os.path.basename(path)}'},
            'licenses': [], 'type': 'captions', 'images': out_images, 'annotations': annotations}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--input_json', default='', help='Karpathy-format dataset json (default: extract real COCO)')
    p.add_argument('--output_json', default=DEFAULT_OUTPUT, help='where to write the reference json')
    p.add_argument('--splits', default='', help='with --input_json: comma-separated splits to keep (default: all)')
    p.add_argument('--coco_file', default=COCO_FILES[0], choices=COCO_FILES,
                   help='without --input_json: which COCO file to extract')
    return p.parse_args(argv)


def run(args):
    if not args.input_json:
        extract(args.coco_file, args.output_json)
        print(f'wrote {args.output_json} (COCO {args.coco_file} from the pycocoevalcap package)')
        return
    images = load_dataset_images(args.input_json, need_tokens=False)
    splits = set(s.strip() for s in args.splits.split(',') if s.strip()) or None
    ref = reference_json(images, splits, args.input_json)
    if not ref['images']:
        raise SaticError(f'{args.input_json} has no images in splits {sorted(splits)}: check --splits')
    write_json(ref, args.output_json)
    print(f'wrote {args.output_json} ({len(ref["images"])} images, {len(ref["annotations"])} captions)')


def main(argv=None):
    return run_cli(parse_args, run, argv)


if __name__ == '__main__':
    sys.exit(main())
