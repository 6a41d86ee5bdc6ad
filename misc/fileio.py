"""File input/output shared by the loader, the scripts, evaluation, training and bench: atomic writes, json and
feature-array readers, the vocabulary fingerprint, progress output for long jobs, and the command-line wrapper that
turns a SaticError into one line and exit status 2."""
import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import sys
import tempfile
import time

import numpy as np
from tqdm import tqdm

from misc.errors import CheckpointError, SaticError


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
    """Progress of a long loop on stderr (or file): a tqdm bar when it is a terminal; otherwise (a log file, a cluster
    job) one plain line every PROGRESS_SECONDS: "<desc>: 12,000/123,287 images (9.7%), 402 images/s, 0m30s elapsed,
    about 4m36s left". Nothing at all for a loop shorter than that, unless final: then one last line at close (the
    rate of the whole loop; evaluation and validation). file: the stream (default stderr; evaluation and
    validation write to stdout, beside the run's other lines, so that `> log` keeps them in order and stderr holds
    only warnings and errors). Use as a context manager; update(n) per step."""

    def __init__(self, total=None, desc='', unit='it', final=False, file=None):
        self.total, self.desc, self.unit, self.final = total, desc, unit, final
        self.file = file or sys.stderr
        self.n = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if self.file.isatty():
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == 'B', unit_divisor=1024,
                            dynamic_ncols=True, file=self.file)

    def update(self, n=1):
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            print(self.line(now), file=self.file, flush=True)

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
        elif self.final and self.n:
            print(self.line(), file=self.file, flush=True)
            self.final = False

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
    try:
        args = parse_args(argv)  # a refused option value: SaticError (opts.OptionParser), one line
        run(args)
    except SaticError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted: outputs not yet written were not written', file=sys.stderr)
        return 130
    return 0


