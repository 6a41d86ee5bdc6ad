"""Host synchronisations on a CUDA device, found by torch.cuda.set_sync_debug_mode('warn'), and a profile.

For decoding (greedy and beam 3, cached and uncached, batch 50, paper size): every place in our code that makes
the host wait for the GPU, counted per call site; batch-50 decoding with and without attention per group of region
counts (models.masks.Packing.grouped, the CPU default); then torch.profiler's top ops by self CPU and CUDA time for
cached vs uncached batch-50 greedy decoding. Needs a GPU.

    python bench/cuda_syncs.py
"""
import collections
import contextlib
import os
import sys
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import bench_device, median_ms, paper_model  # noqa: E402
from decode import make_inputs  # noqa: E402
from models.decode_config import DecodeConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def our_frame():
    """'file:line' of the innermost frame of this repository's code (outside bench/) that caused the sync."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(ROOT) and '/bench/' not in frame.filename:
            return f'{os.path.relpath(frame.filename, ROOT)}:{frame.lineno} {frame.line}'
    return '?'


def count_syncs(fn):
    """Counter of 'file:line code' -> host syncs while fn() runs."""
    sites = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):  # called at the sync, stack intact
        if 'synchroniz' in str(message):
            sites[our_frame()] += 1
    torch.cuda.set_sync_debug_mode('warn')
    try:
        with warnings.catch_warnings():  # restores showwarning and the filters afterwards
            warnings.simplefilter('always')
            warnings.showwarning = record
            fn()
    finally:
        torch.cuda.set_sync_debug_mode('default')
    return sites


@contextlib.contextmanager
def grouped_on_cuda(grouped):
    """Packing.grouped on CUDA tensors too (grouped=True: what the CPU does) or never (the CUDA default)."""
    import models.sat as sat
    real = sat.SATModel._grouped
    if grouped:
        sat.SATModel._grouped = lambda self, packing: packing.grouped()
    try:
        yield
    finally:
        sat.SATModel._grouped = real


def main():
    device = bench_device('cuda')
    for K in (1, 2):
        model = paper_model(K, device=device)
        att, masks = (t.to(device) for t in make_inputs(50, False, 2048))
        for name, config in (('greedy cached', DecodeConfig(use_cache=True)),
                             ('greedy uncached', DecodeConfig(use_cache=False)),
                             ('beam 3 cached', DecodeConfig(beam_size=3, use_cache=True))):
            with torch.inference_mode():
                model.decode(att, masks, config)  # warm-up
                sites = count_syncs(lambda: model.decode(att, masks, config))
            print(f'\nK={K} batch 50 {name}: {sum(sites.values())} host syncs')
            for site, n in sites.most_common(8):
                print(f'  {n:4d}  {site}')
    print('\nbatch-50 decoding with attention per group of region counts (the CPU default) vs padded (the CUDA '
          'default), median of 10 after a warm-up')
    print(f"{'K':>2} {'search':>8} {'grouped ms':>11} {'padded ms':>10} {'speedup':>8} {'same tokens':>12}")
    for K in (1, 2):
        model = paper_model(K, device=device)
        att, masks = (t.to(device) for t in make_inputs(50, False, 2048))
        for name, config in (('greedy', DecodeConfig()), ('beam 3', DecodeConfig(beam_size=3))):
            times, seqs = {}, {}
            for grouped in (True, False):
                with grouped_on_cuda(grouped), torch.inference_mode():
                    times[grouped] = median_ms(lambda: model.decode(att, masks, config), 10, 1, device)
                    seqs[grouped] = model.decode(att, masks, config)[0]
            print(f"{K:>2} {name:>8} {times[True]:>11.1f} {times[False]:>10.1f} {times[True] / times[False]:>7.2f}x "
                  f"{str(torch.equal(seqs[True], seqs[False])):>12}")
    from torch.profiler import ProfilerActivity, profile
    model = paper_model(1, device=device)
    att, masks = (t.to(device) for t in make_inputs(50, False, 2048))
    for use_cache in (True, False):
        config = DecodeConfig(use_cache=use_cache)
        with torch.inference_mode():
            model.decode(att, masks, config)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model.decode(att, masks, config)
                torch.cuda.synchronize()
        print(f'\nprofile K=1 batch 50 greedy, use_cache={use_cache}, by self CPU time')
        print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=12, max_name_column_width=40))
        print('by self CUDA time')
        print(prof.key_averages().table(sort_by='self_device_time_total', row_limit=10, max_name_column_width=40))


if __name__ == '__main__':
    main()
