"""``score()`` and ``Scorer``: implicit process rewards for (prompt, response) pairs.

For each response token ``y_i``::

    r_i = beta * (log pi(y_i | y_<i) - log pi_ref(y_i | y_<i))      (reference=None: log pi_ref = 0)
    step_reward_k = sum of r_i over the tokens of step k
    q_k = sum_{j<=k} step_reward_j                                  (Q value at the end of step k)
    score = aggregate(step_rewards)   # min by default; also last, mean, sum, and q_* over Q values

Log-probs come from the LM head applied only at response positions, chunked, fp32 logsumexp:
never a ``[tokens x vocab]`` tensor. Items are batched by length with padding and position
ids that restart at each row's first real token, so a response's score does not depend on
what it is batched with. Step segmentation rules are in ``steps.py``, tokenization in
``tokenization.py``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..kernels import ops
from .batching import length_batches, pad_batch, pad_id_of
from .loading import DEFAULT_POLICY, load_model
from .logprobs import scatter_rows, sequence_logprobs, split_lm, target_hidden
from .steps import split_steps, token_steps
from .tokenization import PROMPT_FORMATS, encode

AGGREGATIONS = ("min", "last", "mean", "sum", "q_min", "q_last", "q_mean", "q_sum")


def _aggregate(step_rewards: torch.Tensor, q_values: torch.Tensor, name: str) -> float:
    if name not in AGGREGATIONS:
        raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {name!r}")
    values = q_values if name.startswith("q_") else step_rewards
    op = name.removeprefix("q_")
    if values.numel() == 0:
        return float("nan")
    return float(values[-1] if op == "last" else getattr(values, op)())


@dataclass
class ScoreResult:
    """Rewards of one response. Tensors are float32 on the CPU.

    ``token_rewards[j]`` is the reward of response token ``j`` (``input_ids[response_start + j]``),
    ``token_steps[j]`` its step index; ``step_rewards[k]`` sums the rewards of step ``k``'s tokens
    and ``q_values[k]`` is their running sum.
    """

    score: float  # the aggregate named by ``aggregation``
    aggregation: str
    step_rewards: torch.Tensor  # [S]
    q_values: torch.Tensor  # [S]
    token_rewards: torch.Tensor  # [n] response tokens
    token_steps: torch.Tensor  # [n] long
    input_ids: torch.Tensor  # [T] long: prompt + response
    response_start: int
    steps: list[str]  # text of each step
    step_spans: list[tuple[int, int]]  # (start, end) characters of each step in the response
    token_logprobs: torch.Tensor | None  # [n] log pi (None when the fused reward kernel ran)
    ref_logprobs: torch.Tensor | None = None  # [n] log pi_ref, or None (reference-free, or fused kernel)
    beta: float = 1.0
    meta: dict = field(default_factory=dict)  # the item's other keys, passed through

    def aggregate(self, name: str) -> float:
        """The response's score under another aggregation (see ``AGGREGATIONS``)."""
        return _aggregate(self.step_rewards, self.q_values, name)

    @property
    def step_argmin(self) -> int:
        """Index of the lowest-reward step (the one ``aggregate='min'`` picks)."""
        return int(self.step_rewards.argmin())

    def to_dict(self, tokens: bool = False) -> dict:
        """A JSON-ready dict (the CLI's output schema); ``tokens=True`` adds per-token arrays."""
        out = dict(self.meta)
        out.update(score=self.score, aggregation=self.aggregation, steps=self.steps,
                   step_rewards=self.step_rewards.tolist(), q_values=self.q_values.tolist(),
                   aggregates={a: self.aggregate(a) for a in AGGREGATIONS}, num_tokens=len(self.token_rewards),
                   beta=self.beta)
        if tokens:
            out.update(token_rewards=self.token_rewards.tolist(), token_steps=self.token_steps.tolist(),
                       input_ids=self.input_ids.tolist(), response_start=self.response_start)
        return out


@dataclass
class BatchScores:
    """Padded tensor form for RL loops (B responses, right-padded).

    Equivalent to stacking ``ScoreResult`` fields: ``token_rewards[b, :n_b] == results[b].token_rewards``.
    """

    token_rewards: torch.Tensor  # [B, T_resp] float32, 0 at padding
    mask: torch.Tensor  # [B, T_resp] bool, True at response tokens
    token_steps: torch.Tensor  # [B, T_resp] long, -1 at padding
    step_rewards: torch.Tensor  # [B, S_max] float32, 0 at padding
    step_mask: torch.Tensor  # [B, S_max] bool
    scores: torch.Tensor  # [B] float32, the aggregate


