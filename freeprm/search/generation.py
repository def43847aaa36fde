"""Step generation: sample each live candidate's next step, stopping at the step delimiter, EOS or a length limit.

**Where a step ends** (``cut_step``; the same rule for every backend, applied to the generated token ids). Let ``s``
be the decoded text of the step's tokens so far (a token carried over from the previous step first, see below).
The step is complete at the first token after which ``s`` contains the delimiter *after some non-whitespace text
of this step* (so a delimiter split across tokens, ``"\\n"`` + ``"\\n"``, or merged with neighbours, ``".\\n\\n"``,
counts; a step that opens with blank lines goes on until it has content). Then:

* if that token's text ends within the delimiter or with whitespace after it (``"\\n\\n"``, ``".\\n\\n"``), it is
  the step's last token;
* if it carries non-whitespace text past the delimiter (a BPE merge across the boundary, ``".\\n\\nThe"``), it is
  **carried over**: it becomes the first token of the next step (it is already generated; its reward is computed
  with that step). This is where ``Scorer``'s text rule puts it too (a token belongs to the step that owns its
  last character), so the search's steps and ``Scorer.score`` of the decoded text agree. Exception: a step's only
  token is never carried (a step needs a token).

Other ends of a step:

* **EOS** (any of the generator's EOS ids): the candidate is finished (status ``"eos"``); the EOS token is not part
  of the response (not scored, not in the text). Tokens before it form a last step (none: no new step).
* **no delimiter within ``max_step_tokens``** sampled tokens: the step ends there (it is scored and ranked like any
  step, and marked ``cut`` in the trace); the candidate goes on, and its next step continues the same text. Its
  text then has no delimiter at this boundary, so ``Scorer.score`` of the text would join the two steps: compare
  such candidates by their token ids and step map (``IncrementalScorer.prepared``).
* **total length** (``max_tokens`` response tokens, or the PRM's ``max_length``): the step ends and the candidate is
  finished (status ``"length"``).

A token carried into a step that is never generated (the search stops) is dropped: a candidate's response is
always ``decode(response_ids)`` of its scored ids.

Backends: ``TransformersStepGenerator`` (any device; KV cache per candidate, ``kvcache.py``, batched over all live
candidates of all prompts, sampling one token per forward; with ``name="policy"`` its cache is the PRM policy's and
the scorer reuses its hidden states) and ``VLLMStepGenerator`` (GPU; prefix caching on, all live candidates of all
prompts in one engine call per step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .incremental import Candidate
from .kvcache import CachedLM

ENDS = ("delimiter", "eos", "step_limit", "length")


@dataclass
class StepOutput:
    """One candidate's generated step: ``ids`` to score now, ``carry`` (0 or 1 id) opening the next step."""

    ids: list[int]
    carry: list[int]
    end: str  # one of ENDS
    sampled: int  # tokens sampled for this step (the generation cost)
    rows: torch.Tensor | None = None  # [len(ids), D] hidden states that predicted ``ids`` (shared policy cache only)
    carry_rows: torch.Tensor | None = None  # [len(carry), D] the same for the carried token


def check_delimiter(tokenizer, delimiter: str) -> None:
    """``ValueError`` unless ``delimiter`` is non-blank text the tokenizer can produce (encode/decode round trip)."""
    if not isinstance(delimiter, str) or not delimiter:
        raise ValueError("step_delimiter must be a non-empty string (e.g. '\\n\\n')")
    ids = tokenizer(delimiter, add_special_tokens=False)["input_ids"]
    if not ids or delimiter not in tokenizer.decode(ids):
        raise ValueError(f"step_delimiter {delimiter!r} never appears in generated text: the tokenizer cannot produce "
                         f"it (it encodes to {ids} and decodes to {tokenizer.decode(ids)!r}); pick a delimiter the "
                         "model's tokenizer can write, e.g. '\\n\\n'")


def _delimiter_after_content(s: str, delimiter: str) -> int:
    """Index of the first ``delimiter`` in ``s`` preceded by non-whitespace text of ``s``, else -1."""
    p = len(s) - len(s.lstrip())
    if p == len(s):
        return -1
    return s.find(delimiter, p + 1)


