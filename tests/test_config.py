"""``freeprm.config``: validation, JSON round trip, identity (stable, and equal to the old fingerprints), CLI options."""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from freeprm import cliargs
from freeprm.config import (
    AGGREGATIONS,
    DEFAULT_BETA,
    DEFAULT_STEP_DELIMITER,
    DEFAULT_TRAIN_BETA,
    SCORING_FIELDS,
    ScoringConfig,
    add_scoring_args,
    digest_of,
    normalize_step_delimiter,
)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- defaults and validation
def test_defaults():
    c = ScoringConfig()
    assert (DEFAULT_BETA, DEFAULT_TRAIN_BETA, DEFAULT_STEP_DELIMITER) == (1.0, 0.05, "\n\n")
    assert (c.beta, c.reference, c.reference_free, c.step_delimiter, c.step_pattern) == (1.0, None, False, "\n\n", None)
    assert (c.aggregate, c.prompt_format, c.dtype, c.max_length) == ("min", "auto", "auto", None)


@pytest.mark.parametrize("kw, words", [
    ({"beta": 0}, "beta must be a finite number > 0"),
    ({"beta": -1.0}, "beta must be"),
    ({"beta": float("nan")}, "beta must be"),
    ({"beta": float("inf")}, "beta must be"),
    ({"beta": "1"}, "beta must be"),
    ({"beta": True}, "beta must be"),
    ({"aggregate": "max"}, "aggregate must be one of min, last"),
    ({"prompt_format": "json"}, "prompt_format must be one of auto, chat, raw"),
    ({"dtype": "int8"}, "dtype must be one of auto, float32"),
    ({"max_length": 1}, "max_length must be a whole number of tokens >= 2"),
    ({"max_length": 2.5}, "max_length must be"),
    ({"step_pattern": "("}, "is not a valid regex"),
    ({"step_pattern": ""}, "step_pattern is empty"),
    ({"step_pattern": 3}, "step_pattern must be a regex string"),
    ({"step_delimiter": 3}, "step_delimiter must be a string"),
    ({"reference": ""}, "reference is an empty string"),
    ({"reference": "m", "reference_free": True}, "pass one of them"),
    ({"reference_free": "yes"}, "reference_free must be True or False"),
])
def test_invalid_values_raise_a_value_error_that_says_what_to_do(kw, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        ScoringConfig(**kw)


def test_the_config_is_frozen_and_replace_validates_again():
    c = ScoringConfig()
    with pytest.raises(Exception):  # dataclasses.FrozenInstanceError
        c.beta = 2.0
    assert c.replace(beta=0.5).beta == 0.5
    with pytest.raises(ValueError, match="beta"):
        c.replace(beta=0.0)


def test_one_meaning_of_reference():
    assert ScoringConfig().reference is None  # unset: the context's default
    for spelling in ("none", "None", " NONE "):
        c = ScoringConfig(reference=spelling)
        assert (c.reference, c.reference_free, c.reference_model) == ("none", True, None)
    c = ScoringConfig(reference_free=True)
    assert (c.reference, c.reference_free) == ("none", True)
    c = ScoringConfig(reference="some/model")
    assert (c.reference, c.reference_free, c.reference_model) == ("some/model", False, "some/model")
    assert c.replace(reference="none").reference_free is True
    assert ScoringConfig(reference_free=True).replace(reference="m").reference_free is False
    assert ScoringConfig().with_reference_default("init").reference == "init"
    assert ScoringConfig(reference="none").with_reference_default("init").reference == "none"
    assert ScoringConfig(reference=Path("a/b")).reference == "a/b"


def test_one_rule_for_the_delimiter():
    assert normalize_step_delimiter("") is None and normalize_step_delimiter(None) is None
    assert normalize_step_delimiter("\n") == "\n"
    assert ScoringConfig(step_delimiter="").step_delimiter is None


def test_dtype_spellings():
    import torch

    assert ScoringConfig(dtype="bf16").dtype == "bfloat16"
    assert ScoringConfig(dtype=torch.float16).dtype == "float16"
    assert ScoringConfig(dtype="fp32").effective_dtype() == "torch.float32"
    assert ScoringConfig().effective_dtype(on_cuda=True) == "torch.bfloat16"
    assert ScoringConfig().effective_dtype("cpu") == "torch.float32"


# ---------------------------------------------------------------------- serialisation
@pytest.mark.parametrize("kw", [
    {},
    {"beta": 0.05, "reference": "runs/ref", "step_delimiter": "\n", "aggregate": "q_last", "prompt_format": "raw",
     "dtype": "bfloat16", "max_length": 512},
    {"reference": "none", "step_pattern": r"(?m)^Step \d+:", "step_delimiter": ""},
])
def test_json_round_trip(kw):
    c = ScoringConfig(**kw)
    d = c.to_dict()
    assert d["version"] == 1
    text = json.dumps(d, allow_nan=False)  # plain standard JSON
    assert ScoringConfig.from_dict(json.loads(text)) == c
    assert ScoringConfig.from_json(c.to_json()) == c


def test_from_dict_refuses_unknown_keys_other_versions_and_non_objects():
    d = ScoringConfig().to_dict()
    with pytest.raises(ValueError, match="unknown scoring config key.*'betta'"):
        ScoringConfig.from_dict({**d, "betta": 1})
    with pytest.raises(ValueError, match="version 2 is not supported"):
        ScoringConfig.from_dict({**d, "version": 2})
    with pytest.raises(ValueError, match="version None is not supported"):
        ScoringConfig.from_dict({k: v for k, v in d.items() if k != "version"})
    with pytest.raises(ValueError, match="must be a JSON object"):
        ScoringConfig.from_dict([1])
    with pytest.raises(ValueError, match="must be a JSON object"):
        ScoringConfig.from_json("{")


def test_to_dict_refuses_what_has_no_portable_form():
    import torch

    with pytest.raises(ValueError, match="save it with save_pretrained"):
        ScoringConfig(reference=torch.nn.Linear(2, 2)).to_dict()
    with pytest.raises(ValueError, match="write them inline"):
        ScoringConfig(step_pattern=re.compile("step", re.I)).to_dict()
    assert ScoringConfig(step_pattern=re.compile("step")).to_dict()["step_pattern"] == "step"


# ---------------------------------------------------------------------- identity
def _old_make_fingerprint(*, policy, reference, beta, step_delimiter, step_pattern, aggregate, prompt_format, dtype,
                          max_length, rows_per_part, fmt) -> dict:
    """``batch/rerank.make_fingerprint`` as it was before ``ScoringConfig`` (version 2 output directories)."""
    pattern = getattr(step_pattern, "pattern", step_pattern)
    return {"version": 2, "policy": policy, "reference": reference, "beta": float(beta),
            "step_delimiter": None if pattern is not None else step_delimiter, "step_pattern": pattern,
            "aggregate": aggregate, "prompt_format": prompt_format, "dtype": str(dtype),
            "max_length": max_length, "rows_per_part": int(rows_per_part), "format": fmt}


CASES = [
    {},
    {"beta": 0.5},
    {"step_delimiter": "\n"},
    {"step_pattern": r"\n+"},
    {"step_pattern": r"\n+", "step_delimiter": "\n"},  # the pattern overrides the delimiter: same identity
    {"aggregate": "q_last"},
    {"prompt_format": "raw"},
    {"dtype": "bfloat16"},
    {"max_length": 64},
]


@pytest.mark.parametrize("kw", CASES)
def test_identity_is_the_scoring_part_of_the_old_rerank_fingerprint(kw, tiny_model_dir, tiny_ref_dir):
    from freeprm.identity import model_identity

    for ref in (None, tiny_ref_dir):
        c = ScoringConfig(reference=ref, **kw)
        old = _old_make_fingerprint(
            policy=model_identity(tiny_model_dir), reference=model_identity(ref), beta=c.beta,
            step_delimiter=kw.get("step_delimiter", "\n\n"), step_pattern=kw.get("step_pattern"),
            aggregate=c.aggregate, prompt_format=c.prompt_format, dtype=c.effective_dtype("cpu"),
            max_length=c.max_length, rows_per_part=10, fmt="jsonl")
        new = {"version": 2, "policy": model_identity(tiny_model_dir), **c.identity(device="cpu"),
               "rows_per_part": 10, "format": "jsonl"}
        assert json.dumps(new, sort_keys=True) == json.dumps(old, sort_keys=True)


def test_identity_distinguishes_what_the_old_fingerprints_distinguished(tiny_ref_dir):
    digests = {}
    for kw in CASES + [{"reference": tiny_ref_dir}]:
        digests.setdefault(ScoringConfig(**kw).digest(device="cpu"), []).append(kw)
    same = [v for v in digests.values() if len(v) > 1]
    assert same == [[{"step_pattern": r"\n+"}, {"step_pattern": r"\n+", "step_delimiter": "\n"}]]
    # "none" and unset both mean no reference model for a bare model: one identity
    assert ScoringConfig(reference="none").digest(device="cpu") == ScoringConfig().digest(device="cpu")


def test_identity_of_a_reference_object_digests_its_parameters(tiny_model_dir):
    from freeprm.engine.loading import load_model
    from freeprm.identity import params_identity

    model, tok = load_model(tiny_model_dir)
    c = ScoringConfig(reference=(model, tok))
    assert c.identity(device="cpu")["reference"] == params_identity(model, tok)
    assert ScoringConfig(reference=model).identity(device="cpu", tokenizer=tok)["reference"] == \
        params_identity(model, tok)
    assert c.identity(device="cpu", reference_identity={"x": 1})["reference"] == {"x": 1}


def test_identity_is_stable_across_processes(tiny_ref_dir):
    code = ("import sys; from freeprm.config import ScoringConfig; "
            "print(ScoringConfig(reference=sys.argv[1], beta=0.05, step_pattern='x+', max_length=99)"
            ".digest(device='cpu'))")
    runs = [subprocess.run([sys.executable, "-c", code, str(tiny_ref_dir)], cwd=ROOT, capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}).stdout.strip()
            for seed in ("1", "2")]
    here = ScoringConfig(reference=str(tiny_ref_dir), beta=0.05, step_pattern="x+", max_length=99).digest(device="cpu")
    assert runs == [here, here] and re.fullmatch("[0-9a-f]{16}", here)
    assert digest_of({"a": 1, "b": 2}) == digest_of({"b": 2, "a": 1})


