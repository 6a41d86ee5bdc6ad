"""Safe loading: infos/histories pickles through a restricted unpickler, tensors with weights_only.
(Split out of misc/fileio.py.)"""
import os
import pickle

import numpy as np

from misc.errors import SaticError


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

def load_torch(path, what='checkpoint'):
    """torch.load(weights_only=True) onto the CPU, with a one-line error for a missing or damaged file."""
    import torch  # (misc.files stays torch-free: the data scripts import it)
    if os.path.isdir(path):
        raise SaticError(f"{what} {path} is a folder: pass the .pth file")
    if not os.path.isfile(path):
        raise SaticError(f"{what} {path}: file not found")
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise SaticError(f"{what} {path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"the file is damaged or not a PyTorch checkpoint")
