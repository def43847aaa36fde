"""``freeprm score`` (JSONL in, JSONL out) and ``freeprm demo`` (the bundled GSM8K candidate set).

Input JSONL, one object per line::

    {"prompt": str, "response": str}            # steps split by --step-delimiter / --step-pattern
    {"prompt": str, "steps": [str, ...]}        # explicit steps (response = steps joined by the delimiter)
    {"prompt": str, "response": str, "steps": [...]}   # steps located in the response

Any other keys (ids, labels) are passed through to the output unchanged. Output JSONL, one
object per scored input line, in input order::

    {...passed-through keys..., "line": int (1-based input line),
     "score": float, "aggregation": str, "steps": [str], "step_rewards": [float],
     "q_values": [float], "aggregates": {"min": ..., "last": ..., "mean": ..., "sum": ...,
     "q_min": ..., "q_last": ..., "q_mean": ..., "q_sum": ...}, "num_tokens": int, "beta": float}

With ``--tokens``: also ``token_rewards``, ``token_steps``, ``input_ids``, ``response_start``.
Input keys named like an output key (``line``, ``score``, ``aggregation``, ... or ``meta``) are not
overwritten: they go under ``"meta"`` (a dict of those keys only). Output is standard JSON: a
NaN or infinite number is written as ``null``.

A bad line is reported on stderr as ``PATH:LINE: why`` and skipped (counted in the summary);
with ``--strict`` it is fatal and nothing is written. Bad: not UTF-8, not one standard JSON
object (``NaN`` literals, raw control characters in strings, a lone ``\\ud800`` surrogate, nesting
deeper than 200), longer than ``--max-line-bytes``, missing or mistyped fields, over
``--max-length`` tokens, steps that are not the response, no step, a ``--step-pattern`` split
slower than ``--pattern-timeout``. Blank lines are skipped silently; a UTF-8 BOM is ignored;
lines are split on ``\\n`` only. Options are checked before any model is loaded: the device
exists, the pattern compiles, ``-o`` is not ``-i`` (nor a link to it), not a directory, and its
folder is writable. ``-i -`` / ``-o -`` read stdin / write stdout. The output file is written
atomically (a temporary file beside it, renamed into place when all lines are scored; new
files get mode ``0666 & ~umask``, a replaced file keeps its mode); a FIFO or a character device
(``-o /dev/null``) is written directly, like ``-o -``, and never replaced; other special files are
refused. A full disk or a file too large is one message (exit 2), nothing is left behind. See
``freeprm/io.py``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from ..cliargs import HelpFormatter, error, positive_int
from ..config import DEFAULT_STEP_DELIMITER
from ..io import STDIO, AtomicJsonlWriter, LineError, OutputError, check_input, iter_jsonl, load_jsonl
from ..scorer_cli import add_scorer_args, check_scorer_args, make_scorer
from .timeouts import PatternTimeout, time_limit

DEMO_SET = Path(__file__).resolve().parents[1] / "data" / "demo_gsm8k.jsonl"

# the old private names (the scorer's options live in freeprm/scorer_cli.py); removed in the next release
_scorer_args, _check_scorer_args, _make_scorer = add_scorer_args, check_scorer_args, make_scorer


def default_max_line_bytes(max_length: int) -> int:
    """The default raw line limit: 32 bytes per token of ``max_length``, at least 1 MiB."""
    return min(max(1 << 20, 32 * int(max_length)), sys.maxsize - 1)


def read_items(path: str, scorer, strict: bool, *, max_line_bytes: int | None = None,
               pattern_timeout: float | None = 2.0, report=None):
    """Read, parse and validate every line (no model work); returns (prepared items, their line numbers, errors).

    ``errors``: ``[(line, message)]``. A bad line (see ``freeprm.io.iter_jsonl`` for the file-level
    checks, then ``Scorer.prepare``) is reported through ``report`` (default: stderr) and skipped;
    with ``strict`` the first one raises ``ValueError("PATH:LINE: ...")``. ``max_line_bytes``
    (default ``default_max_line_bytes(scorer.max_length)``) rejects long lines before they are
    parsed or tokenized. With a ``step_pattern`` each line's split runs under ``pattern_timeout``.
    """
    report = report or (lambda msg: print(msg, file=sys.stderr))
    name = "<stdin>" if str(path) == STDIO else path
    if max_line_bytes is None:
        max_line_bytes = default_max_line_bytes(scorer.max_length)
    pattern = getattr(scorer, "step_pattern", None)
    prepared, lines, errors, zero_width = [], [], [], []
    for lineno, item in iter_jsonl(path, max_line_bytes=max_line_bytes):
        try:
            if isinstance(item, LineError):
                raise ValueError(item.message)
            if pattern is not None and isinstance(item.get("response"), str) and item.get("steps") is None:
                try:
                    with time_limit(pattern_timeout):
                        widths = [m.end() - m.start() for m in pattern.finditer(item["response"])]
                except PatternTimeout:
                    raise ValueError(f"--step-pattern took over {pattern_timeout:g} s on this line (catastrophic "
                                     "backtracking?); simplify the pattern or raise --pattern-timeout") from None
                if widths and not any(widths):
                    zero_width.append(lineno)
            p = scorer.prepare(item, lineno)
        except ValueError as e:
            msg = str(e).removeprefix(f"item {lineno}: ")
        except Exception as e:  # noqa: BLE001  a tokenizer or splitter failure on odd text: report the line
            msg = f"{type(e).__name__}: {e}"
        else:
            prepared.append(p)
            lines.append(lineno)
            continue
        if strict:
            raise ValueError(f"{name}:{lineno}: {msg}")
        errors.append((lineno, msg))
        report(f"freeprm score: skipping {name}:{lineno}: {msg}")
    if zero_width:
        report(f"freeprm score: warning: --step-pattern matched only empty text on {len(zero_width)} line(s) "
               f"(first: {name}:{zero_width[0]}); zero-width matches (lookaheads, \\b, x*) do not split steps, so "
               "those responses have no split there; make the pattern consume the separator")
    return prepared, lines, errors


# keys of an output row; input keys with these names are kept under "meta" instead of being overwritten
OUTPUT_KEYS = ("line", "score", "aggregation", "steps", "step_rewards", "q_values", "aggregates", "num_tokens", "beta",
               "token_rewards", "token_steps", "input_ids", "response_start", "meta")


def output_row(result, lineno: int, tokens: bool = False) -> tuple[dict, list[str]]:
    """The output row of one scored line and the input keys moved under ``"meta"`` (name clashes)."""
    base = dataclasses.replace(result, meta={}).to_dict(tokens=tokens)
    row, clash = {}, {}
    for k, v in result.meta.items():
        if k in OUTPUT_KEYS or k in base:
            clash[k] = v
        else:
            row[k] = v
    row.update(base)
    row["line"] = lineno
    if clash:
        row["meta"] = clash
    return row, list(clash)


def cmd_score(args) -> int:
    writer = None
    try:
        check_input(args.input)
        check_scorer_args(args)
        writer = AtomicJsonlWriter(args.output, inputs=[args.input])  # before any model work
        scorer = make_scorer(args)
        prepared, lines, errors = read_items(args.input, scorer, args.strict, max_line_bytes=args.max_line_bytes,
                                             pattern_timeout=args.pattern_timeout)
    except ValueError as e:
        if writer is not None:
            writer.abort()
        return error("score", e)
    except BaseException:  # e.g. a model that fails to load: leave no temporary file behind
        if writer is not None:
            writer.abort()
        raise
    try:
        results = scorer.score_prepared(prepared, progress=not args.no_progress)
        first_clash = None
        for lineno, r in zip(lines, results):
            row, clash = output_row(r, lineno, tokens=args.tokens)
            if clash and first_clash is None:
                first_clash = (lineno, clash)
            writer.write(row)
        writer.commit()
    except OutputError as e:  # a full disk, a file too large, ...: the temporary file is already removed
        return error("score", e)
    except BaseException:
        writer.abort()
        raise
    if first_clash:
        print(f"freeprm score: note: input keys {first_clash[1]} (first on line {first_clash[0]}) clash with output "
              "keys; they are written under \"meta\"", file=sys.stderr)
    print(f"freeprm score: scored {writer.rows} responses, skipped {len(errors)} malformed lines -> {args.output}",
          file=sys.stderr)
    return 0


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_demo(args) -> int:
    from collections import defaultdict

    path = args.input or str(DEMO_SET)
    try:
        items = [obj for _, obj in load_jsonl(path, on_error="raise")]
        args.step_delimiter = DEFAULT_STEP_DELIMITER
        check_scorer_args(args)
        scorer = make_scorer(args)
    except ValueError as e:
        return error("demo", e)
    print(f"freeprm demo: scoring {len(items)} candidates with policy={args.policy!r} "
          f"reference={args.reference!r} beta={scorer.beta} aggregate={scorer.aggregate_name}")
    results = scorer.score(items, progress=not args.no_progress)
    by_problem = defaultdict(list)
    for item, r in zip(items, results):
        by_problem[item.get("problem_id", "?")].append((item, r))
    picks_ok, min_on_corrupt, n_corrupt = 0, 0, 0
    for pid, cands in by_problem.items():
        print(f"\n=== {pid}: {_clip(cands[0][0]['prompt'], 100)}")
        print(f"    gold answer: {cands[0][0].get('gold')}")
        for item, r in cands:
            tag = "correct" if item.get("correct") else f"wrong (corrupted step {item.get('corrupted_step')})"
            print(f"  candidate {item.get('candidate_id')}  [{tag}]  answer={item.get('answer')}  score={r.score:.3f}")
            print(f"    {'step':>4} {'reward':>9} {'Q':>9}  text")
            for k, text in enumerate(r.steps):
                mark = "<- min" if k == r.step_argmin else ""
                bad = " *" if item.get("corrupted_step") == k else "  "
                print(f"   {bad}{k:>3} {float(r.step_rewards[k]):9.3f} {float(r.q_values[k]):9.3f}  "
                      f"{_clip(text, 70):<70} {mark}")
            if item.get("corrupted_step") is not None:
                n_corrupt += 1
                min_on_corrupt += int(r.step_argmin == item["corrupted_step"])
        best_item, best = max(cands, key=lambda c: c[1].score)  # ties: the first candidate in file order
        ties = sum(1 for _, r in cands if r.score == best.score) - 1
        picks_ok += int(bool(best_item.get("correct")))
        print(f"  pick: candidate {best_item.get('candidate_id')} (score {best.score:.3f}"
              f"{f', tied with {ties} other(s); first in file order wins' if ties else ''}) -> "
              f"{'CORRECT' if best_item.get('correct') else 'wrong'}")
    print(f"\nsummary: picked a correct candidate for {picks_ok}/{len(by_problem)} problems "
          f"(aggregate={scorer.aggregate_name}); the min-reward step was the corrupted step in {min_on_corrupt}/{n_corrupt} "
          f"corrupted candidates. (* marks the corrupted step.)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("score", help="score a JSONL file of (prompt, response/steps) items",
                       description=__doc__, formatter_class=HelpFormatter)
    add_scorer_args(p)
    p.add_argument("--input", "-i", required=True, help="input JSONL, or - for stdin")
    p.add_argument("--output", "-o", required=True, help="output JSONL (written atomically), or - for stdout")
    p.add_argument("--strict", action="store_true", help="a malformed line is fatal (nothing is written)")
    p.add_argument("--max-line-bytes", type=positive_int, default=None,
                   help="longer input lines are reported and skipped unread (default: 32 bytes per token of "
                        "max-length, at least 1 MiB)")
    p.add_argument("--tokens", action="store_true", help="also write per-token rewards and ids")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_score)
    d = sub.add_parser("demo", help="score the bundled GSM8K candidate set and print per-step tables",
                       formatter_class=HelpFormatter)
    add_scorer_args(d)
    d.add_argument("--input", default=None, help=f"candidates JSONL (default: {DEMO_SET.name}, bundled)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)
