"""Benchmark: caption decoding latency of SATIC at the paper configuration, cached vs uncached, vs the floor.

Random weights (generator bias[0] = -1e4, so every run decodes the full 20 words), 6+6 layers, d_model 512,
d_ff 2048, vocabulary 9487. Batch 1: 50 regions of 2048-d, no mask; batch 50: 10-100 regions each, with masks.
Rows: K in {1, 2, 4} x batch {1, 50} x beam {1, 3} x cached (per-layer K/V cache, cross-attention K/V projected
once) / uncached (use_cache=0, the reference's way: whole prefix and cross-attention K/V recomputed every step).

The floor: one pass over the decoder's and generator's weights as a chain of F.linear calls on R rows (R = the
rows one decoding step feeds the decoder: batch * beam * K), the matrix work a step cannot avoid; a step's
"x floor" column is (decode time - encode time) / steps / floor, where the encode time of a cached row includes
init_cache's projection of the memory keys/values (once per caption, like the encoder; issue 30: before, it was
charged to the steps, ~16 ms of a 70 ms batch-50 K=1 step on the 2-core AMD EPYC). Also --bf16 rows
(torch.autocast cpu bfloat16, the flat step's weights cast once: models/accel/bf16.py; speed and token agreement
with fp32 on the same inputs) and --profile (torch.profiler over batch-1 cached K=1 greedy decoding: matrix work vs
everything else). Prints tables and merges {"decode": {...}} into results.json.

    python bench/decode.py [--quick] [--bf16] [--profile] [--Ks 1,2,4] [--repeats 5] [--device cuda]

--device cuda times on the GPU (torch.cuda.synchronize around every timed call, after the warm-up calls) and merges
{"decode_cuda": {...}} instead; its bf16 rows are torch.autocast('cuda', bfloat16).
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import bench_device, describe, machine, median_ms, merge_results, other_load, paper_model  # noqa: E402
from models.decode_config import DecodeConfig  # noqa: E402

MATRIX_OPS = ('aten::addmm', 'aten::mm', 'aten::bmm', 'aten::baddbmm', 'aten::matmul', 'aten::linear')


def make_inputs(batch, quick, att_feat_size, seed=0):
    """Batch 1: (1, 50, F) without mask; batch > 1: (B, 100, F) with 10-100 valid regions each (masks (B, 100))."""
    g = torch.Generator().manual_seed(seed + batch)
    if batch == 1:
        return torch.randn(1, 50, att_feat_size, generator=g), None
    n_max = 100
    counts = torch.randint(10, n_max + 1, (batch,), generator=g)  # (B,)
    att = torch.randn(batch, n_max, att_feat_size, generator=g)  # (B, N, F)
    masks = (torch.arange(n_max)[None] < counts[:, None]).float()  # (B, N)
    return att * masks[..., None], masks


def floor_ms(model, rows, repeats):
    """One pass over the decoder's per-step weights and the generator as F.linear on `rows` rows (median ms).

    Per layer: self-attention q, k, v, out; cross-attention q, out (its k, v are projected once per image, not per
    step); FFN w_1, w_2; then the generator. This is the matrix-vector work a batch-1 step cannot avoid.
    """
    weights = []
    for layer in model.model.decoder.layers:
        weights += [layer.self_attn.linears[i] for i in range(4)]
        weights += [layer.src_attn.linears[0], layer.src_attn.linears[3]]
        weights += [layer.feed_forward.w_1, layer.feed_forward.w_2]
    weights.append(model.model.generator.proj)
    device = model.model.generator.proj.weight.device
    x = torch.randn(rows, model.d_model, device=device)  # (R, D)

    def chain_explicit():
        # each output feeds the next weight when the sizes chain (w_1 -> w_2), else the next takes (R, D)
        h = x
        for lin in weights:
            inp = h if h.size(1) == lin.weight.size(1) else x
            h = F.linear(inp, lin.weight, lin.bias)
        return h

    with torch.inference_mode():
        return median_ms(chain_explicit, repeats, warmup=3, device=device)


def decode_ms(model, att, masks, beam, use_cache, repeats, warmup):
    """(median ms of model.decode, its seq) under inference_mode."""
    out = {}

    def run():
        with torch.inference_mode():
            out['seq'] = model.decode(att, masks, DecodeConfig(beam_size=beam, use_cache=bool(use_cache)))[0]
    ms = median_ms(run, repeats, warmup, device=att.device)
    return ms, out['seq']


def encode_ms(model, att, masks, repeats, use_cache=0):
    """The encoder and init_cache (with use_cache, the memory keys/values projected once per caption)."""
    def run():
        with torch.inference_mode():
            memory, mask = model.encode(att, masks)
            model.init_cache(memory, mask, use_cache=use_cache)
    return median_ms(run, repeats, warmup=1, device=att.device)


def profile_decode(model, att, repeats):
    """torch.profiler over batch-1 cached greedy decoding: shares of matrix ops, attention, other ops, Python."""
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode():
        model.decode(att, None, DecodeConfig(use_cache=True))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(repeats):
                model.decode(att, None, DecodeConfig(use_cache=True))
            wall_us = (time.perf_counter() - t0) * 1e6
    matrix = attention = other = 0.0
    top = []
    for evt in prof.key_averages():
        if not evt.key.startswith('aten::'):
            continue
        us = evt.self_cpu_time_total
        if evt.key in MATRIX_OPS:
            matrix += us
        elif 'scaled_dot_product' in evt.key:
            attention += us
        else:
            other += us
        top.append((us, evt.key, evt.count))
    top.sort(reverse=True)
    python = max(wall_us - matrix - attention - other, 0.0)
    return {'profiled_ms_per_decode': round(wall_us / repeats / 1000, 2),
            'matrix_share': round(matrix / wall_us, 3), 'attention_share': round(attention / wall_us, 3),
            'other_aten_share': round(other / wall_us, 3), 'python_dispatch_share': round(python / wall_us, 3),
            'top_ops': [{'op': k, 'self_ms_per_decode': round(us / repeats / 1000, 3), 'calls_per_decode':
                         c // repeats} for us, k, c in top[:8]]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--Ks', default='1,2,4')
    parser.add_argument('--batches', default='1,50')
    parser.add_argument('--beams', default='1,3')
    parser.add_argument('--repeats', type=int, default=5, help='timed runs per batch-1 row (median)')
    parser.add_argument('--repeats_b50', type=int, default=3, help='timed runs per cached batch-50 row')
    parser.add_argument('--repeats_slow', type=int, default=1, help='timed runs per uncached batch-50 row')
    parser.add_argument('--bf16', action='store_true', help='also cached greedy rows under autocast bfloat16 (the flat '
                        'step takes bfloat16 weights cast once: models/accel/bf16.py)')
    parser.add_argument('--cached_only', action='store_true', help='skip the uncached rows (slow at batch 50)')
    parser.add_argument('--profile', action='store_true', help='profile batch-1 cached K=1 greedy decoding')
    parser.add_argument('--quick', action='store_true', help='smoke test: tiny model, batch 4, 1 repeat, 1 thread')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (default: torch\'s, i.e. the cores)')
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    args = parser.parse_args(argv)
    device = bench_device(args.device)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    Ks = [int(k) for k in args.Ks.split(',')]
    batches = [int(b) for b in args.batches.split(',')]
    beams = [int(b) for b in args.beams.split(',')]
    sizes = {}
    if args.quick:
        sizes = dict(input_encoding_size=64, rnn_size=128, num_layers=2, att_feat_size=32, vocab_size=500)
        batches = [1 if b == 1 else 4 for b in batches]
        args.repeats = args.repeats_b50 = args.repeats_slow = 1
    busy = other_load()
    info = machine(device)
    print(f"decode benchmark on {describe(info)}{' (QUICK: tiny model)' if args.quick else ''}")
    if busy:
        print(f'WARNING: other CPU-heavy processes are running, timings are disturbed: {busy}')

    rows, floors, bf16_rows, encode = [], {}, [], {}
    for K in Ks:
        model = paper_model(K, device=device, **sizes)
        feat = model.att_embed[0].in_features
        steps = model.max_length // K
        for batch in batches:
            att, masks = (None if t is None else t.to(device) for t in make_inputs(batch, args.quick, feat))
            for use_cache in (1, 0):
                encode[(K, batch, use_cache)] = encode_ms(model, att, masks, args.repeats, use_cache)
            for beam in beams:
                R = batch * beam * K
                if R not in floors:
                    floors[R] = floor_ms(model, R, max(args.repeats * 4, 5) if R <= 12 else args.repeats)
                seqs = {}
                for use_cache in ((1,) if args.cached_only else (1, 0)):
                    if batch == 1:
                        reps, warm = args.repeats, 1
                    else:
                        reps, warm = (args.repeats_b50, 1) if use_cache else (args.repeats_slow, 0)
                    ms, seqs[use_cache] = decode_ms(model, att, masks, beam, use_cache, reps, warm)
                    step = (ms - encode[(K, batch, use_cache)]) / steps
                    rows.append({'K': K, 'batch': batch, 'beam': beam, 'cache': use_cache, 'ms': round(ms, 2),
                                 'ms_per_image': round(ms / batch, 2), 'steps': steps, 'repeats': reps,
                                 'encode_ms': round(encode[(K, batch, use_cache)], 2), 'ms_per_step': round(step, 3),
                                 'floor_rows': R, 'floor_ms': round(floors[R], 3),
                                 'step_x_floor': round(step / floors[R], 2),
                                 'words': int((seqs[use_cache] > 0).sum(1).float().mean())})
                    print_row(rows[-1], header=len(rows) == 1)
                same = bool(torch.equal(seqs[0], seqs[1])) if 0 in seqs else None
                rows[-1]['same_tokens'] = rows[-1 - len(seqs) + 1]['same_tokens'] = same
                if same is False:
                    print(f'  !! K={K} batch={batch} beam={beam}: cached and uncached tokens differ')
                if args.bf16 and beam == 1:
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        ms16, seq16 = decode_ms(model, att, masks, 1, 1, args.repeats_b50 if batch > 1
                                                else args.repeats, 1)
                    agree = float((seq16 == seqs[1]).float().mean())
                    fp32 = rows[-len(seqs)]['ms']
                    bf16_rows.append({'K': K, 'batch': batch, 'ms': round(ms16, 2), 'fp32_ms': fp32,
                                      'speedup': round(fp32 / ms16, 2), 'token_agreement': round(agree, 4),
                                      'same_tokens': bool(torch.equal(seq16, seqs[1]))})
        del model

    if bf16_rows:
        print(f'\nbf16 (torch.autocast {device.type} bfloat16), cached greedy, vs fp32 on the same inputs')
        print(f"{'K':>2} {'batch':>5} {'bf16 ms':>10} {'fp32 ms':>10} {'speedup':>8} {'token agreement':>16}")
        for r in bf16_rows:
            print(f"{r['K']:>2} {r['batch']:>5} {r['ms']:>10.1f} {r['fp32_ms']:>10.1f} {r['speedup']:>7.2f}x "
                  f"{100 * r['token_agreement']:>15.1f}%")

    profile = None
    if args.profile and 1 in Ks and device.type == 'cpu':
        model = paper_model(1, **sizes)
        att, _ = make_inputs(1, args.quick, model.att_embed[0].in_features)
        profile = profile_decode(model, att, args.repeats)
        print('\nprofile, batch-1 cached K=1 greedy decoding (torch.profiler, self CPU time / wall time):')
        print(f"  matrix ops (addmm/mm/bmm) {100 * profile['matrix_share']:.1f}%, attention kernels "
              f"{100 * profile['attention_share']:.1f}%, other aten ops {100 * profile['other_aten_share']:.1f}%, "
              f"Python/dispatch (rest) {100 * profile['python_dispatch_share']:.1f}%")
        for op in profile['top_ops']:
            print(f"    {op['op']:45s} {op['self_ms_per_decode']:8.2f} ms  {op['calls_per_decode']:5d} calls")

    targets = compute_targets(rows, floors, Ks, batches)
    print('\ntargets:')
    for name, t in targets.items():
        print(f"  {'MET ' if t['met'] else 'NOT MET'} {name}: {t['text']}")
    key = 'decode' if device.type == 'cpu' else f'decode_{device.type}'
    merge_results(key, {'machine': info, 'quick': args.quick, 'disturbed_by': busy, 'rows': rows,
                             'floors_ms': {str(k): round(v, 3) for k, v in sorted(floors.items())},
                             'bf16': bf16_rows, 'profile': profile, 'targets': targets})
    print(f'wrote "{key}" into bench/results.json')
    return 0


def print_row(r, header=False):
    if header:
        print(f"\n{'K':>2} {'batch':>5} {'beam':>4} {'cache':>5} {'ms/batch':>10} {'ms/image':>9} {'encode':>8} "
              f"{'ms/step':>8} {'floor':>7} {'x floor':>7} {'words':>5} {'reps':>4}")
    print(f"{r['K']:>2} {r['batch']:>5} {r['beam']:>4} {'yes' if r['cache'] else 'no':>5} {r['ms']:>10.1f} "
          f"{r['ms_per_image']:>9.2f} {r['encode_ms']:>8.1f} {r['ms_per_step']:>8.2f} {r['floor_ms']:>7.2f} "
          f"{r['step_x_floor']:>7.2f} {r['words']:>5} {r['repeats']:>4}", flush=True)


def compute_targets(rows, floors, Ks, batches):
    """The issue's targets, from this run's rows."""
    def get(K, batch, beam, cache):
        for r in rows:
            if (r['K'], r['batch'], r['beam'], r['cache']) == (K, batch, beam, cache):
                return r
        return None
    targets = {}
    for batch, need in ((batches[0], 1.8), (batches[-1], 4.0)):
        c, u = get(1, batch, 1, 1), get(1, batch, 1, 0)
        if c and u:
            ratio = u['ms'] / c['ms']
            steps_ratio = (u['ms'] - u['encode_ms']) / max(c['ms'] - c['encode_ms'], 1e-9)
            targets[f'cached vs uncached K=1 batch {batch} >= {need}x, same tokens'] = {
                'met': ratio >= need and c['same_tokens'], 'ratio': round(ratio, 2),
                'ratio_excluding_encoder': round(steps_ratio, 2), 'same_tokens': c['same_tokens'],
                'text': f"{ratio:.2f}x whole decode ({steps_ratio:.2f}x excluding the encoder, "
                        f"{c['encode_ms']:.0f} ms of the cached {c['ms']:.0f} ms), same tokens: {c['same_tokens']}"}
    base = get(1, 1, 1, 1)
    for K in Ks:
        r = get(K, 1, 1, 1)
        if K == 1 or not base or not r:
            continue
        gain = base['ms'] / r['ms']
        allowed = (20 * floors[1]) / ((20 / K) * floors[K])
        targets[f'SAT K={K} gain (cached, batch 1) within 10% of the floor ratio'] = {
            'met': gain >= 0.9 * allowed, 'gain': round(gain, 2), 'floor_ratio': round(allowed, 2),
            'text': f'gain {gain:.2f}x vs floor ratio {allowed:.2f}x ({100 * gain / allowed:.0f}%)'}
    for K in Ks:
        r = get(K, 1, 1, 1)
        if r:
            targets[f'cached batch-1 step K={K} within 1.3x of the floor'] = {
                'met': r['step_x_floor'] <= 1.3, 'x_floor': r['step_x_floor'],
                'text': f"{r['ms_per_step']:.2f} ms/step vs floor {r['floor_ms']:.2f} ms = {r['step_x_floor']:.2f}x"}
    for K in Ks:
        for batch in batches:
            g, b = get(K, batch, 1, 1), get(K, batch, 3, 1)
            if g and b:
                ratio = b['ms'] / g['ms']
                targets[f'beam 3 <= 3x greedy, K={K} batch {batch} (cached)'] = {
                    'met': ratio <= 3.0, 'ratio': round(ratio, 2), 'text': f'beam 3 = {ratio:.2f}x greedy'}
    return targets


if __name__ == '__main__':
    sys.exit(main())
