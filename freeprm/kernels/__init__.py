"""Fused ops of the implicit-PRM hot path.

Public functions (see ``ops.py``): ``linear_logprobs``, ``token_rewards``, ``segment_sum``,
``segment_cumsum``, ``segment_reduce``, ``policy_ref_rewards``. Each dispatches with
``impl="auto" | "triton" | "torch"``.
``oracle`` holds the plain-torch definition of every op (test oracle, ``upcast`` flag).
"""

from . import oracle
from .ops import linear_logprobs, policy_ref_rewards, segment_cumsum, segment_reduce, segment_sum, token_rewards

__all__ = ["oracle", "linear_logprobs", "token_rewards", "segment_sum", "segment_cumsum", "segment_reduce",
           "policy_ref_rewards"]
