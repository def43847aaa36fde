"""Bounded memory: peak RSS of ``rerank`` is flat from 10k to 100k input rows (tiny model, subprocesses)."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("pyarrow")

_CHILD = r"""
import resource, sys, torch
torch.set_num_threads(1)
from freeprm.batch import rerank
s = rerank(sys.argv[1], sys.argv[2], policy=sys.argv[3], prompt_format="raw", rows_per_part=1000, progress=False, quiet=True)
assert s.groups == int(sys.argv[4]), s
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


def _peak_rss_kib(tmp_path, model, rows: int) -> int:
    inp = tmp_path / f"in{rows}.jsonl"
    with open(inp, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": i, "prompt": "q", "candidates": ["a"]}) + "\n")
    r = subprocess.run([sys.executable, "-c", _CHILD, str(inp), str(tmp_path / f"out{rows}"), model, str(rows)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1])


def test_peak_rss_is_flat_from_10k_to_100k_rows(tmp_path):
    from freeprm.testing import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "m", hidden_size=8, layers=1)
    small = _peak_rss_kib(tmp_path, model, 10_000)
    large = _peak_rss_kib(tmp_path, model, 100_000)
    # the only state that grows is the duplicate-id set (~100 B per id: ~9 MB for 90k more ids);
    # holding the rows or results (as `freeprm score` does, ~20 KB per line) would add > 1 GB
    assert large - small < 32 * 1024, (small, large)
