"""The test fault hook of interrupted runs (SATIC_TEST_BLOCK_AT).
(Split out of misc/fileio.py.)"""
import os
import time


def fault_point(name, count=None):
    """Tests of interrupted runs: with SATIC_TEST_BLOCK_AT=name (or name@count, count matching), print
    'blocked at name' on stdout and wait to be killed. Does nothing otherwise."""
    spec = os.environ.get('SATIC_TEST_BLOCK_AT')
    if spec and spec in (name, f'{name}@{count}'):
        print(f'blocked at {spec}', flush=True)
        while True:
            time.sleep(60)
