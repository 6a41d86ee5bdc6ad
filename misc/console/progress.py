"""Progress output for long loops: a tqdm bar on a terminal, else one plain line every PROGRESS_SECONDS.
(Split out of misc/fileio.py.)"""
import sys
import time

from tqdm import tqdm


# Seconds between progress lines when stderr is not a terminal (log files, cluster jobs); a terminal gets a tqdm bar.
PROGRESS_SECONDS = 60.0

def _human(value, unit):
    if unit != 'B':
        return f'{value:,.0f}' if value >= 100 or value == int(value) else f'{value:.1f}'
    for prefix in ('', 'K', 'M', 'G', 'T'):
        if abs(value) < 1024 or prefix == 'T':
            return f'{value:.0f} {prefix}B' if prefix == '' else f'{value:.1f} {prefix}B'
        value /= 1024.0

def _duration(seconds):
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'

class Progress:
    """Progress of a long loop on stderr (or file): a tqdm bar when it is a terminal; otherwise (a log file, a cluster
    job) one plain line every PROGRESS_SECONDS: "<desc>: 12,000/123,287 images (9.7%), 402 images/s, 0m30s elapsed,
    about 4m36s left". Nothing at all for a loop shorter than that, unless final: then one last line at close (the
    rate of the whole loop; evaluation and validation). file: the stream (default stderr; evaluation and
    validation write to stdout, beside the run's other lines, so that `> log` keeps them in order and stderr holds
    only warnings and errors). Use as a context manager; update(n) per step."""

    def __init__(self, total=None, desc='', unit='it', final=False, file=None):
        self.total, self.desc, self.unit, self.final = total, desc, unit, final
        self.file = file or sys.stderr
        self.n = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if self.file.isatty():
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == 'B', unit_divisor=1024,
                            dynamic_ncols=True, file=self.file)

    def update(self, n=1):
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            print(self.line(now), file=self.file, flush=True)

    def line(self, now=None):
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.n / elapsed
        done = _human(self.n, self.unit)
        unit = '' if self.unit == 'B' else ' ' + self.unit
        text = f'{self.desc}: {done}'
        if self.total:
            text += f'/{_human(self.total, self.unit)}{unit} ({100.0 * self.n / self.total:.1f}%)'
        else:
            text += unit
        text += f', {_human(rate, self.unit)}{unit}/s, {_duration(elapsed)} elapsed'
        if self.total and rate > 0 and self.n < self.total:
            text += f', about {_duration((self.total - self.n) / rate)} left'
        return text

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.final and self.n:
            print(self.line(), file=self.file, flush=True)
            self.final = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

def progress(iterable, total=None, desc='', unit='it'):
    """Iterate over `iterable` with a Progress (total: len(iterable) when it has one)."""
    if total is None and hasattr(iterable, '__len__'):
        total = len(iterable)
    with Progress(total, desc, unit) as bar:
        for item in iterable:
            yield item
            bar.update()
