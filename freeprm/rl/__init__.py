"""RL reward loops: dense implicit process rewards, online PRM updates (PRIME) and PRIME advantages.

``ImplicitPRM`` scores rollouts token by token and learns online from outcome labels;
``prime_advantages`` turns its rewards and the outcomes into RLOO advantages and returns.
Formulas and a runnable example: ``docs/rl.md``.

Modules: ``prm.py`` (``ImplicitPRM``), ``reference.py`` (the kinds of ``pi_ref``), ``update.py`` (the online
update over the trainer's loss registry), ``checkpoint.py`` (save / load), ``batch.py`` (``encode_batch`` and
the batch checks), ``advantages.py``. Step placement is ``freeprm.engine.steps.step_rewards_on_last_token``;
``auroc`` lives in ``freeprm.eval.metrics``.
"""

from .advantages import masked_whiten, prime_advantages
from .batch import encode_batch
from .prm import ImplicitPRM, Rewards

__all__ = ["ImplicitPRM", "Rewards", "encode_batch", "prime_advantages", "masked_whiten"]


def __getattr__(name: str):
    if name == "auroc":  # moved to freeprm.eval.metrics; this alias is removed in the next release
        import warnings

        from ..eval.metrics import auroc

        warnings.warn("freeprm.rl.auroc is deprecated; import freeprm.eval.metrics.auroc", DeprecationWarning,
                      stacklevel=2)
        return auroc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
