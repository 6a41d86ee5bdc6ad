"""CIDEr-D (Vedantam et al., 2015): the self-critical reward and the CIDEr of offline evaluation.

Same maths as pycocoevalcap's `Cider` (cider/cider_scorer.py), which already is CIDEr-D: for n = 1..4 each sentence
becomes a tf-idf vector g_n (term frequency x (log(num_documents) - log(max(1, df)))); a hypothesis h is compared
with each reference r by the clipped cosine

    sim_n(h, r) = sum_g min(h_g, r_g) * r_g / (|h_n| |r_n|)          (0 when either norm is 0)

times the Gaussian length penalty exp(-(l_h - l_r)^2 / (2 sigma^2)), sigma = 6; the score is
10 * mean_n(sum_r sim_n(h, r)) / num_refs.

Two quirks of pycocoevalcap are kept so the numbers are identical (both are in the reference's reward too):
- the "length" l of a sentence is its number of BIGRAMS (pycocoevalcap adds term frequencies where the 0-based n-gram
  index `n == 1`), i.e. max(words - 1, 0), not its number of words; deltas only differ from word deltas when a
  sentence is empty or has one word;
- the clipped numerator `min(h_g, r_g) * r_g` is divided by the UNclipped norms |h_n| |r_n|.

Document frequencies come either from the references being scored (`CiderD.from_references`, exactly what
pycocoevalcap does: df = number of reference SETS containing the n-gram, num_documents = number of sets) or from the
train corpus cached by scripts/prepro_ngrams.py (`CiderD.from_cached_tokens`, the self-critical reward).

Speed (bench/reward.py): every n-gram gets a global integer id; a reference set's tf-idf entries, norms and lengths are
computed once and cached (by image id, or by the tuple of its sentences); scoring a batch builds only the hypotheses'
n-grams (one pass for the whole batch) and does a few numpy operations per reference set.
"""
import math
import numbers
import os
from collections import Counter, OrderedDict

import numpy as np

from misc.errors import SaticError
from misc.files.safe_load import load_pickle

PREPRO_NGRAMS_COMMAND = ('python scripts/prepro_ngrams.py --input_json data/dataset_coco.json '
                         '--dict_json data/cocotalk.json --output_pkl data/coco-train --split train')


def ngram_counts(sentence, n=4):
    """Counter of all 1..n-grams (tuples of str) of a whitespace-tokenised sentence."""
    words = sentence.split()
    grams = []
    for k in range(1, n + 1):
        grams += zip(*[words[i:] for i in range(k)])  # the k-grams
    return Counter(grams)


def load_cached_tokens(path):
    """Read a prepro_ngrams pickle -> (document_frequency dict, ref_len = number of images). `.p` is optional."""
    candidates = [path] if path.endswith('.p') else [path + '.p', path]
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        base = candidates[0][:-len('.p')]
        if base.endswith('-idxs') and os.path.isfile(base[:-len('-idxs')] + '-words.p'):
            raise SaticError('cached tokens file %s not found but %s is there: prepro_ngrams.py was interrupted '
                             'between its two files; run it again: %s'
                             % (candidates[0], base[:-len('-idxs')] + '-words.p', PREPRO_NGRAMS_COMMAND))
        raise SaticError('cached tokens file %s not found: build it with %s' % (candidates[0], PREPRO_NGRAMS_COMMAND))
    try:  # never plain pickle.load: a crafted file would run code; this admits only containers and numbers
        data = load_pickle(found)
    except SaticError as e:
        raise SaticError('cached tokens file %s; rebuild it with %s' % (e, PREPRO_NGRAMS_COMMAND)) from None
    if not isinstance(data, dict) or not isinstance(data.get('document_frequency'), dict) \
            or not isinstance(data.get('ref_len'), numbers.Real) or not data['ref_len'] > 0:
        raise SaticError('cached tokens file %s has no document_frequency/ref_len: rebuild it with %s'
                         % (found, PREPRO_NGRAMS_COMMAND))
    return data['document_frequency'], data['ref_len']


