"""The scores-file cache tag: every option that changes scores changes the tag; a passed-in scorer is named by its own config."""

import re
from pathlib import Path

import pytest

from freeprm.eval.scoring import load_scores, score_candidates, scorer_tag, scorer_tag_of

BASE = dict(policy="pol", reference=None, beta=1.0, step_delimiter="\n\n", step_pattern=None, prompt_format="auto",
            dtype="float32")
CHANGES = [("policy", "other-pol"), ("reference", "ref"), ("beta", 0.5), ("step_delimiter", "\n"),
           ("step_pattern", r"Step \d+:"), ("prompt_format", "raw"), ("prompt_format", "chat"), ("dtype", "bfloat16")]


def _tag(policy, reference, beta, step_delimiter, **kw):
    return scorer_tag(policy, reference, beta, step_delimiter, **kw)


@pytest.mark.parametrize("name,value", CHANGES, ids=[f"{n}={v!r}" for n, v in CHANGES])
def test_each_scoring_option_changes_the_tag(name, value):
    assert _tag(**{**BASE, name: value}) != _tag(**BASE)


def test_equivalent_spellings_share_a_tag():
    import torch

    assert _tag(**{**BASE, "dtype": torch.float32}) == _tag(**BASE)
    assert _tag(**{**BASE, "step_pattern": re.compile(r"\n+")}) == _tag(**{**BASE, "step_pattern": r"\n+"})


def _cands():
    return [{"problem_id": "p", "candidate_id": i, "prompt": "What is 2 + 2?", "response": f"2 + 2 = {3 + i}.\n\nDone."}
            for i in range(2)]


def test_passed_scorer_is_tagged_by_its_own_config(tiny_model_dir, tiny_ref_dir, tmp_path):
    from freeprm.engine import Scorer

    scorer = Scorer(tiny_model_dir, tiny_ref_dir, beta=2.0, prompt_format="raw", step_pattern=r"\n\n")
    tag = scorer_tag_of(scorer)
    # named by the paths its models were loaded from, plus a digest of their parameters (not of the files)
    pairs = ((scorer.policy, scorer.tokenizer), (scorer.reference, scorer.tokenizer))
    assert tag == scorer_tag(*pairs, 2.0, "\n\n", step_pattern=r"\n\n", prompt_format="raw", dtype="float32")
    assert f"policy={tiny_model_dir}@" in tag and f"reference={tiny_ref_dir}@" in tag
    out = tmp_path / "scores.jsonl"
    # policy/beta given here name nothing: the scorer's real config goes in the tag
    st = score_candidates(_cands(), out, policy="smollm2", beta=1.0, scorer=scorer, progress=False)
    assert st["scored"] == 2
    assert set(r["scorer"] for r in load_scores(out).values()) == {tag}
    again = score_candidates(_cands(), out, scorer=scorer, progress=False)
    assert again["reused"] == 2 and again["scored"] == 0
    other = Scorer(tiny_model_dir, tiny_ref_dir, beta=2.0, prompt_format="chat", step_pattern=r"\n\n")
    changed = score_candidates(_cands(), out, scorer=other, progress=False)
    assert changed["reused"] == 0 and changed["scored"] == 2  # another prompt format: no stale reuse
    a, b = load_scores(out, tag), load_scores(out, scorer_tag_of(other))
    assert a[("p", 0)]["aggregates"]["sum"] != b[("p", 0)]["aggregates"]["sum"]


def test_spec_path_tag_covers_scorer_kwargs(tiny_model_dir, tmp_path):
    out = tmp_path / "scores.jsonl"
    score_candidates(_cands(), out, policy=tiny_model_dir, progress=False)
    st = score_candidates(_cands(), out, policy=tiny_model_dir, prompt_format="raw", progress=False)
    assert st["reused"] == 0 and st["scored"] == 2
    assert load_scores(out, scorer_tag(tiny_model_dir, None, 1.0, "\n\n", prompt_format="raw"))


def _perturb_in_place(model_dir) -> None:
    """Rewrite the model's weights under the same path: one tensor nudged, same shapes and file names."""
    from safetensors.torch import load_file, save_file

    (path,) = [p for p in Path(model_dir).iterdir() if p.suffix == ".safetensors"]
    sd = load_file(path)
    name = sorted(sd)[0]
    # scaled, not shifted: a constant added to every LM-head entry shifts all logits of a row alike and
    # leaves log-softmax (so every score) unchanged, so that edit would only show through rounding
    sd[name] = sd[name] * 1.5
    save_file(sd, path, metadata={"format": "pt"})


def test_weights_changed_in_place_miss_the_cache(tiny_model_dir, tmp_path):
    """Same path, other weights: rescored (the tag carries a content digest), not silently reused."""
    import shutil

    from freeprm.engine import Scorer

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "scores.jsonl"
    first = score_candidates(_cands(), out, policy=str(model), prompt_format="raw", progress=False)
    assert first["scored"] == 2
    assert score_candidates(_cands(), out, policy=str(model), prompt_format="raw", progress=False)["reused"] == 2
    old_tag = scorer_tag(str(model), None, 1.0, "\n\n", prompt_format="raw")
    before = Scorer(str(model), prompt_format="raw")
    _perturb_in_place(model)
    assert scorer_tag(str(model), None, 1.0, "\n\n", prompt_format="raw") != old_tag
    st = score_candidates(_cands(), out, policy=str(model), prompt_format="raw", progress=False)
    assert (st["scored"], st["reused"]) == (2, 0)
    new = load_scores(out, scorer_tag(str(model), None, 1.0, "\n\n", prompt_format="raw"))
    assert new[("p", 0)]["aggregates"]["sum"] != load_scores(out, old_tag)[("p", 0)]["aggregates"]["sum"]
    # built scorers: the same path (same _name_or_path), other parameters -> other tags
    after = Scorer(str(model), prompt_format="raw")
    assert scorer_tag_of(before) != scorer_tag_of(after)
    assert scorer_tag_of(after) == scorer_tag_of(Scorer(str(model), prompt_format="raw"))
