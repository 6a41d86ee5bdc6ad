"""COCO image_info_test2014.json -> data/cocotest.json, the image list eval_cocotest.py decodes.

data/README.md. Output: {"images": [{"id", "file_path", "split": "test"}, ..]} in the input's order, plus the
vocabulary ("ix_to_word") when --dict_json is given. The test features go through make_bu_data.py as usual.

  python scripts/prepro_cocotest.py --input_json annotations/image_info_test2014.json \
      --output_json data/cocotest.json --dict_json data/cocotalk.json
"""
import argparse
import os
import sys

if __package__ in (None, ''):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from misc.errors import SaticError
from misc.console.cli import run_cli
from misc.files.atomic import write_json
from misc.files.readers import read_json
from scripts.prepro_labels import read_vocabulary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--input_json', default='annotations/image_info_test2014.json',
                   help="COCO image info json (images[] with id, file_name)")
    p.add_argument('--output_json', default='data/cocotest.json', help='image list for eval_cocotest.py')
    p.add_argument('--dict_json', default='', help='cocotalk.json: copy its vocabulary into the output')
    p.add_argument('--images_dir', default='test2014', help="(ours) folder prefix of each file_path")
    return p.parse_args(argv)


def run(args):
    info = read_json(args.input_json, 'COCO image info json')
    images = info.get('images') if isinstance(info, dict) else None
    if not isinstance(images, list) or not images:
        raise SaticError(f'{args.input_json} has no images[]: expected COCO image_info_test2014.json')
    out_images, seen = [], set()
    for img in images:
        if 'id' not in img or 'file_name' not in img:
            raise SaticError(f'{args.input_json}: image entry {str(img)[:60]} lacks id/file_name')
        if img['id'] in seen:
            raise SaticError(f'{args.input_json}: image {img["id"]} is listed twice; the server expects unique ids')
        seen.add(img['id'])
        out_images.append({'id': img['id'], 'file_path': os.path.join(args.images_dir, img['file_name']),
                           'split': 'test'})
    out = {'images': out_images}
    if args.dict_json:
        out['ix_to_word'] = read_vocabulary(args.dict_json)[1]
    write_json(out, args.output_json)
    print(f'wrote {args.output_json} ({len(out_images)} test images)')


def main(argv=None):
    return run_cli(parse_args, run, argv)


if __name__ == '__main__':
    sys.exit(main())
