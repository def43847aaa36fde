"""Shared-prompt prefill (``freeprm/engine/prefill.py``): the cascade and repeat attention paths against
running each ``prompt + response`` whole; dtype check in the house three-way form; unsupported models."""

import pytest
import torch

from freeprm.engine import prefill
from freeprm.engine.logprobs import split_lm
from freeprm.engine.prefill import SharedPromptUnsupported, cascade_attention, shared_prompt_hidden

LENGTHS = (5, 9, 1, 7, 16)  # ragged, one single-token response


def _model(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).float().eval()
    if kind == "llama-mha":
        return LlamaForCausalLM(LlamaConfig(**{**common, "num_key_value_heads": 4})).float().eval()
    return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8)).float().eval()  # q/k norms before rotary


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 97, (11,), generator=g).tolist()
    responses = [torch.randint(1, 97, (n,), generator=g).tolist() for n in LENGTHS]
    return prompt, responses


def _whole(base, prompt, responses):
    """Oracle: each sequence run whole; rows ``P-1 .. P+R-2`` predict the response tokens."""
    out = []
    for r in responses:
        hs = base(input_ids=torch.tensor([prompt + r])).last_hidden_state[0]
        out.append(hs[len(prompt) - 1: len(prompt) + len(r) - 1])
    return out


@pytest.mark.parametrize("kind", ["llama", "llama-mha", "qwen3"])
@pytest.mark.parametrize("attention", ["cascade", "repeat"])
@pytest.mark.parametrize("max_batch_tokens", [4096, 20])  # 20: several chunks
@torch.inference_mode()
def test_shared_prompt_hidden_equals_whole_sequences(kind, attention, max_batch_tokens):
    base, _ = split_lm(_model(kind))
    prompt, responses = _inputs()
    impl_before = base.config._attn_implementation
    got = shared_prompt_hidden(base, prompt, responses, pad_id=0, max_batch_tokens=max_batch_tokens,
                               attention=attention)
    assert base.config._attn_implementation == impl_before
    for x, y, r in zip(got, _whole(base, prompt, responses), responses):
        assert x.shape == (len(r), 32)
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_cascade_in_bf16_within_twice_torch_error():
    """|cascade_bf16 - fp32 oracle| <= 2 |whole-sequence bf16 - oracle| + atol, per response."""
    model = _model("llama")
    prompt, responses = _inputs(2)
    oracle = _whole(split_lm(model)[0], prompt, responses)
    base16, _ = split_lm(model.to(torch.bfloat16))
    plain = _whole(base16, prompt, responses)
    got = shared_prompt_hidden(base16, prompt, responses, pad_id=0, max_batch_tokens=4096, attention="cascade")
    for k, t, o in zip(got, plain, oracle):
        assert k.dtype == torch.bfloat16
        err_k, err_t = (k.float() - o).abs().max(), (t.float() - o).abs().max()
        assert err_k <= 2 * err_t + 1e-2, (float(err_k), float(err_t))


@torch.inference_mode()
def test_cascade_restores_attention_implementation_on_error(monkeypatch):
    base, _ = split_lm(_model("llama"))
    prompt, responses = _inputs()
    before = base.config._attn_implementation

    def boom(*a, **k):
        raise RuntimeError("attention failed")

    monkeypatch.setattr(prefill, "_attend", boom)
    with pytest.raises(RuntimeError, match="attention failed"):
        shared_prompt_hidden(base, prompt, responses, pad_id=0, max_batch_tokens=4096, attention="cascade")
    assert base.config._attn_implementation == before
    monkeypatch.undo()
    got = shared_prompt_hidden(base, prompt, responses, pad_id=0, max_batch_tokens=4096)  # still usable
    torch.testing.assert_close(got[0], _whole(base, prompt, responses[:1])[0], atol=1e-5, rtol=1e-5)


def test_cascade_attention_refuses_what_it_cannot_do():
    class Mod:
        layer_idx = 0

    q, kv = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8)
    prefix = [(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))]
    with pytest.raises(SharedPromptUnsupported, match="sliding"):
        cascade_attention(Mod(), q, kv, kv, None, freeprm_prefix_kv=prefix, sliding_window=4)
    with pytest.raises(SharedPromptUnsupported, match="softcap"):
        cascade_attention(Mod(), q, kv, kv, None, freeprm_prefix_kv=prefix, softcap=30.0)
    with pytest.raises(SharedPromptUnsupported, match="mask"):
        cascade_attention(Mod(), q, kv, kv, torch.ones(2, 1, 3, 8), freeprm_prefix_kv=prefix)
    with pytest.raises(SharedPromptUnsupported, match="prompt"):
        cascade_attention(Mod(), q, kv, kv, None)
    out, w = cascade_attention(Mod(), q, kv, kv, None, freeprm_prefix_kv=prefix)
    assert out.shape == (2, 3, 4, 8) and w is None


def test_bad_attention_option_is_a_value_error():
    base, _ = split_lm(_model("llama"))
    with pytest.raises(ValueError, match="attention must be"):
        shared_prompt_hidden(base, [1, 2], [[3]], pad_id=0, max_batch_tokens=64, attention="flash")


@pytest.mark.parametrize("attention", ["cascade", "repeat"])
@torch.inference_mode()
def test_equal_prefixes_give_bitwise_equal_rows(attention):
    """Candidates that share a response prefix get bitwise equal rows for it, wherever they sit in the
    group: best-of-N ties between such candidates stay exact ties (broken by file order, not rounding)."""
    base, _ = split_lm(_model("llama"))
    prompt, responses = _inputs(3)
    common = responses[4][:9]
    group = [responses[0], common + [5, 6], responses[2], common + [7], common + [5, 6]]
    got = shared_prompt_hidden(base, prompt, group, pad_id=0, max_batch_tokens=4096, attention=attention)
    assert torch.equal(got[1][:10], got[3][:10]) and torch.equal(got[1], got[4])
    # two rows only: the second row's elements sit at the end of every [G, H, R] tensor, where torch's
    # elementwise loops finish with a scalar tail (which once rounded the cascade merge differently)
    for extra in range(1, 9):
        pair = [common + [5] * extra, common + [6] * extra]
        got = shared_prompt_hidden(base, prompt, pair, pad_id=0, max_batch_tokens=4096, attention=attention)
        assert torch.equal(got[0][:10], got[1][:10]), extra
