"""Candidates file I/O, records, validation of user-made files."""

import json

import pytest

from freeprm.eval.candidates import (
    append_jsonl,
    derive_seed,
    generate_candidates,
    latest_by_key,
    make_record,
    read_jsonl,
    truncate_at_stop,
    validate_record,
)
from freeprm.eval.generation import TransformersGenerator, pack_batches
from freeprm.eval.tasks import Problem


def test_jsonl_resume_after_cut_line(tmp_path):
    path = tmp_path / "c.jsonl"
    append_jsonl(path, [{"problem_id": "a", "candidate_id": 0}])
    with open(path, "a") as f:
        f.write('{"problem_id": "a", "candid')  # an interrupted write
    assert read_jsonl(path) == [{"problem_id": "a", "candidate_id": 0}]
    append_jsonl(path, [{"problem_id": "a", "candidate_id": 1}])  # drops the cut line first
    assert [r["candidate_id"] for r in read_jsonl(path)] == [0, 1]
    append_jsonl(path, [{"problem_id": "a", "candidate_id": 0, "x": 2}])
    latest = latest_by_key(read_jsonl(path))
    assert latest[("a", 0)]["x"] == 2 and len(latest) == 2
    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(ValueError, match=":2: invalid JSON"):
        read_jsonl(path)
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_make_record_schema():
    p = Problem("q1", "gsm8k", "What is 2+2?", "4")
    rec = make_record(p, 3, "prompt text", "2 + 2 = 4.\n\nThe answer is 4.")
    assert rec == {"problem_id": "q1", "candidate_id": 3, "task": "gsm8k", "prompt": "prompt text",
                   "response": "2 + 2 = 4.\n\nThe answer is 4.", "steps": ["2 + 2 = 4.", "The answer is 4."],
                   "answer": "4", "correct": True, "gold": "4"}
    assert json.loads(json.dumps(rec)) == rec
    empty = make_record(p, 0, "prompt", "  ")
    assert empty["steps"] == [] and empty["answer"] is None and empty["correct"] is False


def test_validate_user_record():
    rec = validate_record({"problem_id": 7, "candidate_id": "2", "prompt": "p", "response": "x = 3\n\nso \\boxed{3}",
                           "task": "math500", "gold": "3"})
    assert rec["problem_id"] == "7" and rec["candidate_id"] == 2
    assert rec["steps"] == ["x = 3", "so \\boxed{3}"] and rec["answer"] == "3" and rec["correct"] is True
    kept = validate_record({"problem_id": "a", "candidate_id": 0, "prompt": "p", "response": "r", "answer": "9",
                            "correct": 1})
    assert kept["answer"] == "9" and kept["correct"] is True
    with pytest.raises(ValueError, match="lacks"):
        validate_record({"problem_id": "a", "prompt": "p", "response": "r"})
    with pytest.raises(ValueError, match="to grade it with"):
        validate_record({"problem_id": "a", "candidate_id": 0, "prompt": "p", "response": "r"})
    with pytest.raises(ValueError, match="integer"):
        validate_record({"problem_id": "a", "candidate_id": "x", "prompt": "p", "response": "r"})


def test_pack_and_seeds():
    probs = [Problem(f"p{i}", "arith", "q", "1") for i in range(3)]
    todo = {"p0": [0, 1, 2], "p1": [1, 2], "p2": [0, 1, 2, 3, 4]}
    batches = list(pack_batches(probs, todo, 4))
    assert [[(p.problem_id, c) for p, c in b] for b in batches] == [
        [("p0", 0), ("p0", 1), ("p0", 2)], [("p1", 1), ("p1", 2)], [("p2", 0), ("p2", 1), ("p2", 2), ("p2", 3)],
        [("p2", 4)]]
    base = derive_seed(0, "p0", 0)
    assert len({base, derive_seed(1, "p0", 0), derive_seed(0, "p1", 0), derive_seed(0, "p0", 1)}) == 4
    assert 0 <= derive_seed(5, "x", 9) < 2**63


def test_derive_seed_does_not_use_the_salted_hash(monkeypatch):
    # hash() of a str differs between interpreters, so seeds from it would change on a resumed run
    from freeprm.eval import generation

    want = derive_seed(3, "gsm8k-test-7", 2)

    def salted(x):
        raise AssertionError("derive_seed must not use hash(): it is salted per process")

    monkeypatch.setattr(generation, "hash", salted, raising=False)  # shadows the builtin in that module only
    assert derive_seed(3, "gsm8k-test-7", 2) == want


def test_truncate_at_stop():
    assert truncate_at_stop("a\n\nQuestion: b", ["\nQuestion:"]) == "a\n"
    assert truncate_at_stop("xyz", ["q", "y", "z"]) == "x"  # the earliest stop wins
    assert truncate_at_stop("xyz", None) == "xyz" and truncate_at_stop("xyz", [""]) == "xyz"


def test_generate_is_seeded_and_honours_stop(tiny_model_dir, tmp_path):
    probs = [Problem(f"p{i}", "arith", f"What is {i} + 1?", str(i + 1)) for i in range(2)]
    kw = dict(model=tiny_model_dir, n=3, max_new_tokens=10, batch_size=3, progress=False)
    generate_candidates(probs, tmp_path / "a.jsonl", **kw)
    generate_candidates(probs, tmp_path / "b.jsonl", **kw)
    a, b = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
    assert [r["response"] for r in a] == [r["response"] for r in b]  # same seed, same candidates
    assert len({r["response"] for r in a}) > 1  # sampled, not all equal
    stop = ["e", "a", " "]
    st = generate_candidates(probs, tmp_path / "s.jsonl", stop=stop, **kw)
    assert st["generated"] == 6
    for r in read_jsonl(tmp_path / "s.jsonl"):
        assert not any(t in r["response"] for t in stop) and r["gen"]["stop"] == stop


