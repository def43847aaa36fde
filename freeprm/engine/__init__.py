"""The scoring engine: ``score()`` and ``Scorer`` (see ``scorer.py``), model loading, steps, log-probs."""

from .loading import DEFAULT_POLICY, load_model
from .logprobs import naive_sequence_logprobs, sequence_logprobs

__all__ = ["DEFAULT_POLICY", "load_model", "sequence_logprobs", "naive_sequence_logprobs"]

try:  # the scorer lands in its own commit
    from .scorer import AGGREGATIONS, BatchScores, Scorer, ScoreResult, score  # noqa: F401

    __all__ += ["AGGREGATIONS", "BatchScores", "Scorer", "ScoreResult", "score"]
except ImportError as _e:  # pragma: no cover
    if "scorer" not in str(_e):
        raise
