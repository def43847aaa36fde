"""freeprm: kernel-accelerated scoring and training of implicit process reward models.

An implicit PRM is a causal LM ``pi`` read against a reference ``pi_ref``:
``r_i = beta * (log pi(y_i | y_<i) - log pi_ref(y_i | y_<i))`` (arXiv 2412.01981).

The API users call, importable from here (each loaded on first use, so ``import freeprm`` stays light)::

    from freeprm import score, Scorer, ScoringConfig, ImplicitPRM, train, rerank, search

``search`` is the ``freeprm.search`` package, callable as its ``search()`` (step-level PRM-guided search).

Subpackages:
    freeprm.config   ScoringConfig: beta, reference, step split, aggregation, ... (docs/config.md)
    freeprm.kernels  fused ops (Triton on CUDA) and their plain-torch references
    freeprm.engine   score(), Scorer: loading, tokenization, steps, batching
    freeprm.trainer  losses over log-probs and a small trainer
    freeprm.eval     best-of-N evaluation
    freeprm.batch    rerank(): streaming, resumable, optionally on Ray
    freeprm.rl       ImplicitPRM for RL loops
    freeprm.search   search(): best-of-N, beam search, DVTS with incremental scoring
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "score": "freeprm.engine.scorer",
    "Scorer": "freeprm.engine.scorer",
    "ScoringConfig": "freeprm.config",
    "ImplicitPRM": "freeprm.rl",
    "train": "freeprm.trainer",
    "rerank": "freeprm.batch.rerank",
}

# subpackages that are themselves an entry point (``freeprm.search`` is callable as ``search()``)
_LAZY_MODULES = {"search": "freeprm.search"}

__all__ = ["score", "Scorer", "ScoringConfig", "ImplicitPRM", "train", "rerank", "search", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _LAZY_MODULES:
        return importlib.import_module(_LAZY_MODULES[name])  # the import binds it as freeprm.search
    raise AttributeError(f"module 'freeprm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_MODULES))
