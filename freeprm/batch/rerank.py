"""``rerank()``: stream groups of candidates through the scorer into resumable Parquet/JSONL parts.

Per input group the output row is::

    id               str     the group's id
    line             int     1-based input line (Parquet: row) of the group's first row
    num_candidates   int     N (rejected candidates included)
    best             int     index of the best scored candidate under ``aggregation`` (ties: the lowest
                             index); None when no candidate of the group could be scored
    best_score       float   its score (None with ``best``)
    aggregation      str     the aggregation that picks ``best``
    scores           [N]     each candidate's score under ``aggregation`` (None: candidate rejected)
    score_<agg>      [N]     each candidate's score under every aggregation in ``AGGREGATIONS``
    step_rewards     [N][S_n] each candidate's step rewards (Q values are their running sums); None: rejected
    num_tokens       [N]     prompt + response tokens scored per candidate; None: rejected
    errors           [N]     None, or why the candidate was rejected ("group 'ID': candidate K: why")
    extra            dict    the group row's other keys (None when it has none)
    candidate_extra  [N]     each candidate's other keys (a candidate object's, or a flat row's), or None

A candidate the engine rejects costs only its own entries: the group's other candidates are
scored. (Parquet parts hold ``extra`` / ``candidate_extra`` as JSON text; ``read_output`` parses it.)

Memory is bounded by one chunk: ``rows_per_part`` groups are read, scored (through
``Scorer.score_prepared``, all candidates of the chunk in one call, so the engine batches and
shares prompts as it can), written as one part, and dropped. Peak memory is about
``rows_per_part x candidates per group x (row text + per-token tensors)`` plus the engine's
forward batch (``max_batch_tokens``) plus 16 bytes (about 100 bytes with Python's set
overhead) per distinct group id, kept to detect duplicate ids; it does not grow with the
number of rows otherwise.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..config import DEFAULT_POLICY, UNSET, ScoringConfig, merge_config
from ..engine.scorer import Scorer
from ..identity import model_identity, params_identity
from ..io import check_input
from ..prm_meta import resolve_config
from .job import Progress, RerankSummary, _report, _resume_part, _warn_extra_parts, _write_scored_part, score_groups
from .reader import BadLine, detect_format, iter_chunks, open_parquet
from .store import OutputDir

FINGERPRINT_VERSION = 2  # 2: rows of groups with rejected candidates, errors, extra, candidate_extra


# ---------------------------------------------------------------------- fingerprint
def make_fingerprint(policy_identity, config_identity: dict, *, rows_per_part: int, fmt: str) -> dict:
    """What produced an output directory (``fingerprint.json``): the policy's identity, the scoring config's
    ``ScoringConfig.identity()`` and the output layout. Output of another fingerprint is not resumed.

    The keys and values are those of fingerprint version 2 as written before ``ScoringConfig`` existed, so
    directories written then resume unchanged (``tests/test_config_wiring.py`` pins one)."""
    return {"version": FINGERPRINT_VERSION, "policy": policy_identity, **config_identity,
            "rows_per_part": int(rows_per_part), "format": fmt}


# ---------------------------------------------------------------------- the job
def rerank(
    input: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    policy=DEFAULT_POLICY,
    reference=None,
    scorer: Scorer | None = None,
    config: ScoringConfig | None = None,
    beta: float | None = UNSET,
    step_delimiter: str | None = UNSET,
    step_pattern: str | None = UNSET,
    aggregate: str = UNSET,
    prompt_format: str | None = UNSET,
    dtype: str = UNSET,
    device: str | None = None,
    max_length: int | None = UNSET,
    max_batch_tokens: int = 8192,
    format: str = "parquet",
    input_format: str | None = None,
    rows_per_part: int = 1000,
    strict: bool = False,
    progress: bool = True,
    quiet: bool = False,
    engine: str = "local",
    workers: int = 1,
    num_cpus_per_worker: float = 1.0,
    num_gpus_per_worker: float = 0.0,
    torch_threads: int | None = None,
    ray_address: str | None = None,
    pattern_timeout: float | None = 2.0,
    force_reference: bool = False,
    **scorer_kwargs,
) -> RerankSummary:
    """Rerank every group of ``input`` (JSONL or Parquet) into parts under ``output_dir``; resumable.

    Equivalent, in memory, to::

        for group in groups(input):                       # see reader.py for the row kinds
            res = Scorer(...).score([{"prompt": group.prompt, **c} for c in group.candidates])
            scores = [r.score for r in res]
            write({"id": group.id, "best": scores.index(max(scores)), "scores": scores, ...})

    but streamed in chunks of ``rows_per_part`` groups (one output part each) with bounded
    memory, and resumable: rerunning with the same arguments after a crash or ``kill -9``
    computes only the missing parts; another configuration is refused (``ValueError``).
    ``config``: a ``freeprm.ScoringConfig`` (beta, reference, step split, aggregate, ...); the keyword arguments of
    the same names, when given, win over it. ``scorer``: a ready ``Scorer`` (its models and options are used;
    ``policy`` .. ``max_batch_tokens`` are then ignored, except ``aggregate``). ``engine="ray"`` runs the scoring on a Ray Data actor pool of ``workers``
    actors (see ``ray_engine.py``; ``num_cpus_per_worker`` may be fractional, ``torch_threads`` sets
    each actor's torch threads, ``ray_address`` the cluster when Ray is not initialised yet). Returns a ``RerankSummary``.
    A trained PRM directory as ``policy`` supplies beta, reference, prompt format and step split where not given
    (its ``freeprm_prm.json``, as ``Scorer`` reads it; ``force_reference`` as there).
    """
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    if format not in ("parquet", "jsonl"):
        raise ValueError(f"format must be 'parquet' or 'jsonl', got {format!r}")
    cfg = merge_config(config, reference=reference, beta=beta, step_delimiter=step_delimiter,
                       step_pattern=step_pattern, aggregate=aggregate, prompt_format=prompt_format, dtype=dtype,
                       max_length=max_length)  # validated here: a NaN must never reach fingerprint.json
    if scorer is not None:
        cfg = scorer.config.replace(aggregate=cfg.aggregate) if cfg.is_given("aggregate") else scorer.config
    aggregate = cfg.aggregate
    if rows_per_part < 1:
        raise ValueError(f"rows_per_part must be >= 1, got {rows_per_part}")
    input = str(input)
    check_input(input)
    in_fmt = detect_format(input, input_format)
    if in_fmt == "parquet" or format == "parquet":
        _require_pyarrow()
    _check_input_format(input, in_fmt)
    if Path(output_dir).resolve() == Path(input).resolve():
        raise ValueError("the output directory is the input file; pass another --output")
    if scorer is not None:
        if engine == "ray":
            raise ValueError("engine='ray' builds a Scorer in each worker: pass model specs (policy=...), not scorer=")
        ref_identity = None if scorer.reference is None else params_identity(scorer.reference, scorer.tokenizer)
        ident = cfg.replace(dtype="auto", max_length=scorer.max_length).identity(model_dtype=scorer.dtype,
                                                                                  reference_identity=ref_identity)
        fp = make_fingerprint(params_identity(scorer.policy, scorer.tokenizer), ident, rows_per_part=rows_per_part,
                              fmt=format)
    else:
        # a trained PRM directory's freeprm_prm.json fills what is not given, as Scorer reads it
        cfg, _ = resolve_config(policy, cfg, force_reference=force_reference)
        ident = cfg.identity(device=device, on_cuda=(num_gpus_per_worker > 0) if engine == "ray" else None,
                             reference_identity=model_identity(cfg.reference_model))
        fp = make_fingerprint(model_identity(policy), ident, rows_per_part=rows_per_part, fmt=format)
        OutputDir.check(output_dir, fp, format)  # another configuration is refused before the models load
        scorer_kwargs["force_reference"] = force_reference
    reference = cfg.reference
    scorer_opts = dict(config=cfg, device=device, max_batch_tokens=max_batch_tokens, **scorer_kwargs)
    if scorer is None and engine == "local":
        scorer = Scorer(policy, reference, **scorer_opts)  # validates the options, loads the models
    # nothing is written before this point; the directory is created here, fingerprint.json with the first part
    t0 = time.perf_counter()
    with OutputDir(output_dir, fp, format) as out:
        summary = RerankSummary(output=str(out.path))
        if engine == "ray":
            from .ray_engine import run_ray

            run_ray(input, in_fmt, out, summary, policy=policy, reference=reference, scorer_opts=scorer_opts,
                    aggregate=aggregate, rows_per_part=rows_per_part, strict=strict, progress=progress, quiet=quiet,
                    workers=workers, num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker, t0=t0,
                    torch_threads=torch_threads, address=ray_address, pattern_timeout=pattern_timeout)
        else:
            _run_local(input, in_fmt, out, summary, scorer, aggregate, rows_per_part, strict, progress, quiet, t0,
                       pattern_timeout)
        summary.seconds = time.perf_counter() - t0
        out.write_summary({k: v for k, v in asdict(summary).items() if k != "bad"}
                          | {"rows_per_s": summary.rows_per_s, "tokens_per_s": summary.tokens_per_s})
    if not quiet:
        print(f"freeprm rerank: {summary.line()}", file=sys.stderr)
    return summary


def _check_input_format(path: str, fmt: str) -> None:
    """``ValueError`` when ``path`` is plainly not ``fmt`` (the Parquet magic bytes decide), before any work."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if fmt == "parquet":
        open_parquet(path)  # reads the footer: a ValueError naming the file if it is not Parquet
    elif magic == b"PAR1":
        raise ValueError(f"input {path} is a Parquet file; pass --input-format parquet (or name it *.parquet)")


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ValueError("Parquet needs pyarrow: pip install 'freeprm[batch]' (or use --format jsonl and JSONL input)") from None


def _run_local(input, in_fmt, out, summary, scorer, aggregate, rows_per_part, strict, progress, quiet, t0,
               pattern_timeout: float | None = None) -> None:
    bar = Progress(progress, t0)
    last = -1
    try:
        for item in iter_chunks(input, rows_per_part, in_fmt):
            if isinstance(item, BadLine):
                summary.bad_lines += 1
                _report(summary, input, item.line, item.message, strict, quiet)
                continue
            last = item.index
            if item.index in out.done:
                _resume_part(item.index, item.ids_digest, item.content_digest, item.where(), out, summary)
                continue
            rows, invalid, n_cand, n_tok = score_groups(scorer, item.groups, aggregate, pattern_timeout)
            _write_scored_part(item.index, item.ids_digest, item.content_digest, rows, invalid, n_cand, n_tok, out,
                               summary, input, strict, quiet, bar)
    finally:
        bar.close()
    _warn_extra_parts(out, last, quiet)


