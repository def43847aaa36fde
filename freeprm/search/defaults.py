"""The scoring defaults search builds on, in one place (switch to ``freeprm.config`` when it exists)."""

try:  # the shared scoring configuration (freeprm/config.py), once it is on main
    from ..config import DEFAULT_BETA, DEFAULT_STEP_DELIMITER
except ImportError:  # the engine's current defaults (Scorer's signature)
    DEFAULT_BETA = 1.0
    DEFAULT_STEP_DELIMITER = "\n\n"

DEFAULT_AGGREGATE = "min"  # Scorer's default aggregation

__all__ = ["DEFAULT_AGGREGATE", "DEFAULT_BETA", "DEFAULT_STEP_DELIMITER"]
