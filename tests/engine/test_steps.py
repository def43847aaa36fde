"""Step segmentation and the token -> step rule (see freeprm/engine/steps.py)."""

import re

import pytest
import torch

from freeprm.engine.steps import (
    decoded_offsets,
    split_steps,
    step_rewards_on_last_token,
    sum_on_last_token,
    token_steps,
)
from freeprm.engine.tokenization import encode, response_tokens


def texts(response, spans):
    return [response[a:b] for a, b in spans]


def test_delimiter_split_basic():
    r = "Step 1.\n\nStep 2.\n\nStep 3."
    assert texts(r, split_steps(r)) == ["Step 1.", "Step 2.", "Step 3."]


def test_one_step_response():
    assert split_steps("Just one line.") == [(0, 14)]


def test_leading_spaces_belong_to_first_step():
    r = "   indented first\n\nsecond"
    spans = split_steps(r)
    assert texts(r, spans) == ["   indented first", "second"]
    # characters before step 1 starts, including leading spaces, map to step 0
    assert token_steps([(0, 1), (1, 3), (3, 17), (17, 19), (19, 25)], spans) == [0, 0, 0, 0, 1]


def test_empty_and_whitespace_pieces_are_not_steps():
    r = "a\n\n\n\nb\n\n   \n\nc\n\n"
    assert texts(r, split_steps(r)) == ["a", "b", "c"]


def test_regex_split():
    r = "Step 1: x\nStep 2: y\n\nStep 3: z"
    spans = split_steps(r, step_pattern=re.compile(r"\n+(?=Step)"))
    assert texts(r, spans) == ["Step 1: x", "Step 2: y", "Step 3: z"]
    assert texts(r, split_steps(r, step_pattern=r"\n+")) == ["Step 1: x", "Step 2: y", "Step 3: z"]


def test_no_delimiter_is_one_step():
    assert split_steps("a\n\nb", step_delimiter=None) == [(0, 4)]


def test_explicit_steps_located_in_response():
    r = "First step.\n\n  Second step.\nThird."
    spans = split_steps(r, steps=["First step.", "Second step.", "Third."])
    assert texts(r, spans) == ["First step.", "Second step.", "Third."]


@pytest.mark.parametrize("steps, match", [
    (["First", "Third"], "step 1"),
    (["First step.", "Second"], "continues after"),
    (["First step.", "  "], "step 1 is empty"),
    ([], "non-empty list"),
])
def test_explicit_steps_that_are_not_the_response(steps, match):
    with pytest.raises(ValueError, match=match):
        split_steps("First step.\n\nSecond step.", steps=steps)


@pytest.mark.parametrize("response", ["", "   ", "\n\n"])
def test_empty_response(response):
    with pytest.raises(ValueError, match="empty response"):
        split_steps(response)


def test_token_straddling_boundary_goes_to_step_of_its_last_char():
    r = "ab.\n\ncd"
    spans = split_steps(r)  # step 0 owns "ab.\n\n" (0..5), step 1 owns "cd"
    # token ".\n\n" ends inside the delimiter -> step 0; token "\n\nc" ends in step 1 -> step 1
    assert token_steps([(0, 2), (2, 5), (5, 7)], spans) == [0, 0, 1]
    assert token_steps([(0, 3), (3, 6), (6, 7)], spans) == [0, 1, 1]


def test_empty_span_tokens_follow_previous_token():
    spans = [(0, 2), (4, 6)]
    assert token_steps([(0, 0), (0, 2), (2, 4), (4, 4), (4, 6), (6, 6)], spans) == [0, 0, 0, 0, 1, 1]


