"""The scoring engine: ``score()`` and ``Scorer`` (see ``scorer.py``), model loading, steps, log-probs, batching."""

from .batching import length_batches, pad_batch, pad_id_of
from .items import PreparedItem
from .loading import DEFAULT_POLICY, load_model
from .logprobs import sequence_logprobs
from .results import AGGREGATIONS, BatchScores, ScoreResult, TokenRewards
from .scorer import Scorer, score

__all__ = ["DEFAULT_POLICY", "load_model", "sequence_logprobs", "AGGREGATIONS", "BatchScores", "PreparedItem",
           "Scorer", "ScoreResult", "TokenRewards", "score", "pad_batch", "length_batches", "pad_id_of"]
