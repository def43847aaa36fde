"""A wall-clock bound on a block of Python code (a ``--step-pattern`` split), shared by ``score`` and ``rerank``."""

from __future__ import annotations

import contextlib
import signal
import threading


class PatternTimeout(Exception):
    """Raised inside a ``time_limit`` block that ran out of time."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise ``PatternTimeout`` in the block after ``seconds`` (SIGALRM; it interrupts ``re`` too).

    Only in the main thread of a Unix process; elsewhere (and with ``seconds`` None or 0) the block
    runs unbounded.
    """
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise PatternTimeout

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
