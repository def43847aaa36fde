"""Build freeprm/data/demo_gsm8k.jsonl: a few GSM8K test problems, each with its gold solution
and corrupted copies (one calculation's result changed, the error carried to the answer).

Deterministic: python scripts/make_demo_set.py [--problems 5] [--corrupted 2] [--seed 0]
"""

import argparse
import json
import random
from pathlib import Path

from freeprm.gsm8k import corrupt_steps, final_answer, gold_steps, read_gsm8k


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--problems", type=int, default=5)
    ap.add_argument("--corrupted", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "freeprm" / "data" / "demo_gsm8k.jsonl"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    rows, n = [], 0
    for idx, rec in enumerate(read_gsm8k("test")):
        steps = gold_steps(rec["answer"])
        if not 3 <= len(steps) <= args.max_steps:
            continue
        variants, seen = [], set()
        for _ in range(10 * args.corrupted):
            c = corrupt_steps(rec["question"], rec["answer"], rng)
            if c is not None and c.answer not in seen:
                seen.add(c.answer)
                variants.append(c)
            if len(variants) == args.corrupted:
                break
        if len(variants) < args.corrupted:
            continue
        gold = final_answer(rec["answer"])
        cands = [dict(steps=steps, answer=gold, correct=True, corrupted_step=None)]
        cands += [dict(steps=c.steps, answer=c.answer, correct=False, corrupted_step=c.step_index) for c in variants]
        rng.shuffle(cands)
        for j, c in enumerate(cands):
            rows.append(dict(problem_id=f"gsm8k-test-{idx}", candidate_id=j, prompt=rec["question"], gold=gold, **c))
        n += 1
        if n == args.problems:
            break
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} candidates for {n} problems to {args.out}")


if __name__ == "__main__":
    main()
