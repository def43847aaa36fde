"""``ScoringConfig``: the one description of how implicit process rewards are computed, and its defaults.

Every entry point that scores (``Scorer``, ``score()``, ``rerank``, best-of-N scoring, ``serve``) and every one
that trains (``TrainConfig``, ``ImplicitPRM``) takes its beta, reference, step split, aggregation, prompt format,
dtype and length limit from here: one default each, one validation, one serialised form, one identity.

For a response token ``y_i``::

    r_i = beta * (log pi(y_i | y_<i) - log pi_ref(y_i | y_<i))      (no reference: log pi_ref = 0)

``reference`` has one meaning everywhere: ``pi_ref``, the model whose log-prob is subtracted (docs/config.md):

* a spec (local directory, alias such as ``"smollm2"``, hub id, ``.gguf`` file) or a model object
  (``nn.Module`` or ``(model, tokenizer)`` pair): that model;
* ``"none"`` (``NO_REFERENCE``): explicitly no reference model, ``log pi_ref = 0``; ``reference_free`` is True
  exactly then (passing ``reference_free=True`` alone sets ``reference="none"``);
* ``None``: unset, the context's default: scoring a bare model uses no reference (as ``"none"``); a trained PRM
  directory uses the reference recorded in its metadata; training and ``ImplicitPRM`` use the initial policy.

This module imports neither torch nor transformers at import time (``identity()`` loads them when it digests
models), so command-line parsing stays light.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import cliargs

DEFAULT_POLICY = "smollm2"
"""The model scored or trained when none is named: SmolLM2-135M-Instruct (``freeprm.engine.loading``)."""

DEFAULT_BETA = 1.0
"""beta when scoring a bare model: the reward is the log-likelihood ratio itself (scores as before this module)."""

DEFAULT_TRAIN_BETA = 0.05
"""beta when training an implicit PRM (``TrainConfig``, ``ImplicitPRM``): the paper's value (arXiv 2412.01981)."""

DEFAULT_STEP_DELIMITER = "\n\n"
"""Responses split into steps at blank lines unless a delimiter, a pattern or explicit steps say otherwise."""

NO_REFERENCE = "none"
"""The spelling of "no reference model" (``log pi_ref = 0``), in the API and on the command line."""

AGGREGATIONS = ("min", "last", "mean", "sum", "q_min", "q_last", "q_mean", "q_sum")
"""How step rewards become one score: over step rewards, or (``q_*``) over their running sums (Q values)."""

DEFAULT_AGGREGATE = "min"
PROMPT_FORMATS = ("auto", "chat", "raw")
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")  # float64: oracle runs in tests and benchmarks
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
CONFIG_VERSION = 1

MAX_LENGTH_LIMIT = 2**31 - 1
"""The longest ``max_length`` accepted (tokens): beyond any model; larger values overflow C integers."""


class _Unset:
    """The default of keyword arguments that fall back to a ``ScoringConfig`` (``UNSET``): "not given here"."""

    def __repr__(self) -> str:
        return "<unset>"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()


class _Default:
    """A ``ScoringConfig`` field's default, marked so the config knows which fields were given (``given``)."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def normalize_step_delimiter(delimiter: str | None, *, where: str = "step_delimiter") -> str | None:
    """The one rule for a step delimiter: a non-empty string splits there; ``None`` or ``""`` means no delimiter.

    With no delimiter (and no pattern or explicit steps) the whole response is one step; ``ImplicitPRM`` and the
    verl manager with ``granularity="step"`` then put the response's summed reward on its last token. Returns the
    delimiter, or None for no delimiter; anything but a string or None raises ``ValueError``.
    """
    if delimiter is None:
        return None
    if not isinstance(delimiter, str):
        raise ValueError(f"{where} must be a string (or None for no delimiter: the whole response is one step), "
                         f"got {type(delimiter).__name__}")
    return delimiter or None


def check_beta(beta, *, where: str = "beta") -> float:
    """``float(beta)``, or ``ValueError`` unless it is a finite number > 0."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"{where} must be a finite number > 0 (e.g. {DEFAULT_BETA} to score a bare model, "
                         f"{DEFAULT_TRAIN_BETA} as in training), got {beta!r}")
    return float(beta)


def dtype_name(dtype) -> str:
    """A dtype option as its canonical name: ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Accepts those names, their short forms (``fp32``, ``bf16``, ``fp16``) and ``torch.dtype`` objects (compared by
    name, so torch is not imported here); anything else raises ``ValueError``.
    """
    name = str(dtype).removeprefix("torch.") if not isinstance(dtype, str) else dtype
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or fp32, bf16, fp16, fp64, or a torch.dtype), "
                         f"got {dtype!r}")
    return name


