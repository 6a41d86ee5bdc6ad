"""Readers of input files with one-line errors: json files, their fields, feature arrays.
(Split out of misc/fileio.py.)"""
import json

import numpy as np

from misc.errors import SaticError


def read_structured(path, what, load, parse_errors, kind):
    """load(open file) with a one-line SaticError for a missing, unreadable (a folder, no permission) or malformed
    file (one of parse_errors); kind names the format in the messages ('json', 'YAML')."""
    try:
        with open(path) as f:
            return load(f)
    except FileNotFoundError:
        raise SaticError(f'{what} {path} does not exist (no such file): check the path') from None
    except IsADirectoryError:
        raise SaticError(f'{what} {path} is a folder, not a {kind} file: pass the file') from None
    except OSError as e:
        raise SaticError(f'{what} {path} cannot be read ({e.strerror or e}): check the path and its '
                         'permissions') from None
    except parse_errors + (UnicodeDecodeError,) as e:
        reason = str(e).replace('\n', ' ')
        raise SaticError(f'{what} {path} is not valid {kind} ({reason}); it may be truncated: re-create it') from None


def read_json(path, what='json file', expect=None, shape=''):
    """json.load with a one-line SaticError for a missing, unreadable (a folder, no permission) or malformed file;
    expect: the type the top level must have (dict or list), described by shape in the message."""
    data = read_structured(path, what, json.load, (json.JSONDecodeError,), 'json')
    if expect is not None and not isinstance(data, expect):
        raise SaticError(f'{what} {path} holds a json {type(data).__name__}, not {shape or expect.__name__}: '
                         'pass the right file or re-create it')
    return data


def check_field(ok, path, what, problem):
    """One line '<what> <path>: <problem>' (SaticError) unless ok: the schema checks of the readers of input files."""
    if not ok:
        raise SaticError(f'{what} {path}: {problem}')

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
