"""Scorer execution paths and boundaries: shared-prompt prefill (and its fallback), unknown options,
item hardening before model work, model objects (device/dtype/train mode), dtype="auto"."""

import warnings

import pytest
import torch

from freeprm.engine import PreparedItem, Scorer, TokenRewards, load_model, score
from freeprm.engine import items as items_mod

PROMPT = "Natalia sold clips to 48 of her friends in April. How many clips?"
GROUP = [
    {"prompt": PROMPT, "response": "Step 1: 48 / 2 = 24.\n\nThe answer is 72."},
    {"prompt": PROMPT, "response": "72"},
    {"prompt": PROMPT, "response": "She sold 48 clips in April.\n\nThen half as many: 24.\n\n#### 72", "id": 3},
    {"prompt": "Other prompt", "response": "x = 5 so \\boxed{5}"},
    {"prompt": PROMPT, "steps": ["In May 24.", "Altogether 72 clips."]},
]


def assert_same(a, b, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.meta == y.meta and x.steps == y.steps
        assert torch.equal(x.input_ids, y.input_ids)
        for name in ("token_rewards", "token_logprobs", "ref_logprobs", "step_rewards"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None) == (v is None), name
            if u is not None:  # sums (step rewards) may carry fp32 rounding of their size: a 1e-6 relative term
                err = float(((u - v).abs() - 1e-6 * v.abs()).max())
                assert u.shape == v.shape and err <= atol, (name, err)
        assert abs(x.score - y.score) <= atol + 1e-6 * abs(y.score)


@pytest.mark.parametrize("max_batch_tokens", [8192, 60])  # 60: the group's candidates run in several chunks
def test_shared_prompt_equals_unshared(tiny_model_dir, tiny_ref_dir, max_batch_tokens):
    kw = dict(beta=0.7, max_batch_tokens=max_batch_tokens)
    shared = Scorer(tiny_model_dir, tiny_ref_dir, **kw)
    assert shared.share_prompt  # the default
    groups, rest = shared._shared_groups([shared.prepare(it, i) for i, it in enumerate(GROUP)])
    assert [len(g) for g in groups] == [4] and len(rest) == 1  # the path under test is taken
    unshared = Scorer(tiny_model_dir, tiny_ref_dir, share_prompt=False, **kw)
    assert_same(shared.score(GROUP), unshared.score(GROUP))


def test_shared_prompt_falls_back_on_sliding_window_cache(tiny_model_dir):
    from transformers import MistralConfig, MistralForCausalLM

    _, tok = load_model(tiny_model_dir)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4096,
                        max_position_embeddings=512, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).float().eval()
    with pytest.warns(UserWarning, match="share_prompt"):
        shared = Scorer((model, tok)).score(GROUP)
    assert_same(shared, Scorer((model, tok), share_prompt=False).score(GROUP))


def test_unknown_options_raise_value_error(tiny_model_dir):
    with pytest.raises(ValueError, match="stepdelimiter"):
        Scorer(tiny_model_dir, stepdelimiter="\n")
    with pytest.raises(ValueError, match="agregate"):
        score(GROUP[:1], policy=tiny_model_dir, agregate="min")
    with pytest.raises(ValueError, match="progres"):
        Scorer(tiny_model_dir).score(GROUP[:1], progres=True)


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    return Scorer(tiny_model_dir, max_length=64)


def _no_model_work(monkeypatch, scorer):
    def boom(*a, **k):
        raise AssertionError("model work started before validation finished")

    monkeypatch.setattr(scorer, "_run", boom)


def test_zero_steps_is_a_clean_item_error(monkeypatch, tiny_model_dir):
    s = Scorer(tiny_model_dir, step_pattern=r"\d+")  # numbers are delimiters: "12 34" leaves only whitespace
    _no_model_work(monkeypatch, s)
    with pytest.raises(ValueError, match=r"item 1: .*no steps"):
        s.score([{"prompt": "p", "response": "fine"}, {"prompt": "p", "response": "12 34"}])


def test_length_checked_before_tokenizing(monkeypatch, scorer):
    def no_tokenize(*a, **k):
        raise AssertionError("tokenized an input that cannot fit")

    monkeypatch.setattr(items_mod, "encode", no_tokenize)
    with pytest.raises(ValueError, match=r"item 0: 5000 characters cannot fit in max_length=64"):
        scorer.prepare({"prompt": "p", "response": "x" * 4999})


