"""Incremental scoring (KV caches per candidate) equals whole-sequence scoring; fork / drop bookkeeping; step rule."""

import pytest
import torch

from freeprm.search import IncrementalScorer
from freeprm.search.generation import cut_step, steps_from_ids

TOL = 1e-5


def _close(got, want, tol=TOL):
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = want.abs().clamp(min=1.0)
    assert bool(((got - want).abs() <= tol * scale).all()), f"max diff {(got - want).abs().max():.3g}\n{got}\n{want}"


def _whole_rewards(scorer, cand):
    """Per-token rewards of the candidate's whole sequence, in one forward per model (the non-incremental path)."""
    ids = torch.tensor([cand.prompt_ids + cand.response_ids])
    rm = torch.zeros_like(ids, dtype=torch.bool)
    rm[0, len(cand.prompt_ids):] = True
    tr = scorer.token_rewards_from_ids(ids, torch.ones_like(ids), rm)
    return tr.rewards[0, len(cand.prompt_ids):]


def _step_sums(tokens, cand):
    out, a = [], 0
    for e in cand.step_ends:
        out.append(float(tokens[a:e].sum()))
        a = e
    return out


STEPS = ["Step 1: In May she sold 48 / 2 = 24 clips.\n\n", "Step 2: Altogether 48 + 24 = 72.\n\n", "The answer is 72."]


def test_extend_equals_whole_sequence_scoring_batched_over_prompts_and_forks(tiny_scorer):
    inc = IncrementalScorer(tiny_scorer)
    tok = tiny_scorer.tokenizer
    roots = inc.start(["How many clips did Natalia sell?", "Weng earns $12 an hour. What is 3x + 5 = 20?"])
    cands = inc.fork(roots[0], 3) + inc.fork(roots[1], 2)
    for k, step in enumerate(STEPS):
        # ragged steps: each candidate gets a different continuation (lengths differ across rows and prompts)
        new = [tok(("x " * i) + step, add_special_tokens=False)["input_ids"] for i in range(len(cands))]
        got = inc.extend(cands, new)
        for c, g, ids in zip(cands, got, new):
            assert len(g.token_rewards) == len(ids) and g.step_reward == pytest.approx(float(g.token_rewards.sum()))
            assert c.step_ends[-1] == len(c.response_ids)
        if k == 1:  # fork mid-way: children share the parent's caches and continue independently
            extra = inc.fork(cands[0], 2)
            assert all(x.states["policy"] is cands[0].states["policy"] for x in extra)
            cands += extra
    for c in cands:
        whole = _whole_rewards(tiny_scorer, c)
        _close(torch.cat(c.token_rewards), whole)
        _close(c.step_rewards, _step_sums(whole, c))
    # and Scorer.score_prepared on the whole ids with the same step map (the full re-scoring baseline)
    for c, full in zip(cands, inc.rescore_full(cands)):
        _close(c.step_rewards, full)


def test_extend_equals_scorer_score_of_the_text_when_tokenizations_agree(tiny_scorer):
    """Steps cut after the delimiter token: Scorer.score's text rule assigns the same tokens to the same steps."""
    inc = IncrementalScorer(tiny_scorer)
    tok = tiny_scorer.tokenizer
    prompt = "How many clips did Natalia sell?"
    (c,) = inc.start([prompt])
    response = "".join(STEPS)
    ids = tok(response, add_special_tokens=False)["input_ids"]
    steps = steps_from_ids(tok, ids, "\n\n")
    assert sum(steps, []) == ids and len(steps) == 3
    for s in steps:
        inc.extend([c], [s])
    (res,) = tiny_scorer.score([{"prompt": prompt, "response": response}])
    assert res.input_ids[res.response_start:].tolist() == c.response_ids
    assert res.token_steps.tolist() == c.token_steps()
    _close(c.step_rewards, res.step_rewards)
    _close(torch.cat(c.token_rewards), res.token_rewards)


