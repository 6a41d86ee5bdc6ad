"""File input/output shared by the loader, the scripts, evaluation, training and bench: atomic writes, json and
feature-array readers, the vocabulary fingerprint, progress output for long jobs, and the command-line wrapper that
turns a SaticError into one line and exit status 2."""
import hashlib
import json
import sys
import time

import numpy as np

from misc.errors import SaticError


# Seconds between progress lines when stderr is not a terminal (log files, cluster jobs); a terminal gets a tqdm bar.
PROGRESS_SECONDS = 60.0


def _human(value, unit):
    if unit != 'B':
        return f'{value:,.0f}' if value >= 100 or value == int(value) else f'{value:.1f}'
    for prefix in ('', 'K', 'M', 'G', 'T'):
        if abs(value) < 1024 or prefix == 'T':
            return f'{value:.0f} {prefix}B' if prefix == '' else f'{value:.1f} {prefix}B'
        value /= 1024.0


def _duration(seconds):
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


class Progress:
    """Progress of a long loop on stderr: a tqdm bar when stderr is a terminal; otherwise (a log file, a cluster
    job) one plain line every PROGRESS_SECONDS: "<desc>: 12,000/123,287 images (9.7%), 402 images/s, 0m30s elapsed,
    about 4m36s left". Nothing at all for a loop shorter than that. Use as a context manager; update(n) per step."""

    def __init__(self, total=None, desc='', unit='it'):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == 'B', unit_divisor=1024,
                            dynamic_ncols=True)

    def update(self, n=1):
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now=None):
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.n / elapsed
        done = _human(self.n, self.unit)
        unit = '' if self.unit == 'B' else ' ' + self.unit
        text = f'{self.desc}: {done}'
        if self.total:
            text += f'/{_human(self.total, self.unit)}{unit} ({100.0 * self.n / self.total:.1f}%)'
        else:
            text += unit
        text += f', {_human(rate, self.unit)}{unit}/s, {_duration(elapsed)} elapsed'
        if self.total and rate > 0 and self.n < self.total:
            text += f', about {_duration((self.total - self.n) / rate)} left'
        return text

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(iterable, total=None, desc='', unit='it'):
    """Iterate over `iterable` with a Progress (total: len(iterable) when it has one)."""
    if total is None and hasattr(iterable, '__len__'):
        total = len(iterable)
    with Progress(total, desc, unit) as bar:
        for item in iterable:
            yield item
            bar.update()


def run_cli(parse_args, run, argv=None):
    """Parse argv, call run(args): 0 when it completes; a SaticError becomes one 'error: <msg>' line on stderr and
    exit status 2; Ctrl-C one 'interrupted' line and 130 (what was already written stays complete: every output
    is written atomically)."""
    args = parse_args(argv)
    try:
        run(args)
    except SaticError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted: outputs not yet written were not written', file=sys.stderr)
        return 130
    return 0


def read_json(path, what='json file'):
    """json.load with a one-line SaticError for a missing or malformed file."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SaticError(f'{what} {path} does not exist: check the path') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaticError(f'{what} {path} is not valid json ({e}): re-create it') from None


def write_json(obj, path):
    """Write json atomically (misc.checkpoint.atomic_write: temp file + fsync + rename, umask permissions), creating
    the folder."""
    from misc.checkpoint import atomic_write
    text = json.dumps(obj)  # json.dumps runs the C encoder; json.dump the (slow) Python one
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def vocab_sha1(ix_to_word):
    """sha1 of a vocabulary {index: word}; keys as strings, as json stores them. Recorded in label h5 attrs."""
    canonical = json.dumps({str(k): v for k, v in ix_to_word.items()}, sort_keys=True, separators=(',', ':'))
    return hashlib.sha1(canonical.encode('utf-8')).hexdigest()


def image_id(img, path='the dataset json'):
    """The id an image entry of dataset_coco.json is known by: cocoid, else imgid, else id."""
    for key in ('cocoid', 'imgid', 'id'):
        if key in img:
            return img[key]
    raise SaticError(f'{path}: an image entry has no cocoid/imgid/id ({str(img)[:60]}...): fix the json')


def read_array(source):
    """The array in an .npy / .npz file (path or file object); npz: key 'feat', else 'z' (older dumps)."""
    data = np.load(source)
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            return data['feat'] if 'feat' in data.files else data['z']
    return data
