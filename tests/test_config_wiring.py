"""``ScoringConfig`` taken by every entry point: the same scores as the keyword arguments, old fingerprints and
cache tags unchanged, options left out on the command line filled from a trained PRM's ``freeprm_prm.json``, old
spellings kept as deprecated aliases, one error format."""

import json
import shutil
import warnings

import pytest

from freeprm.cli import main
from freeprm.config import ScoringConfig
from freeprm.prm_meta import PRMMetaWarning, meta_dict, write_meta

ITEMS = [{"prompt": "What is 2 + 3?", "response": "2 + 3 = 5.\n\nThe answer is 5."},
         {"prompt": "What is 7 * 6?", "response": "7 * 6 = 42.\n\nSo 42.\n\nThe answer is 42."}]


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_ref_dir):
    from freeprm.engine.loading import load_model

    return load_model(tiny_model_dir), load_model(tiny_ref_dir)


@pytest.fixture(scope="module")
def prm_dir(tiny_model_dir, tmp_path_factory):
    """A model directory that records beta 0.05, no reference and prompt format raw (as training writes them)."""
    d = tmp_path_factory.mktemp("wiring") / "prm"
    shutil.copytree(tiny_model_dir, d)
    write_meta(d, meta_dict(ScoringConfig(beta=0.05, reference="none", prompt_format="raw"), reference_digest=None,
                            training={"trainer": "test"}))
    return str(d)


def _scores(results):
    return [(r.score, r.step_rewards.tolist(), r.token_rewards.tolist()) for r in results]


def _write_items(path):
    path.write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    return str(path)


# ---------------------------------------------------------------------- the API
def test_scorer_config_equals_the_keywords_bit_for_bit(models):
    from freeprm import Scorer

    (pol, tok), (ref, _) = models
    old = Scorer((pol, tok), (ref, tok), beta=0.5, step_delimiter="\n", aggregate="q_last", prompt_format="raw")
    cfg = ScoringConfig(reference=(ref, tok), beta=0.5, step_delimiter="\n", aggregate="q_last", prompt_format="raw")
    new = Scorer((pol, tok), config=cfg)
    assert _scores(new.score(ITEMS)) == _scores(old.score(ITEMS))
    assert new.beta == 0.5 and new.aggregate_name == "q_last" and new.config.step_delimiter == "\n"
    # keywords win over the config; "none" = no reference
    s = Scorer((pol, tok), "none", config=cfg, beta=2.0)
    assert s.reference is None and s.beta == 2.0 and s.config.reference_free
    want = Scorer((pol, tok), beta=2.0, step_delimiter="\n", aggregate="q_last", prompt_format="raw")
    assert _scores(s.score(ITEMS)) == _scores(want.score(ITEMS))


def test_score_function_takes_the_config(models):
    from freeprm import score

    (pol, tok), _ = models
    got = score(ITEMS, (pol, tok), config=ScoringConfig(beta=0.25, aggregate="sum"))
    want = score(ITEMS, (pol, tok), beta=0.25, aggregate="sum")
    assert _scores(got) == _scores(want) and got[0].aggregation == "sum" and got[0].beta == 0.25


def test_bad_options_raise_before_loading():
    from freeprm import Scorer

    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        Scorer("no/such/model", beta=0)
    with pytest.raises(ValueError, match="aggregate must be one of"):
        Scorer("no/such/model", config=ScoringConfig(), aggregate="max")
    with pytest.raises(ValueError, match="config must be a freeprm.ScoringConfig"):
        Scorer("no/such/model", config={"beta": 1.0})
    with pytest.raises(ValueError, match="max_length must be at most"):
        Scorer("no/such/model", max_length=2**31)


