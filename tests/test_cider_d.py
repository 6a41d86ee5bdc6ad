"""misc/eval/cider_d.py: our CIDEr-D == pycocoevalcap's Cider; the cached-df variant == a brute-force implementation."""
import math
import pickle
import random
from collections import defaultdict

import numpy as np
import pytest

from misc.eval.cider_d import CiderD, corpus_cider_d, load_cached_tokens, ngram_counts
from misc.errors import SaticError

WORDS = 'a man woman dog cat sitting on the of with table red two is are in riding bike near'.split()


def random_sentence(rng, low=0, high=14, vocab=WORDS):
    return ' '.join(rng.choice(vocab) for _ in range(rng.randint(low, high)))


def random_corpus(seed, images=40, vocab=WORDS):
    rng = random.Random(seed)
    hyps = [random_sentence(rng, vocab=vocab) for _ in range(images)]
    refs = [[random_sentence(rng, vocab=vocab) for _ in range(rng.randint(1, 6))] for _ in range(images)]
    return hyps, refs


def pycoco_cider(hyps, refs):
    from pycocoevalcap.cider.cider_scorer import CiderScorer
    scorer = CiderScorer(n=4, sigma=6.0)
    for h, r in zip(hyps, refs):
        scorer += (h, r)
    mean, scores = scorer.compute_score()
    return float(mean), np.asarray(scores)


def brute_force_cider_d(hyp, refs, df, num_documents, n=4, sigma=6.0):
    """CIDEr-D written down straight from the paper's formulas (with pycocoevalcap's bigram length)."""
    log_n = math.log(num_documents)

    def vectorise(sentence):
        words = sentence.split()
        vec = [defaultdict(float) for _ in range(n)]
        for k in range(1, n + 1):
            for i in range(len(words) - k + 1):
                vec[k - 1][tuple(words[i:i + k])] += 1.0
        for k in range(n):
            for g in vec[k]:
                vec[k][g] *= log_n - math.log(max(1.0, df.get(g, 0.0)))
        norms = [math.sqrt(sum(v * v for v in vec[k].values())) for k in range(n)]
        return vec, norms, max(len(words) - 1, 0)

    h_vec, h_norm, h_len = vectorise(hyp)
    total = 0.0
    for ref in refs:
        r_vec, r_norm, r_len = vectorise(ref)
        penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma ** 2))
        for k in range(n):
            num = sum(min(v, r_vec[k].get(g, 0.0)) * r_vec[k].get(g, 0.0) for g, v in h_vec[k].items())
            if h_norm[k] > 0 and r_norm[k] > 0:
                num /= h_norm[k] * r_norm[k]
            total += penalty * num / n
    return 10.0 * total / len(refs)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_equals_pycocoevalcap(seed):
    hyps, refs = random_corpus(seed)
    hyps[0], refs[1][0] = '', 'dog'  # empty and one-word sentences (length quirk)
    refs[2] = list(refs[2]) + [hyps[2]]  # an exact match somewhere
    expected_mean, expected = pycoco_cider(hyps, refs)
    mean, scores = corpus_cider_d(hyps, refs)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert abs(mean - expected_mean) < 1e-6
    assert scores.max() > 0


def test_equals_pycocoevalcap_on_id_strings():
    rng = random.Random(3)
    vocab = [str(i) for i in range(1, 60)]
    hyps = [random_sentence(rng, 3, 16, vocab) + ' 0' for _ in range(30)]
    refs = [[random_sentence(rng, 6, 16, vocab) + ' 0' for _ in range(5)] for _ in range(30)]
    np.testing.assert_allclose(corpus_cider_d(hyps, refs)[1], pycoco_cider(hyps, refs)[1], rtol=0, atol=1e-6)


def test_shared_reference_sets_score_together():
    """Hypotheses keyed to the same references (as in self-critical) score as they would one by one."""
    hyps, refs = random_corpus(4, images=6)
    scorer = CiderD.from_references(refs)
    grouped = scorer.score(hyps * 3, refs * 3, keys=list(range(6)) * 3)
    single = np.array([scorer.score([h], [r])[0] for h, r in zip(hyps, refs)])
    np.testing.assert_allclose(grouped, np.tile(single, 3), rtol=0, atol=1e-12)


def cached_df(refs_list):
    df = defaultdict(float)
    for refs in refs_list:
        for g in set(g for r in refs for g in ngram_counts(r)):
            df[g] += 1.0
    return dict(df)


def test_cached_df_equals_brute_force(tmp_path):
    rng = random.Random(5)
    train = [[random_sentence(rng, 2, 14) for _ in range(5)] for _ in range(200)]
    df = cached_df(train)
    path = tmp_path / 'coco-train-idxs.p'
    with open(path, 'wb') as f:
        pickle.dump({'document_frequency': df, 'ref_len': len(train)}, f, protocol=2)
    scorer = CiderD.from_cached_tokens(str(tmp_path / 'coco-train-idxs'))  # '.p' optional
    hyps, refs = random_corpus(6, images=25)
    refs[3] = refs[3] + ['zebra unicorn dog']  # n-grams the train corpus never saw
    hyps[3] = 'a zebra unicorn dog'
    expected = [brute_force_cider_d(h, r, df, len(train)) for h, r in zip(hyps, refs)]
    np.testing.assert_allclose(scorer.score(hyps, refs), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(scorer.score(hyps, refs), expected, rtol=0, atol=1e-6)  # now from the cache
    assert len(scorer._cache) == 25


def test_cache_size_bound():
    hyps, refs = random_corpus(7, images=10)
    scorer = CiderD.from_references(refs, cache_size=3)
    first = scorer.score(hyps, refs, keys=list(range(10)))
    assert len(scorer._cache) == 3
    np.testing.assert_array_equal(scorer.score(hyps, refs, keys=list(range(10))), first)


def test_missing_cached_tokens_file(tmp_path):
    with pytest.raises(SaticError) as err:
        load_cached_tokens(str(tmp_path / 'coco-train-idxs'))
    message = str(err.value)
    assert 'coco-train-idxs.p not found' in message and 'scripts/prepro_ngrams.py' in message
    assert '\n' not in message


def test_python2_pickle_latin1_fallback(tmp_path):
    """A Python 2 pickle of byte strings (non-ASCII) loads with the latin-1 fallback."""
    def binstring(b):
        return b'U' + bytes([len(b)]) + b
    raw = (b'\x80\x02}(' + binstring(b'document_frequency') + b'}(' + binstring(b'caf\xe9') + b'\x85'
           + b'G' + np.array(2.0, '>f8').tobytes() + b'u' + binstring(b'ref_len') + b'K\x04u.')
    path = tmp_path / 'py2.p'
    path.write_bytes(raw)
    df, ref_len = load_cached_tokens(str(path))
    assert df == {('caf\xe9',): 2.0} and ref_len == 4