class SentenceVectors:
    """tf-idf vectors of S sentences, stored sparsely: one entry per (sentence, distinct n-gram)."""
    __slots__ = ('gram_ids', 'rows', 'orders', 'values', 'norms', 'lengths')

    def __init__(self, gram_ids, rows, orders, values, norms, lengths):
        self.gram_ids = gram_ids  # (E,) global id of each entry's n-gram (-1: unknown, so in no reference)
        self.rows = rows          # (E,) which sentence each entry belongs to (non-decreasing)
        self.orders = orders      # (E,) 0-based n-gram order
        self.values = values      # (E,) tf-idf
        self.norms = norms        # (S, n) |g_n| of each sentence
        self.lengths = lengths    # (S,) bigram counts (see module docstring)

    def slice(self, a, b):
        """The vectors of sentences a..b-1."""
        lo, hi = np.searchsorted(self.rows, [a, b])
        return SentenceVectors(self.gram_ids[lo:hi], self.rows[lo:hi] - a, self.orders[lo:hi], self.values[lo:hi],
                               self.norms[a:b], self.lengths[a:b])


class ReferenceVectors:
    """One image's R references over their J distinct n-grams (compact: built once, then cached)."""
    __slots__ = ('ids', 'rows', 'cols', 'values', 'orders', 'norms', 'lengths')

    def __init__(self, sv):
        self.ids, cols = np.unique(sv.gram_ids, return_inverse=True)  # (J,) sorted global ids, (E,) their columns
        self.rows = sv.rows.astype(np.int16)  # (E,)
        self.cols = cols.astype(np.int32)  # (E,)
        self.values = sv.values  # (E,)
        self.orders = np.zeros(len(self.ids), dtype=np.int8)  # (J,) 0-based n-gram order of each column
        self.orders[cols] = sv.orders
        self.norms = sv.norms  # (R, n)
        self.lengths = sv.lengths  # (R,)

    def dense(self):
        """(R, J) tf-idf matrix."""
        vectors = np.zeros((len(self.lengths), len(self.ids)))
        vectors[self.rows, self.cols] = self.values
        return vectors


