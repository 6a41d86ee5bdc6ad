"""Benchmark: this tree's decoding steps against another commit's flat step, in one process, A/B interleaved.

The other side ("base") is models/accel/flat_step.py as of --base (read with `git show`, loaded as a module next to
this tree's) with this tree's step-attention switch off (models.accel.kernels.PLAIN_ATTENTION_MIN_ROWS huge: torch's
fused attention everywhere, as before issue 30). Everything else (encoder, search loop, cache) is this tree's, so the
ratio is the step's own. Paper size, greedy, cached, every caption the full 20 words; batch 1 (50 regions, no mask)
and batch 50 (10-100 regions). Each repeat runs: base steps, new steps, the floor (bench/decode.py's chain of
F.linear over the step's weights), in alternating order; each keeps its median and minimum. The step time is
all steps of one caption divided by the steps; init_cache (the memory keys/values, projected once per caption, like
the encoder) is timed apart (the "init" column, this tree's side; the encoder is run once, outside).

    python bench/step_ab.py [--base a63be36] [--repeats 9] [--Ks 1,2] [--batches 1,50] [--threads N]

Prints one row per (K, batch): base and new ms/step (median, min), their ratio, each against the floor, identical
tokens and log-probs. Merges {"step_ab": {...}} into bench/results.json (see --no_save).
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, merge_results, other_load, paper_model  # noqa: E402
from decode import floor_ms, make_inputs  # noqa: E402
from models.accel import kernels  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_flat_step(commit):
    """The FlatStep class of models/accel/flat_step.py at `commit` (a module of its own)."""
    source = subprocess.run(['git', '-C', ROOT, 'show', f'{commit}:models/accel/flat_step.py'], check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f'base_flat_step_{commit}', loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f'{commit}:models/accel/flat_step.py', 'exec'), module.__dict__)
    return module.FlatStep


def run_steps(model, memory, memory_mask, batch, step_class, plain_rows):
    """init_cache + greedy steps for one caption with the given FlatStep class -> (seconds of the steps, seconds of
    init_cache (the memory keys/values, once per caption), tokens, log-probs)."""
    saved = kernels.PLAIN_ATTENTION_MIN_ROWS
    kernels.PLAIN_ATTENTION_MIN_ROWS = plain_rows
    try:
        t0 = time.perf_counter()
        cache = model.init_cache(memory, memory_mask)
        cache.flat_step = step_class(model)
        t1 = time.perf_counter()
        tokens = torch.zeros(batch, model.K, dtype=torch.long)
        seq, logps = [], []
        for _ in range(model.max_length // model.K):
            logprobs, cache = model.step(tokens, cache)  # (S, K, V)
            best, tokens = logprobs.max(-1)
            seq.append(tokens)
            logps.append(best)
        elapsed = time.perf_counter() - t1
    finally:
        kernels.PLAIN_ATTENTION_MIN_ROWS = saved
    return elapsed, t1 - t0, torch.cat(seq, 1), torch.cat(logps, 1)


def ab(model, batch, repeats, base_class):
    from models.accel.flat_step import FlatStep
    att, masks = make_inputs(batch, False, model.att_embed[0].in_features)
    steps = model.max_length // model.K
    rows = batch * model.K
    times = {'base': [], 'new': [], 'floor': [], 'init_cache': []}
    out = {}
    with torch.inference_mode():
        memory, memory_mask = model.encode(att, masks)
        sides = {'base': (base_class, 10 ** 9), 'new': (FlatStep, kernels.PLAIN_ATTENTION_MIN_ROWS)}
        for r in range(repeats + 1):
            order = ['base', 'new', 'floor'] if r % 2 else ['floor', 'new', 'base']
            for side in order:
                if side == 'floor':
                    ms = floor_ms(model, rows, 3)
                else:
                    seconds, init_s, seq, logps = run_steps(model, memory, memory_mask, batch, *sides[side])
                    out[side] = (seq, logps)
                    ms = 1000 * seconds / steps
                    if r and side == 'new':
                        times['init_cache'].append(1000 * init_s)
                if r:  # the first round warms up
                    times[side].append(ms)
    result = {side: {'median': statistics.median(t), 'min': min(t)} for side, t in times.items()}
    result['same_tokens'] = bool(torch.equal(out['base'][0], out['new'][0]))
    result['logprob_max_diff'] = float((out['base'][1] - out['new'][1]).abs().max())
    result['ratio_median'] = result['base']['median'] / result['new']['median']
    result['ratio_min'] = result['base']['min'] / result['new']['min']
    pairs = [b / n for b, n in zip(times['base'], times['new'])]
    result['ratio_per_repeat'] = [round(p, 3) for p in pairs]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--base', default='a63be36', help='commit whose models/accel/flat_step.py is the base side')
    parser.add_argument('--repeats', type=int, default=9)
    parser.add_argument('--Ks', default='1,2')
    parser.add_argument('--batches', default='1,50')
    parser.add_argument('--threads', type=int, default=0)
    parser.add_argument('--no_save', action='store_true', help='do not write bench/results.json')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    busy = other_load()
    base_class = base_flat_step(args.base)
    print(f"step A/B: {args.base} flat step vs this tree on {info['cpu']} ({info['cpu_capability']}), "
          f"{torch.get_num_threads()} threads, ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '-')}")
    if busy:
        print(f'WARNING: other CPU-heavy processes are running, timings are disturbed: {busy}')
    print(f"{'K':>2} {'batch':>5} {'base ms/step':>15} {'new ms/step':>15} {'floor ms':>13} {'speedup':>13} "
          f"{'base x floor':>12} {'new x floor':>11} {'init ms':>7} same tokens (max log-prob diff)")
    results = {'machine': info, 'base': args.base, 'busy_at_start': busy,
               'env': {k: os.environ.get(k) for k in ('ATEN_CPU_CAPABILITY', 'ONEDNN_MAX_CPU_ISA',
                                                       'MKL_ENABLE_INSTRUCTIONS', 'FBGEMM_ENABLE_INSTRUCTIONS')}}
    for K in (int(k) for k in args.Ks.split(',')):
        model = paper_model(K)
        for batch in (int(b) for b in args.batches.split(',')):
            r = ab(model, batch, args.repeats if batch == 1 else max(3, args.repeats // 2), base_class)
            results[f'K{K}_b{batch}'] = r
            b, n, f = r['base'], r['new'], r['floor']
            print(f"{K:>2} {batch:>5} {b['median']:>7.2f} ({b['min']:>5.2f}) {n['median']:>7.2f} ({n['min']:>5.2f}) "
                  f"{f['median']:>6.2f} ({f['min']:>4.2f}) {r['ratio_median']:>5.2f}x/{r['ratio_min']:.2f}x "
                  f"{b['median'] / f['median']:>5.2f}/{b['min'] / f['min']:.2f} "
                  f"{n['median'] / f['median']:>5.2f}/{n['min'] / f['min']:.2f} "
                  f"{r['init_cache']['median']:>7.1f} {r['same_tokens']} ({r['logprob_max_diff']:.1e})", flush=True)
        del model
    results['busy_at_end'] = other_load()
    print('(median (min) of the repeats; speedup base/new: medians/minima; x floor: median/min)')
    if not args.no_save:
        merge_results('step_ab', results)
        print('wrote "step_ab" into bench/results.json')
    return 0


if __name__ == '__main__':
    sys.exit(main())