def cut_step(tokenizer, ids: Sequence[int], delimiter: str, *, carried: int = 0,
             last_only: bool = False) -> tuple[int, int] | None:
    """Apply the step rule (module docstring) to a step's token ids so far.

    Returns None while the step is not complete, else ``(end, j)``: the step is ``ids[:end]`` and ``ids[end:j + 1]``
    (empty, or the one token carried over) opens the next step; ``j`` is the token that completed the delimiter.
    Only the shortest prefix that completes it counts (tokens after ``j`` are not looked at). ``last_only``: check
    only whether the last token completes it (when every shorter prefix was checked already, as while sampling).
    ``carried``: how many leading ids were carried over from the previous step; their text up to and including
    the delimiter they hold closed the previous step and is not searched again.
    """
    skip = 0
    if carried:
        t = tokenizer.decode(list(ids[:carried]))
        k = t.find(delimiter)
        skip = k + len(delimiter) if k >= 0 else 0
    for j in range(len(ids) - 1 if last_only else 0, len(ids)):
        s = tokenizer.decode(list(ids[:j + 1]))[skip:]
        i = _delimiter_after_content(s, delimiter)
        if i < 0:
            continue
        tail = s[i + len(delimiter):]
        if tail.strip() and j > 0:
            return j, j
        return j + 1, j
    return None


def steps_from_ids(tokenizer, ids: Sequence[int], delimiter: str) -> list[list[int]]:
    """The steps the generator would cut from a response it sampled as ``ids`` (the rule above, applied token by
    token, with carry-over); the tokens after the last delimiter form the last step. (Per-step token limits,
    EOS and length limits are the generator's business and not applied here.)"""
    steps, cur, carried = [], [], 0
    for t in ids:
        cur.append(int(t))
        c = cut_step(tokenizer, cur, delimiter, carried=carried, last_only=True)
        if c is not None:
            stop = c[0]
            steps.append(cur[:stop])
            cur = cur[stop:]
            carried = len(cur)
    if cur:
        steps.append(cur)
    return steps


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``logits`` ``[B, V]`` (fp32): greedy at temperature 0, else top-p sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        p, idx = probs.sort(-1, descending=True)
        keep = (p.cumsum(-1) - p) < top_p  # the smallest set whose mass reaches top_p (the top token always)
        p = p * keep
        choice = torch.multinomial(p, 1, generator=gen)[:, 0]
        return idx.gather(-1, choice[:, None])[:, 0]
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def _rooms(cands: Sequence[Candidate], max_tokens: int | Sequence[int]) -> list[int]:
    """Response tokens each candidate may still get (a carried token counts as already there); ``max_tokens``: the
    longest response, one for all or one per candidate."""
    limits = [max_tokens] * len(cands) if isinstance(max_tokens, int) else list(max_tokens)
    if len(limits) != len(cands):
        raise ValueError(f"max_tokens: {len(limits)} limits for {len(cands)} candidates")
    return [m - len(c.response_ids) - len(c.carry) for c, m in zip(cands, limits)]


