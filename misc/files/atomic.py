"""Atomic writes (temp file, fsync, rename; several files at once), honouring the umask.
(Split out of misc/fileio.py.)"""
import contextlib
import errno
import hashlib
import json
import os
import pickle
import tempfile

from misc.console.progress import _human
from misc.errors import CheckpointError
from misc.run.faults import fault_point


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
    import torch  # (misc.files stays torch-free: the data scripts import it)
    atomic_write(path, lambda f: torch.save(obj, f))

def write_json(obj, path):
    """Write json atomically (atomic_write: temp file + fsync + rename, umask permissions), creating
    the folder."""
    text = json.dumps(obj)  # json.dumps runs the C encoder; json.dump the (slow) Python one
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))
