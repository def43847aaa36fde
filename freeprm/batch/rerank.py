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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import NO_REFERENCE
from ..engine.cli import _PatternTimeout, _time_limit
from ..engine.loading import DEFAULT_POLICY, auto_dtype, resolve_dtype
from ..identity import model_identity
from ..identity import params_identity as _params_identity
from ..engine.scorer import AGGREGATIONS, Scorer
from ..prm_meta import resolve_scoring
from .reader import BadLine, Group, detect_format, iter_chunks
from .store import OutputDir

FINGERPRINT_VERSION = 2  # 2: rows of groups with rejected candidates, errors, extra, candidate_extra


@dataclass
class RerankSummary:
    """Totals of one ``rerank`` run (``resumed_groups`` were already in the output directory)."""

    groups: int = 0
    candidates: int = 0
    tokens: int = 0
    parts_written: int = 0
    resumed_groups: int = 0
    resumed_parts: int = 0
    bad_lines: int = 0
    invalid_candidates: int = 0  # candidates the engine rejected (not scored; their row says why)
    unscored_groups: int = 0  # groups with no valid candidate (written with best = None)
    seconds: float = 0.0
    output: str = ""
    bad: list = field(default_factory=list)  # [(line, message)] of this run (capped at 1000)

    @property
    def rows_per_s(self) -> float:
        return self.candidates / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"{self.groups} groups, {self.candidates} candidates, {self.tokens} tokens scored in "
                f"{self.seconds:.1f} s ({self.rows_per_s:.1f} candidates/s, {self.tokens_per_s:.0f} tokens/s); "
                f"{self.parts_written} parts written, {self.resumed_groups} groups already done "
                f"({self.resumed_parts} parts), {self.bad_lines} bad lines skipped, {self.invalid_candidates} invalid "
                f"candidates not scored ({self.unscored_groups} groups without a valid one) -> {self.output}")


# ---------------------------------------------------------------------- fingerprint
def effective_dtype(dtype, device, on_gpu_workers: bool | None = None) -> str:
    """The dtype the models will run in: ``"auto"`` as ``Scorer`` resolves it (``loading.auto_dtype``)."""
    import torch

    if not (isinstance(dtype, str) and dtype == "auto"):
        return str(resolve_dtype(dtype))
    if on_gpu_workers is not None:
        on_cuda = on_gpu_workers
    else:
        on_cuda = torch.device(device).type == "cuda" if device else torch.cuda.is_available()
    return str(auto_dtype("cuda" if on_cuda else "cpu"))


def make_fingerprint(*, policy, reference, beta, step_delimiter, step_pattern, aggregate, prompt_format, dtype,
                     max_length, rows_per_part, fmt) -> dict:
    pattern = getattr(step_pattern, "pattern", step_pattern)
    return {"version": FINGERPRINT_VERSION, "policy": policy, "reference": reference, "beta": float(beta),
            "step_delimiter": None if pattern is not None else step_delimiter, "step_pattern": pattern,
            "aggregate": aggregate, "prompt_format": prompt_format, "dtype": str(dtype),
            "max_length": max_length, "rows_per_part": int(rows_per_part), "format": fmt}


# ---------------------------------------------------------------------- scoring one chunk
def _aggregates(r) -> dict[str, float]:
    """``r.aggregate(a)`` for every aggregation, in float32 numpy (~30x cheaper than 8 torch calls)."""
    out = {}
    for prefix, t in (("", r.step_rewards), ("q_", r.q_values)):
        v = t.numpy()
        if v.size == 0:
            out.update({f"{prefix}{op}": float("nan") for op in ("min", "last", "mean", "sum")})
            continue
        out.update({f"{prefix}min": float(v.min()), f"{prefix}last": float(v[-1]),
                    f"{prefix}mean": float(v.mean(dtype=np.float32)), f"{prefix}sum": float(v.sum(dtype=np.float32))})
    return out


