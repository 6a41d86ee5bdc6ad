"""Benchmark: training iterations per second at the paper configuration, K = 2, batch 10 images x 5 captions.

One iteration is train.py's train_step: LossWrapper forward (XE: teacher forcing; self-critical: 5 multinomial
samples per image in train mode, the CIDEr-D reward with leave-one-out baseline), backward, the element-wise
gradient clamp and the optimiser step (XE: Noam Adam, as the paper; self-critical: Adam 2e-5). Random weights,
random 2048-d features of 10-100 regions per image (repeated 5x per image, as DataLoader returns them), random
Zipf labels and a synthetic cached-tokens pickle (bench/reward.py's). Also times the encoder on the 50 repeated
rows vs the 10 distinct images (the share of an iteration spent re-encoding copies).
Prints a table and merges {"train_speed": {...}} into bench/results.json.

    python bench/train_speed.py [--quick] [--iters 5] [--sc_iters 3] [--device cuda] [--precisions fp32,bf16]
                                [--compile 1] [--images N]

--device cuda times on the GPU (torch.cuda.synchronize around every timed iteration, one warm-up iteration first)
and merges {"train_speed_cuda": {...}}. --precisions times XE and self-critical once per precision: fp32 (the
default), tf32 (train.py --tf32 1, CUDA only), bf16 (--bf16 1), fp16 (--fp16 1 with its GradScaler). --compile 1
compiles the model as train.py --compile 1 does (3 warm-up iterations).
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import opts  # noqa: E402
from common import (PAPER, bench_device, describe, machine, median_ms, merge_results, other_load,  # noqa: E402
                    paper_model)
from reward import zipf_caption_rows, write_cached_tokens  # noqa: E402
from misc.train import optim  # noqa: E402
from misc.run.distributed import World  # noqa: E402
from misc.utils import to_device  # noqa: E402
from misc.options.configs import OptimConfig  # noqa: E402
from misc.train.loss_wrapper import LossConfig, LossWrapper  # noqa: E402
from misc.options.configs import StepConfig  # noqa: E402
from misc.train.step import precision, train_step  # noqa: E402
from models.decode_config import DecodeConfig  # noqa: E402

REFERENCE_S_PER_ITER = {'xe': 2.5, 'sc': 11.5}  # reference code, this machine class (from the issue)


def make_batch(images, seq_per_img, att_feat_size, vocab, seed=0):
    """A DataLoader-style train batch: features repeated per caption, labels (S, 18), masks, gts, infos."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    n_max = 100
    counts = torch.randint(10, n_max + 1, (images,), generator=g)  # (B,)
    masks = (torch.arange(n_max)[None] < counts[:, None]).float()  # (B, N)
    att = torch.randn(images, n_max, att_feat_size, generator=g) * masks[..., None]  # (B, N, F)
    gts = [np.minimum(zipf_caption_rows(rng, 5, 1.3), vocab).astype(np.uint32) for _ in range(images)]  # B x (5, 16)
    labels = np.zeros((images * seq_per_img, 18), dtype=np.int64)  # (S, 18): [0, w1..w16, 0]
    for i in range(images):
        labels[i * seq_per_img:(i + 1) * seq_per_img, 1:17] = gts[i][:seq_per_img]
    label_masks = np.zeros_like(labels, dtype=np.float32)
    nonzero = (labels > 0).sum(1) + 2  # words + BOS + EOS
    for r, n in enumerate(nonzero):
        label_masks[r, :n] = 1
    rep = lambda t: t.repeat_interleave(seq_per_img, dim=0)  # noqa: E731
    return {'fc_feats': torch.zeros(images * seq_per_img, att_feat_size), 'att_feats': rep(att),
            'att_masks': rep(masks), 'labels': torch.from_numpy(labels), 'masks': torch.from_numpy(label_masks),
            'gts': gts, 'infos': [{'id': i} for i in range(images)],
            'distinct': (att, masks)}


