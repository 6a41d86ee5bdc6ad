"""A folder of per-image feature files (<id>.npy / <id>.npz) -> one LMDB (or HDF5) file.

data/README.md; dataloader.py reads the result when --input_att_dir / --input_fc_dir end in .lmdb (or .h5).
LMDB: key = image id as ascii bytes, value = the file's bytes unchanged (what the reference stored, so its loader
and ours read each other's files). HDF5 (--output_file ending in .h5, our addition): one float32 dataset per image id.
Images: those of --input_json (dataset_coco.json or cocotalk.json), or every file in --folder without it.

  python scripts/dump_to_lmdb.py --input_json data/cocotalk.json --folder data/cocobu_att --output_file data/cocobu_att.lmdb
"""
import argparse
import os
import sys

if __package__ in (None, ''):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import h5py
import numpy as np

from misc.errors import SaticError
from misc.console.cli import run_cli
from misc.console.progress import Progress, progress
from misc.files.atomic import atomic_output
from misc.files.folders import check_output_folder, remove_stale_temps
from misc.files.readers import image_id, read_array, read_json
from misc.run.faults import fault_point

EXTENSIONS = ('.npz', '.npy')


def feature_files(folder, input_json=''):
    """[(image id string, path)] of the images to dump."""
    if not os.path.isdir(folder):
        raise SaticError(f'feature folder {folder} does not exist: check --folder')
    if not input_json:
        names = sorted(n for n in os.listdir(folder) if n.endswith(EXTENSIONS))
        if not names:
            raise SaticError(f'{folder} has no .npy/.npz files: check --folder')
        return [(os.path.splitext(n)[0], os.path.join(folder, n)) for n in names]
    data = read_json(input_json, 'image list json')
    out = []
    for img in data.get('images', []):
        key = str(image_id(img, input_json))
        for ext in EXTENSIONS:
            path = os.path.join(folder, key + ext)
            if os.path.exists(path):
                out.append((key, path))
                break
        else:
            raise SaticError(f'{folder} has no {key}.npz/.npy for image {key} of {input_json}: '
                             'build the features for every image first (make_bu_data.py)')
    return out


def load_array(path, key):
    """The array stored in one feature file (npz key 'feat', else 'z')."""
    try:
        return read_array(path)
    except Exception as e:  # corrupt or truncated file
        raise SaticError(f'{path} (image {key}) is unreadable ({type(e).__name__}: {e}): re-create it') from None


def load_bytes(path, key):
    """The feature file's bytes, unchanged (what the LMDB stores)."""
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as e:
        raise SaticError(f'{path} (image {key}) is unreadable ({e.strerror or e}): re-create it') from None


def write_lmdb(items, output_file):
    import lmdb  # (only for an .lmdb output: .h5 runs never pay for it)
    page = 4096
    pages = sum(os.path.getsize(p) // page + 3 for _, p in items)
    map_size = int(pages * page * 1.5) + (64 << 20)
    with atomic_output(output_file) as tmp:
        os.remove(tmp)  # lmdb creates its file itself
        env = lmdb.open(tmp, subdir=False, map_size=map_size, readonly=False, meminit=False, map_async=True)
        try:
            with Progress(len(items), f'dump_to_lmdb: {output_file}', 'images') as bar:
                for start in range(0, len(items), 1000):
                    with env.begin(write=True) as txn:
                        for key, path in items[start:start + 1000]:
                            txn.put(key.encode('ascii'), load_bytes(path, key))
                            bar.update()
                            fault_point('dump_to_lmdb', bar.n)
            env.sync()
        finally:
            env.close()
    stale_lock = output_file + '-lock'  # a lock file an older run left beside the output
    if os.path.isfile(stale_lock):
        os.remove(stale_lock)


def write_h5(items, output_file):
    with atomic_output(output_file) as tmp, h5py.File(tmp, 'w') as f:
        for key, path in progress(items, desc=f'dump_to_lmdb: {output_file}', unit='images'):
            f.create_dataset(key, data=np.asarray(load_array(path, key), dtype=np.float32))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--input_json', default='', help='dataset_coco.json or cocotalk.json (default: every file in --folder)')
    p.add_argument('--folder', default='data/cocobu_att', help='folder of <id>.npz / <id>.npy feature files')
    p.add_argument('--output_file', default='data/cocobu_att.lmdb', help='.lmdb output (or .h5 for HDF5)')
    return p.parse_args(argv)


def run(args):
    folder = os.path.dirname(args.output_file)
    check_output_folder(folder, '--output_file')  # now, not after reading every feature file
    if os.path.isdir(args.output_file):
        raise SaticError(f'--output_file {args.output_file} is a folder: name a file (.lmdb or .h5)')
    for name in remove_stale_temps(args.output_file):  # what a killed dump left beside it
        print(f'removed {os.path.join(folder, name)}, left by an interrupted run')
    items = feature_files(args.folder, args.input_json)
    if folder:
        os.makedirs(folder, exist_ok=True)
    if args.output_file.endswith(('.h5', '.hdf5')):
        write_h5(items, args.output_file)
    else:
        write_lmdb(items, args.output_file)
    print(f'wrote {len(items)} images from {args.folder} to {args.output_file}')


def main(argv=None):
    return run_cli(parse_args, run, argv)


if __name__ == '__main__':
    sys.exit(main())