def test_step_without_token_is_refused(monkeypatch, scorer):
    tok = scorer.tokenizer
    word = next(w for w in ("clips", "Natalia", "answer", "babysitting")
                if len(tok(w, add_special_tokens=False)["input_ids"]) == 1)
    _no_model_work(monkeypatch, scorer)
    # steps cut inside a one-token word: the token's last character is in step 1, so step 0 owns nothing
    with pytest.raises(ValueError, match=r"item 0: step 0 .* owns no token"):
        scorer.score([{"prompt": "p", "response": word, "steps": [word[:2], word[2:]]}])


def test_prepare_returns_public_type(scorer):
    p = scorer.prepare(GROUP[0], 7)
    assert isinstance(p, PreparedItem) and p.index == 7
    assert p.prompt_ids == p.input_ids[:p.response_start] and p.num_response_tokens == len(p.token_steps)


def test_model_object_keeps_mode_device_and_gets_dtype(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    expected = Scorer(tiny_model_dir).score(GROUP[:2])
    s = Scorer((model, tok))
    assert s.device == torch.device("cpu") and s.dtype == torch.float32
    assert_same(s.score(GROUP[:2]), expected)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    out = s.token_rewards(expected[0].input_ids[None], torch.ones_like(expected[0].input_ids[None]),
                          torch.arange(len(expected[0].input_ids))[None] >= expected[0].response_start,
                          with_logprobs=True)
    assert isinstance(out, TokenRewards) and out.logp_ref is None and model.training
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Scorer((model, tok), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16  # an explicit dtype casts the object


def test_dtype_auto_is_fp32_on_cpu(scorer):
    assert scorer.dtype == torch.float32 and scorer.device.type == "cpu"


def test_packing_equals_padding_without_cross_contamination(tiny_model_dir, tiny_ref_dir):
    # very different lengths in one batch: packing puts the short ones in one row behind each other
    items = [{"prompt": "p " * 40, "response": "long " * 30}] + [
        {"prompt": f"q{i}", "response": f"Step {i}.\n\nThe answer is {i}."} for i in range(5)]
    packed = Scorer(tiny_model_dir, tiny_ref_dir, pack=True, share_prompt=False)
    prepared = [packed.prepare(it, i) for i, it in enumerate(items)]
    from freeprm.engine.batching import pack_rows

    assert len(pack_rows([len(p.input_ids) for p in prepared], max(len(p.input_ids) for p in prepared))) < len(items)
    padded = Scorer(tiny_model_dir, tiny_ref_dir, pack=False, share_prompt=False)
    assert_same(packed.score(items), padded.score(items))
    # a sequence's result does not depend on its row neighbours
    changed = items[:2] + [{"prompt": "zz", "response": "other text entirely"}] + items[3:]
    assert_same(packed.score(changed)[1:2], padded.score(items)[1:2])
    auto = Scorer(tiny_model_dir, share_prompt=False)
    assert auto.pack == "auto" and auto._should_pack([100, 10, 10, 10]) and not auto._should_pack([100, 95, 90])


@pytest.mark.smollm
def test_shared_prompt_and_packing_on_smollm2(smollm2_dir):
    """House three-way form against an fp64 oracle: |path - oracle| <= 2 |unshared - oracle| + atol.

    On SmolLM2 (|reward| up to ~12) every fp32 path is 1.5e-5 .. 2e-5 from fp64, so two fp32 paths that round
    differently cannot agree to 1e-5; each must be as close to the fp64 result as the unshared path is."""
    import copy

    model, tok = load_model(smollm2_dir)
    items = [{"prompt": PROMPT + "\n", "response": r} for r in (
        "48 / 2 = 24.\n\n48 + 24 = 72.", "48 + 48 = 96.\n\nThe answer is 96.", "72")] + [
        {"prompt": "What is 7 * 6?\n", "response": "42"}]
    kw = dict(prompt_format="raw")
    oracle = Scorer((copy.deepcopy(model).double(), tok), share_prompt=False, pack=False, **kw).score(items)
    base = Scorer((model, tok), share_prompt=False, pack=False, **kw).score(items)
    shared = Scorer((model, tok), share_prompt=True, pack=False, **kw)
    assert len(shared._shared_groups([shared.prepare(it, i) for i, it in enumerate(items)])[0]) == 1
    for other in (shared.score(items), Scorer((model, tok), share_prompt=False, pack=True, **kw).score(items)):
        assert_same(other, base, atol=5e-5)  # a coarse guard on every field; the precise check follows
        for x, y, o in zip(other, base, oracle):
            err_x = float((x.token_rewards.double() - o.token_rewards).abs().max())
            err_y = float((y.token_rewards.double() - o.token_rewards).abs().max())
            assert err_x <= 2 * err_y + 2e-6, (err_x, err_y)