class _FakeVLLM:
    """Stands in for the ``vllm`` module: records what the backend hands to ``LLM.generate``.

    Sample ``j`` of prompt ``i`` of a call reads ``"<seed> <j>"`` (the prompt's SamplingParams seed), so a
    test can tell which prompt each output was sampled for.
    """

    def __init__(self, tokenizer):
        import types

        self.calls = []
        fake = self

        class LLM:
            def __init__(self, model, seed):
                pass

            def get_tokenizer(self):
                return tokenizer

            def generate(self, prompts, params, use_tqdm=False):
                fake.calls.append((prompts, params))
                params = params if isinstance(params, list) else [params] * len(prompts)
                return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"{sp.seed} {j}\n\nThe answer is 4.",
                                                                             token_ids=[1, 2, 3])
                                                       for j in range(sp.n)]) for sp in params]

        def sampling_params(**kw):
            return types.SimpleNamespace(**kw)

        self.module = types.SimpleNamespace(LLM=LLM, SamplingParams=sampling_params)


def test_vllm_sends_many_problems_per_call(tiny_model_dir, tmp_path, monkeypatch):
    """One ``llm.generate`` call for many problems (not one per problem), outputs mapped back to their problem."""
    import sys

    from transformers import AutoTokenizer

    from freeprm.eval.generation import derive_seed, vllm_generate

    fake = _FakeVLLM(AutoTokenizer.from_pretrained(tiny_model_dir))
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    probs = [Problem(f"p{i}", "arith", f"What is {i} + 2?", str(i + 2)) for i in range(5)]
    todo = {"p0": [0, 1, 2], "p1": [], "p2": [1], "p3": [0, 2], "p4": [0, 1, 2]}  # p1 is complete already
    prompts = {p.problem_id: p.prompt() for p in probs}
    out = list(vllm_generate(probs, todo, tiny_model_dir, prompts=prompts, seed=7, temperature=0.5, top_p=1.0,
                             max_new_tokens=8, problems_per_call=3))
    assert [len(c[0]) for c in fake.calls] == [3, 1]  # p0, p2, p3 in one call, then p4
    assert [sp.n for sp in fake.calls[0][1]] == [3, 1, 2]
    assert [(p.problem_id, cid) for p, cid, _, _ in out] == [(pid, c) for pid, cs in todo.items() for c in cs]
    for p, cid, text, ntok in out:
        seed = derive_seed(7, p.problem_id, todo[p.problem_id][0]) % (2**31)
        assert text.startswith(f"{seed} {todo[p.problem_id].index(cid)}") and ntok == 3
    st = generate_candidates(probs, tmp_path / "v.jsonl", model=tiny_model_dir, n=2, backend="vllm", progress=False)
    assert st["generated"] == 10 and len(fake.calls) == 3  # the whole run: one more call
    assert sorted((r["problem_id"], r["candidate_id"]) for r in read_jsonl(tmp_path / "v.jsonl")) == \
        [(f"p{i}", c) for i in range(5) for c in range(2)]


@pytest.mark.parametrize("prompt_format", ["chat", "raw"])
def test_vllm_and_transformers_format_the_same_prompt(tiny_model_dir, tmp_path, monkeypatch, prompt_format):
    import sys

    from transformers import AutoTokenizer

    fake = _FakeVLLM(AutoTokenizer.from_pretrained(tiny_model_dir))
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    probs = [Problem("p0", "arith", "What is 2 + 2?", "4")]
    st = generate_candidates(probs, tmp_path / "v.jsonl", model=tiny_model_dir, n=2, backend="vllm", prompt_format=prompt_format,
                             progress=False)
    assert st["generated"] == 2
    ((sent, _),) = fake.calls
    hf = TransformersGenerator(tiny_model_dir, prompt_format=prompt_format)
    assert sent == [{"prompt_token_ids": hf.prompt_ids(probs[0].prompt())}]
    other = "raw" if prompt_format == "chat" else "chat"
    assert sent[0]["prompt_token_ids"] != TransformersGenerator(tiny_model_dir, prompt_format=other).prompt_ids(probs[0].prompt())
    recs = read_jsonl(tmp_path / "v.jsonl")
    assert [r["gen"]["backend"] for r in recs] == ["vllm", "vllm"] and recs[0]["gen"]["prompt_format"] == prompt_format


def test_shared_prefill_samples_the_same_continuations(tiny_model_dir):
    """Prefilling each distinct prompt once and copying its cache to its rows gives what a full-batch prefill gives
    (greedy, so exactly the same tokens), with prompts of different lengths (left padding) and unsorted rows."""
    from freeprm.eval.tasks import make_arith

    gen = TransformersGenerator(tiny_model_dir)
    ps = [p.prompt() for p in make_arith(3, seed=0, levels=(1, 3))]
    assert len({len(gen.prompt_ids(p)) for p in ps}) > 1
    prompts = [ps[0], ps[1], ps[0], ps[2], ps[1], ps[0]]
    shared = gen.sample_many(prompts, seed=0, temperature=0, max_new_tokens=10, share_prefill=True)
    full = gen.sample_many(prompts, seed=0, temperature=0, max_new_tokens=10, share_prefill=False)
    assert shared == full
    calls = []
    orig = gen._prefill
    gen._prefill = lambda ids, mask, rows: calls.append((ids.shape, list(rows))) or orig(ids, mask, rows)
    gen.sample_many(prompts, seed=0, temperature=0, max_new_tokens=2)
    assert calls[0][0][0] == 3 and calls[0][1] == [0, 1, 0, 2, 1, 0]  # three distinct prompts, one pass each
