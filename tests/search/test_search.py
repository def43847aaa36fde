"""Search algorithms: per-prompt pools, beam / DVTS / best-of-N selection, the step budget, exactness of the
reported step rewards, determinism, and bad inputs."""

import warnings

import pytest
import torch

from freeprm.search import IncrementalScorer, SearchConfig, Searcher, StepOutput, search
from freeprm.search.algorithms import pick_best
from freeprm.search.generation import check_delimiter


class LetterWriter:
    """A stand-in step generator: prompt p's candidates write steps of letter ``LETTERS[p]`` (a length that depends
    on the candidate id, so scores differ), ``"\\n\\n"``-terminated; step ``eos_at`` ends with EOS instead."""

    LETTERS = ["A", "B", "C"]

    def __init__(self, tok, eos_at=None):
        self.tok, self.eos_at, self.calls = tok, eos_at, []

    def start(self, roots):
        pass

    def generate_step(self, cands, *, delimiter, max_step_tokens, max_tokens, generator=None):
        self.calls.append([(c.prompt_index, c.id) for c in cands])
        outs = []
        for c in cands:
            letter = self.LETTERS[c.prompt_index]
            body = f"{letter} " * (1 + (c.id * 7 + c.num_steps) % 4)
            if self.eos_at is not None and c.num_steps == self.eos_at:
                ids = self.tok(body, add_special_tokens=False)["input_ids"]
                outs.append(StepOutput(ids, [], "eos", len(ids) + 1))
            else:
                ids = self.tok(body + delimiter, add_special_tokens=False)["input_ids"]
                outs.append(StepOutput(ids, [], "delimiter", len(ids)))
        return outs


def _searcher(scorer, method, gen=None, **kw):
    cfg = SearchConfig(method=method, **kw)
    return Searcher(IncrementalScorer(scorer), gen or LetterWriter(scorer.tokenizer), cfg)


PROMPTS = ["What is 2 + 2?", "How many clips did Natalia sell?", "Solve 3x + 5 = 20."]


@pytest.mark.parametrize("method", ["best_of_n", "beam", "dvts"])
def test_pools_are_per_prompt_and_batched(tiny_scorer, method):
    s = _searcher(tiny_scorer, method, n=4, beam_width=2, max_steps=3)
    res = s.run(PROMPTS)
    assert len(res) == 3
    for p, r in enumerate(res):
        letter = LetterWriter.LETTERS[p]
        assert r.prompt == PROMPTS[p] and r.candidates
        for c in r.candidates:  # every candidate of prompt p was written for prompt p only
            assert set(c["text"].split()) == {letter}, c["text"]
        assert r.best == pick_best([c["score"] for c in r.candidates])
        assert r.steps == 3 and len(r.trace) == 3
    # one generator call per step carries the live candidates of all prompts
    assert len(s.gen.calls) == 3
    assert all({p for p, _ in call} == {0, 1, 2} for call in s.gen.calls)


def test_beam_keeps_the_top_n_over_width_and_forks(tiny_scorer):
    s = _searcher(tiny_scorer, "beam", n=6, beam_width=3, max_steps=4, aggregate="last")
    (r,) = s.run(PROMPTS[:1])
    for _t, e in enumerate(r.trace):
        scores = dict(zip(e["candidates"], e["scores"]))
        kept = e["kept"]
        assert len(kept) == 2  # n // beam_width
        ranked = sorted(scores, key=lambda i: -scores[i])
        assert sorted(scores[i] for i in kept) == sorted(scores[i] for i in ranked[:2])
        assert len(e["candidates"]) == 6  # every step runs n live candidates
    assert len(r.candidates) == 2 and all(c["status"] == "budget" for c in r.candidates)
    assert all(len(c["steps"]) == 4 for c in r.candidates)


def test_dvts_keeps_one_per_subtree(tiny_scorer):
    s = _searcher(tiny_scorer, "dvts", n=6, beam_width=2, max_steps=3)
    (r,) = s.run(PROMPTS[:1])
    for e in r.trace:
        assert len(e["kept"]) == 3 and len(e["candidates"]) == 6  # n // beam_width subtrees, beam_width each
    assert len(r.candidates) == 3


def test_best_of_n_prunes_nothing_and_eos_finishes(tiny_scorer):
    s = _searcher(tiny_scorer, "best_of_n", gen=LetterWriter(tiny_scorer.tokenizer, eos_at=1), n=5, max_steps=4)
    (r,) = s.run(PROMPTS[:1])
    assert len(r.candidates) == 5 and all(c["status"] == "eos" for c in r.candidates)
    assert r.steps == 2 and all(len(c["steps"]) == 2 for c in r.candidates)  # EOS at step 1 ends everything early
    assert r.trace[-1]["ends"] == ["eos"] * 5


