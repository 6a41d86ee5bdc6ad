"""Benchmark: the flat decoding step (models/accel/flat_step.py) vs the module step, in one process, A/B alternated.

Greedy decoding (cached, every caption the full 20 words: generator bias[0] = -1e4), K = 1 and 2, at batch 1 on
  - the paper size (6+6 layers, d_model 512, d_ff 2048, vocabulary 9487): what a user gets on this machine;
  - a narrow model (6+6 layers, d_model 64, d_ff 128, the same vocabulary): its matrix work is ~1/60 of the paper
    size's, so its step time is mostly the Python and dispatch around the torch calls, the part the flat step
    removes. It stands in for a CPU whose matrix-vector products are much faster than this one's.
and at batch 50 (10-100 regions each, masks) on the paper size. The same inputs and weights for both paths; each repeat runs both (in alternating order), and each side keeps its median.
Also the per-step floor of bench/decode.py (the decoder's and generator's weights as a chain of F.linear) at the
paper size. Identical tokens and log-probs are checked. Merges {"flat_step": {...}} into bench/results.json.

    python bench/flat_step.py [--repeats 15] [--threads N]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, merge_results, other_load, paper_model  # noqa: E402
from decode import floor_ms, make_inputs  # noqa: E402
from models.decode_config import DecodeConfig  # noqa: E402
from models.sat import SATModel  # noqa: E402


def narrow_model(K):
    torch.manual_seed(0)
    model = SATModel(9487, K=K, d_model=64, d_ff=128, num_layers=6, att_feat_size=2048).eval()
    with torch.no_grad():
        model.model.generator.proj.bias[0] = -1e4
    return model


def ab(model, att, masks, repeats):
    """{'flat': median ms, 'modules': median ms, 'encode': median ms, 'same': identical outputs}."""
    times = {True: [], False: [], 'encode': []}
    outputs = {}
    with torch.inference_mode():
        for r in range(repeats + 2):
            for flat in ((True, False) if r % 2 else (False, True)):  # alternating order
                model.flat_step = flat
                t0 = time.perf_counter()
                outputs[flat] = model.decode(att, masks, DecodeConfig())
                if r >= 2:  # two warm-up rounds
                    times[flat].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.init_cache(*model.encode(att, masks))
            if r >= 2:
                times['encode'].append(time.perf_counter() - t0)
    model.flat_step = True
    median = lambda xs: 1000 * sorted(xs)[len(xs) // 2]  # noqa: E731
    same = all(torch.equal(a, b) for a, b in zip(outputs[True], outputs[False]))
    return {'flat_ms': median(times[True]), 'modules_ms': median(times[False]), 'encode_ms': median(times['encode']),
            'same_outputs': same}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--threads', type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    busy = other_load()
    print(f"flat step vs module step on {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
          f"{torch.get_num_threads()} threads")
    if busy:
        print(f'WARNING: other CPU-heavy processes are running, timings are disturbed: {busy}')
    results = {'machine': info, 'busy_at_start': busy, 'threads': torch.get_num_threads()}
    print(f"{'model':>8} {'batch':>5} {'K':>2} {'modules ms':>10} {'flat ms':>8} {'speedup':>7} {'step ms':>15} "
          f"{'floor':>6} {'x floor':>13} same")
    for size, build, batch in (('paper', paper_model, 1), ('narrow', narrow_model, 1), ('paper', paper_model, 50)):
        att, masks = make_inputs(batch, False, 2048)
        for k in (1, 2):
            model = build(k)
            row = ab(model, att, masks, args.repeats if batch == 1 else max(args.repeats // 3, 3))
            steps = 20 // k
            row['modules_step_ms'] = (row['modules_ms'] - row['encode_ms']) / steps
            row['flat_step_ms'] = (row['flat_ms'] - row['encode_ms']) / steps
            row['speedup'] = row['modules_ms'] / row['flat_ms']
            floor = floor_ms(model, k, 20) if size == 'paper' and batch == 1 else None
            row['floor_ms'] = floor
            results[f'{size}_b{batch}_K{k}'] = row
            x_floor = (f"{row['modules_step_ms'] / floor:.2f} -> {row['flat_step_ms'] / floor:.2f}" if floor
                       else '')
            print(f"{size:>8} {batch:>5} {k:>2} {row['modules_ms']:>10.1f} {row['flat_ms']:>8.1f} {row['speedup']:>6.2f}x "
                  f"{row['modules_step_ms']:>6.2f} -> {row['flat_step_ms']:<6.2f} "
                  f"{f'{floor:.2f}' if floor else '-':>6} {x_floor or '-':>13} {row['same_outputs']}", flush=True)
            del model
    results['busy_at_end'] = other_load()
    merge_results('flat_step', results)
    print('wrote "flat_step" into bench/results.json')
    return 0


if __name__ == '__main__':
    sys.exit(main())
