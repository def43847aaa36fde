"""What every adapter needs from a reward model, written against a duck-typed contract.

An adapter accepts either a ``freeprm.engine.Scorer`` or a ``freeprm.rl.ImplicitPRM`` (anything with
the same two methods):

* ``score(items, *, aggregate=...) -> list[ScoreResult]`` (the ``Scorer.score`` contract: items are
  ``{"prompt": str, "response": str, ...}`` dicts, results in input order);
* dense token rewards over token tensors: ``token_rewards(input_ids, attention_mask, response_mask) ->
  Tensor[B, T]`` (``freeprm.engine.protocols.TokenRewardSource``: ``Scorer`` and ``ImplicitPRM``), or the
  older ``token_rewards_from_ids(...)``, which returns the rewards either as the first element of a tuple
  ``(rewards, logp, logp_ref)`` or as the ``.rewards`` field of a result object; ``dense_rewards`` accepts
  all of these forms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


def check_reward_model(prm) -> None:
    """``ValueError`` unless ``prm`` has a ``score`` method (a Scorer or an ImplicitPRM)."""
    if not callable(getattr(prm, "score", None)):
        raise ValueError(f"expected a freeprm.engine.Scorer or freeprm.rl.ImplicitPRM (an object with .score(items)), "
                         f"got {type(prm).__name__}")


def score_items(prm, items: Sequence[Mapping], aggregate: str | None) -> list:
    """``prm.score(items, aggregate=aggregate)`` (the Scorer's default aggregation when None)."""
    if not items:
        return []
    if aggregate is None:
        return list(prm.score(list(items)))
    return list(prm.score(list(items), aggregate=aggregate))


def dense_rewards(prm, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  response_mask: torch.Tensor) -> torch.Tensor:
    """Token rewards ``[B, T]`` (fp32, 0 off ``response_mask``) from whichever tensor method ``prm`` has.

    Equivalent to ``beta * (log pi(x_t | x_<t) - log pi_ref(x_t | x_<t)) * response_mask`` computed by
    ``prm``; inputs ``[B, T]`` on any padding side.
    """
    if callable(getattr(prm, "token_rewards", None)):  # freeprm.engine.protocols.TokenRewardSource
        out = prm.token_rewards(input_ids, attention_mask, response_mask)
    elif callable(getattr(prm, "token_rewards_from_ids", None)):  # the Scorer's deprecated name
        out = prm.token_rewards_from_ids(input_ids, attention_mask, response_mask)
    else:
        raise ValueError(f"{type(prm).__name__} has neither token_rewards(...) nor token_rewards_from_ids(...); "
                         "pass a freeprm.engine.Scorer or a freeprm.rl.ImplicitPRM")
    return _rewards_of(out)


def _rewards_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    rewards = getattr(out, "rewards", None)
    if isinstance(rewards, torch.Tensor):
        return rewards
    raise ValueError(f"token rewards came back as {type(out).__name__}; expected a Tensor, a (rewards, ...) tuple "
                     "or an object with a .rewards Tensor")


def finite_or_none(x: float) -> float | None:
    """``float(x)``, or None when it is NaN/inf (a response with no steps has a NaN min)."""
    x = float(x)
    return x if math.isfinite(x) else None


def model_version(prm):
    """``prm.version`` (ImplicitPRM counts its updates) or None."""
    v = getattr(prm, "version", None)
    return v if isinstance(v, (int, float, str)) else None