def test_beam_stops_when_n_finished(tiny_scorer):
    s = _searcher(tiny_scorer, "beam", gen=LetterWriter(tiny_scorer.tokenizer, eos_at=0), n=4, beam_width=2,
                  max_steps=5)
    with pytest.warns(UserWarning, match="no candidate produced the step delimiter"):
        (r,) = s.run(PROMPTS[:1])
    assert r.steps == 1 and len(r.candidates) == 4 and all(c["status"] == "eos" for c in r.candidates)


def test_reported_step_rewards_equal_rescoring_the_ids(tiny_scorer):
    """The search's step rewards (incremental) equal the Scorer on each final candidate's whole ids and steps."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights rarely write the delimiter: steps end at max_step_tokens
        res = search(PROMPTS[:2], scorer=tiny_scorer, method="beam", n=4, beam_width=2, max_steps=3,
                     max_step_tokens=6, temperature=1.0, seed=1)
    tok = tiny_scorer.tokenizer
    for p, r in zip(PROMPTS, res):
        prompt_ids = tok(p)["input_ids"]  # prompt_format="raw": BOS + text
        for c in r.candidates:
            ids = torch.tensor([prompt_ids + c["token_ids"]])
            rm = torch.zeros_like(ids, dtype=torch.bool)
            rm[0, len(prompt_ids):] = True
            tr = tiny_scorer.token_rewards_from_ids(ids, torch.ones_like(ids), rm).rewards[0, len(prompt_ids):]
            ends = [0] + c["step_ends"]
            want = [float(tr[a:b].sum()) for a, b in zip(ends, ends[1:])]
            assert c["step_rewards"] == pytest.approx(want, rel=1e-5, abs=1e-5)
            assert c["text"] == tok.decode(c["token_ids"]) and "".join(c["steps"]) == c["text"]


@pytest.mark.parametrize("method", ["best_of_n", "beam", "dvts"])
def test_sampled_search_end_to_end_is_seeded(tiny_scorer, method):
    kw = dict(scorer=tiny_scorer, method=method, n=4, beam_width=2, max_steps=3, max_step_tokens=5, temperature=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = search(PROMPTS[:2], seed=7, **kw)
        b = search(PROMPTS[:2], seed=7, **kw)
        c = search(PROMPTS[:2], seed=8, **kw)
    assert [r.to_dict() for r in a] == [r.to_dict() for r in b]
    assert [r.to_dict() for r in a] != [r.to_dict() for r in c]
    for r in a:
        assert r.generated_tokens >= r.scored_tokens > 0 and r.best is not None


def test_bad_inputs_raise_clear_errors(tiny_scorer):
    kw = dict(scorer=tiny_scorer, n=4, beam_width=2, max_steps=2)
    with pytest.raises(ValueError, match="prompt 1 is empty|empty prompt|non-empty"):
        search(["What is 2 + 2?", ""], **kw)
    with pytest.raises(ValueError, match="non-empty list"):
        search([], **kw)
    with pytest.raises(ValueError, match="beam_width .* must be an integer >= 1"):
        search(PROMPTS, **dict(kw, beam_width=0))
    with pytest.raises(ValueError, match="max_steps .*step budget.* >= 1"):
        search(PROMPTS, **dict(kw, max_steps=0))
    with pytest.raises(ValueError, match="multiple of beam_width"):
        search(PROMPTS, **dict(kw, n=5))
    with pytest.raises(ValueError, match="n must be"):
        search(PROMPTS, **dict(kw, n=0))
    with pytest.raises(ValueError, match="method must be"):
        search(PROMPTS, **dict(kw, method="mcts"))
    with pytest.raises(ValueError, match="aggregate must be"):
        search(PROMPTS, **dict(kw, aggregate="max"))
    with pytest.raises(ValueError, match="non-empty string"):
        search(PROMPTS, **dict(kw, step_delimiter=""))
    # a delimiter that cannot fit in a step never appears
    with pytest.raises(ValueError, match="never appears within max_step_tokens"):
        search(PROMPTS, **dict(kw, step_delimiter="\n\n### Step ###\n\n", max_step_tokens=4))


def test_a_delimiter_the_tokenizer_cannot_write_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(["one two three four"] * 5, trainers.WordPieceTrainer(vocab_size=60,
                                                                               special_tokens=["[UNK]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")
    with pytest.raises(ValueError, match="never appears in generated text"):
        check_delimiter(tok, "§§")
    check_delimiter(tok, "two")  # producible: no error


def test_no_delimiter_ever_warns(tiny_scorer):
    with pytest.warns(UserWarning, match="no candidate produced the step delimiter"):
        search(PROMPTS[:1], scorer=tiny_scorer, method="best_of_n", n=2, max_steps=2, max_step_tokens=12,
               step_delimiter="zzzz zzzz", temperature=1.0)


def test_shared_policy_cache_skips_the_policy_forward(tiny_scorer, tiny_model_dir):
    """Generator = the PRM's policy: sampling advances the policy's cache and log pi comes from the sampling pass's
    hidden states; the same search with a separately loaded copy of the policy as generator gives the same text
    and (to fp32 rounding) the same step rewards."""
    from freeprm.search import build_searcher

    cfg = SearchConfig(method="beam", n=4, beam_width=2, max_steps=3, max_step_tokens=6, temperature=1.0, seed=3)
    shared = build_searcher(scorer=tiny_scorer, config=cfg)
    separate = build_searcher(scorer=tiny_scorer, config=cfg, generator=tiny_model_dir)
    assert shared.shared_policy and not separate.shared_policy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = shared.run(PROMPTS[:2])
        b = separate.run(PROMPTS[:2])
    assert shared.inc.tokens_run["policy"] == 0 and shared.inc.tokens_run["reference"] > 0
    assert separate.inc.tokens_run["policy"] == separate.inc.tokens_run["reference"] > 0
    for ra, rb in zip(a, b):
        assert [c["token_ids"] for c in ra.candidates] == [c["token_ids"] for c in rb.candidates]
        for ca, cb in zip(ra.candidates, rb.candidates):
            assert ca["step_rewards"] == pytest.approx(cb["step_rewards"], rel=1e-5, abs=1e-5)


def test_stop_strings_finish_a_candidate_after_their_step(tiny_scorer):
    s = _searcher(tiny_scorer, "beam", n=4, beam_width=2, max_steps=3, stop=("B",))
    res = s.run(PROMPTS)
    assert all(c["status"] == "stop" and len(c["steps"]) == 1 for c in res[1].candidates)  # prompt 1 writes "B"
    assert len(res[1].candidates) == 4 and res[1].steps == 1
    assert all(c["status"] == "budget" for c in res[0].candidates)
    with pytest.raises(ValueError, match="stop must be a list"):
        SearchConfig(stop="B")


def test_a_trained_prm_directory_applies_its_recorded_settings(tmp_path, tiny_model_dir):
    """freeprm_prm.json (beta, prompt format) applies through the Scorer unless given; given values win."""
    import shutil

    from freeprm.config import ScoringConfig
    from freeprm.prm_meta import meta_dict, write_meta
    from freeprm.search import build_searcher

    prm = tmp_path / "prm"
    shutil.copytree(tiny_model_dir, prm)
    write_meta(prm, meta_dict(ScoringConfig(beta=0.25, reference="none", prompt_format="raw"), reference_digest=None,
                              training={"trainer": "test"}))
    cfg = SearchConfig(method="best_of_n", n=2, max_steps=1, max_step_tokens=4)
    s = build_searcher(str(prm), config=cfg)
    assert s.inc.scorer.beta == 0.25 and s.inc.scorer.prompt_format == "raw" and s.inc.scorer.reference is None
    with pytest.warns(UserWarning):
        s2 = build_searcher(str(prm), config=cfg, beta=0.5)
    assert s2.inc.scorer.beta == 0.5


def test_search_takes_a_scoring_config_bit_for_bit(tiny_model_dir, tiny_ref_dir):
    """search(config=ScoringConfig) equals the keyword form; keywords win over the config; its step delimiter and
    aggregate are the search's unless given."""
    from freeprm import ScoringConfig

    kw = dict(method="beam", n=4, beam_width=2, max_steps=2, max_step_tokens=5, temperature=1.0, seed=7,
              device="cpu")
    prompt = PROMPTS[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = search(prompt, tiny_model_dir, tiny_ref_dir, beta=0.5, prompt_format="raw", aggregate="sum", **kw)
        cfg = search(prompt, tiny_model_dir, config=ScoringConfig(beta=0.5, reference=tiny_ref_dir,
                                                                  prompt_format="raw", aggregate="sum"), **kw)
        over = search(prompt, tiny_model_dir, tiny_ref_dir, config=ScoringConfig(beta=2.0, prompt_format="raw"),
                      beta=0.5, aggregate="sum", **kw)
    assert [r.to_dict() for r in cfg] == [r.to_dict() for r in ref] == [r.to_dict() for r in over]
    assert cfg[0].aggregation == "sum" and cfg[0].best is not None
    with pytest.raises(ValueError, match="step_pattern is not supported"):
        search(prompt, tiny_model_dir, config=ScoringConfig(step_pattern=r"\n"), **kw)
    with pytest.raises(ValueError, match="pass no scoring options \\(config\\)"):
        search(prompt, scorer=object(), config=ScoringConfig(beta=0.5))
