"""``run_search()``: search over a task or a JSONL of prompts into resumable output parts (``freeprm search``).

The output directory is ``rerank``'s (``freeprm/batch/store.py``: JSONL parts written atomically, a manifest, a
fingerprint, a lock): part ``k`` holds the rows of prompts ``k * prompts_per_part ...``, searched together (one
batch of all their candidates). Each chunk's sampling seed is derived from ``seed`` and ``k`` only, so a chunk
computes the same rows whether the run was interrupted or not; after ``kill -9`` rerun the same command and only
the missing parts are computed. A run with another configuration (models, search or scoring options,
``prompts_per_part``) on the same directory is refused before any work. One row per prompt::

    id, line, prompt, best, best_text, best_score, aggregation, candidates (text, steps, step_rewards, score,
    status, num_tokens, cut, id, token_ids, step_ends), trace, generated_tokens, scored_tokens, steps, extra,
    and with a task: gold, answers (per candidate), correct (per candidate), best_correct
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..batch.store import OutputDir
from ..identity import model_identity, params_identity
from .algorithms import SearchConfig, Searcher, build_searcher

FINGERPRINT_VERSION = 1


@dataclass
class PromptRow:
    """One prompt to search: its id, input line (0 for a task), text, and for a task the gold answer."""

    id: str
    line: int
    prompt: str
    gold: str | None = None
    grader: str | None = None  # grading task name (eval/grading.py)
    extra: dict | None = None


@dataclass
class SearchSummary:
    prompts: int = 0
    parts_written: int = 0
    resumed_prompts: int = 0
    resumed_parts: int = 0
    steps: int = 0
    generated_tokens: int = 0
    scored_tokens: int = 0
    bad_lines: int = 0
    correct: int = 0
    graded: int = 0
    seconds: float = 0.0
    output: str = ""

    def line(self) -> str:
        acc = f", best correct {self.correct}/{self.graded}" if self.graded else ""
        return (f"{self.prompts} prompts searched in {self.seconds:.1f} s ({self.steps} steps, "
                f"{self.generated_tokens} tokens generated, {self.scored_tokens} scored{acc}); "
                f"{self.parts_written} parts written, {self.resumed_prompts} prompts already done "
                f"({self.resumed_parts} parts), {self.bad_lines} bad lines skipped -> {self.output}")


# ---------------------------------------------------------------------- inputs
def read_prompts(path: str, *, quiet: bool = False) -> tuple[list[PromptRow], int]:
    """Rows ``{"id", "prompt", ...}`` of a JSONL file (``id`` optional: the line number; other keys pass through to
    ``extra``; ``gold`` with ``task`` (gsm8k / math / arith grading) is graded). Bad lines are reported and skipped."""
    from ..io import LineError, iter_jsonl

    rows, seen, bad = [], {}, 0

    def skip(line, why):
        nonlocal bad
        bad += 1
        if not quiet:
            print(f"freeprm search: skipping {path}:{line}: {why}", file=sys.stderr)

    for line, obj in iter_jsonl(path):
        if isinstance(obj, LineError):
            skip(line, obj.message)
            continue
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            skip(line, "'prompt' must be a non-empty string")
            continue
        pid = obj.get("id", line)
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            skip(line, "'id' must be a string or an integer")
            continue
        pid = str(pid)
        if pid in seen:
            skip(line, f"duplicate id {pid!r} (first on line {seen[pid]})")
            continue
        seen[pid] = line
        gold = obj.get("gold")
        grader = obj.get("task")
        extra = {k: v for k, v in obj.items() if k not in ("id", "prompt")} or None
        rows.append(PromptRow(pid, line, prompt, None if gold is None else str(gold),
                              grader if isinstance(grader, str) else None, extra))
    return rows, bad


def task_prompts(task: str, *, limit: int | None, offset: int = 0, seed: int = 0, data_dir=None) -> list[PromptRow]:
    """The problems of a ``freeprm.eval.tasks`` task as prompt rows (prompt = the task's step-format prompt)."""
    from ..eval.tasks import load_task

    probs = load_task(task, limit=limit, offset=offset, seed=seed, data_dir=data_dir)
    return [PromptRow(p.problem_id, 0, p.prompt(), p.gold, p.grader_task, {"meta": p.meta} if p.meta else None)
            for p in probs]


# ---------------------------------------------------------------------- the job
def _chunk_seed(seed: int, index: int) -> int:
    h = hashlib.sha256(f"{seed}:chunk:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _ids_digest(rows: list[PromptRow]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(r.id.encode() + b"\0" + hashlib.sha256(r.prompt.encode()).digest())
    return h.hexdigest()


def _grade(row: dict, pr: PromptRow) -> None:
    from ..eval.grading import grade

    row["gold"] = pr.gold
    answers, correct = [], []
    for c in row["candidates"]:
        ans, ok = grade(c["text"], pr.gold, pr.grader)
        answers.append(ans)
        correct.append(bool(ok))
    row["answers"], row["correct"] = answers, correct
    row["best_correct"] = None if row["best"] is None else correct[row["best"]]


class _Bar:
    """tqdm over search steps, with prompts done, steps/s and tokens/s (generated) in the postfix."""

    def __init__(self, enabled: bool, total_prompts: int, t0: float) -> None:
        self.bar, self.t0, self.tokens, self.scored, self.steps, self.prompts = None, t0, 0, 0, 0, 0
        self.total = total_prompts
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(desc="search", unit="step", dynamic_ncols=True)

    def step(self, generated: int, scored: int) -> None:
        self.steps += 1
        self.tokens += generated
        self.scored += scored
        if self.bar is not None:
            self.bar.update(1)
            self._post()

    def prompts_done(self, n: int) -> None:
        self.prompts += n
        if self.bar is not None:
            self._post()

    def _post(self) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix(prompts=f"{self.prompts}/{self.total}", steps_s=f"{self.steps / dt:.2f}",
                             tok_s=f"{self.tokens / dt:.0f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def make_fingerprint(searcher: Searcher, *, policy, reference, generator, backend: str, prompts_per_part: int,
                     source: dict) -> dict:
    """What produced the parts: model identities (``freeprm/identity.py``), scoring and search options."""
    sc = searcher.inc.scorer

    def ident(spec, model):
        return model_identity(spec) if isinstance(spec, str) else params_identity(model, sc.tokenizer)

    if generator is None:
        gen = None  # the PRM's policy
    elif isinstance(generator, str):
        gen = model_identity(generator)
    elif hasattr(searcher.gen, "model"):
        gen = params_identity(searcher.gen.model, sc.tokenizer)
    else:
        gen = type(searcher.gen).__name__
    return {"version": FINGERPRINT_VERSION, "tool": "search", "policy": ident(policy, sc.policy),
            "reference": None if sc.reference is None else ident(reference, sc.reference), "generator": gen,
            "backend": backend, "beta": sc.beta, "prompt_format": sc.prompt_format, "dtype": str(sc.dtype),
            "max_length": sc.max_length, **{f"search.{k}": v for k, v in searcher.cfg.to_dict().items()},
            "prompts_per_part": int(prompts_per_part), "source": source, "format": "jsonl"}


def run_search(rows: list[PromptRow], output_dir: str | os.PathLike, *, config: SearchConfig, policy=None,
               reference=None, generator=None, backend: str = "transformers", prompts_per_part: int = 16,
               source: dict | None = None, progress: bool = True, quiet: bool = False, searcher: Searcher | None = None,
               bad_lines: int = 0, **scorer_kwargs) -> SearchSummary:
    """Search every prompt row into parts under ``output_dir`` (resumable; see the module docstring).

    ``searcher``: a ready ``Searcher`` (then ``config`` must be its config, and the model options are not used);
    ``bad_lines``: input lines the reader skipped (counted in the summary).
    """
    if prompts_per_part < 1:
        raise ValueError(f"prompts_per_part must be >= 1, got {prompts_per_part}")
    if not rows:
        raise ValueError("no prompts to search (the input is empty or every line was bad)")
    if searcher is None:
        searcher = build_searcher(policy, reference, config=config, generator=generator, backend=backend,
                                  **scorer_kwargs)
    fp = make_fingerprint(searcher, policy=policy, reference=reference, generator=generator, backend=backend,
                          prompts_per_part=prompts_per_part, source=source or {})
    t0 = time.perf_counter()
    summary = SearchSummary(bad_lines=bad_lines)
    chunks = [rows[i:i + prompts_per_part] for i in range(0, len(rows), prompts_per_part)]
    with OutputDir(output_dir, fp, "jsonl", tool="search") as out:
        summary.output = str(out.path)
        bar = _Bar(progress, len(rows), t0)
        try:
            for k, chunk in enumerate(chunks):
                digest = _ids_digest(chunk)
                if k in out.done:
                    entry = out.done[k]
                    if entry.get("ids_sha256") != digest:
                        raise ValueError(f"{out.part_path(k)} was written from other prompts than chunk {k} of this "
                                         f"input (the input changed). Rerun with the original input, or delete "
                                         f"{out.path} to start over")
                    summary.resumed_parts += 1
                    summary.resumed_prompts += entry["rows"]
                    summary.correct += entry.get("correct", 0)
                    summary.graded += entry.get("graded", 0)
                    bar.prompts_done(entry["rows"])
                    continue
                results = searcher.run([r.prompt for r in chunk], seed=_chunk_seed(config.seed, k),
                                       on_step=lambda s, g, sc: bar.step(g, sc))
                out_rows = []
                for pr, res in zip(chunk, results):
                    row = {"id": pr.id, "line": pr.line, **res.to_dict(), "extra": pr.extra}
                    if pr.gold is not None and pr.grader is not None:
                        _grade(row, pr)
                    out_rows.append(row)
                graded = [r for r in out_rows if r.get("best_correct") is not None]
                n_correct = sum(1 for r in graded if r["best_correct"])
                gen_tok = sum(r.generated_tokens for r in results)
                sc_tok = sum(r.scored_tokens for r in results)
                out.write_part(k, out_rows, {"ids_sha256": digest, "generated_tokens": gen_tok, "scored_tokens": sc_tok,
                                             "steps": max(r.steps for r in results), "correct": n_correct,
                                             "graded": len(graded)})
                summary.parts_written += 1
                summary.prompts += len(out_rows)
                summary.steps += max(r.steps for r in results)
                summary.generated_tokens += gen_tok
                summary.scored_tokens += sc_tok
                summary.correct += n_correct
                summary.graded += len(graded)
                bar.prompts_done(len(out_rows))
        finally:
            bar.close()
        summary.seconds = time.perf_counter() - t0
        out.write_summary(asdict(summary))
    if not quiet:
        print(f"freeprm search: {summary.line()}", file=sys.stderr)
    return summary


def read_search_output(path: str | os.PathLike) -> list[dict]:
    """All rows of a ``freeprm search`` output directory, in prompt order."""
    from ..batch.store import read_output

    if not Path(path).is_dir():
        raise ValueError(f"{path} is not a search output directory")
    return read_output(path)
