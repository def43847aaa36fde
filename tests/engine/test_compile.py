"""``Scorer(compile=True)``: the base models run through ``torch.compile`` and give the eager results up to
float rounding, on the padded, packed and shared-prompt paths."""

import pytest
import torch

from freeprm.engine import Scorer, load_model
from freeprm.engine.logprobs import split_lm

PROMPT = "Tom has 3 apples and buys 4 more. How many?"
ITEMS = [
    {"prompt": PROMPT, "response": "3 + 4 = 7.\n\nThe answer is 7."},
    {"prompt": PROMPT, "response": "He has 7.\n\n#### 7"},
    {"prompt": "What is 2 + 2?", "response": "2 + 2 = 4"},
    {"prompt": "A longer, different prompt about trains leaving stations at noon?", "steps": ["It is 5.", "So 5."]},
]


def test_compiled_scorer_equals_eager(tiny_model_dir):
    torch._dynamo.reset()
    eager_model, tok = load_model(tiny_model_dir)
    model, _ = load_model(tiny_model_dir)
    compiled = Scorer((model, tok), compile=True, pack=True)
    assert split_lm(model)[0]._compiled_call_impl is not None
    from torch._dynamo.utils import counters

    counters.clear()
    got = compiled.score(ITEMS)
    assert counters["stats"]["unique_graphs"] > 0  # the compiled forward ran
    want = Scorer((eager_model, tok), pack=True).score(ITEMS)
    for x, y in zip(got, want):
        torch.testing.assert_close(x.token_rewards, y.token_rewards, atol=1e-4, rtol=1e-4)
        assert abs(x.score - y.score) <= 1e-4
    again = compiled.score(ITEMS[:3])  # other shapes: dynamic, no error
    for x, y in zip(again, want):
        torch.testing.assert_close(x.token_rewards, y.token_rewards, atol=1e-4, rtol=1e-4)


def test_compile_must_be_a_bool(tiny_model_dir):
    with pytest.raises(ValueError, match="compile must be"):
        Scorer(tiny_model_dir, compile="yes")
