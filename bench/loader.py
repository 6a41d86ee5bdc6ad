"""Benchmark: DataLoader.get_batch('train') throughput on the demo data, per feature backend.

Batches of 10 images x 5 captions (the paper's training batch), dir (<id>.npz / <id>.npy) and lmdb backends
(the lmdb files are dumped from the demo folders on first use). Builds the demo data if needed.
Prints batches/s and merges {"loader": {...}} into bench/results.json.

    python bench/loader.py [--batches 300] [--num_workers 2] [--backends dir,lmdb]
"""
import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import merge_results  # noqa: E402

import opts  # noqa: E402
from dataloader import DataConfig, DataLoader  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_STAMP = '.demo_stamp.json'  # written by scripts/make_demo_data.py when the demo data is complete


def run_script(name, *args):
    """python scripts/<name> args (the scripts are a leaf: run, never imported) -> exit status."""
    return subprocess.run([sys.executable, os.path.join(REPO, 'scripts', name), *args]).returncode


def ensure_copies(demo_dir, backend):
    """Paths of the fc/att features of the demo data in `backend` format (dumped once from the folders)."""
    paths = {}
    for kind in ('fc', 'att'):
        folder = os.path.join(demo_dir, f'cocobu_{kind}')
        if backend == 'dir':
            paths[kind] = folder
            continue
        out = os.path.join(demo_dir, f'cocobu_{kind}.{backend}')
        stamp = os.path.join(demo_dir, DEMO_STAMP)
        if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(stamp):
            if run_script('dump_to_lmdb.py', '--input_json', os.path.join(demo_dir, 'cocotalk.json'),
                          '--folder', folder, '--output_file', out) != 0:
                raise SystemExit(f'bench/loader.py: dumping {folder} to {out} failed')
        paths[kind] = out
    return paths


def measure(demo_dir, backend, args):
    paths = ensure_copies(demo_dir, backend)
    opt = opts.parse_opt(['--input_json', os.path.join(demo_dir, 'cocotalk.json'),
                          '--input_label_h5', os.path.join(demo_dir, 'cocotalk_label.h5'),
                          '--input_fc_dir', paths['fc'], '--input_att_dir', paths['att'],
                          '--batch_size', str(args.batch_size), '--seq_per_img', str(args.seq_per_img),
                          '--num_workers', str(args.num_workers)])
    with DataLoader(DataConfig.from_opt(opt)) as loader:
        for _ in range(5):  # warm up: threads, page cache
            loader.get_batch('train')
        start = time.perf_counter()
        for _ in range(args.batches):
            loader.get_batch('train')
        seconds = time.perf_counter() - start
    return {'batches_per_s': round(args.batches / seconds, 1),
            'images_per_s': round(args.batches * args.batch_size / seconds, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--demo_dir', default='data/demo')
    parser.add_argument('--batches', type=int, default=300)
    parser.add_argument('--batch_size', type=int, default=10)
    parser.add_argument('--seq_per_img', type=int, default=5)
    parser.add_argument('--num_workers', type=int, default=2)
    parser.add_argument('--backends', default='dir,lmdb', help='comma-separated: dir, lmdb, h5')
    parser.add_argument('--results', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results.json'))
    args = parser.parse_args(argv)
    if run_script('make_demo_data.py', '--output_dir', args.demo_dir) != 0:
        return 2
    numbers = {'batch_size': args.batch_size, 'seq_per_img': args.seq_per_img, 'num_workers': args.num_workers,
               'batches': args.batches, 'cpu_count': os.cpu_count()}
    print(f'\nDataLoader train batches of {args.batch_size} x {args.seq_per_img}, {args.num_workers} worker threads:')
    for backend in args.backends.split(','):
        numbers[backend] = measure(args.demo_dir, backend, args)
        print(f'  {backend:5s} {numbers[backend]["batches_per_s"]:8.1f} batches/s '
              f'({numbers[backend]["images_per_s"]:.0f} images/s)')
    merge_results('loader', numbers, args.results)
    print(f'wrote "loader" into {args.results}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
