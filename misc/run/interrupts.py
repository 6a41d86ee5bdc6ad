"""Ctrl-C and SIGTERM while train.py runs: honoured between iterations, never in the middle of a save (README,
"Interrupts and resume").

`Signals` records the first signal and tells the training loop, which stops after the iteration in progress, saves
it and raises `Interrupted`; main() prints its one line and exits 128 + the signal number. A second signal raises
`Aborted` wherever it lands: nothing more is saved. In the middle of a save, that save is abandoned: before its
commit its temp files are removed and the folder keeps the previous set; after it, the renames are completed
(misc/run/checkpoint.py). train.py's one line then names the iteration the folder holds.
"""
import contextlib
import signal
import threading


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM; `message` says what was saved. main() prints it on one line
    and exits 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum=signal.SIGINT, message=''):
        super().__init__(message)
        self.signum, self.message = signum, message


class Aborted(Interrupted):
    """A second signal: stop at once, saving nothing more."""


class Signals:
    """SIGINT/SIGTERM while training runs (main thread only). The first signal is honoured between iterations
    (phase 'train': training stops after the iteration in progress and saves its state) or after the save in
    progress (phase 'save'); in phase 'setup' (nothing to save yet) or 'validate' (which may take minutes) it raises
    Interrupted at once. A second signal raises Aborted wherever it lands."""

    def __init__(self):
        self.signum, self.phase, self._previous = None, 'setup', {}

    @property
    def requested(self):
        """A signal asked training to stop."""
        return self.signum is not None

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    @contextlib.contextmanager
    def during(self, phase):
        """Run a block in `phase` ('validate', 'save', ...), then go back to the phase before it."""
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise Aborted(signum)
        self.signum = signum
        if self.phase in ('setup', 'validate'):
            raise Interrupted(signum)
