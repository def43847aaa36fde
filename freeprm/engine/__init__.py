"""The scoring engine: ``score()`` and ``Scorer`` (see ``scorer.py``), model loading, steps, log-probs, batching.

Exported: what users call. The building blocks (``batching``, ``items``, ``steps``, ``prefill``, ...) are imported
from their modules."""

from ..config import AGGREGATIONS, DEFAULT_POLICY
from .items import PreparedItem
from .loading import load_model
from .logprobs import sequence_logprobs
from .results import BatchScores, ScoreResult, TokenRewards
from .scorer import Scorer, score

__all__ = ["Scorer", "score", "ScoreResult", "BatchScores", "TokenRewards", "AGGREGATIONS", "DEFAULT_POLICY",
           "load_model", "sequence_logprobs", "PreparedItem"]