class CiderD:
    """CIDEr-D scorer with fixed document frequencies and a cache of reference vectors."""

    def __init__(self, document_frequency, num_documents, n=4, sigma=6.0, cache_size=None):
        """document_frequency: {n-gram tuple: count}; num_documents: the corpus size (ref_len before the log).
        cache_size: at most this many reference sets are kept (least recently used dropped); None = no limit
        (about 6 KB per set of 5 references)."""
        self.n = n
        self.sigma = sigma
        self.log_num_documents = math.log(float(num_documents))
        # every n-gram gets an integer id: those with a document frequency first, then any other n-gram met in a
        # reference (df 0); a hypothesis n-gram never met in a reference cannot match one and gets id -1
        self.gram_ids = {g: i for i, g in enumerate(document_frequency)}
        df = np.fromiter(document_frequency.values(), dtype=np.float64, count=len(document_frequency))
        self.idf = self.log_num_documents - np.log(np.maximum(1.0, df))  # (num known n-grams,)
        self.cache_size = cache_size
        self._cache = OrderedDict()

    @classmethod
    def from_cached_tokens(cls, path, **kwargs):
        """Train document frequencies written by scripts/prepro_ngrams.py (the self-critical reward)."""
        document_frequency, ref_len = load_cached_tokens(path)
        return cls(document_frequency, ref_len, **kwargs)

    @classmethod
    def from_references(cls, refs_list, n=4, **kwargs):
        """Document frequencies of the reference sets themselves, as pycocoevalcap computes them."""
        df = Counter()
        for refs in refs_list:
            df.update(set(g for ref in refs for g in ngram_counts(ref, n)))
        return cls(df, len(refs_list), n=n, **kwargs)

    def sentence_vectors(self, sentences, references=False):
        """tf-idf vectors, norms and lengths of S sentences, all at once (one numpy pass, for speed).
        references=True gives every new n-gram an id, so that hypotheses can match it."""
        grams, tfs, sizes = [], [], []
        for sentence in sentences:
            counts = ngram_counts(sentence, self.n)
            grams.extend(counts)
            tfs.extend(counts.values())
            sizes.append(len(counts))
        S, n, E = len(sentences), self.n, len(grams)
        ids = self.gram_ids
        if references:
            gram_ids = np.fromiter((ids.setdefault(g, len(ids)) for g in grams), dtype=np.int64, count=E)
        else:
            gram_ids = np.fromiter((ids.get(g, -1) for g in grams), dtype=np.int64, count=E)
        known = (gram_ids >= 0) & (gram_ids < len(self.idf))
        idf = np.full(E, self.log_num_documents)  # (E,) no document frequency: df counts as 1, idf = log(N)
        idf[known] = self.idf[gram_ids[known]]
        tfs = np.array(tfs, dtype=np.float64)  # (E,)
        values = tfs * idf  # (E,)
        rows = np.repeat(np.arange(S), sizes)  # (E,)
        orders = np.fromiter(map(len, grams), dtype=np.int64, count=E) - 1  # (E,)
        norms = np.sqrt(np.bincount(rows * n + orders, weights=values ** 2, minlength=S * n)).reshape(S, n)
        # pycocoevalcap quirk: the length is the number of bigrams
        lengths = np.bincount(rows, weights=tfs * (orders == 1), minlength=S)  # (S,)
        return SentenceVectors(gram_ids, rows, orders, values, norms, lengths)

    def lookup(self, key):
        """The cached ReferenceVectors of `key`, or None."""
        rv = self._cache.get(key)
        if rv is not None:
            self._cache.move_to_end(key)
        return rv

    def reference_vectors(self, refs, key=None):
        """ReferenceVectors of a list of reference sentences, cached under `key` (default: the tuple of refs)."""
        key = tuple(refs) if key is None else key
        rv = self.lookup(key)
        if rv is None:
            rv = ReferenceVectors(self.sentence_vectors(refs, references=True))
            self._cache[key] = rv
            if self.cache_size is not None and len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return rv

    def _score_vectors(self, sv, rv):
        """CIDEr-D of S sentence vectors against one reference set -> (S,)."""
        S, J = len(sv.lengths), len(rv.ids)
        if J == 0:  # only empty references: every similarity is 0
            return np.zeros(S)
        cols = np.minimum(np.searchsorted(rv.ids, sv.gram_ids), J - 1)  # (E,)
        shared = rv.ids[cols] == sv.gram_ids  # n-grams absent from the references only add to the hypothesis norm
        H = np.zeros((S, J))  # (S, J)
        H[sv.rows[shared], cols[shared]] = sv.values[shared]
        V = rv.dense()[None]  # (1, R, J)
        clipped = np.minimum(H[:, None, :], V) * V  # (S, R, J) the "D" clipping: min(h, r) * r
        numer = clipped @ np.eye(self.n)[rv.orders]  # (S, R, n) summed per n-gram order
        denom = sv.norms[:, None, :] * rv.norms[None]  # (S, R, n)
        # a zero norm means a zero numerator too: pycocoevalcap then leaves it undivided (0)
        denom[denom == 0] = 1.0
        delta = sv.lengths[:, None] - rv.lengths[None]  # (S, R)
        penalty = np.exp(-(delta ** 2) / (2 * self.sigma ** 2))  # (S, R)
        return 10.0 * ((numer / denom).mean(axis=2) * penalty).sum(axis=1) / len(rv.lengths)  # (S,)

    def score_groups(self, hyps, rvs, sizes):
        """Hypotheses in consecutive groups, group g (sizes[g] of them) against rvs[g] -> (len(hyps),) float64."""
        sv = self.sentence_vectors(hyps)  # one pass over all hypotheses, whatever the grouping
        scores, a = [], 0
        for rv, size in zip(rvs, sizes):
            scores.append(self._score_vectors(sv.slice(a, a + size), rv))
            a += size
        return np.concatenate(scores) if scores else np.zeros(0)

    def score(self, hyps, refs, keys=None):
        """CIDEr-D of hyps[i] against refs[i] (a list of str) -> (len(hyps),) float64.

        Hypotheses sharing a key (default: the tuple of their references) are scored together."""
        keys = [tuple(r) for r in refs] if keys is None else keys
        groups = OrderedDict()
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        order = [i for idx in groups.values() for i in idx]  # hypotheses grouped by reference set
        rvs = [self.reference_vectors(refs[idx[0]], key) for key, idx in groups.items()]
        scores = np.zeros(len(hyps))
        scores[order] = self.score_groups([hyps[i] for i in order], rvs, [len(idx) for idx in groups.values()])
        return scores


def corpus_cider_d(hyps, refs_list, n=4, sigma=6.0):
    """pycocoevalcap's Cider.compute_score: df from the references given -> (mean, (len(hyps),) scores)."""
    scorer = CiderD.from_references(refs_list, n=n, sigma=sigma)
    scores = scorer.score(hyps, refs_list, keys=list(range(len(hyps))))
    return float(scores.mean()), scores
