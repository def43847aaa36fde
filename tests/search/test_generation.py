"""Step generation: the KV-cached sampler equals plain generation; EOS, a missing delimiter, the length limit; vLLM
batching against a stand-in engine."""

from types import SimpleNamespace

import pytest
import torch

from freeprm.search import IncrementalScorer, TransformersStepGenerator, VLLMStepGenerator


class Scripted(TransformersStepGenerator):
    """Emits a fixed token sequence per candidate (by its order in ``script``), whatever the logits say."""

    def __init__(self, *a, script, **k):
        super().__init__(*a, **k)
        self.script, self.pos, self.rows = script, {}, None

    def generate_step(self, cands, **kw):
        self.rows = list(cands)
        return super().generate_step(cands, **kw)

    def choose(self, logits, gen):
        out = []
        for c in self.rows:
            seq = self.script[c.id]
            i = self.pos.get(c.id, 0)
            self.pos[c.id] = i + 1
            out.append(seq[i] if i < len(seq) else seq[-1])
        return torch.tensor(out)


def _setup(scorer, prompts, n=1):
    inc = IncrementalScorer(scorer)
    roots = inc.start(prompts)
    return inc, roots


def test_greedy_steps_equal_plain_generate(tiny_scorer):
    """Greedy step-by-step sampling through the per-candidate caches = transformers' generate on the whole text."""
    tok, model = tiny_scorer.tokenizer, tiny_scorer.policy
    inc, roots = _setup(tiny_scorer, ["How many clips did Natalia sell?", "What is 3x + 5 = 20?"])
    gen = TransformersStepGenerator(model, tok, temperature=0.0, eos_ids=[])
    gen.start(roots)
    cands = inc.fork(roots[0], 1) + inc.fork(roots[1], 1)
    got = [[] for _ in cands]
    for _ in range(3):  # three steps of 5 tokens (no delimiter: each ends at the step limit)
        outs = gen.generate_step(cands, delimiter="@@@", max_step_tokens=5, max_tokens=100)
        for i, (c, o) in enumerate(zip(cands, outs)):
            assert o.end in ("step_limit", "delimiter") and o.sampled == 5 - len(c.carry) or o.end == "delimiter"
            got[i] += o.ids + o.carry
            c.response_ids = c.response_ids + o.ids  # (what the search does through the scorer)
            c.carry = o.carry
    for c, g in zip(cands, got):
        ids = torch.tensor([c.prompt_ids])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(g), do_sample=False,
                             pad_token_id=0, eos_token_id=None)[0, ids.shape[1]:].tolist()
        assert g == ref


def _ids(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def test_eos_missing_delimiter_and_length_limit(tiny_scorer):
    tok = tiny_scorer.tokenizer
    eos = tok.eos_token_id
    inc, roots = _setup(tiny_scorer, ["What is 2 + 2?"])
    gen = Scripted(tiny_scorer.policy, tok, script={})
    gen.start(roots)
    cands = inc.fork(roots[0], 4)
    a, nl = _ids(tok, "So 4."), _ids(tok, "\n")
    gen.script.update({
        cands[0].id: a + [eos],                # EOS before any delimiter: the candidate finishes, EOS not kept
        cands[1].id: a * 10,                   # no delimiter: the step ends at max_step_tokens; the candidate goes on
        cands[2].id: a + nl + nl + a + nl + nl,  # the delimiter split over two tokens
        cands[3].id: a * 10,                   # hits the total length limit
    })
    # (the length limit is per call; give candidate 3 a nearly full response by hand)
    cands[3].response_ids = [a[0]] * 20
    outs = gen.generate_step(cands, delimiter="\n\n", max_step_tokens=8, max_tokens=22)
    assert outs[0].end == "eos" and outs[0].ids == a and outs[0].sampled == len(a) + 1
    assert outs[1].end == "step_limit" and outs[1].ids == (a * 10)[:8] and not outs[1].carry
    assert outs[2].end == "delimiter" and outs[2].ids == a + nl + nl
    assert outs[3].end == "length" and len(outs[3].ids) == 2
    # the caches hold exactly the tokens generated (the EOS is not run)
    assert cands[0].states["generator"].length == len(cands[0].prompt_ids) + len(a)
    assert cands[2].states["generator"].length == len(cands[2].prompt_ids) + len(a) + 2
    # a candidate whose step is cut by the limit continues the same text in the next step
    c1 = cands[1]
    c1.response_ids += outs[1].ids
    nxt = gen.generate_step([c1], delimiter="\n\n", max_step_tokens=8, max_tokens=100)[0]
    assert nxt.ids == (a * 10)[8:16] and nxt.end == "step_limit"
    # EOS as the first token: no new step
    c = inc.fork(roots[0], 1)[0]
    gen.script[c.id] = [eos]
    o = gen.generate_step([c], delimiter="\n\n", max_step_tokens=8, max_tokens=100)[0]
    assert o.end == "eos" and o.ids == [] and o.sampled == 1


@pytest.mark.parametrize("name", ["generator", "policy"])  # its own cache, or the policy's (log pi from its rows)
def test_carried_token_opens_the_next_step(merge_scorer, name):
    tok = merge_scorer.tokenizer
    inc, roots = _setup(merge_scorer, ["Add the numbers."])
    gen = Scripted(merge_scorer.policy, tok, script={}, name=name)
    gen.start(roots)
    (c,) = inc.fork(roots[0], 1)
    ids = _ids(tok, "we add 4.\n\nThe sum is 6.\n\nThe total")
    gen.script[c.id] = ids + [tok.eos_token_id]
    steps = []
    while c.status == "live":
        o = gen.generate_step([c], delimiter="\n\n", max_step_tokens=50, max_tokens=100)[0]
        assert o.rows.shape[0] == len(o.ids) and o.carry_rows.shape[0] == len(o.carry)
        if o.ids:
            inc.extend([c], [o.ids], policy_rows=[o.rows] if name == "policy" else None)
            steps.append(o.ids)
        c.carry, c.carry_rows = o.carry, list(o.carry_rows)
        if o.end == "eos":
            c.status = "eos"
    assert sum(steps, []) == ids and len(steps) == 3
    assert inc.tokens_run["policy"] == (0 if name == "policy" else len(ids))
    (res,) = merge_scorer.score([{"prompt": "Add the numbers.", "response": tok.decode(ids)}])
    assert res.token_steps.tolist() == c.token_steps()
    assert torch.allclose(torch.tensor(c.step_rewards), res.step_rewards, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- vLLM batching (stand-in engine)

class FakeLLM:
    """Records ``generate`` calls; ``answers(prompt_token_ids, params)`` gives each request's output token ids."""

    def __init__(self, tok, answers):
        self.tok, self.answers, self.calls = tok, answers, []

    def get_tokenizer(self):
        return self.tok

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append((prompts, params))
        outs = []
        for p, sp in zip(prompts, params):
            ids = self.answers(p["prompt_token_ids"], sp)[:sp["max_tokens"]]
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason="stop")]))
        return outs


