"""Small helpers shared by the data scripts and dataloader.py: the command-line wrapper, the vocabulary hash, json io."""
import hashlib
import json
import sys

import numpy as np

from misc.errors import SaticError


def cli(parse_args, run, argv=None):
    """Parse argv, call run(args); a SaticError becomes 'error: <msg>' on stderr and exit status 2."""
    args = parse_args(argv)
    try:
        run(args)
    except SaticError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


def load_json(path, what='json file'):
    """json.load with a one-line SaticError for a missing or malformed file."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SaticError(f'{what} {path} does not exist: check the path') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaticError(f'{what} {path} is not valid json ({e}): re-create it') from None


def dump_json(obj, path):
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