def read_json(path, what='json file', expect=None, shape=''):
    """json.load with a one-line SaticError for a missing, unreadable (a folder, no permission) or malformed file;
    expect: the type the top level must have (dict or list), described by shape in the message."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SaticError(f'{what} {path} does not exist: check the path') from None
    except IsADirectoryError:
        raise SaticError(f'{what} {path} is a folder, not a json file: pass the file') from None
    except OSError as e:
        raise SaticError(f'{what} {path} cannot be read ({e.strerror or e}): check the path and its '
                         'permissions') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaticError(f'{what} {path} is not valid json ({e}); it may be truncated: re-create it') from None
    if expect is not None and not isinstance(data, expect):
        raise SaticError(f'{what} {path} holds a json {type(data).__name__}, not {shape or expect.__name__}: '
                         'pass the right file or re-create it')
    return data


def check_field(ok, path, what, problem):
    """One line '<what> <path>: <problem>' (SaticError) unless ok: the schema checks of the readers of input files."""
    if not ok:
        raise SaticError(f'{what} {path}: {problem}')


def write_json(obj, path):
    """Write json atomically (atomic_write: temp file + fsync + rename, umask permissions), creating
    the folder."""
    text = json.dumps(obj)  # json.dumps runs the C encoder; json.dump the (slow) Python one
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def check_vocabulary(ix_to_word, where):
    """ix_to_word must be {"1": word, ..}: string keys 1..V, string words (one line naming `where` otherwise)."""
    if not isinstance(ix_to_word, dict):
        raise SaticError(f'{where}: ix_to_word is a json {type(ix_to_word).__name__}, not an object '
                         '{"1": word, ..}: re-create the json with scripts/prepro_labels.py')
    keys = sorted(int(k) if str(k).isdigit() else -1 for k in ix_to_word)
    if keys != list(range(1, len(keys) + 1)) or not all(isinstance(w, str) for w in ix_to_word.values()):
        raise SaticError(f'{where}: ix_to_word must map "1".."{len(keys)}" to words (found keys or words of another '
                         'kind): re-create the json with scripts/prepro_labels.py')


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


# ---- safe loading and atomic writing (checkpoints, infos, json, everything the project writes) ----
_SAFE_GLOBALS = {
    ('argparse', 'Namespace'),
    ('collections', 'OrderedDict'),
    ('collections', 'defaultdict'),
    ('builtins', 'dict'), ('builtins', 'list'), ('builtins', 'tuple'), ('builtins', 'set'),
    ('builtins', 'frozenset'), ('builtins', 'int'), ('builtins', 'float'), ('builtins', 'complex'),
    ('builtins', 'str'), ('builtins', 'bytes'), ('builtins', 'bool'), ('builtins', 'bytearray'),
    ('__builtin__', 'dict'), ('__builtin__', 'list'), ('__builtin__', 'set'), ('__builtin__', 'frozenset'),
    ('__builtin__', 'int'), ('__builtin__', 'long'), ('__builtin__', 'float'), ('__builtin__', 'unicode'),
    ('__builtin__', 'str'), ('__builtin__', 'bool'),
    ('copy_reg', '_reconstructor'), ('copyreg', '_reconstructor'),  # plain objects of the classes above
    ('_codecs', 'encode'),  # how protocol 2 stores bytes (numpy array buffers)
    ('__builtin__', 'object'), ('builtins', 'object'),
    # numpy arrays and scalars, under the module names numpy 1.x and 2.x pickle them with
    ('numpy', 'ndarray'), ('numpy', 'dtype'),
    ('numpy.core.multiarray', '_reconstruct'), ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', '_reconstruct'), ('numpy._core.multiarray', 'scalar'),
}
_NUMPY2 = int(np.__version__.split('.')[0]) >= 2
_PY2_NAMES = {('__builtin__', 'long'): ('builtins', 'int'), ('__builtin__', 'unicode'): ('builtins', 'str')}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path, **kwargs):
        super().__init__(file, **kwargs)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            module, name = _PY2_NAMES.get((module, name), (module, name))
            module = {'__builtin__': 'builtins', 'copy_reg': 'copyreg'}.get(module, module)
            if module.startswith('numpy.core.') and _NUMPY2:
                module = 'numpy._core.' + module[len('numpy.core.'):]
            return super().find_class(module, name)
        raise SaticError(f"{self.path}: refusing to unpickle {module}.{name} (infos/histories files hold only "
                         f"options, vocabulary, numbers and arrays); if you trust this file, inspect it by hand")


def load_pickle(path):
    """Load an infos/histories pickle safely, with the latin-1 fallback for files written by Python 2."""
    if os.path.isdir(path):
        raise SaticError(f"{path} is a folder: pass the .pkl file")
    if not os.path.isfile(path):
        raise SaticError(f"{path}: file not found")
    for encoding in ('ASCII', 'latin1'):
        try:
            with open(path, 'rb') as f:
                return _RestrictedUnpickler(f, path, encoding=encoding).load()
        except UnicodeDecodeError:
            continue
        except SaticError:
            raise
        except Exception as e:  # truncated or not a pickle
            raise SaticError(f"{path}: not a readable pickle ({type(e).__name__}: {e}); the file is damaged")
    raise SaticError(f"{path}: cannot decode this pickle's strings")


# ----------------------------------------------------------------------------------------------- file permissions
def _read_umask():
    """The process umask, without changing it when /proc tells it (os.umask(0) + restore briefly affects threads)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def file_mode():
    """Permissions of a new file: 0666 & ~umask (0644 under umask 022), as open() gives; mkstemp gives 0600."""
    return 0o666 & ~_read_umask()


