"""What the local and the Ray engine of ``rerank`` share: scoring one chunk, counting, writing and resuming parts.

``rerank.py`` (the entry point and the local engine) and ``ray_engine.py`` both import this module;
neither imports the other at module level (``rerank`` loads ``ray_engine`` only for ``engine="ray"``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..engine.scorer import AGGREGATIONS, Scorer
from ..engine.timeouts import PatternTimeout, time_limit
from .reader import Group, first_change
from .store import OutputDir


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
        with time_limit(pattern_timeout if scorer.step_pattern is not None else None):
            p = scorer.prepare({"prompt": prompt, **cand}, k)
    except ValueError as e:
        return None, str(e).removeprefix(f"item {k}: ")
    except PatternTimeout:
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


# ---------------------------------------------------------------------- parts
def _report(summary: RerankSummary, where: str, line: int, msg: str, strict: bool, quiet: bool) -> None:
    if strict:
        raise ValueError(f"{where}:{line}: {msg} (--strict: stopping; finished parts are kept, rerun to resume)")
    if len(summary.bad) < 1000:
        summary.bad.append((line, msg))
    if not quiet:
        print(f"freeprm rerank: skipping {where}:{line}: {msg}", file=sys.stderr)


def _resume_part(index: int, ids_digest: str, content: str, where: list, out: OutputDir,
                 summary: RerankSummary) -> None:
    """Count part ``index``, already written, after checking it was made from the same input as this chunk.

    ``content``: the chunk's ``Chunk.content_digest`` (every group's id, prompt, candidates, line numbers and
    extra keys); ``where``: ``(id, line)`` per group, to name the first group that changed. A part written by
    an older version (no ``content`` in its manifest line) is checked by its ids only.
    """
    entry = out.done[index]
    stored = entry.get("content")
    changed = None
    if stored is not None:
        changed = first_change(stored, content)
    elif entry.get("ids_sha256") != ids_digest:
        changed = 0
    if changed is not None:
        if changed < len(where):
            gid, line = where[changed]
            what = f"the group at input line (Parquet: row) {line}, id {gid!r}, is not the one that was scored"
        else:
            what = f"the input now ends after {len(where)} of its {entry['rows']} groups"
        raise ValueError(
            f"the input changed since {out.part_path(index)} was written: {what} (group {changed} of part {index}; "
            "its text, id, line number or extra keys differ, or a line above it was added or removed). Rerun with "
            f"the original input, or delete {out.path} (or pass another --output) to start over")
    summary.resumed_parts += 1
    summary.resumed_groups += entry["rows"]
    summary.invalid_candidates += len(entry.get("invalid", []))
    summary.unscored_groups += entry.get("unscored", 0)


def _write_scored_part(index: int, ids_digest: str, content: str, rows: list[dict], invalid: list, n_cand: int,
                       n_tok: int, out: OutputDir, summary: RerankSummary, where: str, strict: bool, quiet: bool,
                       bar) -> None:
    """Report the rejected candidates of a scored chunk, write its part, count it (local and Ray engines)."""
    for line, msg in invalid:
        summary.invalid_candidates += 1
        _report(summary, where, line, msg, strict, quiet)
    unscored = sum(1 for r in rows if r["best"] is None)
    out.write_part(index, rows, {"ids_sha256": ids_digest, "content": content, "invalid": invalid,
                                 "unscored": unscored, "candidates": n_cand, "tokens": n_tok})
    summary.parts_written += 1
    summary.groups += len(rows)
    summary.unscored_groups += unscored
    summary.candidates += n_cand
    summary.tokens += n_tok
    bar.update(len(rows), n_cand, n_tok)


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


def _warn_extra_parts(out: OutputDir, last: int, quiet: bool) -> None:
    extra = sorted(k for k in out.done if k > last)
    if extra and not quiet:
        print(f"freeprm rerank: warning: {out.path} holds parts {extra[0]}..{extra[-1]} beyond the end of this input "
              "(the input got shorter?); they are left as they are", file=sys.stderr)
