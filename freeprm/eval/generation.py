"""Candidate generation backends: sampling with ``transformers`` or vLLM, seeds and batching.

Both backends format the prompt with the scorer's own formatter,
``freeprm.engine.tokenization.prompt_ids(tokenizer, prompt, prompt_format)`` (chat template or
raw text, see there), and hand the generator its token ids, so the scorer sees exactly the
prompt the generator saw, whichever backend sampled it.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence

import torch

from ..config import DEFAULT_POLICY
from ..engine.batching import pad_batch, pad_id_of
from ..engine.tokenization import prompt_ids
from .tasks import Problem

BACKENDS = ("auto", "transformers", "vllm")


def truncate_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """``text`` cut before the earliest occurrence of any stop string (unchanged without one)."""
    cut = min((i for i in (text.find(t) for t in (stop or ()) if t) if i >= 0), default=len(text))
    return text[:cut]


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

    def __init__(self, model=DEFAULT_POLICY, *, dtype: str = "float32", device: str | None = None,
                 prompt_format: str = "auto", trust_remote_code: bool = False):
        from ..engine.loading import load_model

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.tokenizer = load_model(model, dtype=dtype, device=self.device,
                                                trust_remote_code=trust_remote_code)
        self.prompt_format = prompt_format
        tok = self.tokenizer
        if tok.pad_token_id is None and tok.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; generation cannot pad or stop")
        self.pad_id = pad_id_of(tok)
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            eos |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        self.eos_ids = sorted(eos)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's token ids, formatted as the scorer formats it (``prompt_format``)."""
        return prompt_ids(self.tokenizer, prompt, self.prompt_format)

    @torch.inference_mode()
    def sample(self, prompt: str, n: int, *, seed: int, temperature: float = 0.7, top_p: float = 0.95,
               max_new_tokens: int = 256, stop: Sequence[str] | None = None) -> list[tuple[str, int]]:
        """``n`` sampled continuations of ``prompt``: ``[(text, number of new tokens)]``."""
        return self.sample_many([prompt] * n, seed=seed, temperature=temperature, top_p=top_p,
                                max_new_tokens=max_new_tokens, stop=stop)

    @torch.inference_mode()
    def sample_many(self, prompts: Sequence[str], *, seed: int, temperature: float = 0.7, top_p: float = 0.95,
                    max_new_tokens: int = 256, stop: Sequence[str] | None = None,
                    share_prefill: bool = True) -> list[tuple[str, int]]:
        """One sampled continuation per prompt, in one left-padded ``generate`` call.

        ``stop``: strings that end a continuation (cut before them); the token count is then
        that of the generated tokens up to the stop, as generated.
        ``share_prefill``: run the forward pass over each *distinct* prompt once (all but its last
        token), copy its KV cache to every row that samples from it, and let ``generate`` go on
        from there. Best-of-N sends N copies of a prompt, so this does 1/N of the prompt work;
        the rows' distributions are the same (the cache holds the same keys and values), only the
        random draws differ from ``share_prefill=False``. See bench/bench_generate.py.
        """
        ids = [self.prompt_ids(p) for p in prompts]
        row_of: dict[tuple[int, ...], int] = {}
        src = [row_of.setdefault(tuple(x), len(row_of)) for x in ids]  # row -> distinct prompt
        share = share_prefill and len(row_of) < len(ids) and min(len(x) for x in ids) > 1
        batch = pad_batch([list(k) for k in row_of] if share else ids, self.pad_id, side="left")  # [U or B, T]
        input_ids, attention_mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        t = input_ids.shape[1]
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=self.pad_id, eos_token_id=self.eos_ids or None)
        if share:
            kwargs["cache"] = self._prefill(input_ids[:, :-1], attention_mask[:, :-1], src)
            idx = torch.tensor(src, device=self.device)
            input_ids, attention_mask = input_ids[idx], attention_mask[idx]  # [B, T]
        torch.manual_seed(seed)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        texts = []
        for row in out[:, t:].tolist():
            n_tok = len(row)
            for j, tok_id in enumerate(row):
                if tok_id in self.eos_ids:
                    n_tok = j
                    break
            texts.append((truncate_at_stop(self.tokenizer.decode(row[:n_tok], skip_special_tokens=True), stop), n_tok))
        return texts

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: Sequence[int]):
        """KV cache of ``input_ids`` ``[U, T-1]`` (left padded), its batch rows then gathered by ``rows`` ``[B]``.

        Positions are those ``generate`` gives left-padded rows (``cumsum(mask) - 1``, 0 at pads), so
        the cached keys are the ones ``generate`` would have computed itself.
        """
        from transformers import DynamicCache

        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   cache=cache, use_cache=True, logits_to_keep=1)
        cache.batch_select_indices(torch.tensor(rows, device=input_ids.device))
        return cache


def vllm_generate(problems: Sequence[Problem], todo: dict[str, list[int]], model: str, *, prompts: dict[str, str],
                  seed: int, temperature: float, top_p: float, max_new_tokens: int, stop=None,
                  prompt_format: str = "auto", problems_per_call: int = 512, llm=None):
    """vLLM backend (GPU only): yields ``(problem, candidate_id, text, n_tokens)``.

    Prompts go to vLLM as token ids from ``prompt_ids`` (as the transformers backend and the
    scorer format them), never as text for vLLM to template or tokenize again. Up to
    ``problems_per_call`` problems go to one ``llm.generate`` call (a list of prompts, one
    ``SamplingParams(n=#missing candidates, seed=...)`` each), so vLLM batches them all; results
    come back problem by problem in input order. ``llm``: an ``LLM`` already built (else one is
    built from ``model``).
    """
    from vllm import LLM, SamplingParams  # noqa: PLC0415

    from ..engine.loading import resolve_spec

    if problems_per_call < 1:
        raise ValueError(f"problems_per_call must be >= 1, got {problems_per_call}")
    work = [p for p in problems if todo.get(p.problem_id)]
    if not work:
        return
    llm = llm if llm is not None else LLM(model=resolve_spec(model), seed=seed)
    tok = llm.get_tokenizer()
    for i in range(0, len(work), problems_per_call):
        chunk = work[i:i + problems_per_call]
        inputs, params = [], []
        for p in chunk:
            cids = todo[p.problem_id]
            inputs.append({"prompt_token_ids": prompt_ids(tok, prompts[p.problem_id], prompt_format)})
            params.append(SamplingParams(n=len(cids), temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                         seed=derive_seed(seed, p.problem_id, cids[0]) % (2**31),
                                         stop=list(stop) if stop else None))
        results = llm.generate(inputs, params, use_tqdm=False)
        if len(results) != len(chunk):
            raise RuntimeError(f"vLLM returned {len(results)} results for {len(chunk)} prompts")
        for p, res in zip(chunk, results):
            cids = todo[p.problem_id]
            if len(res.outputs) != len(cids):
                raise RuntimeError(f"vLLM returned {len(res.outputs)} samples for problem {p.problem_id}, "
                                   f"asked for {len(cids)}")
            for cid, o in zip(cids, res.outputs):
                yield p, cid, o.text, len(o.token_ids)


def pack_batches(problems: Sequence[Problem], todo: dict[str, list[int]], batch_size: int):
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