def test_real_tokenizer_offsets_multibyte_and_delimiter_in_token(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    r = "Café 🙂 naïve.\n\n\n数学 step two\n\nend"
    ids, offsets = response_tokens(tok, r)
    spans = split_steps(r)
    steps = token_steps(offsets, spans)
    assert len(steps) == len(ids)
    assert steps == sorted(steps) and set(steps) == {0, 1, 2}
    # every token's characters map to the step that owns its last character
    starts = [a for a, _ in spans]
    for (s, e), k in zip(offsets, steps):
        if e > s:
            assert starts[k] <= e - 1 and (k + 1 == len(starts) or e - 1 < starts[k + 1])
    # the response tokens decode back to the response: offsets index the response itself
    assert tok.decode(ids) == r


def test_encode_keeps_response_tokens_independent_of_prompt(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    a = encode(tok, "prompt one", "The answer is 4.")
    b = encode(tok, "a different, longer prompt", "The answer is 4.")
    assert a.input_ids[a.response_start:] == b.input_ids[b.response_start:]
    assert a.offsets == b.offsets


# ------------------------------------------------------------------ step rewards on token tensors
RESPONSES = ["48 / 2 = 24.\n\nThe answer is 24.", "Café 🙂 naïve.\n\n\n数学 step two\n\nend", "one step only",
             "  \n\n  "]


def _expected_step_rewards(rewards, steps):
    """Plain loop: each step's sum on its last token (the engine's token -> step map)."""
    out = torch.zeros_like(rewards)
    for k in sorted(set(steps)):
        where = [i for i, s in enumerate(steps) if s == k]
        out[where[-1]] = rewards[where].sum()
    return out


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("side", ["right", "left"])
def test_step_rewards_on_last_token_follow_the_engine_rule(tok, side):
    g = torch.Generator().manual_seed(0)
    rows = [[7, 8, 9] + response_tokens(tok, r)[0] for r in RESPONSES]
    t = max(len(x) for x in rows) + 2
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    rm = torch.zeros(len(rows), t, dtype=torch.bool)
    for b, x in enumerate(rows):
        o = t - len(x) if side == "left" else 0
        ids[b, o:o + len(x)] = torch.tensor(x)
        rm[b, o + 3:o + len(x)] = True
    rewards = torch.randn(ids.shape, generator=g) * rm
    out = step_rewards_on_last_token(rewards, ids, rm, tok)
    assert bool((out[~rm] == 0).all())
    for b, r in enumerate(RESPONSES):
        _, offsets = response_tokens(tok, r)
        steps = token_steps(offsets, split_steps(r) if r.strip() else [(0, len(r))])
        got, want = out[b][rm[b]], _expected_step_rewards(rewards[b][rm[b]], steps)
        assert torch.equal(got != 0, want != 0)  # the same last tokens
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # sums in another order
    assert int((out[3] != 0).sum()) == 1  # whitespace only: one step, its sum on the last token
    torch.testing.assert_close(out[3][rm[3]][-1], rewards[3].sum())
    pattern = step_rewards_on_last_token(rewards, ids, rm, tok, step_pattern=r"\n\n")
    torch.testing.assert_close(pattern, out, atol=0, rtol=0)


def test_decoded_offsets_of_sampled_non_canonical_tokens(tok):
    """Token ids that re-tokenizing the text would not give (a sampled rollout): per-token pieces, then prefixes."""
    text = "ab cd\n\nef 🙂 ok\n\nπ"
    ids = [t for ch in text for t in tok(ch, add_special_tokens=False)["input_ids"]]  # one character at a time
    assert tok(text, add_special_tokens=False)["input_ids"] != ids
    got_text, offsets = decoded_offsets(tok, ids)
    assert got_text == text and offsets[-1][1] == len(text) and offsets[0][0] == 0
    ends = [e for _, e in offsets]
    assert ends == sorted(ends) and all(a <= b for a, b in offsets)
    spans = split_steps(text)
    steps = token_steps(offsets, spans)
    assert steps == sorted(steps) and set(steps) == {0, 1, 2}
    # each token's last character lies in the step it is assigned to
    for (a, e), k in zip(offsets, steps):
        if e > a:
            assert spans[k][0] <= e - 1 and (k + 1 == len(spans) or e - 1 < spans[k + 1][0])


def test_sum_on_last_token_and_bad_input(tok):
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert sum_on_last_token(r, torch.tensor([0, 0, 1, 1])).tolist() == [0.0, 3.0, 0.0, 7.0]
    assert sum_on_last_token(r, torch.tensor([0, 1, 1, 2])).tolist() == [1.0, 0.0, 5.0, 4.0]
    ids = torch.tensor([[5, 6, 7]])
    rm = torch.tensor([[False, True, True]])
    with pytest.raises(ValueError, match="shape"):
        step_rewards_on_last_token(torch.zeros(1, 2), ids, rm, tok)
    with pytest.raises(ValueError, match="tokenizer"):
        step_rewards_on_last_token(torch.zeros(1, 3), ids, rm, None)
