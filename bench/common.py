"""What every benchmark records with its results: the machine, versions, git sha, date; and peak RSS."""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def env_info(threads: int) -> dict:
    """device (CPU model), threads, torch / transformers / python versions, short git sha, UTC date."""
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip() or "unknown"
    except OSError:
        sha = "unknown"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {"device": f"CPU: {cpu}", "threads": threads, "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "python": platform.python_version(),
            "git_sha": sha, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def rss_kb(field: str) -> int:
    """A field of /proc/self/status in KiB (``VmRSS`` now, ``VmHWM`` the peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)
