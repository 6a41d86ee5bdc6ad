"""A run folder (--checkpoint_path) belongs to one run (docs/reproducibility.md, "Interrupts and resume"); train.py's rank 0 claims
it before any work.

`RunFolderLock`: an exclusive fcntl.flock on DIR/.satic.lock, held for the run's whole life and released by the
operating system when the process ends, however it ends (kill -9 included: no stale lock). The file holds the
owner's pid, host, start time and command, for the one line that refuses a second run.
`check_owner`: a fresh run (no --start_from) into a folder that holds a checkpoint, a run whose --id is not the
folder's, or a resume from another folder into one that holds a checkpoint is refused in one line, unless
--overwrite_run 1 (then this run's first save replaces the folder's checkpoint: misc.run.checkpoint.save_checkpoint).
"""
import errno
import fcntl
import json
import os
import re
import socket
import sys
import time

from misc.files import atomic
from misc.run.infos import read_infos
from misc.errors import SaticError

LOCK_NAME = '.satic.lock'

# The files of a checkpoint (misc/run/checkpoint.py writes them): what a folder must not hold for a fresh run.
CHECKPOINT_FILE = re.compile(r'^(model(-[^/]+)?\.pth|optimizer\.pth|infos_.+\.pkl|histories_.+\.pkl|'
                             r'checkpoint_.+\.json)$')


class FolderBusy(SaticError):
    """Another live process holds the run folder."""


def _owner_text(path, tries=20):
    """The owner record of a held lock file (the owner writes it just after taking the lock: retried briefly)."""
    for attempt in range(tries):
        try:
            with open(path, encoding='utf-8') as f:
                owner = json.loads(f.read())
            if isinstance(owner, dict) and 'pid' in owner:
                command = ' '.join(owner.get('command', []))
                command = command if len(command) <= 120 else command[:117] + '...'
                return (f"pid {owner['pid']} on {owner.get('host', '?')}, started {owner.get('started', '?')}"
                        + (f': {command}' if command else ''))
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return 'a process that did not say which'


def _flock(fd, how):
    """flock(fd, how | LOCK_NB): True when taken, False when another open file holds a conflicting lock."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


class RunFolderLock:
    """The exclusive lock of one run folder (a context manager): acquire() or FolderBusy, one line."""

    def __init__(self, folder, flag='--checkpoint_path'):
        self.folder, self.flag, self.fd = folder, flag, None

    @property
    def path(self):
        return os.path.join(self.folder, LOCK_NAME)

    def acquire(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, atomic.file_mode())  # (not inherited by children)
        try:
            taken = _flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks (some NFS mounts): say so, run unguarded
            os.close(fd)
            print(f'warning: cannot lock {self.folder} ({e.strerror or e}): make sure no other run writes there',
                  file=sys.stderr, flush=True)
            return self
        if not taken:
            os.close(fd)
            raise FolderBusy(f'{self.flag} {self.folder} is in use by another run ({_owner_text(self.path)}): '
                             f'wait for it to end, or choose another {self.flag}')
        command = [os.path.basename(sys.argv[0])] + sys.argv[1:] if sys.argv and sys.argv[0] else []
        owner = {'pid': os.getpid(), 'host': socket.gethostname(),
                 'started': time.strftime('%Y-%m-%d %H:%M:%S %z'), 'command': command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + '\n').encode('utf-8'), 0)
        self.fd = fd
        return self

    def release(self):
        """Clear the owner record and close: the OS drops the lock (as it does when the process dies)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def check_not_busy(folder, flag='--start_from'):
    """Refuse (FolderBusy) a folder that a live run holds (a resume from it would read a save in progress)."""
    path = os.path.join(folder, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file (a reference or copied folder), or unreadable: nobody to ask
    try:
        free = _flock(fd, fcntl.LOCK_SH)  # (released at once by the close below)
    except OSError:
        free = True  # a file system without locks
    finally:
        os.close(fd)
    if not free:
        raise FolderBusy(f'{flag} {folder} is in use by another run ({_owner_text(path)}): resume from it after '
                         f'that run ends')


def checkpoint_files(folder):
    """The names of checkpoint files in folder (sorted)."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(n for n in names if CHECKPOINT_FILE.match(n))


def run_ids(folder):
    """The run ids of the infos_<id>.pkl in folder, the -best / -<iter> copies folded into their run."""
    names = {n[len('infos_'):-len('.pkl')] for n in checkpoint_files(folder) if n.startswith('infos_')}
    folded = set()
    for name in names:
        match = re.fullmatch(r'(.+)-(best|\d+)', name)
        folded.add(match.group(1) if match and match.group(1) in names else name)
    return sorted(folded)


def _is_ours(name, run_id):
    return name == run_id or re.fullmatch(re.escape(run_id) + r'-(best|\d+)', name) is not None


def same_folder(a, b):
    """a and b are the same folder (or would be, when they do not exist yet)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def held_checkpoint(folder, files):
    """What the folder holds, for a message: 'run ID, iteration N' (its infos) or its files' names."""
    ids = run_ids(folder)
    for run_id in ids:
        try:
            iteration = read_infos(os.path.join(folder, f'infos_{run_id}.pkl'), check=False).get('iter')
            return f"run '{run_id}' at iteration {iteration}"
        except (SaticError, AttributeError, OSError):
            continue
    shown = ', '.join(files[:4]) + (', ...' if len(files) > 4 else '')
    return shown


def check_owner(folder, run_id, start_from=None, overwrite_run=0):
    """The run-folder rule (module docstring) for the run `run_id` (--id) saving into folder (--checkpoint_path),
    resumed from start_from (--start_from) or not; returns the checkpoint files that --overwrite_run 1 lets this run
    replace ([] when there are none)."""
    files = checkpoint_files(folder)
    if not files:
        return []
    if overwrite_run:
        print(f'--overwrite_run 1: the checkpoint in {folder} ({held_checkpoint(folder, files)}) is replaced by '
              f"this run's first save", flush=True)
        return files
    held = held_checkpoint(folder, files)
    others = [name for name in run_ids(folder) if not _is_ours(name, run_id)]
    override = "or pass --overwrite_run 1 to replace that checkpoint (at this run's first save)"
    if others:
        raise SaticError(f"--checkpoint_path {folder} holds another run's checkpoint (infos_{others[0]}.pkl, "
                         f"{held}): --id {run_id} would overwrite its model.pth and optimizer.pth (their names carry "
                         f"no id); choose another --checkpoint_path, {override}")
    if not start_from:
        raise SaticError(f'--checkpoint_path {folder} holds the checkpoint of a run ({held}): resume it with '
                         f'--start_from {folder}, choose another --checkpoint_path, {override}')
    if not same_folder(start_from, folder):
        raise SaticError(f'--checkpoint_path {folder} holds the checkpoint of another run ({held}) than '
                         f'--start_from {start_from}: resume into an empty folder (or into {start_from} '
                         f'itself), continue that run with --start_from {folder}, {override}')
    return []
