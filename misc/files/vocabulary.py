"""The vocabulary's checks and fingerprint (vocab_sha1, recorded in infos).
(Split out of misc/fileio.py.)"""
import hashlib
import json

from misc.errors import SaticError


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
