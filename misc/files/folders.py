"""Output folders and the temp files of killed writers: writability checks, staging folders, pid checks.
(Split out of misc/fileio.py.)"""
import os
import re
import tempfile

from misc.errors import SaticError
from misc.files.atomic import remove_quietly


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