@dataclass
class _Prepared:
    index: int
    input_ids: list[int]
    response_start: int
    token_steps: list[int]
    steps: list[str]
    spans: list[tuple[int, int]]
    meta: dict


class Scorer:
    """Keeps a policy (and optional reference) loaded and scores responses with them.

    Args:
        policy: model spec for ``load_model`` (HF dir, hub id, ``.gguf``, ``"smollm2"``) or ``(model, tokenizer)``.
        reference: the same kinds, or None for reference-free rewards (``log pi_ref = 0``).
        beta: reward scale.
        step_delimiter / step_pattern: how responses split into steps (see ``steps.py``).
        aggregate: default aggregation, one of ``AGGREGATIONS``.
        prompt_format: ``"auto" | "chat" | "raw"`` (see ``tokenization.py``).
        dtype, device: where the models run (device defaults to CUDA when available).
        max_length: longest prompt+response in tokens (default: the model's max positions).
        max_batch_tokens: padded tokens per forward batch.
        padding_side: ``"right"`` or ``"left"``; results do not depend on it.
        impl: kernel dispatch for the log-prob op (``"auto" | "triton" | "torch"``).
        fuse_reference: with a reference and the Triton path, compute ``beta * (log pi - log pi_ref)`` in one
            kernel launch reading both models' hidden states and LM heads. The per-model log-probs are then
            not kept (``ScoreResult.token_logprobs`` / ``ref_logprobs`` are None); pass False to keep them.
    """

    def __init__(
        self,
        policy=DEFAULT_POLICY,
        reference=None,
        *,
        beta: float = 1.0,
        step_delimiter: str | None = "\n\n",
        step_pattern: str | re.Pattern | None = None,
        aggregate: str = "min",
        prompt_format: str = "auto",
        dtype: str | torch.dtype = "float32",
        device: str | torch.device | None = None,
        max_length: int | None = None,
        max_batch_tokens: int = 8192,
        padding_side: str = "right",
        impl: str = "auto",
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        fuse_reference: bool = True,
    ) -> None:
        if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"beta must be a positive finite number, got {beta!r}")
        if aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be >= 1")
        if step_pattern is not None:
            try:
                step_pattern = re.compile(step_pattern) if isinstance(step_pattern, str) else step_pattern
            except re.error as e:
                raise ValueError(f"step_pattern is not a valid regex: {e}") from e
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        opts = dict(dtype=dtype, device=self.device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        self.policy, self.tokenizer = load_model(policy, **opts)
        self.reference = None
        if reference is not None:
            self.reference, ref_tok = load_model(reference, **opts)
            _check_same_vocab(self.tokenizer, ref_tok, self.policy, self.reference)
        self.beta = float(beta)
        self.step_delimiter, self.step_pattern = step_delimiter, step_pattern
        self.aggregate_name, self.prompt_format = aggregate, prompt_format
        cfg = getattr(self.policy.config, "text_config", None) or self.policy.config
        self.max_length = int(max_length or getattr(cfg, "max_position_embeddings", None) or 4096)
        self.max_batch_tokens, self.padding_side, self.impl = max_batch_tokens, padding_side, impl
        self.fuse_reference = fuse_reference
        self.vocab_size = split_lm(self.policy)[1].weight.shape[0]
        self.pad_id = pad_id_of(self.tokenizer)

    # ------------------------------------------------------------------ inputs
    def prepare(self, item: Mapping, index: int = 0) -> _Prepared:
        """Validate one item, split its steps and tokenize it (no model work)."""
        if not isinstance(item, Mapping):
            raise ValueError(f"item {index}: expected a dict with 'prompt' and 'response' or 'steps', got {type(item).__name__}")
        prompt, response, steps = item.get("prompt"), item.get("response"), item.get("steps")
        if not isinstance(prompt, str):
            raise ValueError(f"item {index}: 'prompt' must be a string")
        if response is None and steps is None:
            raise ValueError(f"item {index}: give 'response' (a string) or 'steps' (a list of strings)")
        if steps is not None and (isinstance(steps, str) or not isinstance(steps, Sequence)):
            raise ValueError(f"item {index}: 'steps' must be a list of strings")
        if response is None:
            if not all(isinstance(s, str) for s in steps):
                raise ValueError(f"item {index}: 'steps' must be a list of strings")
            response = (self.step_delimiter or "").join(steps)
        if not isinstance(response, str):
            raise ValueError(f"item {index}: 'response' must be a string")
        try:
            spans = split_steps(response, step_delimiter=self.step_delimiter, step_pattern=self.step_pattern, steps=steps)
            enc = encode(self.tokenizer, prompt, response, self.prompt_format)
        except ValueError as e:
            raise ValueError(f"item {index}: {e}") from None
        if len(enc.input_ids) > self.max_length:
            raise ValueError(f"item {index}: {len(enc.input_ids)} tokens exceed max_length={self.max_length}; "
                             "shorten the prompt/response or pass a larger max_length")
        if max(enc.input_ids) >= self.vocab_size:
            raise ValueError(f"item {index}: token id {max(enc.input_ids)} >= the model's vocabulary {self.vocab_size}; "
                             "the tokenizer does not match the model")
        meta = {k: v for k, v in item.items() if k not in ("prompt", "response", "steps")}
        return _Prepared(index, enc.input_ids, enc.response_start, token_steps(enc.offsets, spans),
                         [response[a:b] for a, b in spans], spans, meta)

    # ------------------------------------------------------------------ compute
    @torch.inference_mode()
    def token_rewards_from_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Tensor form for RL loops: ``(rewards, logp, logp_ref)``, each fp32 ``[B, T]``, 0 off ``response_mask``.

        ``rewards = beta * (logp - logp_ref) * response_mask``; inputs ``[B, T]`` on any padding side.
        ``response_mask[:, 0]`` must be False. ``logp_ref`` is None without a reference; both log-prob
        tensors are None when the fused policy-reference kernel ran (see ``fuse_reference``).
        """
        input_ids, attention_mask, response_mask = (x.to(self.device) for x in (input_ids, attention_mask, response_mask))
        if self._fuse_reference():
            # one kernel launch reads both models' hidden states and LM heads (CUDA / Triton)
            hp, head_p, (b_idx, t_idx) = target_hidden(self.policy, input_ids, attention_mask, response_mask)
            hr, head_r, _ = target_hidden(self.reference, input_ids, attention_mask, response_mask)
            r = ops.policy_ref_rewards(hp, head_p.weight, hr, head_r.weight, input_ids[b_idx, t_idx], self.beta,
                                       logit_scale=head_p.logit_scale, softcap=head_p.softcap, impl=self.impl)
            return scatter_rows(r, b_idx, t_idx, input_ids.shape), None, None
        lp = sequence_logprobs(self.policy, input_ids, attention_mask, response_mask, impl=self.impl)
        lpr = None
        if self.reference is not None:
            lpr = sequence_logprobs(self.reference, input_ids, attention_mask, response_mask, impl=self.impl)
        r = ops.token_rewards(lp, lpr, response_mask, self.beta, impl=self.impl)
        return r, lp, lpr

    def _fuse_reference(self) -> bool:
        """Use the fused policy-minus-reference kernel: Triton dispatch, a reference, the same logit transform."""
        if self.reference is None or not self.fuse_reference:
            return False
        if self.impl == "torch" or (self.impl == "auto" and self.device.type != "cuda"):
            return False
        hp, hr = split_lm(self.policy)[1], split_lm(self.reference)[1]
        return (hp.logit_scale, hp.softcap) == (hr.logit_scale, hr.softcap) and hp.weight.shape[0] == hr.weight.shape[0]

    def _run(self, prepared: list[_Prepared], progress: bool):
        """Per item (in input order): (token_rewards, logp, logp_ref) over its response tokens, on the CPU."""
        out: list = [None] * len(prepared)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prepared), desc="scoring", unit="resp")
        for idx in length_batches([len(p.input_ids) for p in prepared], self.max_batch_tokens):
            batch = [prepared[i] for i in idx]
            pb = pad_batch([p.input_ids for p in batch], self.pad_id, side=self.padding_side,
                           target_starts=[p.response_start for p in batch], device=self.device)
            r, lp, lpr = self.token_rewards_from_ids(pb.input_ids, pb.attention_mask, pb.target_mask)
            r, lp, lpr = (None if x is None else x.cpu() for x in (r, lp, lpr))
            for b, p in enumerate(batch):
                out[p.index] = tuple(None if x is None else pb.unpad(x, b, p.response_start).clone()
                                     for x in (r, lp, lpr))
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return out

    def _step_tensors(self, prepared: list[_Prepared], rewards: list[torch.Tensor]):
        """Flattened step sums and Q values for all items: (step_rewards [S_total], q [S_total], cu_items [B+1])."""
        counts, n_steps = [], []
        for p in prepared:
            counts.append(torch.bincount(torch.tensor(p.token_steps, dtype=torch.long), minlength=len(p.spans)))
            n_steps.append(len(p.spans))
        cu_tok = torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(counts).cumsum(0)])
        cu_items = torch.tensor([0] + n_steps, dtype=torch.long).cumsum(0)
        # segmented reductions on the scoring device (Triton kernels on CUDA), results back on the CPU
        dev = self.device
        values = torch.cat(rewards).to(dev)
        step_rewards = ops.segment_sum(values, cu_tok.to(dev), impl=self.impl)
        q = ops.segment_cumsum(step_rewards, cu_items.to(dev), impl=self.impl)
        return step_rewards.cpu(), q.cpu(), cu_items

    def score(self, items: Iterable[Mapping], *, aggregate: str | None = None, progress: bool = False) -> list[ScoreResult]:
        """Score each item (``{"prompt", "response"}`` and/or ``{"prompt", "steps"}``); results in input order.

        All items are validated before any model work, so a bad item raises ``ValueError``
        (naming its index) and nothing is lost.
        """
        aggregate = aggregate or self.aggregate_name
        if aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
        prepared = [self.prepare(it, i) for i, it in enumerate(items)]
        return self.score_prepared(prepared, aggregate=aggregate, progress=progress)

    def score_prepared(self, prepared: list[_Prepared], *, aggregate: str | None = None,
                       progress: bool = False) -> list[ScoreResult]:
        """Score items already validated by ``prepare`` (results in the order given)."""
        aggregate = aggregate or self.aggregate_name
        prepared = [dataclasses.replace(p, index=i) for i, p in enumerate(prepared)]
        if not prepared:
            return []
        per_item = self._run(prepared, progress)
        step_rewards, q, cu = self._step_tensors(prepared, [x[0] for x in per_item])
        results = []
        for i, p in enumerate(prepared):
            r, lp, lpr = per_item[i]
            sr, qv = step_rewards[cu[i]:cu[i + 1]].clone(), q[cu[i]:cu[i + 1]].clone()
            results.append(ScoreResult(
                score=_aggregate(sr, qv, aggregate), aggregation=aggregate, step_rewards=sr, q_values=qv,
                token_rewards=r, token_steps=torch.tensor(p.token_steps, dtype=torch.long),
                input_ids=torch.tensor(p.input_ids, dtype=torch.long), response_start=p.response_start,
                steps=p.steps, step_spans=p.spans, token_logprobs=lp, ref_logprobs=lpr, beta=self.beta, meta=p.meta))
        return results

    def score_batch(self, items: Iterable[Mapping], *, aggregate: str | None = None) -> BatchScores:
        """Like ``score`` but returns padded ``[B, ...]`` tensors (see ``BatchScores``)."""
        results = self.score(items, aggregate=aggregate)
        b = len(results)
        t = max((len(r.token_rewards) for r in results), default=0)
        s = max((len(r.step_rewards) for r in results), default=0)
        out = BatchScores(torch.zeros(b, t), torch.zeros(b, t, dtype=torch.bool), torch.full((b, t), -1, dtype=torch.long),
                          torch.zeros(b, s), torch.zeros(b, s, dtype=torch.bool), torch.tensor([r.score for r in results]))
        for i, r in enumerate(results):
            n, k = len(r.token_rewards), len(r.step_rewards)
            out.token_rewards[i, :n], out.mask[i, :n], out.token_steps[i, :n] = r.token_rewards, True, r.token_steps
            out.step_rewards[i, :k], out.step_mask[i, :k] = r.step_rewards, True
        return out


def _check_same_vocab(tok_a, tok_b, model_a, model_b) -> None:
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise ValueError("policy and reference tokenizers differ (vocabularies are not identical); the reference "
                         "must share the policy's tokenizer. Use a reference from the same model family, or none")
    va, vb = split_lm(model_a)[1].weight.shape[0], split_lm(model_b)[1].weight.shape[0]
    if min(va, vb) < len(tok_a):
        raise ValueError(f"LM head sizes ({va}, {vb}) do not cover the tokenizer's {len(tok_a)} tokens")


def score(
    items: Iterable[Mapping],
    policy=DEFAULT_POLICY,
    reference=None,
    *,
    beta: float = 1.0,
    step_delimiter: str | None = "\n\n",
    aggregate: str = "min",
    progress: bool = False,
    **scorer_kwargs,
) -> list[ScoreResult]:
    """Implicit process rewards of ``items``; a thin wrapper over ``Scorer(...).score(items)``.

    ``results[i].score`` is the min step reward by default; see ``ScoreResult`` for the fields.
    Other keyword arguments go to ``Scorer`` (``step_pattern``, ``prompt_format``, ``dtype``, ...).
    For repeated calls, build one ``Scorer`` and keep it: this function loads the models each time.
    """
    scorer = Scorer(policy, reference, beta=beta, step_delimiter=step_delimiter, aggregate=aggregate, **scorer_kwargs)
    return scorer.score(items, progress=progress)