def _prepare(scorer: Scorer, prompt: str, cand: dict, k: int, pattern_timeout: float | None):
    """``(PreparedItem, None)``, or ``(None, why)`` for a candidate the engine rejects or that was malformed."""
    if cand.get("error") is not None:  # malformed in the input (reader.py)
        return None, cand["error"]
    try:
        with _time_limit(pattern_timeout if scorer.step_pattern is not None else None):
            p = scorer.prepare({"prompt": prompt, **cand}, k)
    except ValueError as e:
        return None, str(e).removeprefix(f"item {k}: ")
    except _PatternTimeout:
        return None, (f"--step-pattern took over {pattern_timeout:g} s (catastrophic backtracking?); "
                      "simplify the pattern or raise --pattern-timeout")
    if not p.spans:
        return None, "the response splits into zero steps (it is empty or blank)"
    return p, None


def _pick_best(scores: list) -> int | None:
    """Index of the highest score among the scored (non-None) candidates; ties: the lowest index; NaN never
    wins over a number (an all-NaN group picks its first scored candidate); None when nothing was scored."""
    ok = [i for i, s in enumerate(scores) if s is not None]
    if not ok:
        return None
    return max(ok, key=lambda i: (scores[i] == scores[i], scores[i], -i))


def score_groups(scorer: Scorer, groups: list[Group], aggregate: str,
                 pattern_timeout: float | None = None) -> tuple[list[dict], list[list], int, int]:
    """Score every valid candidate of ``groups`` in one ``score_prepared`` call; one output row per group.

    A candidate the engine rejects (``Scorer.prepare`` raises: empty response, zero steps, over
    ``max_length``, steps that are not the response; or its ``step_pattern`` split takes over
    ``pattern_timeout`` seconds, SIGALRM: main thread on Unix only, elsewhere unbounded) is not
    scored: its entries in the per-candidate columns are None and ``errors[k]`` says why (naming the
    group id and the candidate index); the group's other candidates are scored and ``best`` is
    chosen among them. A group with no valid candidate gets a row with ``best`` None.

    Returns ``(rows, invalid, candidates, tokens)``: one output row per group (input order),
    ``[line, message]`` per rejected candidate, and the numbers of candidates and tokens scored.
    """
    prepared, spans, invalid = [], [], []
    for g in groups:
        start, errors, where = len(prepared), [None] * len(g.candidates), []
        for k, cand in enumerate(g.candidates):
            p, bad = _prepare(scorer, g.prompt, cand, k, pattern_timeout)
            if bad is not None:
                errors[k] = f"group {g.id!r}: candidate {k}: {bad}"
                invalid.append([g.lines[k] if len(g.lines) > k else g.line, errors[k]])
                continue
            prepared.append(p)
            where.append(k)
        spans.append((g, start, where, errors))
    results = scorer.score_prepared(prepared, aggregate=aggregate) if prepared else []
    rows = []
    for g, start, where, errors in spans:
        n = len(g.candidates)
        res = [None] * n
        for j, k in enumerate(where):
            res[k] = results[start + j]
        scores = [None if r is None else r.score for r in res]
        best = _pick_best(scores)
        row = {"id": g.id, "line": g.line, "num_candidates": n, "best": best,
               "best_score": None if best is None else scores[best], "aggregation": aggregate, "scores": scores}
        per_cand = [None if r is None else _aggregates(r) for r in res]
        for agg in AGGREGATIONS:
            row[f"score_{agg}"] = scores if agg == aggregate else [None if c is None else c[agg] for c in per_cand]
        row["step_rewards"] = [None if r is None else r.step_rewards.tolist() for r in res]
        row["num_tokens"] = [None if r is None else len(r.input_ids) for r in res]
        row["errors"] = errors
        row["extra"] = g.extra
        row["candidate_extra"] = [g.cand_extra[k] if k < len(g.cand_extra) else None for k in range(n)]
        rows.append(row)
    return rows, invalid, len(prepared), sum(len(p.input_ids) for p in prepared)