def test_vllm_one_engine_call_per_step_for_all_prompts(tiny_scorer):
    tok = tiny_scorer.tokenizer
    inc, roots = _setup(tiny_scorer, ["What is 2 + 2?", "How many clips did Natalia sell?"])
    cands = inc.fork(roots[0], 3) + inc.fork(roots[1], 2)
    step = _ids(tok, "So 4.\n\n")

    llm = FakeLLM(tok, lambda ids, sp: step + _ids(tok, "more"))  # a real engine stops at the stop string
    gen = VLLMStepGenerator(llm=llm, tokenizer=tok, temperature=0.5, seed=3)
    outs = gen.generate_step(cands, delimiter="\n\n", max_step_tokens=16, max_tokens=100)
    assert len(llm.calls) == 1  # every live candidate of every prompt in one call
    prompts, params = llm.calls[0]
    assert [p["prompt_token_ids"] for p in prompts] == [c.prompt_ids for c in cands]
    assert all(sp["stop"] == ["\n\n"] and sp["max_tokens"] == 16 and sp["temperature"] == 0.5 for sp in params)
    assert len({sp["seed"] for sp in params}) == len(cands)  # distinct per candidate
    assert all(o.end == "delimiter" and o.ids == step for o in outs)
    for c, o in zip(cands, outs):
        c.response_ids = c.response_ids + o.ids
    # the next step's prompts continue each candidate's text (the engine's prefix cache reuses them)
    gen.generate_step(cands, delimiter="\n\n", max_step_tokens=16, max_tokens=100)
    assert len(llm.calls) == 2
    assert [p["prompt_token_ids"] for p in llm.calls[1][0]] == [c.prompt_ids + step for c in cands]


def test_vllm_follow_up_call_eos_and_limits(tiny_scorer):
    tok = tiny_scorer.tokenizer
    eos = tok.eos_token_id
    inc, roots = _setup(tiny_scorer, ["What is 2 + 2?"])
    cands = inc.fork(roots[0], 3)
    nl2, a = _ids(tok, "\n\n"), _ids(tok, "So 4.")
    calls = []

    class Engine(FakeLLM):
        """Row 0 writes a blank line first (a real engine stops at that stop string, the step rule wants content
        before the delimiter: a follow-up call continues it); row 1 ends with EOS; row 2 never writes the delimiter."""

        def generate(self, prompts, params, use_tqdm=False):
            calls.append([p["prompt_token_ids"] for p in prompts])
            outs = []
            rows = [0, 1, 2] if len(calls) == 1 else [0]  # the follow-up call carries only row 0
            for row, p, sp in zip(rows, prompts, params):
                body = p["prompt_token_ids"][len(cands[row].prompt_ids):]
                ids = {0: nl2 if not body else a + nl2, 1: a + [eos], 2: (a * 20)[:sp["max_tokens"]]}[row]
                outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason="stop")]))
            return outs

    gen = VLLMStepGenerator(llm=Engine(tok, None), tokenizer=tok)
    outs = gen.generate_step(cands, delimiter="\n\n", max_step_tokens=6, max_tokens=100)
    # one call for all rows, one follow-up for the row stopped at a leading blank line, continuing its text
    assert [len(c) for c in calls] == [3, 1] and calls[1] == [cands[0].prompt_ids + nl2]
    assert outs[0].end == "delimiter" and outs[0].ids == nl2 + a + nl2
    assert outs[1].end == "eos" and outs[1].ids == a
    assert outs[2].end == "step_limit" and outs[2].ids == (a * 20)[:6]
