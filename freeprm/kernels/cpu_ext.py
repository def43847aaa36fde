"""Loader of the optional C++ CPU kernel (``csrc/cpu_head.cpp``): built once, on first use, with the
system C++ compiler through ``torch.utils.cpp_extension`` (``scripts/setup.sh`` triggers the build).

``get()`` returns the compiled module, or ``None`` when it cannot be built (no compiler, no ninja,
``FREEPRM_CPU_EXT=0``); callers then take the pure-torch path, which computes the same values.
The build is cached under ``$FREEPRM_CACHE/torch_extensions`` (default ``~/.cache/freeprm``), keyed
by the source, the torch version and this CPU's flags (a cache shared across machines stays safe).
Only one build runs at a time (torch's lock file in the build folder).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

_SRC = Path(__file__).with_name("csrc") / "cpu_head.cpp"
_MODULE = None
_TRIED = False


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def enabled() -> bool:
    """False when ``FREEPRM_CPU_EXT=0`` (force the pure-torch path)."""
    return os.environ.get("FREEPRM_CPU_EXT", "1") != "0"


def get():
    """The compiled extension module, or None (the caller falls back to pure torch)."""
    global _MODULE, _TRIED
    if not enabled():
        return None
    if _TRIED:
        return _MODULE
    _TRIED = True
    try:
        import torch
        from torch.utils import cpp_extension

        key = hashlib.sha256(_SRC.read_bytes() + torch.__version__.encode() + _cpu_flags().encode()).hexdigest()[:12]
        cache = Path(os.environ.get("FREEPRM_CACHE", Path.home() / ".cache" / "freeprm")) / "torch_extensions"
        build = cache / f"cpu_head_{key}"
        build.mkdir(parents=True, exist_ok=True)
        _MODULE = cpp_extension.load(
            name=f"freeprm_cpu_head_{key}", sources=[str(_SRC)], build_directory=str(build),
            extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
            verbose=False)
    except Exception as e:  # no compiler / ninja / headers: the torch path is exact, only slower
        warnings.warn(f"freeprm: C++ CPU kernel unavailable ({type(e).__name__}: {e}); using the pure-torch path",
                      RuntimeWarning, stacklevel=2)
        _MODULE = None
    return _MODULE
