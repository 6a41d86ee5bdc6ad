"""Render bench/results.json as the markdown tables of bench/README.md (after `make bench`).

    python bench/report.py > /tmp/tables.md
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS  # noqa: E402


def main():
    with open(RESULTS) as f:
        res = json.load(f)
    d = res.get('decode')
    if d:
        m = d['machine']
        print(f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads, "
              f"CPU capability {m['cpu_capability']}, bf16 flags: {m['bf16_flags']}"
              + (f"; DISTURBED by {len(d['disturbed_by'])} other process(es)" if d['disturbed_by'] else '') + '\n')
        print('| K | batch | beam | cache | ms/batch | ms/image | encode ms | ms/step | floor ms (rows) | step/floor '
              '| words | same tokens | repeats |')
        print('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
        for r in d['rows']:
            print(f"| {r['K']} | {r['batch']} | {r['beam']} | {'yes' if r['cache'] else 'no'} | {r['ms']:.1f} | "
                  f"{r['ms_per_image']:.1f} | {r['encode_ms']:.1f} | {r['ms_per_step']:.2f} | "
                  f"{r['floor_ms']:.2f} ({r['floor_rows']}) | {r['step_x_floor']:.2f} | {r['words']} | "
                  f"{r.get('same_tokens')} | {r['repeats']} |")
        if d.get('bf16'):
            print('\n| K | batch | bf16 ms | fp32 ms | speedup | token agreement | identical |')
            print('|---|---|---|---|---|---|---|')
            for r in d['bf16']:
                print(f"| {r['K']} | {r['batch']} | {r['ms']:.1f} | {r['fp32_ms']:.1f} | {r['speedup']:.2f}x | "
                      f"{100 * r['token_agreement']:.1f}% | {r['same_tokens']} |")
        p = d.get('profile')
        if p:
            print(f"\nProfile ({p['profiled_ms_per_decode']} ms per profiled decode): matrix ops "
                  f"{100 * p['matrix_share']:.1f}%, attention kernels {100 * p['attention_share']:.1f}%, other aten "
                  f"ops {100 * p['other_aten_share']:.1f}%, Python/dispatch {100 * p['python_dispatch_share']:.1f}%")
            for op in p['top_ops']:
                print(f"- {op['op']}: {op['self_ms_per_decode']} ms, {op['calls_per_decode']} calls per decode")
        print('\n| target | met | measured |')
        print('|---|---|---|')
        for name, t in d['targets'].items():
            print(f"| {name} | {'yes' if t['met'] else 'NO'} | {t['text']} |")
    t = res.get('train_speed')
    if t:
        print('\n| training (K=%d, %d x %d) | s/iter | iters/s | reference s/iter | speedup |' % (
            t['K'], t['images'], t['seq_per_img']))
        print('|---|---|---|---|---|')
        for mode, name in (('xe', 'XE'), ('sc', 'self-critical')):
            r = t[mode]
            print(f"| {name} | {r['s_per_iter']:.3f} | {r['iters_per_s']:.3f} | {r['reference_s_per_iter']} | "
                  f"{r['speedup_vs_reference']:.2f}x |")
        print(f"\nSC reward {t['sc']['reward_ms']} ms/batch; encoder (no grad) on the 50 repeated rows "
              f"{t['encode_50_rows_ms']} ms vs the 10 distinct images {t['encode_10_images_ms']} ms")
    r = res.get('reward')
    if r:
        print(f"\nCIDEr-D reward, {r['captions_per_batch']} captions x {r['refs_per_image']} refs: pycocoevalcap "
              f"{r['pycocoevalcap_ms']} ms, ours cached {r['ours_cached_ms']} ms ({r['speedup_cached']}x), "
              f"uncached {r['ours_uncached_ms']} ms ({r['speedup_uncached']}x), full reward call "
              f"{r['ours_reward_call_ms']} ms")
    lo = res.get('loader')
    if lo:
        print(f"\nLoader ({lo['batch_size']} x {lo['seq_per_img']}, {lo['num_workers']} workers, {lo['batches']} "
              f"batches): " + ', '.join(f"{b} {lo[b]['batches_per_s']} batches/s" for b in ('dir', 'lmdb', 'h5')
                                       if b in lo))
    ra = res.get('run_all')
    if ra:
        print(f"\nrun_all: seconds {ra['seconds']}, skipped {ra['skipped']}, failed {ra['failed']}, "
              f"busy at start: {len(ra['busy_at_start'])}")


if __name__ == '__main__':
    main()
