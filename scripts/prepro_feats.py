"""Images -> the reference's ResNet grid features, one file per image (docs/own_images.md):
<output_dir>_fc/<id>.npy (2048,) = the spatial mean of the last ResNet stage, <output_dir>_att/<id>.npz 'feat'
(att_size, att_size, 2048) = its adaptive average pool; the data loader reads the latter as att_size^2 regions.

  python scripts/prepro_feats.py --input_json data/dataset_coco.json --output_dir data/cocotalk \
      --images_root data/images --model resnet101 --model_root data/imagenet_weights

The reference's flags and computation (misc/images.py, models/resnet.py): every image of --input_json (Karpathy's
dataset json: filepath, filename, cocoid) at full size, ImageNet-normalised, through the Caffe-style ResNet whose
weights are <model_root>/<model>.pth. Ours: images of one size go through the network together (--batch_size), on
the GPU when there is one (--device), with progress; resumable: an image whose two files exist is skipped, so a run
that was stopped continues where it stopped, and every file is written to a temp file and renamed (never a half
file). An unreadable image is reported on one line and skipped; the run then ends with an error naming how many.
"""
import argparse
import concurrent.futures
import io
import os
import sys

if __package__ in (None, ''):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from misc.errors import SaticError
from misc.console.cli import run_cli
from misc.console.progress import Progress
from misc.files.atomic import atomic_write
from misc.files.folders import check_output_folder
from misc.files.readers import image_id, read_json


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='ResNet grid features of the images of a dataset json.')
    parser.add_argument('--input_json', required=True,
                        help="Karpathy's dataset json (images with filepath, filename and cocoid)")
    parser.add_argument('--output_dir', default='data', help='writes <output_dir>_fc/ and <output_dir>_att/')
    parser.add_argument('--images_root', default='', help='the folder the filepath/filename entries are under')
    parser.add_argument('--att_size', default=14, type=int, help='14 or 7: att features are (att_size, att_size, 2048)')
    parser.add_argument('--model', default='resnet101', type=str, help='resnet101 or resnet152')
    parser.add_argument('--model_root', default='./data/imagenet_weights', type=str,
                        help='the folder holding <model>.pth (ImageNet weights, torchvision key names)')
    parser.add_argument('--batch_size', default=8, type=int,
                        help='(ours) images read ahead and run together when they have the same size')
    parser.add_argument('--device', default='', type=str,
                        help="(ours) 'cuda', 'cpu', ...; default: cuda when available")
    return parser.parse_args(argv)


def image_list(input_json, images_root):
    """[(id, image path)] of the dataset json, in its order."""
    data = read_json(input_json, '--input_json')
    images = data.get('images') if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise SaticError(f"--input_json {input_json}: expected Karpathy's dataset json ({{'images': [...]}})")
    out = []
    for img in images:
        if 'filename' not in img:
            raise SaticError(f'--input_json {input_json}: an image entry has no filename ({str(img)[:60]}...): '
                             "pass Karpathy's dataset_coco.json")
        out.append((image_id(img, input_json), os.path.join(images_root, img.get('filepath', ''), img['filename'])))
    return out


def output_paths(output_dir, iid):
    """(<output_dir>_fc/<id>.npy, <output_dir>_att/<id>.npz)."""
    return os.path.join(output_dir + '_fc', f'{iid}.npy'), os.path.join(output_dir + '_att', f'{iid}.npz')


def write_features(output_dir, iid, fc, att):
    """Both files of one image, each through a temp file and a rename (att first: an image counts as done when
    both exist)."""
    fc_path, att_path = output_paths(output_dir, iid)
    atomic_write(att_path, lambda f: f.write(_encoded(np.savez_compressed, feat=att)))
    atomic_write(fc_path, lambda f: f.write(_encoded(np.save, fc)))


def _encoded(save, *args, **kwargs):
    """The bytes numpy's save / savez_compressed write (a zip file needs a seekable file)."""
    buffer = io.BytesIO()
    save(buffer, *args, **kwargs)
    return buffer.getvalue()


def _read_chunk(chunk):
    """[(normalised image or None, error line or None)] of [(id, path)]."""
    from misc.images import read_image
    out = []
    for _, path in chunk:
        try:
            out.append((read_image(path), None))
        except SaticError as e:
            out.append((None, str(e)))
    return out


def run(args):
    from misc.images import grid_features
    from models.resnet import load_extractor  # (imports torch: --help stays light)
    from misc.utils import resolve_device
    if args.att_size < 1:
        raise SaticError(f'--att_size must be >= 1 (got {args.att_size}; the reference uses 14 or 7)')
    if args.batch_size < 1:
        raise SaticError(f'--batch_size must be >= 1 (got {args.batch_size})')
    images = image_list(args.input_json, args.images_root)
    for suffix in ('_fc', '_att'):
        check_output_folder(args.output_dir + suffix, f'--output_dir {args.output_dir} ({suffix} folder)')
    todo = [(iid, path) for iid, path in images if not all(map(os.path.isfile, output_paths(args.output_dir, iid)))]
    print(f'{len(images)} images in {args.input_json}: {len(images) - len(todo)} already done, {len(todo)} to compute')
    if not todo:
        return
    device = resolve_device(args.device)
    extractor = load_extractor(args.model, os.path.join(args.model_root, f'{args.model}.pth'), args.att_size, device)
    for suffix in ('_fc', '_att'):
        os.makedirs(args.output_dir + suffix, exist_ok=True)
    failed = 0
    chunks = [todo[i:i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
    with Progress(len(todo), 'prepro_feats', 'images') as bar, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:  # reading the next chunk overlaps the network
        ahead = pool.submit(_read_chunk, chunks[0])
        for number, chunk in enumerate(chunks):
            read = ahead.result()
            if number + 1 < len(chunks):
                ahead = pool.submit(_read_chunk, chunks[number + 1])
            for _, error in read:
                if error:
                    failed += 1
                    print(f'skipped: {error}', file=sys.stderr, flush=True)
            good = [(iid, image) for (iid, _), (image, _) in zip(chunk, read) if image is not None]
            for (iid, _), (fc, att) in zip(good, grid_features(extractor, [image for _, image in good])):
                write_features(args.output_dir, iid, fc, att)
            bar.update(len(chunk))
    print(f'wrote the features of {len(todo) - failed} images to {args.output_dir}_fc/ and {args.output_dir}_att/')
    if failed:
        raise SaticError(f'{failed} images of {args.input_json} could not be read (listed above): fix or remove them; '
                         'a rerun computes only the missing ones')


def main(argv=None):
    return run_cli(parse_args, run, argv)


if __name__ == '__main__':
    sys.exit(main())
