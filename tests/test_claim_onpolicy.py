"""The on-policy claim pipeline (bench/claim_onpolicy.py) end to end in --quick mode, and its stage-by-stage resume."""

import json

from bench.claim_onpolicy import main


def test_quick_pipeline_runs_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FREEPRM_CPU_EXT", "0")  # the pure-torch path: no wait on a shared C++ build
    out = tmp_path / "run"
    # a run stopped after its data stage, then the same command for everything: it continues
    main(["--quick", "--out", str(out), "--threads", "1", "--stages", "data"])
    rollouts = (out / "data" / "rollouts.jsonl").read_text()
    doc = main(["--quick", "--out", str(out), "--threads", "1"])
    assert (out / "data" / "rollouts.jsonl").read_text() == rollouts  # reused, not sampled again
    assert (out / "ce" / "final").is_dir()
    bon = doc["bon"]
    assert bon["problems"] == 4 and bon["ns"] == [1, 2, 4]
    assert {"random", "majority", "bon:untrained_min", "bon:ce_min", "wmv:ce_min:sigmoid", "pass@N"} <= set(bon["methods"])
    assert set(bon["paired_vs_majority"]["wmv:ce_min:sigmoid"]) == {1, 2, 4}
    steps = doc["steps"]
    assert steps["rows"]["test_erroneous"] == 3 and {"untrained", "ce", "chance"} <= set(steps)
    assert 0 <= steps["ce"]["test"]["f1"] <= 1
    md = (out / "claim.md").read_text()
    assert "Best-of-N on held-apart problems" in md and "Step-error localisation" in md
    assert (out / "claim_bon.png").stat().st_size > 0
    assert json.loads((out / "claim.json").read_text())["plan"]["n_test"] == 4
    capsys.readouterr()
    main(["--quick", "--out", str(out), "--threads", "1", "--stages", "data,train,bon"])  # all done: nothing redone
    log = capsys.readouterr().out
    assert "0 new rollouts" in log and "train ce: done" in log and "0 generated" in log and "0 scored" in log
    # a second training configuration beside the plan's: trained on the same rows, scored on the same step rows and
    # (score-only) the same test candidates, reported with its settings
    capsys.readouterr()
    doc = main(["--quick", "--out", str(out), "--threads", "1", "--variant", "hi-lr:lr=0.01,epochs=2",
                "--stages", "train,steps,bon,report", "--score-only"])
    log = capsys.readouterr().out
    assert "0 generated" in log and "train ce: done" in log
    assert (out / "variants" / "hi-lr" / "ce" / "final").is_dir()
    assert doc["train"]["hi-lr"]["lr"] == 0.01 and doc["train"]["hi-lr"]["epochs"] == 2
    assert doc["bon"]["problems"] == 4 and "wmv:hi-lr_sum:sigmoid" in doc["bon"]["paired_vs_majority"]
    assert {"hi-lr", "ce-policy-only"} <= set(doc["steps"])
    md = (out / "claim.md").read_text()
    assert "config hi-lr: weighted vote" in md and "| hi-lr | ce | " in md
    # the same name with other settings is refused, the candidates file is untouched
    import pytest

    with pytest.raises(SystemExit):
        main(["--quick", "--out", str(out), "--variant", "hi-lr:lr=0.02", "--stages", "report"])
    with pytest.raises(SystemExit):
        main(["--quick", "--out", str(out), "--variant", "ce:lr=0.02", "--stages", "report"])


def test_derived_scores_equal_direct(tmp_path, monkeypatch):
    """--derive: a trained PRM's rewards from its policy alone minus the untrained scorer's step rewards equal a
    direct Scorer(PRM, reference, beta) run (same tag, step rewards and aggregates to 1e-5)."""
    import shutil

    import pytest

    from bench import claim_onpolicy as co
    from freeprm.eval.candidates import read_jsonl

    monkeypatch.setenv("FREEPRM_CPU_EXT", "0")
    out = tmp_path / "run"
    main(["--quick", "--out", str(out), "--threads", "1", "--stages", "data,train,bon"])
    td2 = tmp_path / "derived"
    td2.mkdir()
    shutil.copyfile(out / "test" / "scores_untrained.jsonl", td2 / "scores_untrained.jsonl")
    cands = read_jsonl(out / "test" / "candidates.jsonl")
    spec = (str(out / "ce" / "final"), str(out / "tiny_policy"), 0.05)
    tag = co.prm_tag(spec)
    got = co.derive_scores(cands, td2, "ce", spec[2], tag, lambda: co._scorer((spec[0], "none", 1.0)))
    assert got["scored"] == len(cands) > 0
    direct = {(r["problem_id"], r["candidate_id"]): r for r in read_jsonl(out / "test" / "scores_ce.jsonl")}
    derived = read_jsonl(td2 / "scores_ce.jsonl")
    assert len(derived) == len(cands)
    for r in derived:
        d = direct[(r["problem_id"], r["candidate_id"])]
        assert r["scorer"] == d["scorer"]
        assert r["step_rewards"] == pytest.approx(d["step_rewards"], abs=1e-5)
        for a, v in d["aggregates"].items():
            assert r["aggregates"][a] == pytest.approx(v, abs=1e-5), a
    assert co.derive_scores(cands, td2, "ce", spec[2], tag, lambda: 1 / 0)["scored"] == 0  # all done: no model work
    # the same through the bon stage (--score-only --derive): the direct file removed, the derived one replaces it
    (out / "test" / "scores_ce.jsonl").unlink()
    main(["--quick", "--out", str(out), "--threads", "1", "--stages", "bon", "--score-only", "--derive",
          "--scorers", "ce"])
    again = read_jsonl(out / "test" / "scores_ce.jsonl")
    assert len(again) == len(cands) and all("derived" in r for r in again)
    for r in again:
        d = direct[(r["problem_id"], r["candidate_id"])]
        assert r["scorer"] == d["scorer"] and r["step_rewards"] == pytest.approx(d["step_rewards"], abs=1e-5)
