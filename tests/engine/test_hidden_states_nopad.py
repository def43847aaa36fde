"""hidden_states without padding skips the attention mask (plain causal path): values must not change."""

import torch
from transformers import AutoModelForCausalLM

from freeprm.engine import logprobs


def test_unpadded_batch_matches_masked_call(tiny_model_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    base, _ = logprobs.split_lm(model)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    calls = []
    real = base.forward

    def spy(*args, **kwargs):
        calls.append("attention_mask" in kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(base, "forward", spy)
    with torch.no_grad():
        fast = logprobs.hidden_states(base, ids, am)
        masked = real(input_ids=ids, attention_mask=am, position_ids=logprobs.position_ids_from_mask(am),
                      use_cache=False).last_hidden_state
        am_pad = am.clone()
        am_pad[1, :2] = 0  # left padding on row 1: the masked path must be taken
        padded = logprobs.hidden_states(base, ids, am_pad)
    assert calls == [False, True]
    torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-5)
    # row 0 has no padding in either batch: same hidden states
    torch.testing.assert_close(padded[0], fast[0], rtol=1e-5, atol=1e-5)
