"""The scoring engine: ``score()`` and ``Scorer`` (see ``scorer.py``), model loading, steps, log-probs."""

from .loading import DEFAULT_POLICY, load_model
from .logprobs import naive_sequence_logprobs, sequence_logprobs
from .scorer import AGGREGATIONS, BatchScores, Scorer, ScoreResult, score

__all__ = ["DEFAULT_POLICY", "load_model", "sequence_logprobs", "naive_sequence_logprobs",
           "AGGREGATIONS", "BatchScores", "Scorer", "ScoreResult", "score"]