# ---------------------------------------------------------------------- the job
def _report(summary: RerankSummary, where: str, line: int, msg: str, strict: bool, quiet: bool) -> None:
    if strict:
        raise ValueError(f"{where}:{line}: {msg} (--strict: stopping; finished parts are kept, rerun to resume)")
    if len(summary.bad) < 1000:
        summary.bad.append((line, msg))
    if not quiet:
        print(f"freeprm rerank: skipping {where}:{line}: {msg}", file=sys.stderr)


def _resume_part(index: int, ids_digest: str, out: OutputDir, summary: RerankSummary) -> None:
    """Count part ``index``, already written, after checking it holds the same groups as this chunk."""
    entry = out.done[index]
    if entry.get("ids_sha256") != ids_digest:
        raise ValueError(
            f"{out.part_path(index)} was written from other input rows than chunk {index} of this input "
            f"(ids differ: the input file changed). Rerun with the original input, or delete {out.path} to start over")
    summary.resumed_parts += 1
    summary.resumed_groups += entry["rows"]
    summary.invalid_candidates += len(entry.get("invalid", []))
    summary.unscored_groups += entry.get("unscored", 0)


def _write_scored_part(index: int, ids_digest: str, rows: list[dict], invalid: list, n_cand: int, n_tok: int,
                       out: OutputDir, summary: RerankSummary, where: str, strict: bool, quiet: bool, bar) -> None:
    """Report the rejected candidates of a scored chunk, write its part, count it (local and Ray engines)."""
    for line, msg in invalid:
        summary.invalid_candidates += 1
        _report(summary, where, line, msg, strict, quiet)
    unscored = sum(1 for r in rows if r["best"] is None)
    out.write_part(index, rows, {"ids_sha256": ids_digest, "invalid": invalid, "unscored": unscored,
                                 "candidates": n_cand, "tokens": n_tok})
    summary.parts_written += 1
    summary.groups += len(rows)
    summary.unscored_groups += unscored
    summary.candidates += n_cand
    summary.tokens += n_tok
    bar.update(len(rows), n_cand, n_tok)


