"""Loader of the optional C++ CPU kernel (``csrc/cpu_head.cpp``): built once, on first use, with the
system C++ compiler through ``torch.utils.cpp_extension`` (``scripts/setup.sh`` triggers the build).

``get()`` returns the compiled module, or ``None`` when it cannot be built (no compiler, no ninja,
``FREEPRM_CPU_EXT=0``); callers then take the pure-torch path, which computes the same values.
The build is cached under ``$FREEPRM_CACHE/torch_extensions`` (default ``~/.cache/freeprm``), keyed
by the source, the torch version, the Python environment (``sys.prefix``: two virtual environments
never rebuild each other's copy) and this CPU's flags (a cache shared across machines stays safe).
Only one build runs at a time: the loader holds an ``flock`` on ``build.flock`` in the build folder,
which the kernel releases when the holder dies, and under it removes a stale ``lock`` file that a
process killed mid-build (``kill -9``) left behind, since torch's own lock file would otherwise make
every later load wait forever. The build compiles a copy of the source kept in the build folder, so
checkouts at different paths with the same source share it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
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


def build_dir() -> Path:
    """The folder this environment's build lives in (see the module docstring for the key)."""
    import torch

    # "copy": builds from a copy of the source (see get) never share a folder with builds from a checkout's path
    key = hashlib.sha256(_SRC.read_bytes() + torch.__version__.encode() + sys.prefix.encode()
                         + _cpu_flags().encode() + b"copy").hexdigest()[:12]
    cache = Path(os.environ.get("FREEPRM_CACHE", Path.home() / ".cache" / "freeprm")) / "torch_extensions"
    return cache / f"cpu_head_{key}"


def get():
    """The compiled extension module, or None (the caller falls back to pure torch)."""
    global _MODULE, _TRIED
    if not enabled():
        return None
    if _TRIED:
        return _MODULE
    _TRIED = True
    try:
        from torch.utils import cpp_extension

        build = build_dir()
        key = build.name.removeprefix("cpu_head_")
        build.mkdir(parents=True, exist_ok=True)
        with open(build / "build.flock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # released by the kernel if this process dies
            # we hold the only right to build here: a torch lock file now is a dead builder's leftover
            (build / "lock").unlink(missing_ok=True)
            # build from a copy inside the build folder: checkouts at other paths (git worktrees) with this
            # source then write the same build.ninja and reuse the build instead of rebuilding it in turn
            src = build / _SRC.name
            if not src.exists() or src.read_bytes() != _SRC.read_bytes():
                src.write_bytes(_SRC.read_bytes())
            _MODULE = cpp_extension.load(
                name=f"freeprm_cpu_head_{key}", sources=[str(src)], build_directory=str(build),
                extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                verbose=False)
    except Exception as e:  # no compiler / ninja / headers: the torch path is exact, only slower
        warnings.warn(f"freeprm: C++ CPU kernel unavailable ({type(e).__name__}: {e}); using the pure-torch path",
                      RuntimeWarning, stacklevel=2)
        _MODULE = None
    return _MODULE
