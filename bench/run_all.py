"""Run every benchmark of bench/ in turn (`make bench`): decode latency (+ bf16 rows and the profile), training
speed, the CIDEr-D reward and the data loader. Each script prints its table and merges its key into
bench/results.json; this runner adds {"run_all": {...}} (machine, per-script wall time, what was skipped).

    python bench/run_all.py [--quick] [--wait_idle MINUTES] [--only decode,train_speed,reward,loader]

--quick passes tiny settings to every script (a smoke test, not numbers to report). --wait_idle polls every 30 s
until no other train.py / eval.py / run_demo.py / pytest runs (at most MINUTES), since they share the CPU cores.
"""
import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, merge_results, other_load  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEMO = os.path.join(ROOT, 'data', 'demo', 'cocotalk.json')


def commands(quick):
    """(name, argv) of each benchmark."""
    q = ['--quick'] if quick else []
    return [
        ('decode', ['decode.py', '--bf16', '--profile'] + q),
        ('train_speed', ['train_speed.py'] + q),
        ('reward', ['reward.py'] + (['--repeats', '3', '--train_images', '300'] if quick else [])),
        ('loader', ['loader.py'] + (['--batches', '20'] if quick else [])),
    ]


def wait_idle(minutes):
    """Poll every 30 s until no other CPU-heavy project process runs; return what still runs after `minutes`."""
    deadline = time.time() + 60 * minutes
    busy = other_load()
    while busy and time.time() < deadline:
        print(f'waiting for {len(busy)} other process(es) to finish: {busy[0][:100]}', flush=True)
        time.sleep(30)
        busy = other_load()
    return busy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--wait_idle', type=float, default=0, help='minutes to wait for other jobs to finish')
    parser.add_argument('--only', default='', help='comma-separated subset of decode,train_speed,reward,loader')
    args = parser.parse_args(argv)
    busy = wait_idle(args.wait_idle) if args.wait_idle else other_load()
    if busy:
        print(f'WARNING: measuring while other CPU-heavy processes run: {busy}')
    only = set(filter(None, args.only.split(',')))
    summary = {'machine': machine(), 'quick': args.quick, 'busy_at_start': busy, 'seconds': {}, 'skipped': {},
               'failed': {}}
    for name, argv_ in commands(args.quick):
        if only and name not in only:
            continue
        if name == 'loader' and not os.path.isfile(DEMO):
            summary['skipped'][name] = 'data/demo absent: run `make demo-data` first'
            print(f'\n=== {name}: skipped ({summary["skipped"][name]})')
            continue
        print(f'\n=== {name}: {" ".join(argv_)}', flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, os.path.join(HERE, argv_[0])] + argv_[1:], cwd=ROOT)
        summary['seconds'][name] = round(time.perf_counter() - t0, 1)
        if rc != 0:
            summary['failed'][name] = rc
            print(f'!!! {name} exited with {rc}')
    merge_results('run_all', summary)
    print(f"\nbench done in {sum(summary['seconds'].values()):.0f} s: {summary['seconds']}"
          + (f"; FAILED {summary['failed']}" if summary['failed'] else ''))
    return 1 if summary['failed'] else 0


if __name__ == '__main__':
    sys.exit(main())