def rerank(
    input: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    policy=DEFAULT_POLICY,
    reference=None,
    scorer: Scorer | None = None,
    beta: float | None = None,
    step_delimiter: str | None = "\n\n",
    step_pattern: str | None = None,
    aggregate: str = "min",
    prompt_format: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    max_length: int | None = None,
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
    ``scorer``: a ready ``Scorer`` (its models and options are used; ``policy`` .. ``max_batch_tokens``
    are then ignored). ``engine="ray"`` runs the scoring on a Ray Data actor pool of ``workers``
    actors (see ``ray_engine.py``; ``num_cpus_per_worker`` may be fractional, ``torch_threads`` sets
    each actor's torch threads, ``ray_address`` the cluster when Ray is not initialised yet). Returns a ``RerankSummary``.
    A trained PRM directory as ``policy`` supplies beta, reference, prompt format and step split where not given
    (its ``freeprm_prm.json``, as ``Scorer`` reads it; ``force_reference`` as there).
    """
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    if format not in ("parquet", "jsonl"):
        raise ValueError(f"format must be 'parquet' or 'jsonl', got {format!r}")
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
    if rows_per_part < 1:
        raise ValueError(f"rows_per_part must be >= 1, got {rows_per_part}")
    input = str(input)
    if not os.path.isfile(input):
        raise ValueError(f"input file not found: {input}")
    in_fmt = detect_format(input, input_format)
    if in_fmt == "parquet" or format == "parquet":
        _require_pyarrow()
    if Path(output_dir).resolve() == Path(input).resolve():
        raise ValueError("the output directory is the input file; pass another --output")
    if scorer is not None:
        if engine == "ray":
            raise ValueError("engine='ray' builds a Scorer in each worker: pass model specs (policy=...), not scorer=")
        fp = make_fingerprint(
            policy=_params_identity(scorer.policy, scorer.tokenizer),
            reference=None if scorer.reference is None else _params_identity(scorer.reference, scorer.tokenizer),
            beta=scorer.beta, step_delimiter=scorer.step_delimiter, step_pattern=scorer.step_pattern,
            aggregate=aggregate, prompt_format=scorer.prompt_format, dtype=effective_dtype(scorer.dtype, None),
            max_length=scorer.max_length, rows_per_part=rows_per_part, fmt=format)
    else:
        r = resolve_scoring(policy, beta=beta, reference=reference, prompt_format=prompt_format,
                            step_delimiter=step_delimiter, step_pattern=step_pattern, force_reference=force_reference)
        beta, prompt_format, step_delimiter, step_pattern = r.beta, r.prompt_format, r.step_delimiter, r.step_pattern
        fp = make_fingerprint(
            policy=model_identity(policy), reference=model_identity(r.reference), beta=beta,
            step_delimiter=step_delimiter, step_pattern=step_pattern, aggregate=aggregate, prompt_format=prompt_format,
            dtype=effective_dtype(dtype, device, (num_gpus_per_worker > 0) if engine == "ray" else None),
            max_length=max_length, rows_per_part=rows_per_part, fmt=format)
        reference = NO_REFERENCE if r.reference is None else r.reference  # resolved: None would mean "unset"
        scorer_kwargs["force_reference"] = force_reference
    scorer_opts = dict(beta=beta, step_delimiter=step_delimiter, step_pattern=step_pattern, aggregate=aggregate,
                       prompt_format=prompt_format, dtype=dtype, device=device, max_length=max_length,
                       max_batch_tokens=max_batch_tokens, **scorer_kwargs)
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
            if scorer is None:
                scorer = Scorer(policy, reference, **scorer_opts)
            _run_local(input, in_fmt, out, summary, scorer, aggregate, rows_per_part, strict, progress, quiet, t0,
                       pattern_timeout)
        summary.seconds = time.perf_counter() - t0
        out.write_summary({k: v for k, v in asdict(summary).items() if k != "bad"}
                          | {"rows_per_s": summary.rows_per_s, "tokens_per_s": summary.tokens_per_s})
    if not quiet:
        print(f"freeprm rerank: {summary.line()}", file=sys.stderr)
    return summary


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ValueError("Parquet needs pyarrow: pip install 'freeprm[batch]' (or use --format jsonl and JSONL input)") from None


class Progress:
    """tqdm bar over candidates, with groups and tokens/s in the postfix (a no-op when disabled)."""

    def __init__(self, enabled: bool, t0: float) -> None:
        self.bar, self.t0, self.tokens, self.groups = None, t0, 0, 0
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(desc="rerank", unit="cand", dynamic_ncols=True)

    def update(self, groups: int, candidates: int, tokens: int) -> None:
        self.groups += groups
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(candidates)
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix(groups=self.groups, tok_s=f"{self.tokens / dt:.0f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
                _resume_part(item.index, item.ids_digest, out, summary)
                continue
            rows, invalid, n_cand, n_tok = score_groups(scorer, item.groups, aggregate, pattern_timeout)
            _write_scored_part(item.index, item.ids_digest, rows, invalid, n_cand, n_tok, out, summary, input,
                               strict, quiet, bar)
    finally:
        bar.close()
    _warn_extra_parts(out, last, quiet)


def _warn_extra_parts(out: OutputDir, last: int, quiet: bool) -> None:
    extra = sorted(k for k in out.done if k > last)
    if extra and not quiet:
        print(f"freeprm rerank: warning: {out.path} holds parts {extra[0]}..{extra[-1]} beyond the end of this input "
              "(the input got shorter?); they are left as they are", file=sys.stderr)
