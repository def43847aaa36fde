"""Self-describing PRM directories (freeprm/prm_meta.py): written by train and ImplicitPRM, read by Scorer, the CLIs
and ImplicitPRM.from_pretrained."""

import json
import shutil
import warnings

import pytest
import torch

from freeprm.cli import main
from freeprm.engine import Scorer
from freeprm.prm_meta import META_FILE, PRMMetaWarning, read_meta
from freeprm.rl import ImplicitPRM, encode_batch
from freeprm.testing import make_tiny_model_dir, naive_sequence_logprobs
from freeprm.trainer import TrainConfig, train

PROMPTS = ["What is 3 + 4?", "What is 5 + 8?"]
RESPONSES = ["3 + 4 = 7.\n\nThe answer is 7.", "5 + 8 = 14.\n\nThe answer is 14."]
ITEMS = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, RESPONSES)]


def _rows(n=4):
    rows = []
    for i in range(n):
        a, b = 3 + i, 4 + 2 * i
        p = f"What is {a} + {b}?"
        rows += [{"prompt": p, "response": f"{a} + {b} = {a + b}.\n\nThe answer is {a + b}.", "label": 1},
                 {"prompt": p, "response": f"{a} + {b} = {a + b + 1}.\n\nThe answer is {a + b + 1}.", "label": 0}]
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny policy (its own copy: some tests change files) trained 3 CE steps against itself; checkpoints kept."""
    root = tmp_path_factory.mktemp("prmmeta")
    policy = make_tiny_model_dir(root / "policy", seed=0)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    cfg = TrainConfig(loss="ce", beta=0.05, lr=3e-3, batch_size=2, max_steps=3, save_every=2, keep_checkpoints=5,
                      progress=False, ref_cache_dir=str(root / "rc"))
    res = train(policy, data, root / "out", config=cfg)
    return {"policy": policy, "data": data, "out": root / "out", "final": str(res.final_dir), "root": root}


def _naive_rewards(policy_dir, ref_dir, beta):
    """beta * (log pi - log pi_ref) over each response, from the full logits (the oracle)."""
    from freeprm.engine import load_model

    pol, tok = load_model(policy_dir)
    ref = load_model(ref_dir)[0]
    ids, am, rm = encode_batch(tok, PROMPTS, RESPONSES)
    with torch.no_grad():
        r = beta * (naive_sequence_logprobs(pol, ids, am, rm) - naive_sequence_logprobs(ref, ids, am, rm))
    return [r[b][rm[b]] for b in range(len(PROMPTS))]


def test_train_writes_metadata_and_score_reads_it(trained):
    meta = read_meta(trained["final"])
    assert meta is not None and meta.scoring.beta == 0.05 and meta.scoring.prompt_format == "auto"
    assert meta.scoring.reference == str(__import__("pathlib").Path(trained["policy"]).resolve())
    assert meta.reference_digest.startswith("files:")
    assert meta.training["loss"] == "ce" and meta.training["steps"] == 3 and meta.training["freeprm_version"]
    assert len(meta.training["data_sha256"]) == 64
    ck = read_meta(trained["out"] / "checkpoint-2")  # checkpoints carry it too
    assert ck.training["steps"] == 2 and ck.reference_digest == meta.reference_digest
    # train -> score: the recorded beta and reference, the trainer's rewards
    with warnings.catch_warnings():
        warnings.simplefilter("error", PRMMetaWarning)
        scorer = Scorer(trained["final"])
    assert scorer.beta == 0.05 and scorer.reference is not None
    want = _naive_rewards(trained["final"], trained["policy"], 0.05)
    for res, w in zip(scorer.score(ITEMS), want):
        torch.testing.assert_close(res.token_rewards, w, atol=1e-6, rtol=1e-4)
    assert float(torch.cat(want).abs().max()) > 0  # trained: not the reference itself


def test_given_values_that_differ_warn_naming_both(trained):
    with pytest.warns(PRMMetaWarning, match=r"beta: using the given 1\.0.*records 0\.05"):
        s = Scorer(trained["final"], beta=1.0)
    assert s.beta == 1.0
    with pytest.warns(PRMMetaWarning, match=r"reference: using the given 'none'"):
        s = Scorer(trained["final"], "none")
    assert s.reference is None
    with pytest.warns(PRMMetaWarning, match="prompt_format: using the given 'raw'.*'auto'"):
        Scorer(trained["final"], prompt_format="raw")
    with warnings.catch_warnings():  # the recorded values given explicitly: no warning
        warnings.simplefilter("error", PRMMetaWarning)
        Scorer(trained["final"], trained["policy"], beta=0.05, prompt_format="auto")


def test_reference_digest_check_and_force(trained, tiny_ref_dir):
    with pytest.raises(ValueError, match=r"content digest .* records files:.*force_reference"):
        Scorer(trained["final"], tiny_ref_dir)
    with pytest.warns(PRMMetaWarning, match="used anyway"):
        s = Scorer(trained["final"], tiny_ref_dir, force_reference=True)
    assert s.reference is not None
    with pytest.raises(ValueError, match="content digest"):
        ImplicitPRM.from_pretrained(trained["final"], tiny_ref_dir)


def test_recorded_reference_changed_in_place_or_missing(trained, tmp_path):
    prm = tmp_path / "prm"
    shutil.copytree(trained["final"], prm)
    ref = tmp_path / "ref"
    shutil.copytree(trained["policy"], ref)
    meta = json.loads((prm / META_FILE).read_text())
    meta["scoring"]["reference"] = str(ref)
    (prm / META_FILE).write_text(json.dumps(meta))
    assert Scorer(str(prm)).beta == 0.05  # moved but identical: the digest ignores the path
    make_tiny_model_dir(ref, seed=7)  # other weights under the same path
    with pytest.raises(ValueError, match=f"the recorded reference '{ref}' has content digest"):
        Scorer(str(prm))
    with pytest.warns(PRMMetaWarning, match="used anyway"):
        Scorer(str(prm), force_reference=True)
    shutil.rmtree(ref)
    with pytest.raises(ValueError, match=f"{prm / META_FILE} names the reference '{ref}', which does not exist"):
        Scorer(str(prm))
    assert Scorer(str(prm), trained["policy"]).reference is not None  # given explicitly: fine


@pytest.mark.parametrize("content, why", [("{not json", "damaged"), ("[1, 2]", "not a JSON object"),
                                          ('{"format": "freeprm-prm-2"}', "missing"),
                                          ('{"format": "other"}', "format 'other'")])
def test_damaged_metadata_is_an_error_naming_the_file(trained, tmp_path, content, why, capsys):
    prm = tmp_path / "prm"
    shutil.copytree(trained["final"], prm)
    (prm / META_FILE).write_text(content)
    with pytest.raises(ValueError, match=f"{prm / META_FILE} is damaged.*{why}"):
        Scorer(str(prm))
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(ITEMS[0]) + "\n")
    assert main(["score", "--policy", str(prm), "--input", str(inp), "--output", str(tmp_path / "o.jsonl"),
                 "--no-progress"]) == 2
    assert f"{prm / META_FILE} is damaged" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_plain_model_and_old_format_load_as_before(tiny_model_dir, tmp_path):
    s = Scorer(tiny_model_dir)  # no metadata: bare model, beta 1.0, no reference
    assert s.beta == 1.0 and s.reference is None and s.prm_meta is None
    old = tmp_path / "old"
    prm = ImplicitPRM(tiny_model_dir, "frozen", beta=0.5)
    prm.save_pretrained(old)
    (old / META_FILE).write_text(json.dumps({  # what ImplicitPRM wrote before this format
        "format": "freeprm-implicit-prm-1", "beta": 0.5, "granularity": "step", "step_delimiter": "\n\n",
        "lr": 0.01, "grad_clip": 10.0, "mini_batch_size": None, "loss": "ce", "weight_decay": 0.0,
        "reference": "frozen", "version": 3}))
    loaded = ImplicitPRM.from_pretrained(old)
    assert loaded.version == 3 and loaded.beta == 0.5 and loaded.granularity == "step"
    assert loaded.reference_kind == "frozen"
    s = Scorer(str(old))
    assert s.beta == 0.5 and s.reference is not None


def test_implicit_prm_round_trip_and_scorer_agree(tiny_model_dir, tmp_path):
    prm = ImplicitPRM(tiny_model_dir, "frozen", beta=0.5, lr=1e-2, granularity="step")
    ids, am, rm = encode_batch(prm.tokenizer, PROMPTS, RESPONSES)
    prm.update(ids, am, rm, torch.tensor([1.0, 0.0]))
    prm.granularity = "token"
    r = prm.token_rewards(ids, am, rm)
    prm.granularity = "step"
    prm.save_pretrained(tmp_path / "p")
    meta = read_meta(tmp_path / "p")
    assert meta.scoring.beta == 0.5 and meta.scoring.reference == "reference"
    assert meta.implicit_prm["granularity"] == "step" and meta.implicit_prm["version"] == 1
    assert meta.training["trainer"] == "ImplicitPRM" and meta.reference_digest.startswith("files:")
    with pytest.warns(PRMMetaWarning, match="beta: using the given 2.0"):
        ImplicitPRM.from_pretrained(tmp_path / "p", beta=2.0)
    loaded = ImplicitPRM.from_pretrained(tmp_path / "p")
    assert loaded.granularity == "step" and loaded.version == 1
    res = Scorer(str(tmp_path / "p")).score(ITEMS)  # the same directory as a Scorer policy: same rewards
    for b, x in enumerate(res):
        torch.testing.assert_close(x.token_rewards, r[b][rm[b]], atol=1e-5, rtol=1e-5)
    shutil.rmtree(tmp_path / "p" / "reference")
    with pytest.raises(ValueError, match="names the reference .*reference', which does not exist"):
        ImplicitPRM.from_pretrained(tmp_path / "p")


def test_cli_score_uses_the_metadata_and_force_reference(trained, tiny_ref_dir, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    out = tmp_path / "o.jsonl"
    assert main(["score", "--policy", trained["final"], "--input", str(inp), "--output", str(out), "--no-progress",
                 "--aggregate", "sum", "--dtype", "float32"]) == 0
    got = [json.loads(ln)["score"] for ln in out.read_text().splitlines()]
    want = [float(w.sum()) for w in _naive_rewards(trained["final"], trained["policy"], 0.05)]
    assert got == pytest.approx(want, abs=1e-5)
    args = ["score", "--policy", trained["final"], "--reference", tiny_ref_dir, "--input", str(inp), "--output",
            str(tmp_path / "o2.jsonl"), "--no-progress"]
    assert main(args) == 2
    assert "force-reference" in capsys.readouterr().err
    with pytest.warns(PRMMetaWarning):
        assert main(args + ["--force-reference"]) == 0


def test_step_split_warns_only_where_training_used_it(trained, tiny_model_dir, tmp_path):
    with warnings.catch_warnings():  # freeprm train never splits steps: another split is no conflict
        warnings.simplefilter("error", PRMMetaWarning)
        assert Scorer(trained["final"], step_pattern=r"\n").step_pattern is not None
    prm = ImplicitPRM(tiny_model_dir, "frozen", beta=0.5, granularity="step", step_delimiter="\n")
    prm.save_pretrained(tmp_path / "p")
    assert Scorer(str(tmp_path / "p")).step_delimiter == "\n"  # unset: the recorded one
    with pytest.warns(PRMMetaWarning, match="step split"):
        Scorer(str(tmp_path / "p"), step_delimiter="\n\n\n")


def test_rerank_and_bon_scoring_use_the_metadata(trained, tmp_path):
    from freeprm.batch.rerank import rerank
    from freeprm.eval.scoring import score_candidates

    inp = tmp_path / "c.jsonl"
    inp.write_text(json.dumps({"id": 0, "prompt": PROMPTS[0], "candidates": [RESPONSES[0], RESPONSES[1]]}) + "\n")
    rerank(str(inp), tmp_path / "rr", policy=trained["final"], format="jsonl", progress=False, quiet=True,
           aggregate="sum", dtype="float32")
    fp = json.loads((tmp_path / "rr" / "fingerprint.json").read_text())
    assert fp["beta"] == 0.05 and fp["reference"] is not None  # the recorded beta and reference
    row = json.loads(next((tmp_path / "rr").glob("part-*.jsonl")).read_text().splitlines()[0])
    want = [float(w.sum()) for w in _naive_rewards(trained["final"], trained["policy"], 0.05)]
    assert row["scores"][0] == pytest.approx(want[0], abs=1e-5)
    cands = [{"problem_id": "p", "candidate_id": k, "prompt": PROMPTS[k], "response": RESPONSES[k]} for k in range(2)]
    score_candidates(cands, tmp_path / "scores.jsonl", policy=trained["final"], progress=False)
    lines = [json.loads(ln) for ln in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert all("beta=0.05" in ln["scorer"] and "reference=none;" not in ln["scorer"] for ln in lines)
    assert [ln["aggregates"]["sum"] for ln in lines] == pytest.approx(want, abs=1e-5)
