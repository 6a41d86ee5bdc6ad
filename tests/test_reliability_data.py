"""Issue 13 ("a run never loses days"), data side: safe cached-tokens loading, features checked when read,
Ctrl-C and broken Java during the COCO metrics, quiet pycocoevalcap, umask-honouring outputs, progress output."""
import os
import pickle
from collections import defaultdict

import pytest

from misc.cider_d import CiderD, load_cached_tokens
from misc.errors import SaticError


# --- 1. --cached_tokens never executes code -------------------------------------------------------------------

class _Exploit:
    """Unpickling it would run `func(*args)`."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _exploit_pickles(marker):
    """Crafted cached-tokens pickles that, loaded with plain pickle.load, would create `marker`."""
    command = 'touch %s' % marker
    code = 'open(%r, "w").close()' % str(marker)
    return {'os.system': _Exploit(os.system, (command,)),
            'builtins.exec': _Exploit(exec, (code,)),
            'builtins.eval': _Exploit(eval, (code,))}


@pytest.mark.parametrize('kind', ['os.system', 'builtins.exec', 'builtins.eval'])
def test_malicious_cached_tokens_do_not_execute(tmp_path, kind):
    marker = tmp_path / 'pwned'
    exploit = _exploit_pickles(marker)[kind]
    path = tmp_path / 'coco-train-idxs.p'
    with open(path, 'wb') as f:  # the payload inside a dict that otherwise looks like a real file
        pickle.dump({'document_frequency': {('a',): 1.0}, 'ref_len': exploit}, f, protocol=2)
    with pytest.raises(SaticError) as err:
        CiderD.from_cached_tokens(str(tmp_path / 'coco-train-idxs'))
    assert not marker.exists()
    message = str(err.value)
    assert str(path) in message and 'refusing' in message and 'prepro_ngrams.py' in message
    assert '\n' not in message


def test_truncated_cached_tokens(tmp_path):
    path = tmp_path / 'coco-train-idxs.p'
    data = pickle.dumps({'document_frequency': {('a', 'b'): 2.0, ('a',): 3.0}, 'ref_len': 4}, protocol=2)
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(SaticError) as err:
        load_cached_tokens(str(path))
    assert str(path) in str(err.value) and '\n' not in str(err.value)
    path.write_bytes(b'')  # empty
    with pytest.raises(SaticError):
        load_cached_tokens(str(path))
    path.write_bytes(pickle.dumps({'document_frequency': {}, 'ref_len': 0}, protocol=2))  # log(0)
    with pytest.raises(SaticError, match='document_frequency/ref_len'):
        load_cached_tokens(str(path))


def test_reference_style_cached_tokens_load(tmp_path):
    """The reference's pickles: protocol 2, a defaultdict(float) of tuple-of-str keys, an int ref_len."""
    df = defaultdict(float)
    df[('1', '5')] += 2.0
    df[('0',)] += 3.0
    path = tmp_path / 'ref.p'
    with open(path, 'wb') as f:
        pickle.dump({'document_frequency': df, 'ref_len': 7}, f, protocol=2)
    loaded, ref_len = load_cached_tokens(str(path))
    assert loaded == {('1', '5'): 2.0, ('0',): 3.0} and ref_len == 7 and isinstance(loaded, defaultdict)


def test_prepro_ngrams_output_loads(tiny_dataset):
    df, ref_len = load_cached_tokens(tiny_dataset.cached_tokens[:-len('.p')])
    assert ref_len == 10 and len(df) > 0  # 8 train + 2 restval
    assert all(isinstance(g, tuple) and all(isinstance(w, str) for w in g) for g in df)
    words, _ = load_cached_tokens(tiny_dataset.cached_tokens.replace('-idxs.p', '-words.p'))
    assert ('<eos>',) in words
