"""Candidate generation (N sampled responses per problem) and the candidates JSONL file.

Schema, one JSON object per line (see docs/eval.md)::

    problem_id, candidate_id (int), task, prompt, response, steps (list[str]),
    answer (extracted, or null), correct (bool), gold, [gen (dict of generation settings)]

Backends:
  * ``transformers``: ``model.generate`` with sampling, the prompts batched (left padding) and
    formatted exactly as the scorer formats them (``freeprm.engine.tokenization.prompt_ids``, chat
    template when the tokenizer has one), so the scorer sees the prompt the generator saw.
    Whole problems are packed into batches of up to ``batch_size`` sequences (left padding);
    each batch is drawn after ``torch.manual_seed`` with a seed derived from ``(seed, its first
    problem_id, its first candidate id)``. So a run is reproducible for the same problem list,
    ``n`` and ``batch_size``; with ``batch_size <= n`` a problem's candidates do not depend on
    the other problems in the run.
  * ``vllm``: used by ``backend="auto"`` when vLLM is importable (GPU machines). Thin and
    untested on CPU-only machines.

Files are appended to one line per candidate, flushed after each problem; ``read_jsonl`` keeps
the last record of each ``(problem_id, candidate_id)`` so a rerun resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..engine.steps import split_steps
from .grading import grade
from .tasks import GRADER_TASK, Problem

BACKENDS = ("auto", "transformers", "vllm")
REQUIRED_FIELDS = ("problem_id", "candidate_id", "prompt", "response")


# --------------------------------------------------------------------------- JSONL I/O

def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file; a truncated last line (an interrupted write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n >= len(lines) - 2:  # the last line, cut by an interrupted run
                continue
            raise ValueError(f"{path}:{n + 1}: not valid JSON ({e})") from None
    return out


def append_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Append records, one line each, flushed; a cut last line (an interrupted write) is dropped first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size > 0:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def key_of(record: dict) -> tuple[str, int]:
    return str(record["problem_id"]), int(record["candidate_id"])


def latest_by_key(records: Iterable[dict]) -> dict[tuple[str, int], dict]:
    """The last record of each (problem_id, candidate_id), in first-seen order."""
    out: dict[tuple[str, int], dict] = {}
    for r in records:
        out[key_of(r)] = r
    return out


def split_response_steps(response: str, step_delimiter: str | None = "\n\n") -> list[str]:
    """The response's steps as strings (the engine's segmentation), ``[]`` for an empty response."""
    if not response.strip():
        return []
    return [response[a:b] for a, b in split_steps(response, step_delimiter=step_delimiter)]


def make_record(problem: Problem, candidate_id: int, prompt: str, response: str, *,
                step_delimiter: str | None = "\n\n", gen: dict | None = None) -> dict:
    """One candidates-file record: steps split, answer extracted and graded."""
    answer, correct = grade(response, problem.gold, problem.grader_task)
    rec = {"problem_id": problem.problem_id, "candidate_id": int(candidate_id), "task": problem.task,
           "prompt": prompt, "response": response, "steps": split_response_steps(response, step_delimiter),
           "answer": answer, "correct": bool(correct), "gold": problem.gold}
    if gen:
        rec["gen"] = gen
    return rec


def validate_record(rec: dict, where: str = "") -> dict:
    """Check a (possibly user-made) record; fill ``steps`` / ``answer`` / ``correct`` when missing and gradable."""
    missing = [k for k in REQUIRED_FIELDS if k not in rec]
    if missing:
        raise ValueError(f"{where}candidate record lacks {missing}; required: {list(REQUIRED_FIELDS)}")
    if not isinstance(rec["response"], str) or not isinstance(rec["prompt"], str):
        raise ValueError(f"{where}'prompt' and 'response' must be strings")
    try:
        rec["candidate_id"] = int(rec["candidate_id"])
    except (TypeError, ValueError):
        raise ValueError(f"{where}candidate_id must be an integer, got {rec['candidate_id']!r}") from None
    rec["problem_id"] = str(rec["problem_id"])
    if "steps" not in rec or rec["steps"] is None:
        rec["steps"] = split_response_steps(rec["response"])
    if "answer" not in rec or "correct" not in rec:
        task, gold = rec.get("task"), rec.get("gold")
        if task not in GRADER_TASK or gold is None:
            raise ValueError(f"{where}record has no 'answer'/'correct' and no 'task' ({'|'.join(GRADER_TASK)}) "
                             "+ 'gold' to grade it with")
        rec["answer"], rec["correct"] = grade(rec["response"], gold, GRADER_TASK[task])
    rec["correct"] = bool(rec["correct"])
    return rec


def truncate_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """``text`` cut before the earliest occurrence of any stop string (unchanged without one)."""
    cut = min((i for i in (text.find(t) for t in (stop or ()) if t) if i >= 0), default=len(text))
    return text[:cut]


# --------------------------------------------------------------------------- seeds

def derive_seed(seed: int, problem_id: str, candidate_id: int) -> int:
    h = hashlib.sha256(f"{seed}:{problem_id}:{candidate_id}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        has_vllm = importlib.util.find_spec("vllm") is not None
        return "vllm" if has_vllm and torch.cuda.is_available() else "transformers"
    return backend


# --------------------------------------------------------------------------- transformers backend

class TransformersGenerator:
    """Sampling with ``model.generate``; keeps the model loaded across calls."""

    def __init__(self, model="smollm2", *, dtype: str = "float32", device: str | None = None,
                 prompt_format: str = "auto", trust_remote_code: bool = False):
        from ..engine.loading import load_model

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.tokenizer = load_model(model, dtype=dtype, device=self.device,
                                                trust_remote_code=trust_remote_code)
        self.prompt_format = prompt_format
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; generation cannot pad or stop")
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            eos |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        self.eos_ids = sorted(eos)

    def prompt_ids(self, prompt: str) -> list[int]:
        from ..engine.tokenization import prompt_ids

        return prompt_ids(self.tokenizer, prompt, self.prompt_format)

    @torch.inference_mode()
    def sample(self, prompt: str, n: int, *, seed: int, temperature: float = 0.7, top_p: float = 0.95,
               max_new_tokens: int = 256, stop: Sequence[str] | None = None) -> list[tuple[str, int]]:
        """``n`` sampled continuations of ``prompt``: ``[(text, number of new tokens)]``."""
        return self.sample_many([prompt] * n, seed=seed, temperature=temperature, top_p=top_p,
                                max_new_tokens=max_new_tokens, stop=stop)

    @torch.inference_mode()
    def sample_many(self, prompts: Sequence[str], *, seed: int, temperature: float = 0.7, top_p: float = 0.95,
                    max_new_tokens: int = 256, stop: Sequence[str] | None = None) -> list[tuple[str, int]]:
        """One sampled continuation per prompt, in one left-padded ``generate`` call.

        ``stop``: strings that end a continuation (cut before them); the token count is then
        that of the generated tokens up to the stop, as generated.
        """
        rows = [self.prompt_ids(p) for p in prompts]
        t = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), t), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), t), dtype=torch.long)
        for b, r in enumerate(rows):  # [B, T] left padding
            input_ids[b, t - len(r):] = torch.tensor(r)
            attn[b, t - len(r):] = 1
        torch.manual_seed(seed)
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=self.pad_id, eos_token_id=self.eos_ids or None)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attn.to(self.device), **kwargs)
        texts = []
        for row in out[:, t:].tolist():
            n_tok = len(row)
            for j, tok_id in enumerate(row):
                if tok_id in self.eos_ids:
                    n_tok = j
                    break
            texts.append((truncate_at_stop(self.tokenizer.decode(row[:n_tok], skip_special_tokens=True), stop), n_tok))
        return texts


def _vllm_generate(problems: Sequence[Problem], todo: dict[str, list[int]], model: str, *, prompts: dict[str, str],
                   seed: int, temperature: float, top_p: float, max_new_tokens: int, stop=None):
    """vLLM backend (GPU only; untested on CPU machines): yields ``(problem, candidate_id, text, n_tokens)``."""
    from vllm import LLM, SamplingParams  # noqa: PLC0415

    from ..engine.loading import resolve_spec

    llm = LLM(model=resolve_spec(model), seed=seed)
    tok = llm.get_tokenizer()
    for p in problems:
        cids = todo.get(p.problem_id)
        if not cids:
            continue
        text = tok.apply_chat_template([{"role": "user", "content": prompts[p.problem_id]}], add_generation_prompt=True,
                                       tokenize=False) if getattr(tok, "chat_template", None) else prompts[p.problem_id]
        params = SamplingParams(n=len(cids), temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                seed=derive_seed(seed, p.problem_id, cids[0]) % (2**31), stop=list(stop) if stop else None)
        outs = llm.generate([text], params, use_tqdm=False)[0].outputs
        for cid, o in zip(cids, outs):
            yield p, cid, o.text, len(o.token_ids)


def _pack(problems: Sequence[Problem], todo: dict[str, list[int]], batch_size: int):
    """Batches of ``(problem, candidate_id)``: whole problems packed up to ``batch_size`` rows
    (a problem with more missing candidates than that is split into chunks)."""
    cur: list = []
    for p in problems:
        cids = todo[p.problem_id]
        if cur and len(cur) + len(cids) > batch_size:
            yield cur
            cur = []
        for c in cids:
            cur.append((p, c))
            if len(cur) == batch_size:
                yield cur
                cur = []
    if cur:
        yield cur


def generate_candidates(
    problems: Sequence[Problem],
    out_path: str | os.PathLike,
    *,
    model="smollm2",
    n: int = 8,
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    backend: str = "auto",
    dtype: str = "float32",
    device: str | None = None,
    prompt_template: str | None = None,
    step_delimiter: str | None = "\n\n",
    stop: Sequence[str] | None = None,
    progress: bool = True,
    generator: TransformersGenerator | None = None,
) -> dict:
    """Append ``n`` candidates per problem to ``out_path``, skipping those already there.

    Returns stats: ``{"generated", "reused", "new_tokens", "seconds", "tokens_per_s"}``.
    ``batch_size`` is the number of sequences per ``generate`` call: whole problems are packed
    into a call while they fit, and a problem with more missing candidates is split.
    ``stop``: strings that end a response (e.g. ``"\\nQuestion:"`` when a few-shot prompt makes
    the model invent the next question); the response is cut before them.
    """
    import time

    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("n, batch_size and max_new_tokens must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
    ids = [p.problem_id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError("problem ids are not unique")
    have = latest_by_key(read_jsonl(out_path))
    todo = {p.problem_id: [c for c in range(n) if (p.problem_id, c) not in have] for p in problems}
    reused = sum(n - len(v) for v in todo.values())
    total = sum(len(v) for v in todo.values())
    stats = {"generated": 0, "reused": reused, "new_tokens": 0, "seconds": 0.0}
    if total == 0:
        stats["tokens_per_s"] = 0.0
        return stats
    prompts = {p.problem_id: p.prompt(prompt_template) for p in problems}
    gen_info = dict(model=str(model) if not isinstance(model, tuple) else "<object>", temperature=temperature,
                    top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    if stop:
        gen_info["stop"] = list(stop)
    backend = resolve_backend(backend)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="generating", unit="cand")
    t0 = time.perf_counter()
    try:
        if backend == "vllm":
            pending: dict[str, list[dict]] = {}
            for p, cid, text, ntok in _vllm_generate(problems, todo, model, prompts=prompts, seed=seed,
                                                     temperature=temperature, top_p=top_p,
                                                     max_new_tokens=max_new_tokens, stop=stop):
                rec = make_record(p, cid, prompts[p.problem_id], text, step_delimiter=step_delimiter,
                                  gen={**gen_info, "backend": "vllm", "new_tokens": ntok})
                pending.setdefault(p.problem_id, []).append(rec)
                stats["generated"] += 1
                stats["new_tokens"] += ntok
                if bar is not None:
                    bar.update(1)
                if len(pending[p.problem_id]) == len(todo[p.problem_id]):
                    append_jsonl(out_path, pending.pop(p.problem_id))
        else:
            gen = generator or TransformersGenerator(model, dtype=dtype, device=device)
            for batch in _pack(problems, todo, batch_size):
                first_p, first_c = batch[0]
                outs = gen.sample_many([prompts[p.problem_id] for p, _ in batch],
                                       seed=derive_seed(seed, first_p.problem_id, first_c),
                                       temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                       stop=stop)
                recs = []
                for (p, cid), (text, ntok) in zip(batch, outs):
                    recs.append(make_record(p, cid, prompts[p.problem_id], text, step_delimiter=step_delimiter,
                                            gen={**gen_info, "backend": "transformers", "new_tokens": ntok}))
                    stats["new_tokens"] += ntok
                append_jsonl(out_path, recs)
                stats["generated"] += len(recs)
                if bar is not None:
                    bar.update(len(recs))
                    bar.set_postfix(tok_s=f"{stats['new_tokens'] / (time.perf_counter() - t0):.1f}")
    finally:
        if bar is not None:
            bar.close()
    stats["seconds"] = time.perf_counter() - t0
    stats["tokens_per_s"] = stats["new_tokens"] / max(stats["seconds"], 1e-9)
    return stats