# ---------------------------------------------------------------------- command line
def _parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=cliargs.HelpFormatter)
    add_scoring_args(p, **kw)
    return p


def test_cli_options_are_generated_from_the_fields_with_their_help():
    p = _parser()
    text = p.format_help()
    for name in SCORING_FIELDS:
        assert "--" + name.replace("_", "-") in text
    assert "reward scale" in text and "else '\\n\\n')" in text and "{auto,float32,bfloat16,float16}" in text
    assert "how step rewards make the score (default: min)" in " ".join(text.split())
    ns = p.parse_args([])
    # options left out stay None (not given), so a trained PRM's recorded values can fill them (prm_meta)
    assert all(getattr(ns, n) in (None, False) for n in SCORING_FIELDS)
    assert ScoringConfig.from_args(ns) == ScoringConfig() and ScoringConfig.from_args(ns).given == frozenset()


def test_cli_parses_into_the_config():
    ns = _parser().parse_args(["--beta", "0.05", "--reference", "none", "--step-delimiter", "\\n", "--aggregate",
                               "q_sum", "--prompt-format", "raw", "--dtype", "bf16", "--max-length", "64"])
    assert ScoringConfig.from_args(ns) == ScoringConfig(beta=0.05, reference="none", step_delimiter="\n",
                                                        aggregate="q_sum", prompt_format="raw", dtype="bfloat16",
                                                        max_length=64)
    assert ScoringConfig.from_args(_parser().parse_args(["--reference-free"])).reference == "none"
    assert ScoringConfig.from_args(_parser().parse_args(["--step-delimiter", ""])).step_delimiter is None
    assert ScoringConfig.from_args(_parser().parse_args([]), beta=2.0).beta == 2.0