def test_a_config_fills_only_what_it_gives_from_a_trained_prm(prm_dir):
    from freeprm import Scorer

    with warnings.catch_warnings():
        warnings.simplefilter("error", PRMMetaWarning)
        s = Scorer(prm_dir, config=ScoringConfig(aggregate="sum"), device="cpu")
    assert (s.beta, s.prompt_format, s.aggregate_name, s.reference) == (0.05, "raw", "sum", None)
    with pytest.warns(PRMMetaWarning, match=r"beta: using the given 1\.0.*records 0\.05"):
        s = Scorer(prm_dir, config=ScoringConfig(beta=1.0), device="cpu")
    assert s.beta == 1.0 and s.prompt_format == "raw"


# ---------------------------------------------------------------------- the command line and a trained PRM
def test_cli_without_beta_uses_the_recorded_beta_and_a_given_one_warns(prm_dir, tmp_path, capsys):
    inp = _write_items(tmp_path / "in.jsonl")
    base = ["score", "--policy", prm_dir, "-i", inp, "--no-progress", "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PRMMetaWarning)
        assert main(base + ["-o", str(tmp_path / "a.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["beta"] for r in rows] == [0.05, 0.05]
    with pytest.warns(PRMMetaWarning, match=r"beta: using the given 1\.0.*records 0\.05"):
        assert main(base + ["-o", str(tmp_path / "b.jsonl"), "--beta", "1"]) == 0
    given = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["beta"] for r in given] == [1.0, 1.0]
    # the same responses: the rewards scale with beta (reference-free, the same prompt format)
    for a, b in zip(rows, given):
        assert b["step_rewards"] == pytest.approx([x / 0.05 for x in a["step_rewards"]], rel=1e-5, abs=1e-6)
    # a prompt format given that differs from the recorded one warns too
    with pytest.warns(PRMMetaWarning, match="prompt_format"):
        assert main(base + ["-o", str(tmp_path / "c.jsonl"), "--prompt-format", "chat"]) == 0
    capsys.readouterr()


def test_rerank_bon_and_serve_options_left_out_stay_unset(prm_dir, tmp_path):
    from freeprm.cli import build_parser
    from freeprm.scorer_cli import make_scorer

    p = build_parser()
    for argv in (["rerank", "-i", "x", "-o", "y"], ["serve"], ["search", "-o", "y"], ["bon", "score", "-o", "y"]):
        ns = p.parse_args(argv + ["--policy", prm_dir])
        assert ns.beta is None and ns.reference is None and ns.step_delimiter is None, argv
    ns = p.parse_args(["serve", "--policy", prm_dir, "--device", "cpu"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PRMMetaWarning)  # serve gives prompt_format raw (the recorded one here)
        s = make_scorer(ns)
    assert s.beta == 0.05 and s.prompt_format == "raw"
    # rerank through the CLI: the fingerprint holds the recorded beta
    inp = tmp_path / "g.jsonl"
    inp.write_text(json.dumps({"id": 0, "prompt": ITEMS[0]["prompt"], "candidates": [ITEMS[0]["response"], "x y"]})
                   + "\n")
    assert main(["rerank", "--policy", prm_dir, "-i", str(inp), "-o", str(tmp_path / "rr"), "--format", "jsonl",
                 "--no-progress", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "rr" / "fingerprint.json").read_text())["beta"] == 0.05


# ---------------------------------------------------------------------- old outputs stay readable
def test_rerank_fingerprint_is_the_one_written_before_the_config(tmp_path, tiny_model_dir):
    from freeprm import rerank
    from freeprm.identity import model_identity

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": it["prompt"], "candidates": [it["response"], "x y"]}) + "\n"
                           for i, it in enumerate(ITEMS)))
    out = tmp_path / "out"
    rerank(inp, out, policy=tiny_model_dir, beta=0.5, format="jsonl", progress=False, quiet=True, rows_per_part=1,
           device="cpu")
    # fingerprint version 2 as rerank.make_fingerprint wrote it before ScoringConfig existed
    old = {"version": 2, "policy": model_identity(tiny_model_dir), "reference": None, "beta": 0.5,
           "step_delimiter": "\n\n", "step_pattern": None, "aggregate": "min", "prompt_format": "auto",
           "dtype": "torch.float32", "max_length": None, "rows_per_part": 1, "format": "jsonl"}
    assert json.loads((out / "fingerprint.json").read_text()) == old
    (out / "part-000001.jsonl").unlink()  # lose one part: the config run must resume it
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(line + "\n" for line in manifest.read_text().splitlines()
                                if json.loads(line).get("part") != 1))
    s = rerank(inp, out, policy=tiny_model_dir, config=ScoringConfig(beta=0.5), format="jsonl", progress=False,
               quiet=True, rows_per_part=1, device="cpu")
    assert (s.resumed_parts, s.parts_written) == (1, 1)
    with pytest.raises(ValueError, match="beta: written with 0.5, now 1.0"):
        rerank(inp, out, policy=tiny_model_dir, config=ScoringConfig(), format="jsonl", progress=False, quiet=True,
               rows_per_part=1, device="cpu")


def test_bon_tag_is_the_one_written_before_the_config(tiny_model_dir, models):
    from freeprm import Scorer
    from freeprm.eval.scoring import config_tag, resolved_config_tag, scorer_tag, scorer_tag_of
    from freeprm.identity import identity_digest, model_identity

    d = identity_digest(model_identity(tiny_model_dir))
    old = f"policy={tiny_model_dir}@{d};reference=none;beta=1;delim='\\n\\n';pattern=None;format=auto;dtype=float32"
    assert scorer_tag(tiny_model_dir, None, 1.0, "\n\n", dtype="float32") == old
    assert config_tag(tiny_model_dir, ScoringConfig(reference="none"), device="cpu") == old  # dtype auto on CPU
    assert resolved_config_tag(tiny_model_dir, ScoringConfig(), device="cpu")[0] == old
    # a pattern keeps the delimiter in the tag, as before
    assert "delim='\\n\\n';pattern='x+'" in config_tag(tiny_model_dir, ScoringConfig(reference="none",
                                                                                      step_pattern="x+"))
    (pol, tok), (ref, _) = models
    s = Scorer((pol, tok), (ref, tok), beta=0.5)
    tag = scorer_tag_of(s)
    assert tag.startswith(f"policy={pol.config._name_or_path}@{identity_digest(model_identity((pol, tok)))};"
                          f"reference={ref.config._name_or_path}@{identity_digest(model_identity((ref, tok)))};")
    assert tag.endswith(";beta=0.5;delim='\\n\\n';pattern=None;format=auto;dtype=float32")


# ---------------------------------------------------------------------- reference, old spellings, errors
def test_implicit_prm_reference_none_is_a_deprecated_alias_of_none(tiny_model_dir):
    from freeprm import ImplicitPRM

    with pytest.warns(DeprecationWarning, match="reference='none'"):
        old = ImplicitPRM(tiny_model_dir, None, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = ImplicitPRM(tiny_model_dir, "none", device="cpu")
    assert old.reference_kind == new.reference_kind == "none" and new.reference is None
    assert new.beta == 0.05  # DEFAULT_TRAIN_BETA
    # the one delimiter rule: "" = the whole response is one step (was an error here)
    assert ImplicitPRM(tiny_model_dir, "none", step_delimiter="", device="cpu").step_delimiter is None


def test_bon_old_spellings_still_work_with_a_warning(tmp_path, capsys):
    from freeprm.cli import build_parser

    p = build_parser()
    with pytest.warns(DeprecationWarning):
        ns = p.parse_args(["bon", "score", "--out", str(tmp_path), "--score-dtype", "fp32"])
    assert ns.out == str(tmp_path) and ns.dtype == "float32"
    err = capsys.readouterr().err
    assert "--out is deprecated; use --output" in err and "--score-dtype is deprecated; use --dtype" in err
    ns = p.parse_args(["bon", "score", "-o", str(tmp_path)])
    assert ns.dtype is None and ScoringConfig.from_args(ns).dtype == "auto"  # --dtype auto, as every command


@pytest.mark.parametrize("argv, command", [
    (["score", "-i", "nonexistent.jsonl", "-o", "x.jsonl"], "score"),
    (["rerank", "-i", "nonexistent.jsonl", "-o", "x"], "rerank"),
    (["bon", "report", "-o", "{tmp}", "--candidates", "nonexistent.jsonl", "--no-scores"], "bon report"),
    (["serve", "--host", "0.0.0.0"], "serve"),
    (["serve", "--max-length", "2147483648"], "serve"),
    (["search", "-o", "{tmp}"], "search"),
    (["demo", "--device", "nosuch"], "demo"),
    (["demo", "--input", "nonexistent.jsonl"], "demo"),
])
def test_one_error_format(argv, command, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"freeprm {command}: error: ")


def test_train_and_bon_renamed_options(tmp_path, capsys, monkeypatch):
    import freeprm.trainer.run as trainer_mod
    from freeprm.cli import build_parser

    p = build_parser()
    ns = p.parse_args(["train", "--data", "d", "-o", "o"])
    assert (ns.dtype, ns.beta, ns.reference, ns.reference_free) == (None, 0.05, None, False)  # --dtype auto
    with pytest.warns(DeprecationWarning):
        ns = p.parse_args(["bon", "report", "-o", str(tmp_path), "--aggregations", "min,q_last"])
    assert ns.aggregations == ["min", "q_last"] and "--aggregations is deprecated; use --aggregate" in \
        capsys.readouterr().err
    assert p.parse_args(["bon", "report", "-o", "x", "--aggregate", "mean"]).aggregations == ["mean"]
    with pytest.raises(SystemExit):
        p.parse_args(["bon", "report", "-o", "x", "--aggregate", "max"])
    assert "expected aggregations from min" in capsys.readouterr().err
    seen = {}

    def fake_train(policy, data, out, *, config, reference, dtype, **kw):
        seen.update(config=config, reference=reference, dtype=dtype)
        raise ValueError("stop here")

    monkeypatch.setattr(trainer_mod, "train", fake_train)
    assert main(["train", "--data", "d", "-o", str(tmp_path), "--reference", "none"]) == 2
    assert seen["dtype"] == "auto" and seen["reference"] == "none"
    assert capsys.readouterr().err.strip().endswith("freeprm train: error: stop here")


def test_train_auto_dtype_and_reference_none(tiny_model_dir, tmp_path):
    from freeprm.trainer import TrainConfig, train

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "q", "response": r, "label": lab}) + "\n"
                            for r, lab in [("a b", 1), ("c d", 0)]))
    cfg = TrainConfig(loss="ce", batch_size=2, max_steps=1, progress=False, ref_cache_dir=str(tmp_path / "rc"))
    res = train(tiny_model_dir, data, tmp_path / "o", config=cfg, reference="none", dtype="auto")
    meta = json.loads((res.final_dir / "freeprm_prm.json").read_text())
    assert meta["scoring"]["reference"] == "none" and res.ref_cache is None  # no reference model was run
    import torch

    from freeprm.engine.loading import load_model

    assert next(load_model(str(res.final_dir))[0].parameters()).dtype == torch.float32  # auto = float32


def test_one_default_each_in_the_library():
    """The defaults live in freeprm/config.py: no other module spells the step delimiter, a beta or the default
    policy as a literal default."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "freeprm"
    bad = []
    for path in root.rglob("*.py"):
        if path.name == "config.py" and path.parent == root:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if (re.search(r'(step_delimiter|delimiter)[^=]*=\s*"\\n\\n"', code)
                    or re.search(r'(default=|^\s*model=|^\s*policy=)\s*"smollm2"', code)
                    or re.search(r"\bbeta: float(\s*\|\s*None)?\s*=\s*[0-9]", code)):
                bad.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not bad, bad
