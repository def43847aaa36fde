"""What scoring returns: ``ScoreResult`` (one response), ``BatchScores`` (padded tensors for RL loops),
``TokenRewards`` (``Scorer.token_rewards(..., with_logprobs=True)``) and the step aggregations (``AGGREGATIONS``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import AGGREGATIONS, DEFAULT_BETA


def aggregate_steps(step_rewards: torch.Tensor, q_values: torch.Tensor, name: str) -> float:
    """``name`` (one of ``AGGREGATIONS``) over step rewards ``[S]`` or, for ``q_*``, Q values ``[S]``; NaN when S = 0."""
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
    token_logprobs: torch.Tensor | None  # [n] log pi (None only with the opt-in fuse_reference=True on Triton)
    ref_logprobs: torch.Tensor | None = None  # [n] log pi_ref; None without a reference (or with fusion)
    beta: float = DEFAULT_BETA
    meta: dict = field(default_factory=dict)  # the item's other keys, passed through

    def aggregate(self, name: str) -> float:
        """The response's score under another aggregation (see ``AGGREGATIONS``)."""
        return aggregate_steps(self.step_rewards, self.q_values, name)

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
class TokenRewards:
    """``Scorer.token_rewards(..., with_logprobs=True)``: fp32 ``[B, T]`` tensors, 0 off the response mask.

    ``rewards = beta * (logp - logp_ref) * response_mask``. ``logp_ref`` is None without a reference;
    ``logp`` and ``logp_ref`` are None only when the opt-in fused kernel ran (``fuse_reference=True``).
    """

    rewards: torch.Tensor  # [B, T] float32
    logp: torch.Tensor | None  # [B, T] float32: log pi at response tokens
    logp_ref: torch.Tensor | None  # [B, T] float32: log pi_ref at response tokens, or None
