"""bench/bench_search_accuracy.py: the exact best-of-k expectation, the token matching, and a --quick run with resume."""

import itertools
import json
import math
import random

import pytest

from bench.bench_search_accuracy import bon_expected, main, matched, pass_at
from freeprm.search.algorithms import pick_best


def _brute(scores, correct, k):
    """Average over every k-subset of the pool of whether freeprm.search's pick_best picks a correct one."""
    subs = list(itertools.combinations(range(len(scores)), k))
    hits = 0
    for sub in subs:
        b = pick_best([scores[i] for i in sub])
        hits += b is not None and correct[sub[b]]
    return hits / len(subs)


@pytest.mark.parametrize("case", range(30))
def test_bon_expected_equals_enumerating_every_subset(case):
    rng = random.Random(case)
    n = rng.randint(1, 7)
    # ties, NaN (ranks below every number) and None (never picked) included
    scores = [rng.choice([None, float("nan"), -1.0, -2.0, rng.uniform(-5, 0)]) for _ in range(n)]
    correct = [rng.random() < 0.5 for _ in range(n)]
    for k in range(1, n + 1):
        assert bon_expected(scores, correct, k) == pytest.approx(_brute(scores, correct, k), abs=1e-12)
        brute_pass = sum(any(correct[i] for i in s) for s in itertools.combinations(range(n), k)) / math.comb(n, k)
        assert pass_at(correct, k) == pytest.approx(brute_pass, abs=1e-12)


def test_bon_expected_rejects_k_outside_the_pool():
    with pytest.raises(ValueError, match="k must be in"):
        bon_expected([1.0, 2.0], [True, False], 3)


def test_matched_budget_mixes_floor_and_ceil_and_caps_at_the_pool():
    per_k = {1: [0.0, 1.0], 2: [1.0, 1.0], 3: [1.0, 0.0]}
    vals, k, capped = matched(per_k, 1.25, 3)
    assert k == 1.25 and not capped and vals == [0.25, 1.0]
    vals, k, capped = matched(per_k, 2.0, 3)
    assert k == 2.0 and vals == [1.0, 1.0]
    vals, k, capped = matched(per_k, 5.0, 3)
    assert k == 3.0 and capped and vals == [1.0, 0.0]
    vals, k, capped = matched(per_k, 0.5, 3)  # below one candidate: best-of-1
    assert k == 1.0 and vals == [0.0, 1.0]


def test_quick_run_writes_a_report_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FREEPRM_CPU_EXT", "0")
    out = tmp_path / "sa"
    doc = main(["--quick", "--out", str(out)])
    s = doc["summary"]
    assert s["problems"] == 2 and set(s["prms"]) == {"untrained", "trained"}
    for e in s["prms"].values():
        assert [c["k"] for c in e["best_of_n"]] == [1, 2, 3, 4]
        for row in e["search"]:
            assert row["method"] in ("beam", "dvts") and row["tokens_per_problem"] > 0
            assert 1.0 <= row["matched_k"] <= 4.0
    parts = sorted(p.name for p in (out / "arith" / "parts").iterdir())
    assert len(parts) == 2 * 2 * 3  # 2 parts x 2 PRMs x (pool, beam, dvts)
    rescored = [json.loads(x) for x in (out / "arith" / "parts" / "trained_best_of_n_000.jsonl").read_text().splitlines()]
    assert all(r["rescored"] for r in rescored)
    assert "Step-level search vs best-of-N" in (out / "arith" / "report.md").read_text()
    # a part lost to a kill is recomputed exactly (same seed per part); the others are reused
    lost = out / "arith" / "parts" / "trained_beam_001.jsonl"
    def rows(path):  # all but the wall time
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in path.read_text().splitlines()]

    before = rows(lost)
    kept = (out / "arith" / "parts" / "untrained_dvts_000.jsonl").stat().st_mtime_ns
    lost.unlink()
    capsys.readouterr()
    main(["--quick", "--out", str(out)])
    log = capsys.readouterr().out
    assert log.count("part ") == 1 and "trained   beam" in log
    assert rows(lost) == before
    assert (out / "arith" / "parts" / "untrained_dvts_000.jsonl").stat().st_mtime_ns == kept
    with pytest.raises(SystemExit):  # another configuration on the same directory is refused
        main(["--quick", "--out", str(out), "--temperature", "0.9"])


def test_more_problems_extend_a_run_and_reuse_its_parts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FREEPRM_CPU_EXT", "0")
    out = tmp_path / "sa"
    main(["--quick", "--out", str(out), "--problems", "1"])
    first = (out / "arith" / "parts" / "untrained_beam_000.jsonl").read_text()
    capsys.readouterr()
    doc = main(["--quick", "--out", str(out), "--problems", "2"])
    log = capsys.readouterr().out
    assert doc["summary"]["problems"] == 2
    assert "part 1/2" not in log and log.count("part 2/2") == 6  # only the new part ran, every method of it
    assert (out / "arith" / "parts" / "untrained_beam_000.jsonl").read_text() == first
    with pytest.raises(SystemExit):  # fewer problems than were run is another plan
        main(["--quick", "--out", str(out), "--problems", "1"])
