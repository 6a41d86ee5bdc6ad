"""Benchmark: the CIDEr-D self-critical reward for one batch (10 images x 5 samples = 50 captions, 5 refs each).

Compares our scorer (misc/eval/cider_d.py, train document frequencies cached as prepro_ngrams writes them) with
pycocoevalcap's CiderScorer on the same 50 x 5 strings. pycocoevalcap cannot use cached document frequencies: it
always computes them from the references it is given, so its numbers differ; only the time is compared.
Prints a table and merges {"reward": {...}} into bench/results.json.

    python bench/reward.py [--repeats 50] [--train_images 5000]
"""
import argparse
import os
import pickle
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import merge_results  # noqa: E402

from misc.eval.cider_d import ngram_counts  # noqa: E402
from misc.train.rewards import SelfCriticalReward, ids_to_str  # noqa: E402

VOCAB = 9487  # COCO Karpathy vocabulary size with word_count_threshold 5


def zipf_caption_rows(rng, count, zipf):
    """(count, 16) zero-padded rows of Zipf-distributed word ids, 8-16 words each."""
    rows = np.zeros((count, 16), dtype=np.uint32)
    for r in range(count):
        length = rng.integers(8, 17)
        rows[r, :length] = np.minimum(rng.zipf(zipf, size=length), VOCAB)
    return rows


def write_cached_tokens(path, rng, train_images, zipf):
    """A synthetic train corpus' document frequencies in scripts/prepro_ngrams.py's format."""
    df = {}
    for _ in range(train_images):
        grams = set()
        for row in zipf_caption_rows(rng, 5, zipf):
            grams.update(ngram_counts(ids_to_str(row, end_token_always=True)))
        for g in grams:
            df[g] = df.get(g, 0.0) + 1.0
    with open(path, 'wb') as f:
        pickle.dump({'document_frequency': df, 'ref_len': train_images}, f, protocol=2)
    return len(df)


def best_ms(fn, repeats):
    """Best wall time of fn() in milliseconds (the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=50)
    parser.add_argument('--train_images', type=int, default=5000)
    parser.add_argument('--images', type=int, default=10)
    parser.add_argument('--seq_per_img', type=int, default=5)
    parser.add_argument('--zipf', type=float, default=1.3)
    parser.add_argument('--output_json', default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                              'results.json'))
    args = parser.parse_args()
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    rng = np.random.default_rng(0)
    B, S = args.images, args.seq_per_img
    with tempfile.TemporaryDirectory() as tmp:
        cached = os.path.join(tmp, 'train-idxs.p')
        num_ngrams = write_cached_tokens(cached, rng, args.train_images, args.zipf)
        reward = SelfCriticalReward(cached)
    cider = reward.scorers['cider'].cider  # misc.eval.cider_d.CiderD of the CIDEr-D part
    gts = [zipf_caption_rows(rng, 5, args.zipf) for _ in range(B)]
    seqs = np.zeros((B * S, 20), dtype=np.int64)
    seqs[:, :16] = np.concatenate([zipf_caption_rows(rng, S, args.zipf) for _ in range(B)])
    hyps = [ids_to_str(row) for row in seqs]
    refs = [[ids_to_str(row) for row in gts[i // S]] for i in range(B * S)]
    keys = [i // S for i in range(B * S)]

    def ours_cold():
        cider._cache.clear()
        cider.score(hyps, refs, keys)

    def pycoco():
        scorer = CiderScorer(n=4, sigma=6.0)
        for h, r in zip(hyps, refs):
            scorer += (h, r)
        scorer.compute_score()

    cider.score(hyps, refs, keys)  # fill the cache
    rows = [
        ('pycocoevalcap CiderScorer.compute_score (df from the 50x5 refs)', best_ms(pycoco, args.repeats)),
        ('ours, references not cached (first sight of each image)', best_ms(ours_cold, args.repeats)),
        ('ours, references cached (CiderD.score)', best_ms(lambda: cider.score(hyps, refs, keys), args.repeats)),
        ('ours, full SelfCriticalReward call (ids->str, baseline), cached',
         best_ms(lambda: reward(seqs, gts, S, image_ids=list(range(B))), args.repeats)),
    ]
    base = rows[0][1]
    print('CIDEr-D reward, %d captions x 5 refs, df from %d synthetic train images (%d n-grams), best of %d'
          % (B * S, args.train_images, num_ngrams, args.repeats))
    print('%-68s %10s %9s' % ('scorer', 'ms/batch', 'speedup'))
    for name, ms in rows:
        print('%-68s %10.2f %8.1fx' % (name, ms, base / ms))
    merge_results('reward', {
        'captions_per_batch': B * S, 'refs_per_image': 5, 'train_images_for_df': args.train_images,
        'pycocoevalcap_ms': round(base, 3),
        'ours_uncached_ms': round(rows[1][1], 3),
        'ours_cached_ms': round(rows[2][1], 3),
        'ours_reward_call_ms': round(rows[3][1], 3),
        'speedup_cached': round(base / rows[2][1], 2),
        'speedup_uncached': round(base / rows[1][1], 2),
        'note': 'pycocoevalcap cannot use cached train df (it computes df from the refs given); time only',
    }, args.output_json)


if __name__ == '__main__':
    main()
