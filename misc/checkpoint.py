"""The only reader and writer of checkpoints: atomic writes, safe loads.

A training run writes, in its checkpoint folder (SPEC.md section 4):
  model.pth (state_dict), optimizer.pth, infos_<id>.pkl, histories_<id>.pkl, and the -best copies.
Writes go to temporary files in the same folder, then os.replace: a crash leaves the previous files intact.
Loads never execute code: tensors through torch.load(weights_only=True), pickles through an unpickler that
admits only what infos/histories legitimately hold.
"""
import os
import pickle
import tempfile

import numpy as np
import torch

from misc.errors import SaticError

# The classes an infos/histories pickle may name. Anything else is refused.
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


def _temp_file(path):
    """(fd, temp path) of a new hidden temp file next to path (same file system: os.replace is atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')


def _remove_stale_temps(path):
    """Temp files of `path` left by a process killed while writing it (kill -9 runs no clean-up)."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = '.' + os.path.basename(path) + '.'
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.startswith(prefix) and name.endswith('.tmp'):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def atomic_write_many(items):
    """items: [(path, write(f))]. Every file is written to a temp file first, then all are renamed into place:
    a crash while writing (the slow part) leaves every previous file intact and the set consistent."""
    temps = []
    try:
        for path, write in items:
            fd, tmp = _temp_file(path)
            temps.append(tmp)
            with os.fdopen(fd, 'wb') as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        for tmp, (path, _) in zip(temps, items):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def atomic_write(path, write):
    """write(f) into path through a temp file + rename: a crash leaves the previous file intact."""
    atomic_write_many([(path, write)])


def save_pickle(obj, path):
    """Pickle protocol 2 (as the reference), written atomically."""
    atomic_write(path, lambda f: pickle.dump(obj, f, protocol=2))


def save_torch(obj, path):
    """torch.save, written atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path, what='checkpoint'):
    """torch.load(weights_only=True) onto the CPU, with a one-line error for a missing or damaged file."""
    if not os.path.isfile(path):
        raise SaticError(f"{what} {path}: file not found")
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise SaticError(f"{what} {path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"the file is damaged or not a PyTorch checkpoint")


def unwrap(model):
    """The bare model inside DistributedDataParallel, if wrapped."""
    return model.module if hasattr(model, 'module') else model


def save_checkpoint(checkpoint_dir, run_id, model, optimizer, infos, histories, best=False, history_iter=None):
    """Write model/optimizer/infos/histories (and the -best copies of model and infos when best), all at once:
    a crash or kill -9 during the save leaves the previous checkpoint's files, all of them readable."""
    state = unwrap(model).state_dict()
    optimizer_state = optimizer.state_dict()
    path = lambda name: os.path.join(checkpoint_dir, name)  # noqa: E731
    write_torch = lambda obj: lambda f: torch.save(obj, f)  # noqa: E731
    write_pickle = lambda obj: lambda f: pickle.dump(obj, f, protocol=2)  # noqa: E731
    items = [(path('model.pth'), write_torch(state)), (path('optimizer.pth'), write_torch(optimizer_state)),
             (path(f'histories_{run_id}.pkl'), write_pickle(histories))]
    if history_iter is not None:
        items += [(path(f'model-{history_iter}.pth'), write_torch(state)),
                  (path(f'infos_{run_id}-{history_iter}.pkl'), write_pickle(infos))]
    if best:
        items += [(path('model-best.pth'), write_torch(state)), (path(f'infos_{run_id}-best.pkl'), write_pickle(infos))]
    items.append((path(f'infos_{run_id}.pkl'), write_pickle(infos)))  # last: it says where training is
    for name, _ in items:  # a checkpoint folder has one writer: any temp file there is a killed save's
        _remove_stale_temps(name)
    atomic_write_many(items)
