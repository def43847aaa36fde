"""Logit soft-capping (Gemma 2/3) and logit scaling (Granite, Cohere) match the models' own logits."""

import pytest
import torch

from freeprm.engine import Scorer
from freeprm.engine.logprobs import split_lm, target_hidden
from freeprm.kernels import oracle
from freeprm.testing import make_tiny_tokenizer


def tiny(kind, vocab):
    import transformers

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=None, bos_token_id=None,
                  eos_token_id=None)
    if kind == "gemma2":
        cfg = transformers.Gemma2Config(head_dim=8, final_logit_softcapping=3.0, **common)
        cls = transformers.Gemma2ForCausalLM
    elif kind == "granite":
        cfg = transformers.GraniteConfig(logits_scaling=4.0, **common)
        cls = transformers.GraniteForCausalLM
    else:
        cfg = transformers.CohereConfig(logit_scale=0.25, **common)
        cls = transformers.CohereForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("kind, field", [("gemma2", "softcap"), ("granite", "logit_scale"), ("cohere", "logit_scale")])
def test_transform_matches_model_logits(kind, field, naive_rewards):
    tok = make_tiny_tokenizer()
    model = tiny(kind, len(tok))
    head = split_lm(model)[1]
    assert getattr(head, field) not in (None, 1.0)
    items = [{"prompt": "What is 48 / 2?", "response": "48 / 2 = 24.\n\nThe answer is 24."}]
    r = Scorer((model, tok)).score(items)[0]
    expected = naive_rewards(model, None, r.input_ids, r.response_start)
    assert (r.token_rewards - expected).abs().max() <= 1e-5
    ids = r.input_ids[None]
    tm = torch.zeros_like(ids, dtype=torch.bool)
    tm[:, r.response_start:] = True
    # and the transform matters: the same hidden states without it give other log-probs
    rows, _, (b_idx, t_idx) = target_hidden(model, ids, torch.ones_like(ids), tm)
    with torch.no_grad():
        plain = oracle.linear_logprobs(rows, head.weight, ids[b_idx, t_idx])
    assert (plain - expected).abs().max() > 1e-2
