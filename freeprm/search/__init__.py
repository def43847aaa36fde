"""PRM-guided step-level search with incremental implicit-PRM scoring (see docs/search.md).

``freeprm.search`` is also the search entry itself: ``from freeprm import search; search(prompts, policy, ...)``
calls ``freeprm.search.search`` (this package is callable), so one name serves both.

* ``incremental.py``: ``IncrementalScorer`` (pi / pi_ref KV caches per candidate; extend, fork, drop);
* ``generation.py``: step generation (transformers with a KV cache; vLLM) and the step-boundary rule;
* ``algorithms.py``: best-of-N, beam search, DVTS, and ``search()``.

Exported: what users call (``search``, ``SearchConfig``, ``SearchResult``, ``Searcher``, ``build_searcher``,
``IncrementalScorer``, the step generators and ``StepOutput``, what a custom generator returns). The internals
(``Candidate``, ``StepScore``, ``CachedLM``, ``KVState``, ``cut_step``, ``METHODS``) are imported from their modules.
"""

import sys
import types

from .algorithms import SearchConfig, Searcher, SearchResult, build_searcher, search
from .generation import StepOutput, TransformersStepGenerator, VLLMStepGenerator
from .incremental import IncrementalScorer

__all__ = ["IncrementalScorer", "SearchConfig", "SearchResult", "Searcher", "StepOutput", "TransformersStepGenerator",
           "VLLMStepGenerator", "build_searcher", "search"]


class _SearchPackage(types.ModuleType):
    """The ``freeprm.search`` package, callable as its ``search`` function (``freeprm.search(prompts, ...)``)."""

    def __call__(self, *args, **kwargs):
        return search(*args, **kwargs)

    @property
    def __signature__(self):  # inspect.signature(freeprm.search) is that of search()
        import inspect

        return inspect.signature(search)


sys.modules[__name__].__class__ = _SearchPackage
