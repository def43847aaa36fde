"""Fault injection for crash tests: one environment variable, read here and nowhere else.

``FREEPRM_FAULT=POINT`` (or ``POINT:N``) makes the process ``SIGKILL`` itself when it reaches the
named point (for the ``N``-th item, e.g. the part index); a test runs a command with it and then
checks that a rerun recovers. Unset (the default), ``fault_point`` only reads the environment.
Points (``docs/batch.md``):

    rerank.tmp        part N's temporary file is written and fsynced, its manifest line is not
    rerank.manifest   part N's manifest line is appended, the part is not renamed into place
    rerank.rename     part N is renamed into place (the run then continues with N + 1)
"""

from __future__ import annotations

import os
import signal

ENV = "FREEPRM_FAULT"
POINTS = ("rerank.tmp", "rerank.manifest", "rerank.rename")


def fault_point(name: str, index: int | None = None) -> None:
    """SIGKILL this process if ``$FREEPRM_FAULT`` names this point (``name`` or ``name:index``)."""
    want = os.environ.get(ENV)
    if not want:
        return
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}; known: {POINTS}")
    if want == name or (index is not None and want == f"{name}:{index}"):
        os.kill(os.getpid(), signal.SIGKILL)