PRECISION_FLAGS = {'fp32': {}, 'tf32': {'tf32': 1}, 'bf16': {'bf16': 1}, 'fp16': {'fp16': 1}}


def time_iterations(model, batch, args, size, cached, precision, device):
    """{'xe': {...}, 'sc': {...}}: train.py's own step timed at one precision (PRECISION_FLAGS)."""
    results = {}
    for mode, iters in (('xe', args.iters), ('sc', args.sc_iters)):
        flags = ['--caption_model', 'sat', '--K', str(args.K), '--cached_tokens', cached,
                 '--seq_per_img', str(args.seq_per_img), '--input_encoding_size', str(size['input_encoding_size'])]
        flags += ['--noamopt'] if mode == 'xe' else ['--learning_rate', '2e-5']
        flags += ['--encode_per_image', str(args.encode_per_image)]
        for name, value in PRECISION_FLAGS[precision].items():
            flags += [f'--{name}', str(value)]
        opt = opts.parse_opt(flags)
        step_config = StepConfig.from_opt(opt)
        wrapper = LossWrapper(model, LossConfig.from_opt(opt))
        optimizer = optim.build(model, OptimConfig.from_opt(opt), opt.input_encoding_size)
        scaler = precision(bool(opt.tf32), bool(opt.fp16), device)  # --tf32 switches; --fp16's GradScaler
        sc = mode == 'sc'

        def iteration():  # train.py's own step: forward, backward, guard, clamp, update
            train_step(wrapper, optimizer, batch, sc, step_config, scaler=scaler)
        try:
            ms = median_ms(iteration, iters, warmup=3 if args.compile else 1, device=device)
        finally:
            precision(False, False, device)
        ref = REFERENCE_S_PER_ITER[mode]
        results[mode] = {'s_per_iter': round(ms / 1000, 4), 'iters_per_s': round(1000 / ms, 3),
                         'iters_timed': iters, 'reference_s_per_iter': ref,
                         'speedup_vs_reference': round(ref * 1000 / ms, 2)}
        if sc:
            reward = wrapper.load_reward()
            model.eval()
            with torch.no_grad():
                seq = model.decode(batch['att_feats'], batch['att_masks'], DecodeConfig(sample_max=False))[0]
            model.train()
            results['sc']['reward_ms'] = round(median_ms(
                lambda: reward(seq, batch['gts'], args.seq_per_img, list(range(args.images))), 5), 2)
            results['sc']['sample_words_mean'] = round(float((seq > 0).sum(1).float().mean()), 1)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--K', type=int, default=2)
    parser.add_argument('--images', type=int, default=10)
    parser.add_argument('--seq_per_img', type=int, default=5)
    parser.add_argument('--iters', type=int, default=5, help='timed XE iterations (median)')
    parser.add_argument('--sc_iters', type=int, default=3, help='timed self-critical iterations (median)')
    parser.add_argument('--train_images', type=int, default=5000, help='synthetic corpus for the CIDEr-D df')
    parser.add_argument('--encode_per_image', type=int, default=0, help='1: encoder once per image (train.py flag)')
    parser.add_argument('--quick', action='store_true', help='smoke test: tiny model, 1 iteration, 1 thread')
    parser.add_argument('--threads', type=int, default=0)
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    parser.add_argument('--precisions', default='fp32', help='comma-separated: fp32, tf32 (CUDA), bf16, fp16')
    parser.add_argument('--compile', type=int, default=0, help='1: train.py --compile 1 (3 warm-up iterations)')
    args = parser.parse_args(argv)
    device = bench_device(args.device)
    precisions = args.precisions.split(',')
    unknown = set(precisions) - set(PRECISION_FLAGS)
    if unknown:
        raise SystemExit(f"--precisions: unknown {sorted(unknown)}; use {', '.join(PRECISION_FLAGS)}")
    sizes = {}
    if args.quick:
        sizes = dict(input_encoding_size=64, rnn_size=128, num_layers=2, att_feat_size=32, vocab_size=500)
        args.iters = args.sc_iters = 1
        args.train_images = 200
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    size = {**PAPER, **sizes}
    busy = other_load()
    info = machine(device)
    print(f"train_speed on {describe(info)}{' (QUICK: tiny model)' if args.quick else ''}")
    if busy:
        print(f'WARNING: other CPU-heavy processes are running, timings are disturbed: {busy}')

    model = paper_model(args.K, device=device, **sizes).train()
    if args.compile:
        from models.accel.speed import compile_model
        compile_model(model)
    batch = make_batch(args.images, args.seq_per_img, size['att_feat_size'], size['vocab_size'])
    att, masks = (t.to(device) for t in batch.pop('distinct'))
    batch = to_device(batch, device)
    results = {'K': args.K, 'images': args.images, 'seq_per_img': args.seq_per_img, 'machine': info,
               'quick': args.quick, 'disturbed_by': busy, 'precisions': {}, 'compile': args.compile}
    with tempfile.TemporaryDirectory() as tmp:
        cached = os.path.join(tmp, 'train-idxs.p')
        write_cached_tokens(cached, np.random.default_rng(1), args.train_images, 1.3)
        for precision in precisions:
            timings = time_iterations(model, batch, args, size, cached, precision, device)
            results['precisions'][precision] = timings
            if precision == precisions[0]:
                results.update(timings)
        with torch.no_grad():
            results['encode_50_rows_ms'] = round(median_ms(lambda: model.encode(batch['att_feats'],
                                                                                batch['att_masks']), 3,
                                                           device=device), 1)
            results['encode_10_images_ms'] = round(median_ms(lambda: model.encode(att, masks), 3, device=device), 1)

    print(f"\ntraining iterations, K={args.K}, batch {args.images} x {args.seq_per_img}"
          f"{' (QUICK: tiny model)' if args.quick else ''}")
    print(f"{'mode':>14} {'s/iter':>8} {'iters/s':>8} {'reference s/iter':>17} {'speedup':>8}")
    for mode, name in (('xe', 'XE'), ('sc', 'self-critical')):
        r = results[mode]
        print(f"{name:>14} {r['s_per_iter']:>8.3f} {r['iters_per_s']:>8.3f} {r['reference_s_per_iter']:>17.1f} "
              f"{r['speedup_vs_reference']:>7.2f}x")
    print(f"self-critical reward (CIDEr-D, 50 samples) {results['sc']['reward_ms']:.1f} ms; "
          f"encoder on 50 repeated rows {results['encode_50_rows_ms']:.0f} ms vs 10 distinct images "
          f"{results['encode_10_images_ms']:.0f} ms (no grad)")
    results['targets'] = {
        'XE no slower than the reference (2.5 s/iter)': results['xe']['s_per_iter'] <= 2.5,
        'self-critical >= 2x faster than the reference (11.5 s/iter)': results['sc']['speedup_vs_reference'] >= 2,
    }
    if device.type == 'cpu':
        for name, met in results['targets'].items():
            print(f"  {'MET ' if met else 'NOT MET'} {name}")
    if len(precisions) > 1:
        print(f"\nby precision ({describe(info)}):")
        print(f"{'precision':>10} {'XE s/iter':>10} {'SC s/iter':>10} {'XE vs ' + precisions[0]:>12}")
        for precision, r in results['precisions'].items():
            print(f"{precision:>10} {r['xe']['s_per_iter']:>10.4f} {r['sc']['s_per_iter']:>10.4f} "
                  f"{results['xe']['s_per_iter'] / r['xe']['s_per_iter']:>11.2f}x")
    key = 'train_speed' if device.type == 'cpu' else f'train_speed_{device.type}'
    if args.compile:
        key += '_compiled'
    if (args.images, args.seq_per_img) != (10, 5):
        key += f'_{args.images}x{args.seq_per_img}'
    merge_results(key, results)
    print(f'wrote "{key}" into bench/results.json')
    return 0


if __name__ == '__main__':
    sys.exit(main())
