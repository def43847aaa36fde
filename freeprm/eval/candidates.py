"""The candidates file (N sampled responses per problem) and the generate stage that fills it.

One JSON object per line, the schema of ``records.py`` (see docs/eval.md)::

    problem_id, candidate_id (int), task, prompt, response, steps (list[str]),
    answer (extracted, or null), correct (bool), gold, [gen (dict of generation settings)]

``generate_candidates`` samples with one of the backends of ``generation.py``:
  * ``transformers``: ``model.generate`` with sampling, the prompts batched (left padding) and
    formatted exactly as the scorer formats them (``freeprm.engine.tokenization.prompt_ids``
    with ``prompt_format``: chat template when the tokenizer has one, by default), so the scorer
    sees the prompt the generator saw. Whole problems are packed into batches of up to
    ``batch_size`` sequences (left padding); each batch is drawn after ``torch.manual_seed`` with
    a seed derived from ``(seed, its first problem_id, its first candidate id)``. So a run is
    reproducible for the same problem list, ``n`` and ``batch_size``; with ``batch_size <= n`` a
    problem's candidates do not depend on the other problems in the run.
  * ``vllm``: used by ``backend="auto"`` when vLLM is importable (GPU machines); it gets the same
    prompt token ids (tested with a stand-in for vLLM; vLLM itself is not installed on CPU machines).

Files are appended to one line per candidate, flushed after each problem; ``read_jsonl`` keeps
the last record of each ``(problem_id, candidate_id)`` so a rerun resumes where it stopped.
The records and backends live in ``records.py`` and ``generation.py``; their public names are
re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..config import DEFAULT_POLICY, DEFAULT_STEP_DELIMITER
from ..engine.tokenization import PROMPT_FORMATS
from ..io import append_jsonl, load_jsonl  # noqa: F401  (append_jsonl: re-exported, the candidates' writer)
from .generation import (  # noqa: F401
    BACKENDS,
    TransformersGenerator,
    derive_seed,
    pack_batches,
    resolve_backend,
    truncate_at_stop,
    vllm_generate,
)
from .records import (  # noqa: F401
    REQUIRED_FIELDS,
    key_of,
    latest_by_key,
    make_record,
    split_response_steps,
    validate_record,
)
from .tasks import Problem

# --------------------------------------------------------------------------- JSONL I/O

def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a candidates/scores JSONL file (``[]`` when it does not exist), through ``freeprm.io``.

    Strict: a bad line raises ``ValueError("PATH:LINE: ...")``, except a cut last line (no final
    newline: an interrupted append), which is dropped with a warning on stderr.
    """
    return [obj for _, obj in read_jsonl_lines(path)]


def read_jsonl_lines(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """``read_jsonl`` with each record's 1-based line number: ``[(line, record)]``."""
    return load_jsonl(path, on_error="raise", allow_truncated_tail=True, missing_ok=True, allow_nan=True)


def generate_candidates(
    problems: Sequence[Problem],
    out_path: str | os.PathLike,
    *,
    model=DEFAULT_POLICY,
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
    step_delimiter: str | None = DEFAULT_STEP_DELIMITER,
    stop: Sequence[str] | None = None,
    prompt_format: str = "auto",
    progress: bool = True,
    generator: TransformersGenerator | None = None,
) -> dict:
    """Append ``n`` candidates per problem to ``out_path``, skipping those already there.

    Returns stats: ``{"generated", "reused", "new_tokens", "seconds", "tokens_per_s"}``.
    ``batch_size`` is the number of sequences per ``generate`` call: whole problems are packed
    into a call while they fit, and a problem with more missing candidates is split.
    ``stop``: strings that end a response (e.g. ``"\\nQuestion:"`` when a few-shot prompt makes
    the model invent the next question); the response is cut before them.
    ``prompt_format``: ``"auto" | "chat" | "raw"``, as for the scorer (both backends honour it;
    a ``generator`` passed in keeps its own).
    """
    import time

    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("n, batch_size and max_new_tokens must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
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
    if prompt_format != "auto":
        gen_info["prompt_format"] = prompt_format
    backend = resolve_backend(backend)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="generating", unit="cand")
    t0 = time.perf_counter()
    try:
        if backend == "vllm":
            pending: dict[str, list[dict]] = {}
            for p, cid, text, ntok in vllm_generate(problems, todo, model, prompts=prompts, seed=seed,
                                                    temperature=temperature, top_p=top_p,
                                                    max_new_tokens=max_new_tokens, stop=stop,
                                                    prompt_format=prompt_format):
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
            gen = generator or TransformersGenerator(model, dtype=dtype, device=device, prompt_format=prompt_format)
            for batch in pack_batches(problems, todo, batch_size):
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
