"""What ``freeprm.search`` exports, and the root entry: ``from freeprm import search`` is the package, callable as
its ``search()``."""

import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = {"IncrementalScorer", "SearchConfig", "SearchResult", "Searcher", "StepOutput", "TransformersStepGenerator",
          "VLLMStepGenerator", "build_searcher", "search"}


def test_search_exports_only_what_users_call():
    import freeprm.search as pkg

    assert set(pkg.__all__) == PUBLIC
    assert all(hasattr(pkg, n) for n in PUBLIC)
    for name in ("Candidate", "StepScore", "CachedLM", "KVState", "cut_step", "METHODS"):
        assert not hasattr(pkg, name), name  # internals: imported from their modules
    from freeprm.search.algorithms import METHODS  # noqa: F401
    from freeprm.search.generation import cut_step  # noqa: F401
    from freeprm.search.incremental import Candidate, StepScore  # noqa: F401
    from freeprm.search.kvcache import CachedLM, KVState  # noqa: F401


def test_root_search_entry_is_lazy_and_callable():
    code = ("import sys, freeprm; light = 'torch' not in sys.modules; from freeprm import search; "
            "import freeprm.search as pkg; from freeprm.search import search as fn; "
            "print(light, search is pkg is freeprm.search, callable(search), fn is not search, "
            "'search' in freeprm.__all__ and 'search' in dir(freeprm))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True"] * 5
    import freeprm
    from freeprm.search import algorithms

    assert inspect.signature(freeprm.search) == inspect.signature(algorithms.search)


def test_root_search_call_is_search(tiny_scorer):
    import freeprm
    from freeprm.search import algorithms

    kw = dict(scorer=tiny_scorer, method="best_of_n", n=2, max_steps=2, max_step_tokens=4, temperature=1.0, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = freeprm.search(["What is 2 + 2?"], **kw)
        b = algorithms.search(["What is 2 + 2?"], **kw)
    assert [r.to_dict() for r in a] == [r.to_dict() for r in b] and a[0].candidates
    with pytest.raises(ValueError, match="prompts must be"):
        freeprm.search([], **kw)