def temp_file(path):
    """(fd, temp path) of a new hidden temp file next to path (same file system: os.replace is atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # The writer's pid in the name (".name.<pid>-XXXX.tmp"): a later run removes what a killed one left
    # (remove_stale_temps).
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.{os.getpid()}-', suffix='.tmp')
    try:
        os.chmod(tmp, file_mode())
    except OSError:
        pass
    return fd, tmp


# make_bu_data.py: the file in an output folder that it is still (or was, when killed) moving new files into.
UNFINISHED_MARKER = '.make_bu_data-unfinished'


def staging_folders(folder):
    """The hidden sibling folders (".<name>.<pid>-partial") where make_bu_data.py builds folder: [(path, pid)]."""
    parent, name = os.path.split(os.path.abspath(folder))
    pattern = re.compile(r'^\.' + re.escape(name) + r'\.(\d+)-partial$')
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    return [(os.path.join(parent, n), int(m.group(1))) for n in sorted(names) for m in [pattern.match(n)] if m]


def pid_alive(pid):
    """Whether process pid exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temps(path):
    """Remove the temp files (temp_file's, and an LMDB lock file beside one) that writers of path killed before
    they finished left beside it: those whose writer's pid is gone. Returns the names removed."""
    folder = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(r'^\.' + re.escape(os.path.basename(path)) + r'\.(\d+)-[^.]+\.tmp(-lock)?$')
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            remove_quietly([os.path.join(folder, name)])
            removed.append(name)
    return removed


def check_output_folder(folder, what):
    """Raise a one-line SaticError unless folder is a writable folder, or can be created (its nearest existing
    parent is a writable folder). Nothing is created: called before any work, so that a run does not fail at its end.
    what: the flag or output named in the message."""
    folder = os.path.abspath(folder or '.')
    probe = folder
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise SaticError(f'{what}: cannot create folder {folder}: {probe} is not a folder; remove it or choose '
                         'another path')
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix='.write-test.', suffix='.tmp')
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        action = 'write to' if probe == folder else 'create'
        raise SaticError(f'{what}: cannot {action} folder {folder} ({probe}: {e.strerror or e}): fix its '
                         'permissions or choose another path') from None


def fault_point(name, count=None):
    """Tests of interrupted runs: with SATIC_TEST_BLOCK_AT=name (or name@count, count matching), print
    'blocked at name' on stdout and wait to be killed. Does nothing otherwise."""
    spec = os.environ.get('SATIC_TEST_BLOCK_AT')
    if spec and spec in (name, f'{name}@{count}'):
        print(f'blocked at {spec}', flush=True)
        while True:
            time.sleep(60)