@pytest.mark.parametrize("argv, words", [
    (["--beta", "0"], "must be a finite number > 0"),
    (["--beta", "x"], "expected a number > 0"),
    (["--aggregate", "max"], "invalid choice"),
    (["--dtype", "int8"], "dtype must be one of"),
    (["--max-length", "0"], "must be >= 1"),
    (["--step-delimiter", "\\q"], "unknown escape"),
])
def test_cli_rejects_bad_values_at_parse_time(argv, words, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(argv)
    assert words in capsys.readouterr().err


def test_cli_subset_defaults_and_help_per_command():
    p = _parser(fields=["beta", "prompt_format"], defaults={"prompt_format": "raw"}, help={"beta": "scale"})
    ns = p.parse_args([])
    assert (ns.beta, ns.prompt_format, hasattr(ns, "aggregate")) == (None, "raw", False)
    assert ScoringConfig.from_args(ns).given == {"prompt_format"} and ScoringConfig.from_args(ns).beta == 1.0
    assert "scale" in p.format_help()
    with pytest.raises(ValueError, match="unknown field"):
        _parser(fields=["betta"])
    assert set(AGGREGATIONS) == {"min", "last", "mean", "sum", "q_min", "q_last", "q_mean", "q_sum"}


def test_import_stays_light():
    code = "import sys, freeprm.config; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_root_api_is_small_and_lazy():
    code = ("import sys, freeprm; light = 'torch' not in sys.modules; "
            "from freeprm import score, Scorer, ScoringConfig, ImplicitPRM, train, rerank, search; "
            "print(light, callable(score) and callable(train) and callable(rerank) and callable(search), Scorer.__name__, "
            "ImplicitPRM.__name__, ScoringConfig.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "Scorer", "ImplicitPRM", "freeprm.config"]
    import freeprm

    with pytest.raises(AttributeError):
        freeprm.no_such_name  # noqa: B018


def test_training_defaults_come_from_the_config(tiny_model_dir):
    from freeprm import ImplicitPRM
    from freeprm.trainer import TrainConfig

    assert TrainConfig().beta == DEFAULT_TRAIN_BETA
    assert ImplicitPRM(tiny_model_dir, "none", device="cpu").beta == DEFAULT_TRAIN_BETA
    # a config that gives no beta keeps the training default (not the config's bare-model 1.0)
    assert ImplicitPRM(tiny_model_dir, "none", config=ScoringConfig(aggregate="sum"), device="cpu").beta == \
        DEFAULT_TRAIN_BETA


def test_given_fields_and_merge():
    from freeprm.config import UNSET, merge_config

    c = ScoringConfig(beta=0.5, aggregate="sum")
    assert c.given == {"beta", "aggregate"} and ScoringConfig().given == frozenset()
    assert c == ScoringConfig(beta=0.5, aggregate="sum", step_delimiter="\n\n")  # values decide equality
    assert c.replace(prompt_format="raw").given == {"beta", "aggregate", "prompt_format"}  # the rest stays unset
    assert ScoringConfig(reference_free=True).is_given("reference")  # "none" is a given reference
    # a recorded config gives every field (its reference None: unset)
    assert ScoringConfig.from_dict(c.to_dict()).given == set(SCORING_FIELDS) - {"reference"}
    import pickle

    assert pickle.loads(pickle.dumps(c)).given == c.given  # Ray workers receive it pickled
    # keywords win; UNSET / None (but for step_delimiter, where None = one step) are not given
    m = merge_config(c, beta=2.0, aggregate=UNSET, prompt_format=None, step_delimiter=None, reference_free=False)
    assert (m.beta, m.aggregate, m.prompt_format, m.step_delimiter) == (2.0, "sum", "auto", None)
    assert m.given == {"beta", "aggregate", "step_delimiter"}
    assert merge_config(None).given == frozenset()
    with pytest.raises(ValueError, match="unknown scoring option"):
        merge_config(None, betta=1.0)
    with pytest.raises(ValueError, match="max_length must be at most"):
        ScoringConfig(max_length=2**31)
