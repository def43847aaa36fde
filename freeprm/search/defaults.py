"""The scoring defaults search builds on, from the shared scoring configuration (``freeprm/config.py``)."""

from ..config import AGGREGATIONS, DEFAULT_AGGREGATE, DEFAULT_BETA, DEFAULT_STEP_DELIMITER, ScoringConfig

SCORING_OPTIONS = ("beta", "reference", "prompt_format", "dtype", "max_length")
"""``ScoringConfig`` fields a search takes from its caller (the step split and the aggregation are search options)."""

__all__ = ["AGGREGATIONS", "DEFAULT_AGGREGATE", "DEFAULT_BETA", "DEFAULT_STEP_DELIMITER", "SCORING_OPTIONS",
           "ScoringConfig"]
