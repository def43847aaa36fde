"""RL reward loops: dense implicit process rewards, online PRM updates (PRIME) and PRIME advantages.

``ImplicitPRM`` scores rollouts token by token and learns online from outcome labels;
``prime_advantages`` turns its rewards and the outcomes into RLOO advantages and returns.
Formulas and a runnable example: ``docs/rl.md``.
"""

from .advantages import masked_whiten, prime_advantages
from .prm import ImplicitPRM, Rewards, auroc, encode_batch

__all__ = ["ImplicitPRM", "Rewards", "encode_batch", "prime_advantages", "masked_whiten", "auroc"]
