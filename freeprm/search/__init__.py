"""PRM-guided step-level search with incremental implicit-PRM scoring (see docs/search.md).

* ``incremental.py``: ``IncrementalScorer`` (pi / pi_ref KV caches per candidate; extend, fork, drop);
* ``generation.py``: step generation (transformers with a KV cache; vLLM) and the step-boundary rule;
* ``algorithms.py``: best-of-N, beam search, DVTS, and ``search()``.
"""

from .algorithms import METHODS, SearchConfig, Searcher, SearchResult, build_searcher, search
from .generation import StepOutput, TransformersStepGenerator, VLLMStepGenerator, cut_step
from .incremental import Candidate, IncrementalScorer, StepScore
from .kvcache import CachedLM, KVState

__all__ = ["METHODS", "CachedLM", "Candidate", "IncrementalScorer", "KVState", "SearchConfig", "SearchResult",
           "Searcher", "StepOutput", "StepScore", "TransformersStepGenerator", "VLLMStepGenerator", "build_searcher",
           "cut_step", "search"]
