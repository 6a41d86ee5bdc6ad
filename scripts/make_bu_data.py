"""Bottom-up TSV features -> one file per image: <out>_att/<id>.npz, <out>_fc/<id>.npy, <out>_box/<id>.npy.

data/README.md. Reads every `*.tsv*` file in --downloaded_feats (the reference hard-coded the Karpathy file
names). A row is tab separated, no header: image_id, image_w, image_h, num_boxes, boxes, features, where boxes and
features are base64 float32 reshaped to (num_boxes, -1); any feature dimension and box count. Rows whose base64
lacks '=' padding (real test2014 files) are padded. Writes att: npz key 'feat' (num_boxes, D) float32;
fc: mean over boxes (D,); box: (num_boxes, 4) x1 y1 x2 y2. Rows holding NaN/inf are refused. The output folders
appear whole or not at all (built in hidden siblings, see prepare_outputs/publish); the next run removes what a
killed one left.

  python scripts/make_bu_data.py --downloaded_feats data/bu_data --output_dir data/cocobu
"""
import argparse
import base64
import binascii
import csv
import glob
import multiprocessing
import os
import shutil
import sys

if __package__ in (None, ''):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from misc.errors import SaticError
from misc.console.cli import run_cli
from misc.console.progress import Progress
from misc.files.atomic import fsync_dir
from misc.files.folders import UNFINISHED_MARKER, check_output_folder, pid_alive, staging_folders
from misc.run.faults import fault_point
from misc.options.optspec import at_least, checked

FIELDNAMES = ['image_id', 'image_w', 'image_h', 'num_boxes', 'boxes', 'features']


def b64_floats(text):
    """base64 text (with or without '=' padding) -> float32 vector."""
    text = text.strip()
    text += '=' * (-len(text) % 4)
    return np.frombuffer(base64.b64decode(text, validate=True), dtype=np.float32)


def encode_b64(array, pad=True):
    """float32 array -> base64 text (the TSV encoding); pad=False drops the '=' padding like real test2014 rows."""
    text = base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes()).decode('ascii')
    return text if pad else text.rstrip('=')


def format_row(iid, width, height, boxes, feats, pad=True):
    """One TSV line (with newline) in the bottom-up format; pad=False drops the base64 '=' padding."""
    return '\t'.join([str(iid), str(width), str(height), str(len(boxes)),
                      encode_b64(boxes, pad), encode_b64(feats, pad)]) + '\n'


def parse_row(fields, where):
    """One TSV row (list of 6 strings) -> (image_id, boxes (n, 4), features (n, D)); where names file:line."""
    if len(fields) != len(FIELDNAMES):
        raise SaticError(f'{where}: expected {len(FIELDNAMES)} tab-separated fields ({", ".join(FIELDNAMES)}), '
                         f'got {len(fields)}: the file is truncated or not a bottom-up TSV')
    try:
        iid = int(fields[0])
        n = int(fields[3])
    except ValueError:
        raise SaticError(f'{where}: image_id/num_boxes are not integers ({fields[0][:20]!r}, {fields[3][:20]!r}): '
                         'not a bottom-up TSV') from None
    where = f'{where} (image {iid})'
    try:
        boxes = b64_floats(fields[4])
        feats = b64_floats(fields[5])
    except (binascii.Error, ValueError) as e:
        raise SaticError(f'{where}: bad base64 ({e}): the row is corrupt; re-extract the features') from None
    if n <= 0:
        raise SaticError(f'{where}: num_boxes is {n}: every image needs at least one box')
    if boxes.size != n * 4:
        raise SaticError(f'{where}: boxes hold {boxes.size * 4} bytes, num_boxes {n} needs {n * 16}: '
                         'the row is corrupt or truncated; re-extract the features')
    if feats.size == 0 or feats.size % n:
        raise SaticError(f'{where}: features hold {feats.size * 4} bytes, not a multiple of num_boxes {n} x 4 bytes: '
                         'the row is corrupt or truncated; re-extract the features')
    for name, values in (('features', feats), ('boxes', boxes)):
        if not np.isfinite(values).all():
            raise SaticError(f'{where}: its {name} hold {np.count_nonzero(~np.isfinite(values))} NaN/inf values: '
                             're-extract the features of this image (or drop its row)')
    return iid, boxes.reshape(n, 4), feats.reshape(n, -1)


def convert_row(job):
    """Decode one row and write its three files; job = (fields, where, (att, fc, box) folders).
    Returns (id, n_boxes, D, about the row's bytes in the TSV, for the progress)."""
    fields, where, (att, fc, box) = job
    iid, boxes, feats = parse_row(fields, where)
    np.savez_compressed(os.path.join(att, f'{iid}.npz'), feat=feats)
    np.save(os.path.join(fc, f'{iid}.npy'), feats.mean(0))
    np.save(os.path.join(box, f'{iid}.npy'), boxes)
    return iid, feats.shape[0], feats.shape[1], sum(map(len, fields)) + len(fields)


