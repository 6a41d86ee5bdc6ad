"""Benchmark: --quantize int8 on both of fbgemm's int8 kernels, at the paper size, batch-1 greedy decoding.

fbgemm multiplies int8 with VNNI (int32 products) where the CPU has avx512_vnni, else with AVX2's int16 pairs that
saturate; models.accel.speed gives the weights 8 bits on the first and 7 on the second (docs/speed.md, "Speed options"). This
runs the same measurement twice, in two worker processes: on this CPU as it is, and with every library held to
AVX2 (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2,
FBGEMM_ENABLE_INSTRUCTIONS=AVX2), which is what an AVX2-only CPU (no AVX-512, no VNNI) runs. Per side: batch-1
greedy decoding time of fp32 and int8 (K = 1, 2; fastest of --rounds interleaved runs), int8/fp32 token agreement,
and one 512 -> 2048 layer's relative error on N(0, 3) inputs. Merges {"int8_kernels": {...}} into results.json.

    python bench/int8_kernels.py [--rounds 5] [--quick]
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

AVX2_ONLY = {'ATEN_CPU_CAPABILITY': 'avx2', 'ONEDNN_MAX_CPU_ISA': 'AVX2', 'MKL_ENABLE_INSTRUCTIONS': 'AVX2',
             'FBGEMM_ENABLE_INSTRUCTIONS': 'AVX2'}


def measure(rounds, quick):
    """One side's numbers (runs inside the worker process)."""
    import warnings
    warnings.filterwarnings('ignore')
    import torch
    from common import paper_model
    from decode import make_inputs
    from models.accel.speed import Int8Linear, int8_kernel, quantize_int8
    torch.manual_seed(0)
    layer = torch.nn.Linear(512, 2048)
    x = 3 * torch.randn(4, 512)
    with torch.no_grad():
        want = layer(x)
        layer_error = ((Int8Linear(layer)(x) - want).norm() / want.norm()).item()
    result = {'kernel': int8_kernel(), 'cpu_capability': torch.backends.cpu.get_cpu_capability(),
              'layer_relative_error': layer_error, 'decode': {}}
    for K in (1, 2):
        fp32 = paper_model(K, **({'num_layers': 2} if quick else {}))
        int8 = quantize_int8(fp32)
        att, masks = make_inputs(1, quick, fp32.att_embed[0].in_features)
        times, tokens = {'fp32': [], 'int8': []}, {}
        with torch.no_grad():
            for model in (fp32, int8):
                model.decode(att, masks)  # warm-up
            for r in range(rounds):
                for name, model in ((('fp32', fp32), ('int8', int8)) if r % 2 == 0 else (('int8', int8), ('fp32', fp32))):
                    start = time.perf_counter()
                    tokens[name] = model.decode(att, masks)[0]
                    times[name].append(1000 * (time.perf_counter() - start))
        fast = {name: min(t) for name, t in times.items()}
        result['decode'][f'K={K}'] = {'fp32_ms': fast['fp32'], 'int8_ms': fast['int8'],
                                      'speedup': fast['fp32'] / fast['int8'],
                                      'token_agreement': (tokens['fp32'] == tokens['int8']).float().mean().item()}
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--quick', action='store_true', help='2 layers, 1 round: a smoke test')
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    if args.worker:
        print(json.dumps(measure(rounds, args.quick)))
        return 0
    from common import machine, merge_results
    results = {'machine': machine()}
    for side, env in (('this CPU', {}), ('AVX2 only', AVX2_ONLY)):
        cmd = [sys.executable, os.path.abspath(__file__), '--worker', '--rounds', str(rounds)] + \
            (['--quick'] if args.quick else [])
        done = subprocess.run(cmd, env=dict(os.environ, **env), capture_output=True, text=True, check=True)
        results[side] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{side}: {results[side]['kernel']} (torch {results[side]['cpu_capability']}); one 512 -> 2048 layer "
              f"{100 * results[side]['layer_relative_error']:.1f}% off")
        for K, row in results[side]['decode'].items():
            print(f"  {K}: fp32 {row['fp32_ms']:.1f} ms, int8 {row['int8_ms']:.1f} ms, {row['speedup']:.2f}x, "
                  f"{100 * row['token_agreement']:.0f}% same tokens")
    if not args.quick:
        merge_results('int8_kernels', results)
    return 0


if __name__ == '__main__':
    sys.exit(main())
