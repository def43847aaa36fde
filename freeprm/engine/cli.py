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
A malformed line (bad JSON, missing fields, over-length, steps that are not the response) is
reported on stderr with its line number and skipped (counted in the summary); with
``--strict`` it is fatal and nothing is written. The output file is written atomically
(a temporary file renamed into place when all lines are scored).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .loading import DEFAULT_POLICY

DEMO_SET = Path(__file__).resolve().parents[1] / "data" / "demo_gsm8k.jsonl"


def _scorer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default=DEFAULT_POLICY,
                   help="HF dir, hub id, .gguf file, or 'smollm2' (bundled default)")
    p.add_argument("--reference", default=None, help="reference model (same kinds); omit for reference-free")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--step-delimiter", default="\n\n", help="step delimiter (escapes like \\n are understood)")
    p.add_argument("--step-pattern", default=None, help="regex that splits steps (overrides --step-delimiter)")
    p.add_argument("--aggregate", default="min", help="min, last, mean, sum, q_min, q_last, q_mean, q_sum")
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "raw"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle (*.bin) checkpoints")


def _make_scorer(args):
    from .scorer import Scorer

    delim = args.step_delimiter.encode().decode("unicode_escape") if args.step_delimiter else None
    return Scorer(args.policy, args.reference, beta=args.beta, step_delimiter=delim, step_pattern=args.step_pattern,
                  aggregate=args.aggregate, prompt_format=args.prompt_format, dtype=args.dtype, device=args.device,
                  max_length=args.max_length, max_batch_tokens=args.max_batch_tokens,
                  trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)


def read_items(path: str, scorer, strict: bool):
    """Parse and validate every line; returns (prepared items, their line numbers, [(line, error)])."""
    prepared, lines, errors = [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                p = scorer.prepare(item, lineno)
            except (json.JSONDecodeError, ValueError) as e:
                msg = str(e).removeprefix(f"item {lineno}: ")
                if isinstance(e, json.JSONDecodeError):
                    msg = f"invalid JSON: {e.msg} (column {e.colno})"
                if strict:
                    raise ValueError(f"{path}:{lineno}: {msg}") from None
                errors.append((lineno, msg))
                print(f"freeprm score: skipping {path}:{lineno}: {msg}", file=sys.stderr)
                continue
            prepared.append(p)
            lines.append(lineno)
    return prepared, lines, errors


def write_jsonl_atomic(path: str, rows) -> None:
    """Write rows as JSONL to a temporary file beside ``path``, then rename it into place."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def cmd_score(args) -> int:
    if not os.path.isfile(args.input):
        print(f"freeprm score: input file not found: {args.input}", file=sys.stderr)
        return 2
    try:
        scorer = _make_scorer(args)
        prepared, lines, errors = read_items(args.input, scorer, args.strict)
    except ValueError as e:
        print(f"freeprm score: {e}", file=sys.stderr)
        return 2
    results = scorer.score_prepared(prepared, progress=not args.no_progress)
    rows = []
    for lineno, r in zip(lines, results):
        row = r.to_dict(tokens=args.tokens)
        row["line"] = lineno
        rows.append(row)
    write_jsonl_atomic(args.output, rows)
    print(f"freeprm score: scored {len(rows)} responses, skipped {len(errors)} malformed lines -> {args.output}",
          file=sys.stderr)
    return 0


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_demo(args) -> int:
    from collections import defaultdict

    path = args.input or str(DEMO_SET)
    with open(path, encoding="utf-8") as f:
        items = [json.loads(line) for line in f if line.strip()]
    args.step_delimiter = "\n\n"
    scorer = _make_scorer(args)
    print(f"freeprm demo: scoring {len(items)} candidates with policy={args.policy!r} "
          f"reference={args.reference!r} beta={args.beta} aggregate={args.aggregate}")
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
          f"(aggregate={args.aggregate}); the min-reward step was the corrupted step in {min_on_corrupt}/{n_corrupt} "
          f"corrupted candidates. (* marks the corrupted step.)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("score", help="score a JSONL file of (prompt, response/steps) items",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _scorer_args(p)
    p.add_argument("--input", "-i", required=True, help="input JSONL")
    p.add_argument("--output", "-o", required=True, help="output JSONL (written atomically)")
    p.add_argument("--strict", action="store_true", help="a malformed line is fatal (nothing is written)")
    p.add_argument("--tokens", action="store_true", help="also write per-token rewards and ids")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_score)
    d = sub.add_parser("demo", help="score the bundled GSM8K candidate set and print per-step tables")
    _scorer_args(d)
    d.add_argument("--input", default=None, help=f"candidates JSONL (default: {DEMO_SET.name}, bundled)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)