def fsync_path(path):
    """fsync a file or folder given by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder):
    """Make renames in folder durable (a no-op where directories cannot be opened or synced)."""
    try:
        fsync_path(folder)
    except OSError:
        pass


class _HashingWriter:
    """A write-only file object that also counts and hashes what goes through it."""

    def __init__(self, f):
        self.f, self.sha1, self.size = f, hashlib.sha1(), 0

    def write(self, data):
        self.sha1.update(data)
        self.size += memoryview(data).nbytes
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def remove_quietly(paths):
    """Remove the temp files of a failed save (those that exist; None entries skipped)."""
    for path in paths:
        try:
            if path and os.path.exists(path):
                os.remove(path)
        except OSError:
            pass


class _CountingWriter:
    """A write-only file object that only counts the bytes (the size a writer would produce, without a disk)."""

    def __init__(self):
        self.size = 0

    def write(self, data):
        self.size += memoryview(data).nbytes
        return memoryview(data).nbytes

    def flush(self):
        pass


def bytes_needed(items):
    """The sum of the sizes of the files items [(path, write(f))] write, or None when a writer fails."""
    total = 0
    for _, write in items:
        counter = _CountingWriter()
        try:
            write(counter)
        except Exception:
            return None
        total += counter.size
    return total


def _write_failure(error):
    """What a failed write(f) really met: torch.save's stream writer wraps what the file object raised (a
    KeyboardInterrupt of a second Ctrl-C, the OSError of a full disk) in a RuntimeError; that original is returned,
    the error itself for other OSErrors and stream-writer RuntimeErrors, None for anything else."""
    seen, cause = set(), error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (KeyboardInterrupt, OSError)):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    text = str(error)
    if isinstance(error, RuntimeError) and any(s in text for s in ('PytorchStreamWriter', 'inline_container',
                                                                      'file write failed')):
        return error
    return None


# errnos of a full disk or quota: the one line then says how much a save needs
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_temp_files(items, failure_note=''):
    """items: [(path, write(f))] -> [(path, temp path, size, sha1)], each temp written and fsync'ed.

    Any failure removes the temps written so far. A write error (disk full, permission...; an OSError, or torch's
    stream writer's RuntimeError around it) becomes a one-line CheckpointError naming the file being written, and
    on a full disk the space the files need (their sizes' sum); a KeyboardInterrupt wrapped by torch.save is
    re-raised as itself."""
    written, path = [], None
    try:
        for path, write in items:
            fd, tmp = temp_file(path)
            written.append((path, tmp, 0, ''))
            with os.fdopen(fd, 'wb') as f:
                writer = _HashingWriter(f)
                write(writer)
                f.flush()
                os.fsync(f.fileno())
            written[-1] = (path, tmp, writer.size, writer.sha1.hexdigest())
        return written
    except BaseException as e:
        remove_quietly(tmp for _, tmp, _, _ in written)
        failure = _write_failure(e)
        if isinstance(failure, KeyboardInterrupt):
            raise failure from None
        if failure is None:
            raise
        if isinstance(failure, OSError):
            reason, code = failure.strerror or str(failure), failure.errno
        else:
            reason, code = str(failure).splitlines()[0][:200], None
        space = ''
        if code in _NO_SPACE or code is None:
            needed = bytes_needed(items)
            if needed is not None:
                space = (f'; a save needs {_human(needed, "B")} free beside the previous files (the sum of its '
                         f'{len(items)} files\' sizes)')
        raise CheckpointError(f'{reason} writing {path}{failure_note}{space}') from None


def atomic_write_many(items):
    """items: [(path, write(f))]. Every file is written to a temp file first, then all are renamed into place:
    a crash while writing (the slow part) leaves every previous file intact. (Checkpoints use save_checkpoint,
    whose manifest also makes the renames one commit.)"""
    written = write_temp_files(items)
    try:
        for n, (path, tmp, _, _) in enumerate(written, 1):
            os.replace(tmp, path)
            fault_point('renamed', n)
    except BaseException:
        for _, tmp, _, _ in written:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for folder in {os.path.dirname(os.path.abspath(path)) for path, _ in items}:
        fsync_dir(folder)


@contextlib.contextmanager
def atomic_output(path):
    """For writers that need a file name (LMDB, HDF5): yields a temp path next to path; renamed onto path (umask
    permissions, fsync'ed) when the block ends without error, removed otherwise (with an LMDB lock file beside it),
    so that an interrupted write never leaves a partial file under the final name."""
    fd, tmp = temp_file(path)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, file_mode())  # the writer may have re-created it (LMDB: mode 0755 less the umask)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        remove_quietly([tmp, tmp + '-lock'])
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write(path, write):
    """write(f) into path through a temp file + rename: a crash leaves the previous file intact."""
    atomic_write_many([(path, write)])


def save_pickle(obj, path):
    """Pickle protocol 2 (as the reference), written atomically."""
    atomic_write(path, lambda f: pickle.dump(obj, f, protocol=2))


def save_torch(obj, path):
    """torch.save, written atomically."""
    import torch  # (misc.fileio stays torch-free: the data scripts import it)
    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path, what='checkpoint'):
    """torch.load(weights_only=True) onto the CPU, with a one-line error for a missing or damaged file."""
    import torch  # (misc.fileio stays torch-free: the data scripts import it)
    if os.path.isdir(path):
        raise SaticError(f"{what} {path} is a folder: pass the .pth file")
    if not os.path.isfile(path):
        raise SaticError(f"{what} {path}: file not found")
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise SaticError(f"{what} {path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"the file is damaged or not a PyTorch checkpoint")
