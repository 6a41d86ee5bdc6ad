"""Benchmark: eval decoding with its steps replayed from CUDA graphs (--cuda_graphs 1) against the eager flat step,
on one GPU, in one run, A/B interleaved (issue 22).

Paper size, random weights (generator bias[0] = -1e4: every caption runs the full 20 words), the inputs of
bench/decode.py. Rows: K = 1, 2 x greedy at batch 1 and 50, beam 3 at batch 50. The first graphed decode of each
row captures its graphs (its time is reported as `capture_ms`); the timed ones replay them. Each repeat runs eager
then graphed; each side keeps its median. Identical tokens are checked. Merges {"cuda_graphs": {...}} into
bench/results.json.

    python bench/cuda_graphs.py [--repeats 10] [--device cuda]

--device cpu runs the same fixed-shape (padded) step eagerly instead of replaying graphs: a smoke test of this
script, and what the graphed path would cost on a CPU.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import bench_device, machine, merge_results, paper_model  # noqa: E402
from decode import make_inputs  # noqa: E402
from models.decode_config import DecodeConfig  # noqa: E402


def timed_decode(model, att, masks, config, device):
    if device.type == 'cuda':
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        seq = model.decode(att, masks, config)[0]
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0), seq


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--device', default='cuda')
    args = parser.parse_args(argv)
    device = bench_device(args.device)
    info = machine(device)
    print(f"--cuda_graphs 1 vs eager on {info.get('gpu') or info['cpu']}, torch {info['torch']}", flush=True)
    results = {'machine': info}
    print(f"{'K':>2} {'batch':>5} {'beam':>4} {'eager ms':>9} {'graphs ms':>9} {'speedup':>7} {'capture ms':>10} same")
    for k in (1, 2):
        model = paper_model(k, device=device)
        for batch, beam in ((1, 1), (50, 1), (50, 3)):
            att, masks = make_inputs(batch, False, 2048)
            att, masks = att.to(device), None if masks is None else masks.to(device)
            config = DecodeConfig(beam_size=beam)
            model.cuda_graphs = False
            timed_decode(model, att, masks, config, device)  # warm-up
            model.cuda_graphs = True
            capture_ms, _ = timed_decode(model, att, masks, config, device)
            times = {False: [], True: []}
            seqs = {}
            for _ in range(args.repeats):
                for graphs in (False, True):
                    model.cuda_graphs = graphs
                    ms, seqs[graphs] = timed_decode(model, att, masks, config, device)
                    times[graphs].append(ms)
            median = {g: sorted(t)[len(t) // 2] for g, t in times.items()}
            row = {'eager_ms': median[False], 'graphs_ms': median[True], 'speedup': median[False] / median[True],
                   'capture_ms': capture_ms, 'same_tokens': bool(torch.equal(seqs[False], seqs[True]))}
            results[f'K{k}_b{batch}_beam{beam}'] = row
            print(f"{k:>2} {batch:>5} {beam:>4} {row['eager_ms']:>9.1f} {row['graphs_ms']:>9.1f} "
                  f"{row['speedup']:>6.2f}x {capture_ms:>10.0f} {row['same_tokens']}", flush=True)
        del model
    merge_results('cuda_graphs' if device.type == 'cuda' else 'cuda_graphs_on_cpu', results)
    return 0


if __name__ == '__main__':
    sys.exit(main())