def is_no_reference(reference) -> bool:
    """Is ``reference`` the explicit "no reference model" (``"none"``, any case)?"""
    return isinstance(reference, str) and reference.strip().lower() == NO_REFERENCE


def _is_model_object(x) -> bool:
    return not isinstance(x, (str, os.PathLike)) and x is not None


def _reference_repr(reference) -> str:
    if _is_model_object(reference):
        return f"<{type(reference).__name__} object>"
    return repr(reference)


def _field(default, help: str, **cli) -> Any:
    """A dataclass field with its command-line help and argparse settings (``add_scoring_args`` reads them).

    The default is wrapped (``_Default``) so ``__post_init__`` can tell a value left at its default from one given
    (``ScoringConfig.given``): a trained PRM's recorded settings fill only what was not given (``prm_meta``)."""
    return field(default=_Default(default), metadata={"help": help, "default": default, **cli})


@dataclass(frozen=True)
class ScoringConfig:
    """How implicit process rewards are computed (validated once, here). See the module doc and docs/config.md.

    Args:
        beta: reward scale, ``r_i = beta * (log pi - log pi_ref)``; > 0. Default ``DEFAULT_BETA`` (1.0).
        reference: ``pi_ref``: a spec or model object; ``"none"`` = no reference; None = the context's default.
        reference_free: True exactly when ``reference == "none"`` (either one sets the other).
        step_delimiter: text between steps (``normalize_step_delimiter``: ``""`` or None = one step).
        step_pattern: a regex whose matches split steps (overrides ``step_delimiter``); a string or compiled pattern.
        aggregate: one of ``AGGREGATIONS``: how step rewards make a response's score.
        prompt_format: ``"auto" | "chat" | "raw"`` (``freeprm/engine/tokenization.py``).
        dtype: the models' weights and activations: ``"auto"`` (bfloat16 on CUDA, float32 elsewhere; a model object
            keeps its own), ``"float32"``, ``"bfloat16"``, ``"float16"``. Log-probs and rewards are always fp32.
        max_length: longest prompt + response in tokens (None: the model's maximum positions); >= 2.

    Equivalent plain code of a config's effect on one response (token log-probs ``lp``, ``lp_ref`` of the
    response, ``[n]``; ``token_step[n]`` from the step split)::

        r = beta * (lp - (lp_ref if reference_free is False else 0))          # [n]
        step_rewards = zeros(S).index_add_(0, token_step, r)                   # [S]
        score = aggregate_steps(step_rewards, step_rewards.cumsum(0), aggregate)
    """

    beta: float = _field(DEFAULT_BETA, f"reward scale: r = beta * (log pi - log pi_ref) (default: a trained PRM "
                                       f"directory's recorded beta, else {DEFAULT_BETA})",
                         type=cliargs.positive_float)
    reference: Any = _field(None, "pi_ref, the model subtracted: HF dir, hub id, .gguf or alias; 'none' for no "
                                  "reference (log pi_ref = 0); omitted: the one a trained PRM directory records "
                                  "(freeprm_prm.json), else none (docs/config.md)")
    reference_free: bool = _field(False, "no reference model (the same as --reference none)", flag=True)
    step_delimiter: str | None = _field(DEFAULT_STEP_DELIMITER, "step delimiter; \\n \\t \\r \\\\ \\uXXXX are "
                                        "understood, other text is taken as is; '' = the whole response is one step "
                                        "(default: a trained PRM directory's recorded split, else '\\n\\n')",
                                        type=cliargs.escapes_arg)
    step_pattern: Any = _field(None, "regex that splits steps (overrides --step-delimiter)")
    aggregate: str = _field(DEFAULT_AGGREGATE, "how step rewards make the score", choices=AGGREGATIONS)
    prompt_format: str = _field("auto", "auto: chat when the tokenizer has a chat template, else raw (default: a "
                                "trained PRM directory's recorded one, else auto)",
                                choices=PROMPT_FORMATS)
    dtype: str = _field("auto", "model dtype: auto (bf16 on CUDA, fp32 elsewhere), float32, bfloat16, float16",
                        type="dtype", metavar="{auto,float32,bfloat16,float16}")
    max_length: int | None = _field(None, "longest prompt+response in tokens (default: the model's maximum)",
                                    type=cliargs.positive_int)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  frozen: set once, here
        given = set()
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, _Default):
                set_(f.name, v.value)
            else:
                given.add(f.name)
        set_("_given", frozenset(given))  # not a field: equality, hash and repr are of the values only
        set_("beta", check_beta(self.beta))
        # reference and reference_free: one meaning (module doc)
        if not isinstance(self.reference_free, bool):
            raise ValueError(f"reference_free must be True or False, got {self.reference_free!r}")
        ref = self.reference
        if isinstance(ref, os.PathLike):
            ref = os.fspath(ref)
        if isinstance(ref, str):
            if not ref.strip():
                raise ValueError("reference is an empty string; pass a model (path, alias, hub id), 'none' for no "
                                 "reference model, or leave it unset (None) for the default")
            if is_no_reference(ref):
                ref = NO_REFERENCE
        if self.reference_free and ref is not None and ref != NO_REFERENCE:
            raise ValueError(f"reference_free=True but reference={_reference_repr(ref)}: pass one of them "
                             "(reference='none' is the same as reference_free=True)")
        if ref == NO_REFERENCE and self.reference_free is False:
            set_("reference_free", True)
        if self.reference_free:
            ref = NO_REFERENCE
        set_("reference", ref)
        set_("step_delimiter", normalize_step_delimiter(self.step_delimiter))
        pattern = self.step_pattern
        if pattern is not None:
            if isinstance(pattern, str):
                if not pattern:
                    raise ValueError("step_pattern is empty; pass a regex that matches the text between steps, "
                                     "or None to split at step_delimiter")
                try:
                    re.compile(pattern)
                except (re.error, OverflowError, RecursionError) as e:  # OverflowError: a repeat like a{99999999999}
                    raise ValueError(f"step_pattern {pattern!r} is not a valid regex: {e}") from None
            elif not isinstance(pattern, re.Pattern):
                raise ValueError(f"step_pattern must be a regex string or a compiled pattern, got "
                                 f"{type(pattern).__name__}")
        if self.aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATIONS)}, got {self.aggregate!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        set_("dtype", dtype_name(self.dtype))
        if self.max_length is not None:
            if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
                raise ValueError(f"max_length must be a whole number of tokens >= 2 (or None for the model's "
                                 f"maximum), got {self.max_length!r}")
            if self.max_length > MAX_LENGTH_LIMIT:
                raise ValueError(f"max_length must be at most {MAX_LENGTH_LIMIT} tokens, got {self.max_length}; no "
                                 "model takes longer sequences (omit it to score whole lines)")

    # ------------------------------------------------------------------ views
    @property
    def given(self) -> frozenset:
        """The names of the fields given explicitly (the others hold their defaults). ``reference`` counts as given
        whenever it is set (not None), ``"none"`` included. A trained PRM directory's ``freeprm_prm.json`` fills
        the fields that are not given (``freeprm.prm_meta.resolve_config``)."""
        out = set(self._given)
        out.discard("reference")
        if self.reference is not None:
            out.add("reference")
        return frozenset(out)

    def is_given(self, name: str) -> bool:
        return name in self.given

    @property
    def pattern_text(self) -> str | None:
        """``step_pattern`` as text (a compiled pattern's ``.pattern``), or None."""
        return getattr(self.step_pattern, "pattern", self.step_pattern)

    @property
    def compiled_pattern(self) -> re.Pattern | None:
        """``step_pattern`` compiled (None without one)."""
        p = self.step_pattern
        return re.compile(p) if isinstance(p, str) else p

    @property
    def reference_model(self):
        """The reference to load: the spec or model object, or None for no reference model (``"none"``) and for
        unset (callers resolve unset to their context's default first; ``with_reference_default``)."""
        return None if self.reference in (None, NO_REFERENCE) else self.reference

    def with_reference_default(self, default) -> ScoringConfig:
        """This config with an unset ``reference`` (None) replaced by ``default`` (a spec, a model or ``"none"``)."""
        if self.reference is not None or default is None:
            return self
        return self.replace(reference=default)

    def replace(self, **changes) -> ScoringConfig:
        """A copy with ``changes`` (validated again); fields not given here nor before stay "not given" (``given``).
        Changing ``reference`` to a model resets ``reference_free``."""
        unknown = sorted(set(changes) - set(SCORING_FIELDS))
        if unknown:
            raise ValueError(f"unknown scoring option(s) {unknown}; options are {', '.join(SCORING_FIELDS)}")
        if "reference" in changes and "reference_free" not in changes:
            changes["reference_free"] = False
        kw = {name: getattr(self, name) for name in self._given}
        kw.update(changes)
        return type(self)(**kw)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """Plain standard JSON: ``{"version": CONFIG_VERSION, field: value, ...}``.

        A model object as reference cannot be written: save it (``save_pretrained``) and pass its path.
        A compiled ``step_pattern`` is written as its text; one with flags beyond the defaults raises
        ``ValueError`` (write them inline, e.g. ``(?i)``).
        """
        if _is_model_object(self.reference):
            raise ValueError("ScoringConfig.to_dict: the reference is a model object, which has no portable name; "
                             "save it with save_pretrained and pass its directory as reference")
        p = self.step_pattern
        if isinstance(p, re.Pattern) and p.flags & ~re.UNICODE:
            raise ValueError(f"ScoringConfig.to_dict: step_pattern {p.pattern!r} has flags {p.flags}; write them "
                             "inline (e.g. '(?m)^Step') so the pattern text carries them")
        out = {"version": CONFIG_VERSION}
        for f in dataclasses.fields(self):
            out[f.name] = getattr(self, f.name)
        out["step_pattern"] = self.pattern_text
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> ScoringConfig:
        """The inverse of ``to_dict``; unknown keys and other versions raise ``ValueError`` naming them."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a scoring config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", None)
        if version != CONFIG_VERSION:
            raise ValueError(f"scoring config version {version!r} is not supported (this freeprm reads version "
                             f"{CONFIG_VERSION}); write it again with this version, or upgrade freeprm")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown scoring config key(s) {', '.join(map(repr, unknown))}; known keys: "
                             f"version, {', '.join(sorted(known))}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> ScoringConfig:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"a scoring config must be a JSON object: {e}") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------------ identity
    def effective_dtype(self, device=None, *, on_cuda: bool | None = None, model_dtype=None) -> str:
        """The dtype the models run in, as ``str(torch.dtype)`` (e.g. ``"torch.float32"``).

        ``"auto"``: ``model_dtype`` when given (a model object keeps its own), else bfloat16 when the models run on
        CUDA (``on_cuda``, else ``device``'s type, else whether CUDA is available), float32 otherwise.
        """
        import torch

        from .engine.loading import auto_dtype, resolve_dtype

        if self.dtype != "auto":
            return str(resolve_dtype(self.dtype))
        if model_dtype is not None:
            return str(model_dtype)
        if on_cuda is None:
            on_cuda = torch.device(device).type == "cuda" if device else torch.cuda.is_available()
        return str(auto_dtype("cuda" if on_cuda else "cpu"))

    def identity(self, *, device=None, on_cuda: bool | None = None, model_dtype=None, reference_identity=...,
                 tokenizer=None) -> dict:
        """Everything in this config that changes a score, as a plain JSON dict (stable across processes).

        ``{"beta", "reference", "step_delimiter", "step_pattern", "aggregate", "prompt_format", "dtype",
        "max_length"}``: ``reference`` is ``freeprm.identity.model_identity`` of the reference model (a digest of its
        files, of its parameters for a model object, None for no reference); ``step_delimiter`` is None when a
        pattern overrides it; ``dtype`` is ``effective_dtype(device, on_cuda=..., model_dtype=...)``. These are the
        scoring part of the ``rerank`` output fingerprint and of the best-of-N scores-cache tag.
        ``reference_identity``: a precomputed identity of the reference (e.g. of a loaded model). ``tokenizer``:
        hashed with a reference model object. An unset reference counts as none: resolve it first
        (``with_reference_default``) where the context has another default.
        """
        from .identity import model_identity

        if reference_identity is ...:
            ref = self.reference_model
            if ref is not None and _is_model_object(ref) and not isinstance(ref, tuple):
                ref = (ref, tokenizer)
            reference_identity = model_identity(ref)
        return {"beta": self.beta, "reference": reference_identity,
                "step_delimiter": None if self.step_pattern is not None else self.step_delimiter,
                "step_pattern": self.pattern_text, "aggregate": self.aggregate, "prompt_format": self.prompt_format,
                "dtype": self.effective_dtype(device, on_cuda=on_cuda, model_dtype=model_dtype),
                "max_length": self.max_length}

    def digest(self, **identity_kwargs) -> str:
        """A short hex digest (16 characters) of ``identity(**identity_kwargs)``."""
        return digest_of(self.identity(**identity_kwargs))

    # ------------------------------------------------------------------ command line
    @classmethod
    def from_args(cls, ns: argparse.Namespace, **overrides) -> ScoringConfig:
        """The config of parsed ``add_scoring_args`` options; an option left out (None, or an unset flag) is not
        given (``given``): it keeps its default, or a trained PRM directory's recorded value fills it.

        ``overrides`` win over ``ns`` (None there means not given too). Raises ``ValueError`` (the CLI prints it and
        exits 2).
        """
        kw = {}
        for f in dataclasses.fields(cls):
            if hasattr(ns, f.name):
                kw[f.name] = getattr(ns, f.name)
        kw.update(overrides)
        kw = {k: v for k, v in kw.items() if v is not None and not (k == "reference_free" and v is False)}
        return cls(**kw)


def digest_of(identity: Mapping) -> str:
    """16 hex characters of the sha256 of ``identity`` as sorted JSON: ``freeprm.identity.identity_digest``, the one
    digest function (model identities, config identities)."""
    from .identity import identity_digest

    return identity_digest(identity)


SCORING_FIELDS = tuple(f.name for f in dataclasses.fields(ScoringConfig))


def merge_config(config: ScoringConfig | None, **fields) -> ScoringConfig:
    """``config`` (default: ``ScoringConfig()``) with every field given in ``fields`` replaced: the one way an entry
    point that takes both ``config=`` and the keyword arguments of the same names combines them (a keyword wins).

    Not given: ``UNSET``; None for every field but ``step_delimiter`` (where None means "no delimiter": the whole
    response is one step); ``reference_free=False``. What stays not given can still be filled from a trained PRM
    directory's metadata (``freeprm.prm_meta.resolve_config``).
    """
    if config is not None and not isinstance(config, ScoringConfig):
        raise ValueError(f"config must be a freeprm.ScoringConfig, got {type(config).__name__}")
    given = {k: v for k, v in fields.items()
             if v is not UNSET and not (v is None and k != "step_delimiter")
             and not (k == "reference_free" and v is False)}
    if config is None:
        unknown = sorted(set(given) - set(SCORING_FIELDS))
        if unknown:
            raise ValueError(f"unknown scoring option(s) {unknown}; options are {', '.join(SCORING_FIELDS)}")
        return ScoringConfig(**given)
    return config.replace(**given) if given else config


def _cli_dtype(text: str) -> str:
    try:
        return dtype_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_scoring_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, fields: Iterable[str] | None = None,
                     *, defaults: Mapping | None = None, help: Mapping | None = None) -> None:
    """Add one ``--option`` per ``ScoringConfig`` field (``--beta``, ``--step-delimiter``, ...) to ``parser``.

    Help text, type and choices come from the field's metadata, so every command spells, checks and documents an
    option the same way; ``ScoringConfig.from_args`` reads them back. ``fields``: which (default: all);
    ``defaults``: per-command defaults (e.g. ``serve``'s ``prompt_format="raw"``; such a default counts as given);
    ``help``: per-command help text.

    An option left out parses as None (a flag as False): not given, so the config's default applies, or a trained
    PRM directory's recorded value (``freeprm.prm_meta``); the help names the default all the same.
    """
    names = SCORING_FIELDS if fields is None else tuple(fields)
    unknown = [n for n in names if n not in SCORING_FIELDS]
    if unknown:
        raise ValueError(f"add_scoring_args: unknown field(s) {unknown}; fields are {', '.join(SCORING_FIELDS)}")
    defaults, help = dict(defaults or {}), dict(help or {})
    by_name = {f.name: f for f in dataclasses.fields(ScoringConfig)}
    for name in names:
        f = by_name[name]
        meta = dict(f.metadata)
        flags = ["--" + name.replace("_", "-"), *meta.get("aliases", ())]
        text = help.get(name, meta["help"])
        if meta.get("flag"):
            parser.add_argument(*flags, dest=name, action="store_true", default=bool(defaults.get(name, False)),
                                help=text)
            continue
        default = defaults.get(name)
        shown = default if name in defaults else meta["default"]
        if shown is not None and "default" not in text.lower():
            text = f"{text} (default: {cliargs.show_default(shown)})"
        kw = {"dest": name, "default": default, "help": text.replace("%", "%%")}
        t = meta.get("type")
        if t == "dtype":
            kw["type"], kw["metavar"] = _cli_dtype, meta["metavar"]
        elif t is not None:
            kw["type"] = t
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        parser.add_argument(*flags, **kw)
