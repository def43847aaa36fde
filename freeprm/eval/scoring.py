"""The score stage: implicit process rewards of every candidate, through ``freeprm.engine.Scorer``.

Scores are appended to ``scores.jsonl``, one line per candidate::

    problem_id, candidate_id, scorer (config string), aggregates {name: float for AGGREGATIONS},
    step_rewards [float], num_tokens

A line is reused on a rerun when its ``(problem_id, candidate_id)`` and ``scorer`` string match.
The string (``config_tag``: the policy and ``ScoringConfig.identity()`` less aggregate and max_length, which do
not change step rewards) covers every option that changes scores: policy, reference, beta, step delimiter, step
pattern, prompt format and dtype, so changing any of them rescores. Its text is the one written before
``ScoringConfig`` existed (``scorer_tag``), so existing ``scores.jsonl`` files are reused. A model
is named by its spec (or, inside an already-built ``Scorer``, the path it was loaded from) plus
``@`` and a digest of its content (``freeprm.identity``, the code of the ``rerank`` fingerprint):
of its files for a spec (size, first and last MiB of each weight/config/tokenizer file), of its
parameters and vocabulary for a model in memory; so weights changed in place under the same path
miss the cache and are rescored. A hub id has no local files: it is named as given. Candidates with
an empty response are not sent to the engine; they get ``null`` (read as ``-inf``) for every aggregation (never
picked by best-of-N while any other candidate has a score, weight 0 in voting).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..config import DEFAULT_BETA, DEFAULT_POLICY, DEFAULT_STEP_DELIMITER, UNSET, ScoringConfig, merge_config
from .candidates import append_jsonl, key_of, read_jsonl


def _model_name(model, identity=...) -> str:
    """``NAME@DIGEST``: a spec as given, or a model object (a ``(model, tokenizer)`` pair from a ``Scorer``) by the
    path it was loaded from, plus a digest of its content (``identity``, default ``freeprm.identity.model_identity``
    of it); ``"none"`` for no model."""
    from ..identity import identity_digest, model_identity

    if model is None:
        return "none"
    if isinstance(model, (str, os.PathLike)):
        return f"{model}@{identity_digest(model_identity(model) if identity is ... else identity)}"
    m, tok = model if isinstance(model, tuple) else (model, None)
    name = getattr(getattr(m, "config", None), "_name_or_path", None) or "<object>"
    return f"{name}@{identity_digest(model_identity((m, tok)) if identity is ... else identity)}"


def config_tag(policy, config: ScoringConfig, *, device=None, model_dtype=None, reference_identity=...) -> str:
    """The scorer config string of ``scores.jsonl`` lines: ``policy`` and ``config.identity()`` (a resolved config:
    its reference a spec, a model or ``"none"``), without aggregate and max_length (they do not change step
    rewards; device and batching are not in the config either).

    ``policy`` / the reference: specs (named with a digest of their files) or ``(model, tokenizer)`` pairs (a
    digest of their parameters); see the module doc. The text is ``scorer_tag``'s, field for field.
    """
    ident = config.identity(device=device, model_dtype=model_dtype, reference_identity=reference_identity)
    ref = config.reference_model
    ref_name = "none" if ref is None else _model_name(ref, ident["reference"])
    return (f"policy={_model_name(policy)};reference={ref_name};beta={ident['beta']:g};"
            f"delim={config.step_delimiter!r};pattern={ident['step_pattern']!r};format={ident['prompt_format']};"
            f"dtype={ident['dtype'].removeprefix('torch.')}")


def scorer_tag(policy, reference=None, beta: float = DEFAULT_BETA,
               step_delimiter: str | None = DEFAULT_STEP_DELIMITER, *, step_pattern=None, prompt_format: str = "auto",
               dtype="float32") -> str:
    """``config_tag`` of these settings (the keyword form of the first version; ``reference=None``: none)."""
    cfg = ScoringConfig(reference="none" if reference is None else reference, beta=beta,
                        step_delimiter=step_delimiter, step_pattern=step_pattern, prompt_format=prompt_format,
                        dtype=dtype)
    return config_tag(policy, cfg)


def resolved_config_tag(policy, config: ScoringConfig, *, force_reference: bool = False, device=None):
    """``(config_tag, resolved config)`` after a trained PRM directory's ``freeprm_prm.json`` filled what
    ``config`` does not give (``freeprm.prm_meta.resolve_config``); the scoring and report stages share it."""
    from ..prm_meta import resolve_config

    resolved, _ = resolve_config(policy, config, force_reference=force_reference)
    return config_tag(policy, resolved, device=device), resolved


def resolved_scorer_tag(policy, reference, beta: float | None, step_delimiter: str | None = UNSET, *,
                        step_pattern=None, prompt_format: str | None = None, dtype="float32",
                        force_reference: bool = False):
    """``resolved_config_tag`` of keyword settings (None / UNSET: not given); returns ``(tag, resolved config)``."""
    cfg = merge_config(None, reference=reference, beta=beta, step_delimiter=step_delimiter, step_pattern=step_pattern,
                       prompt_format=prompt_format, dtype=dtype)
    return resolved_config_tag(policy, cfg, force_reference=force_reference)


def scorer_tag_of(scorer) -> str:
    """``config_tag`` of a built ``freeprm.engine.Scorer``, from its own models (their parameters) and settings."""
    from ..identity import params_identity

    ref = None if scorer.reference is None else (scorer.reference, scorer.tokenizer)
    cfg = scorer.config.replace(reference=ref if ref is not None else "none", dtype="auto")
    ref_ident = None if ref is None else params_identity(scorer.reference, scorer.tokenizer)
    return config_tag((scorer.policy, scorer.tokenizer), cfg, model_dtype=scorer.dtype, reference_identity=ref_ident)


def empty_score(rec: dict, tag: str) -> dict:
    from ..engine import AGGREGATIONS

    return {"problem_id": rec["problem_id"], "candidate_id": rec["candidate_id"], "scorer": tag,
            "aggregates": {a: None for a in AGGREGATIONS}, "step_rewards": [], "num_tokens": 0}


def load_scores(path: str | os.PathLike, tag: str | None = None) -> dict[tuple[str, int], dict]:
    """Latest score line per candidate key (only lines with scorer ``tag`` when given)."""
    out = {}
    for r in read_jsonl(path):
        if tag is None or r.get("scorer") == tag:
            out[key_of(r)] = r
    return out


def score_candidates(
    candidates: Sequence[dict],
    out_path: str | os.PathLike,
    *,
    policy=DEFAULT_POLICY,
    reference=None,
    config: ScoringConfig | None = None,
    beta: float | None = UNSET,
    step_delimiter: str | None = UNSET,
    chunk_size: int = 16,
    progress: bool = True,
    scorer=None,
    where: dict | None = None,
    **scorer_kwargs,
) -> dict:
    """Score the candidates not yet in ``out_path`` (for this scorer config); append their lines.

    ``config``: a ``freeprm.ScoringConfig``; ``reference``, ``beta``, ``step_delimiter`` and the config fields in
    ``scorer_kwargs`` (``step_pattern``, ``prompt_format``, ``dtype``, ...), when given, win over it; what neither
    gives comes from a trained PRM directory's metadata, else the defaults. ``scorer``: an already-built
    ``freeprm.engine.Scorer`` to use; the tag then comes from its own config (``scorer_tag_of``) and the model and
    scoring options are ignored. Work is done ``chunk_size`` candidates at a time,
    each chunk appended and flushed, so an interrupted run loses at most one chunk.
    Every candidate is validated (``Scorer.prepare``) before any model work; a bad one raises
    ``ValueError`` named by ``where[key]`` (e.g. ``"candidates.jsonl:12"``, from the CLI) or its key.
    Returns ``{"scored", "reused", "empty", "seconds"}``.
    """
    import time

    if scorer is not None:
        tag = scorer_tag_of(scorer)
    else:
        from ..config import SCORING_FIELDS

        fields = {k: scorer_kwargs.pop(k) for k in SCORING_FIELDS if k in scorer_kwargs}
        config = merge_config(config, reference=reference, beta=beta, step_delimiter=step_delimiter, **fields)
        tag, config = resolved_config_tag(policy, config, force_reference=scorer_kwargs.get("force_reference", False),
                                          device=scorer_kwargs.get("device"))
    done = load_scores(out_path, tag)
    todo = [c for c in candidates if key_of(c) not in done]
    stats = {"scored": 0, "reused": len(candidates) - len(todo), "empty": 0, "seconds": 0.0}
    if not todo:
        return stats
    empties = [c for c in todo if not c["response"].strip()]
    if empties:
        append_jsonl(out_path, [empty_score(c, tag) for c in empties])
        stats["empty"] = len(empties)
    todo = [c for c in todo if c["response"].strip()]
    if not todo:
        return stats
    t0 = time.perf_counter()
    if scorer is None:
        from ..engine import Scorer

        scorer = Scorer(policy, config=config, **scorer_kwargs)
    from ..engine import AGGREGATIONS

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="scoring", unit="cand")
    try:
        prepared = []
        for c in todo:
            item = {"prompt": c["prompt"], "response": c["response"]}
            if c.get("steps"):
                item["steps"] = c["steps"]
            label = (where or {}).get(key_of(c)) or f"candidate {key_of(c)}"
            try:
                prepared.append(scorer.prepare(item, 0))
            except ValueError as e:
                raise ValueError(f"{label}: {str(e).removeprefix('item 0: ')}") from None
        for i in range(0, len(todo), chunk_size):
            chunk = todo[i:i + chunk_size]
            results = scorer.score_prepared(prepared[i:i + chunk_size])
            lines = []
            for c, r in zip(chunk, results):
                lines.append({"problem_id": c["problem_id"], "candidate_id": c["candidate_id"], "scorer": tag,
                              "aggregates": {a: r.aggregate(a) for a in AGGREGATIONS},
                              "step_rewards": [round(float(x), 6) for x in r.step_rewards],
                              "num_tokens": len(r.token_rewards)})
            append_jsonl(out_path, lines)
            stats["scored"] += len(lines)
            if bar is not None:
                bar.update(len(lines))
    finally:
        if bar is not None:
            bar.close()
    stats["seconds"] = time.perf_counter() - t0
    return stats