def test_bpe_merge_across_the_delimiter_is_carried_into_the_next_step(merge_scorer):
    """A token like '.\\n\\nThe ' ends one step and starts the next: it is carried into the next step, where the
    Scorer's text rule (the step owning the token's last character) puts it too."""
    tok = merge_scorer.tokenizer
    response = "we add 4.\n\nThe sum is 6.\n\nThe total"
    ids = tok(response, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    merged = [p for p in pieces if "\n\n" in p and p.strip() and not p.endswith("\n\n")]
    assert merged, f"the test tokenizer should merge across the delimiter: {pieces}"
    steps = steps_from_ids(tok, ids, "\n\n")
    assert len(steps) == 3 and sum(steps, []) == ids
    assert "\n\n" in tok.decode(steps[1][:1]) and "\n\n" in tok.decode(steps[2][:1])  # carried merged tokens
    assert "\n\n" not in tok.decode(steps[0])
    inc = IncrementalScorer(merge_scorer)
    (c,) = inc.start(["Add the numbers."])
    for s in steps:
        inc.extend([c], [s])
    (res,) = merge_scorer.score([{"prompt": "Add the numbers.", "response": response}])
    assert res.input_ids[res.response_start:].tolist() == c.response_ids
    assert res.token_steps.tolist() == c.token_steps()
    _close(c.step_rewards, res.step_rewards)


def test_cut_step_rule_cases(merge_tokenizer, tiny_scorer):
    tok = tiny_scorer.tokenizer
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    a = tok("So 4.", add_special_tokens=False)["input_ids"]
    b = tok("The", add_special_tokens=False)["input_ids"]
    assert len(nl) == 1
    # delimiter split across two tokens: the step ends at the second "\n"
    assert cut_step(tok, a + nl + nl + b, "\n\n") == (len(a) + 2, len(a) + 1)
    # a step that opens with blank lines is not over: content must come before the delimiter
    assert cut_step(tok, nl + nl + a, "\n\n") is None
    assert cut_step(tok, nl + nl + a + nl + nl, "\n\n") == (len(a) + 4, len(a) + 3)
    # no delimiter yet
    assert cut_step(tok, a + nl, "\n\n") is None
    # merged across the delimiter (the merge tokenizer): the merged token is carried, unless it is the only one
    mt = merge_tokenizer
    ids = mt("we add 4.\n\nThe sum", add_special_tokens=False)["input_ids"]
    j = next(i for i, t in enumerate(ids) if "\n\n" in mt.decode([t]))
    assert cut_step(mt, ids, "\n\n") == (j, j)
    # carried into the next step, its own delimiter closed the previous step: it does not end this one
    assert cut_step(mt, ids[j:j + 1], "\n\n", carried=1) is None
    assert cut_step(mt, ids[j:], "\n\n", carried=1) is None
    # as a step's only token it is kept (a step needs a token)
    assert cut_step(mt, ids[j:j + 1], "\n\n") == (1, 0)


def test_reference_free_and_bad_inputs(tiny_model_dir):
    from freeprm.engine import Scorer

    sc = Scorer(tiny_model_dir, prompt_format="raw", beta=2.0, max_length=64)
    inc = IncrementalScorer(sc)
    tok = sc.tokenizer
    (root,) = inc.start(["What is 2 + 2?"])
    (c,) = inc.fork(root, 1)
    ids = tok("2 + 2 = 4.\n\n", add_special_tokens=False)["input_ids"]
    (got,) = inc.extend([c], [ids])
    assert got.logp_ref is None
    _close(got.token_rewards, 2.0 * got.logp)
    _close(torch.cat(c.token_rewards), _whole_rewards(sc, c))
    with pytest.raises(ValueError, match="at least one token"):
        inc.extend([c], [[]])
    with pytest.raises(ValueError, match="token ids must lie"):
        inc.extend([c], [[sc.vocab_size]])
    with pytest.raises(ValueError, match="max_length"):
        inc.extend([c], [ids * 10])
    with pytest.raises(ValueError, match="appears twice"):
        inc.extend([c, c], [ids, ids])
    with pytest.raises(ValueError, match="empty prompt"):
        inc.start(["  "])
    with pytest.raises(ValueError, match="k >= 1"):
        inc.fork(c, 0)
    inc.drop(c)
    assert c.states == {} and c.status == "dropped"
    with pytest.raises(ValueError, match="dropped"):
        inc.extend([c], [ids])
    with pytest.raises(ValueError, match="dropped"):
        inc.fork(c, 2)
    # the root is untouched by its child's extension and dropping
    assert root.response_ids == [] and root.states["policy"].length == len(root.prompt_ids)


def test_fork_drop_bookkeeping_and_memory(tiny_scorer):
    inc = IncrementalScorer(tiny_scorer)
    tok = tiny_scorer.tokenizer
    (root,) = inc.start(["How many clips did Natalia sell?"])
    ids = tok(STEPS[0], add_special_tokens=False)["input_ids"]
    inc.extend([root], [ids])
    kids = inc.fork(root, 3)
    assert [k.parent for k in kids] == [root.id] * 3 and len({k.id for k in kids}) == 3
    assert all(k.step_rewards == root.step_rewards and k.response_ids == root.response_ids for k in kids)
    shared = root.states["reference"].segments
    inc.extend(kids[:2], [tok(s, add_special_tokens=False)["input_ids"] for s in (STEPS[1], STEPS[2])])
    # the children's caches extend the parent's segments without copying them
    for k in kids[:2]:
        assert k.states["reference"].segments[:len(shared)] == shared
        assert all(x is y for x, y in zip(k.states["reference"].segments, shared))
        assert k.num_steps == 2
    assert kids[2].num_steps == 1 and root.num_steps == 1 and len(root.response_ids) == len(ids)
    assert kids[0].step_rewards[0] == root.step_rewards[0]
    inc.drop(kids[1])
    assert kids[1].status == "dropped" and kids[0].states  # dropping one sibling leaves the others