class TransformersStepGenerator:
    """Step sampling with a ``transformers`` causal LM and a KV cache per candidate (``kvcache.py``).

    ``model`` / ``tokenizer``: the generator; it must share the PRM's tokenizer (its ids are scored as they are).
    ``name``: the key of its cache state in ``Candidate.states``. ``name="policy"`` (what ``build_searcher`` does
    when the generator is the PRM's policy model) makes the generator's cache the policy's: sampling advances
    it, and each ``StepOutput`` carries the hidden states that predicted its tokens (``rows``), from which the
    scorer takes ``log pi`` without running the policy again (``IncrementalScorer.extend(..., policy_rows=)``).
    Sampling: ``temperature`` (0 = greedy) and ``top_p``; randomness from the ``torch.Generator`` passed to
    ``generate_step``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, temperature: float = 0.7, top_p: float = 1.0,
                 eos_ids: Sequence[int] | None = None, name: str = "generator") -> None:
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        from ..engine.batching import pad_id_of

        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.lm = CachedLM(model, pad_id_of(tokenizer))
        self.temperature, self.top_p = float(temperature), float(top_p)
        if eos_ids is None:
            eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
            gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            if gen_eos is not None:
                eos |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
            eos_ids = sorted(eos)
        self.eos_ids = set(int(e) for e in eos_ids)

    def choose(self, logits: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """The next token of each row from its logits ``[B, V]`` (fp32): greedy at temperature 0, else top-p."""
        return _sample(logits, self.temperature, self.top_p, gen)

    @torch.inference_mode()
    def start(self, roots: Sequence[Candidate]) -> None:
        """Run the roots' prompts through the generator (their ``prompt_ids``, as the scorer formatted them); roots
        that already hold a cache under ``name`` (the shared policy cache) are left as they are."""
        todo = [c for c in roots if self.name not in c.states]
        if todo:
            for c, st in zip(todo, self.lm.prefill([c.prompt_ids for c in todo])):
                c.states[self.name] = st

    @torch.inference_mode()
    def generate_step(self, cands: Sequence[Candidate], *, delimiter: str, max_step_tokens: int,
                      max_tokens: int | Sequence[int],
                      generator: torch.Generator | None = None) -> list[StepOutput]:
        """Sample the next step of every candidate (batched; see the module docstring for where a step ends).

        ``max_tokens``: the longest response a candidate may reach (one for all, or one per candidate). Updates each
        candidate's generator state (all sampled tokens, including a carried one, are in its cache); does not touch
        its response or rewards.
        """
        b = len(cands)
        if b == 0:
            return []
        if any(self.name not in c.states for c in cands):
            raise ValueError(f"a candidate has no {self.name!r} cache: call start(roots) before forking the roots")
        was_training = self.model.training
        self.model.eval()
        try:
            return self._generate(cands, delimiter, max_step_tokens, max_tokens, generator)
        finally:
            self.model.train(was_training)

    def _generate(self, cands, delimiter, max_step_tokens, max_tokens, gen) -> list[StepOutput]:
        b = len(cands)
        batch = self.lm.open([c.states[self.name] for c in cands])
        head = self.lm.head
        h = torch.stack([c.states[self.name].last_hidden for c in cands])  # [B, D]
        step = [list(c.carry) for c in cands]
        rows = [list(c.carry_rows) for c in cands]  # hidden states that predicted step[i] (shared policy cache)
        end: list[str | None] = [None] * b
        cut: list[tuple[int, int] | None] = [None] * b
        sampled = [0] * b
        room = _rooms(cands, max_tokens)
        for i in range(b):
            if room[i] <= 0:
                end[i] = "length"
        for _ in range(max_step_tokens):
            if all(e is not None for e in end):
                break
            z = head.logit_scale * (h.float() @ head.weight.float().T)  # [B, V]: one row per candidate (sampling)
            if head.softcap:
                z = head.softcap * torch.tanh(z / head.softcap)
            tok = self.choose(z, gen).tolist()
            col = torch.full((b, 1), self.lm.pad_id, dtype=torch.long)
            valid = torch.zeros((b, 1), dtype=torch.bool)
            for i in range(b):
                if end[i] is not None:
                    continue
                sampled[i] += 1
                if tok[i] in self.eos_ids:
                    end[i] = "eos"
                    continue
                step[i].append(tok[i])
                rows[i].append(h[i])
                col[i, 0], valid[i, 0] = tok[i], True
                c = cut_step(self.tokenizer, step[i], delimiter, carried=len(cands[i].carry), last_only=True)
                if c is not None:
                    end[i], cut[i] = "delimiter", c
                elif len(step[i]) - len(cands[i].carry) >= room[i]:
                    end[i] = "length"
            if not bool(valid.any()):
                break
            h = batch.forward(col, valid)[:, 0]  # [B, D]
        states = batch.states() if batch.new_cols else [c.states[self.name] for c in cands]
        out = []
        for i, c in enumerate(cands):
            c.states[self.name] = states[i]
            e = end[i] or "step_limit"
            stop = cut[i][0] if e == "delimiter" else len(step[i])
            r = torch.stack(rows[i]) if rows[i] else h.new_zeros((0, h.shape[-1]))
            out.append(StepOutput(step[i][:stop], step[i][stop:], e, sampled[i], r[:stop], r[stop:]))
        return out


class VLLMStepGenerator:
    """Step sampling with vLLM (GPU): prefix caching on; all live candidates of all prompts go to the engine in one
    ``generate`` call per search step (a row whose output does not complete a step by ``cut_step`` while vLLM
    stopped it, e.g. a delimiter right at the step's start, is continued in a follow-up call of the same step).

    ``llm``: a ``vllm.LLM`` (or any object with its ``generate(prompts, sampling_params, use_tqdm=...)``); by
    default one is built from ``model`` with ``enable_prefix_caching=True``. Prompts are token ids
    (``{"prompt_token_ids": prompt + response + carry}``), never text. UNTESTED on a real vLLM here (not
    installable on the CPU test machine); its batching is tested against a stand-in that records the calls.
    """

    def __init__(self, model: str | None = None, tokenizer=None, *, llm=None, temperature: float = 0.7,
                 top_p: float = 1.0, seed: int = 0, eos_ids: Sequence[int] | None = None, **llm_kwargs) -> None:
        if llm is None:
            from vllm import LLM  # noqa: PLC0415

            from ..engine.loading import resolve_spec

            llm = LLM(model=resolve_spec(model), enable_prefix_caching=True, seed=seed, **llm_kwargs)
        self.llm = llm
        self.tokenizer = tokenizer if tokenizer is not None else llm.get_tokenizer()
        self.temperature, self.top_p, self.seed = float(temperature), float(top_p), int(seed)
        if eos_ids is None:
            eos_ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        self.eos_ids = set(int(e) for e in eos_ids)
        self.calls = 0
        self._round = 0

    def start(self, roots: Sequence[Candidate]) -> None:
        """Nothing to run ahead: vLLM's prefix cache holds the prompts after the first step."""

    def _params(self, max_tokens: int, delimiter: str, seed: int):
        try:
            from vllm import SamplingParams  # noqa: PLC0415
        except ImportError:  # the stand-in used in tests takes plain dicts
            return dict(n=1, temperature=self.temperature, top_p=self.top_p, max_tokens=max_tokens,
                        stop=[delimiter], include_stop_str_in_output=True, seed=seed)
        return SamplingParams(n=1, temperature=self.temperature, top_p=self.top_p, max_tokens=max_tokens,
                              stop=[delimiter], include_stop_str_in_output=True, seed=seed)

    def generate_step(self, cands: Sequence[Candidate], *, delimiter: str, max_step_tokens: int,
                      max_tokens: int | Sequence[int],
                      generator: torch.Generator | None = None) -> list[StepOutput]:
        b = len(cands)
        step = [list(c.carry) for c in cands]
        room = _rooms(cands, max_tokens)
        end: list[str | None] = ["length" if room[i] <= 0 else None for i in range(b)]
        cut: list[tuple[int, int] | None] = [None] * b
        sampled = [0] * b
        self._round += 1
        while True:
            todo = [i for i in range(b) if end[i] is None]
            if not todo:
                break
            prompts, params = [], []
            for i in todo:
                c = cands[i]
                limit = min(max_step_tokens - sampled[i], room[i] - (len(step[i]) - len(c.carry)))
                prompts.append({"prompt_token_ids": list(c.prompt_ids) + list(c.response_ids) + step[i]})
                seed = (self.seed * 1_000_003 + c.id * 7919 + self._round * 104_729 + sampled[i]) % (2**31)
                params.append(self._params(limit, delimiter, seed))
            outs = self.llm.generate(prompts, params, use_tqdm=False)
            self.calls += 1
            for i, o in zip(todo, outs):
                got = list(o.outputs[0].token_ids)
                c = cands[i]
                n_before = len(step[i])
                for tok in got:
                    sampled[i] += 1
                    if tok in self.eos_ids:
                        end[i] = "eos"
                        break
                    step[i].append(tok)
                    ct = cut_step(self.tokenizer, step[i], delimiter, carried=len(c.carry), last_only=True)
                    if ct is not None:
                        end[i], cut[i] = "delimiter", ct
                        break
                    if len(step[i]) - len(c.carry) >= room[i]:
                        end[i] = "length"
                        break
                if end[i] is None and (sampled[i] >= max_step_tokens or len(step[i]) == n_before):
                    end[i] = "step_limit"  # token limit, or the engine returned nothing (no progress possible)
        out = []
        for i in range(b):
            ids, carry = step[i], []
            if end[i] == "delimiter":
                stop, _ = cut[i]
                ids, carry = step[i][:stop], step[i][stop:]
            out.append(StepOutput(ids, carry, end[i], sampled[i]))
        return out