def iter_rows(files, folders):
    csv.field_size_limit(sys.maxsize)
    for path in files:
        with open(path, newline='') as f:
            for line_no, fields in enumerate(csv.reader(f, delimiter='\t'), 1):
                if fields:
                    yield fields, f'{path}:{line_no}', folders


# ---- outputs: whole or not at all -----------------------------------------------------------------------------
# Each output folder is built in a hidden sibling (".<name>.<pid>-partial") and renamed into place when every row is
# written. Into an existing folder (a second run adds its images, as the reference did) the files are moved one by
# one under UNFINISHED_MARKER, which the loader refuses. A later run removes what a killed one left.

def prepare_outputs(outputs):
    """Check that the outputs can be written, remove a killed run's leftovers; returns the staging folders."""
    for out in outputs:
        check_output_folder(os.path.dirname(out), '--output_dir')
        if os.path.exists(out):
            if not os.path.isdir(out):
                raise SaticError(f'--output_dir: {out} exists and is not a folder: remove it or choose another '
                                 '--output_dir')
            check_output_folder(out, '--output_dir')
        for staging, pid in staging_folders(out):
            if pid_alive(pid):
                raise SaticError(f'--output_dir: another make_bu_data.py (pid {pid}) is writing {out}: wait for it '
                                 f'or stop it')
            shutil.rmtree(staging, ignore_errors=True)
            print(f'removed {staging}, left by an interrupted run')
    staging = []
    for out in outputs:
        parent, name = os.path.split(out)
        staging.append(os.path.join(parent, f'.{name}.{os.getpid()}-partial'))
        os.makedirs(staging[-1])
    return staging


def publish(staging, out):
    """Move a finished staging folder's files to out (a rename when out does not exist yet)."""
    if not os.path.exists(out):
        os.rename(staging, out)
        fsync_dir(os.path.dirname(out))
        return
    marker = os.path.join(out, UNFINISHED_MARKER)
    with open(marker, 'w') as f:
        f.write(f'make_bu_data.py (pid {os.getpid()}) is moving new files here\n')
    for n, name in enumerate(sorted(os.listdir(staging)), 1):
        os.replace(os.path.join(staging, name), os.path.join(out, name))
        fault_point('make_bu_data:moving', n)
    fsync_dir(out)
    os.remove(marker)
    os.rmdir(staging)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--downloaded_feats', default='data/bu_data', help='folder of bottom-up *.tsv* files')
    p.add_argument('--output_dir', default='data/cocobu', help="output prefix ('_att', '_fc', '_box' appended)")
    p.add_argument('--num_workers', default=min(8, os.cpu_count() or 1), type=int,
                   help='(ours) processes writing files (1: in this process)')
    return checked(p.parse_args(argv), num_workers=at_least(1))


def convert_all(files, folders, num_workers):
    """Every row of files -> its three files in folders (att, fc, box); returns [(id, n_boxes, D)]."""
    rows = iter_rows(files, tuple(folders))
    done = []
    with Progress(sum(os.path.getsize(f) for f in files), 'make_bu_data: TSV read', 'B') as bar:
        if num_workers > 1:
            with multiprocessing.Pool(num_workers) as pool:
                for iid, n, d, size in pool.imap_unordered(convert_row, rows, chunksize=16):
                    done.append((iid, n, d))
                    bar.update(size)
                    fault_point('make_bu_data', len(done))
        else:
            for job in rows:
                iid, n, d, size = convert_row(job)
                done.append((iid, n, d))
                bar.update(size)
                fault_point('make_bu_data', len(done))
    return done


def run(args):
    files = sorted(f for f in glob.glob(os.path.join(args.downloaded_feats, '*.tsv*')) if os.path.isfile(f))
    if not files:
        raise SaticError(f'no *.tsv* files in {args.downloaded_feats}: check --downloaded_feats')
    outputs = [os.path.abspath(args.output_dir + suffix) for suffix in ('_att', '_fc', '_box')]
    staging = prepare_outputs(outputs)
    try:
        done = convert_all(files, staging, args.num_workers)
        for folder, out in zip(staging, outputs):
            publish(folder, out)
    finally:
        for folder in staging:
            shutil.rmtree(folder, ignore_errors=True)
    dims = sorted({d for _, _, d in done})
    if len({iid for iid, _, _ in done}) != len(done):
        print(f'warning: {args.downloaded_feats} lists some image ids more than once; their files were overwritten',
              file=sys.stderr)
    counts = [n for _, n, _ in done]
    print(f'wrote {len(done)} images from {len(files)} files to {args.output_dir}_att/_fc/_box '
          f'(D={"/".join(map(str, dims))}, boxes per image {min(counts, default=0)}-{max(counts, default=0)})')


def main(argv=None):
    return run_cli(parse_args, run, argv)


if __name__ == '__main__':
    sys.exit(main())
