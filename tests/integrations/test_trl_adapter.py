"""freeprm.integrations.trl.reward_function: formats, None rows, label_column, and a real GRPOTrainer run."""

import math

import pytest
import torch

from freeprm.integrations.trl import reward_function

PROMPTS = ["What is 48 / 2 + 48?", "What is 7 * 6?", "Natalia sold clips."]
COMPLETIONS = ["48 / 2 = 24.\n\n24 + 48 = 72.\n\nThe answer is 72.", "7 * 6 = 42.\n\nThe answer is 42.",
               "She sold 48 + 24 = 72 clips."]


def _direct(scorer, prompts, completions, aggregate="min"):
    return [r.score for r in scorer.score([{"prompt": p, "response": c} for p, c in zip(prompts, completions)],
                                          aggregate=aggregate)]


def test_plain_strings_match_scorer(any_prm, tiny_scorer):
    f = reward_function(any_prm)
    assert f.__name__ == "freeprm_min" and not isinstance(f, torch.nn.Module)
    got = f(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=[[1, 2]] * 3, trainer_state=None)
    want = _direct(tiny_scorer, PROMPTS, COMPLETIONS)
    assert len(set(want)) == 3  # the check below can tell rows apart
    assert got == pytest.approx(want, abs=1e-5)


def test_aggregate_and_name(tiny_scorer):
    f = reward_function(tiny_scorer, aggregate="sum", name="prm")
    assert f.__name__ == "prm"
    assert f(PROMPTS, COMPLETIONS) == pytest.approx(_direct(tiny_scorer, PROMPTS, COMPLETIONS, "sum"), abs=1e-5)


def test_conversational(tiny_scorer):
    f = reward_function(tiny_scorer)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    prompts[2] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[2]}]
    completions = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    got = f(prompts=prompts, completions=completions)
    want = _direct(tiny_scorer, PROMPTS[:2] + ["Be brief.\n\n" + PROMPTS[2]], COMPLETIONS)
    assert got == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="assistant turn"):
        f(prompts=[[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]], completions=["c"])


def test_none_rows_and_label_column(tiny_scorer):
    f = reward_function(tiny_scorer, label_column="answer")
    got = f(PROMPTS, [COMPLETIONS[0], "  \n", COMPLETIONS[2]], answer=["72", "42", None])
    assert got[1] is None and got[2] is None  # empty completion; no label
    assert got[0] == pytest.approx(_direct(tiny_scorer, PROMPTS[:1], COMPLETIONS[:1])[0], abs=1e-5)
    with pytest.raises(ValueError, match="not among the columns"):
        f(PROMPTS, COMPLETIONS, solution=["a", "b", "c"])
    with pytest.raises(ValueError, match="one prompt per completion"):
        f(PROMPTS[:2], COMPLETIONS)


def test_rejects_non_prm():
    with pytest.raises(ValueError, match="Scorer or freeprm.rl.ImplicitPRM"):
        reward_function(object())


def test_grpo_trainer_two_steps(tmp_path, tiny_model_dir, tiny_scorer):
    """TRL GRPOTrainer trains 2 steps with the reward function; the reward is logged and finite."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from freeprm.testing import make_tiny_model_dir

    policy_dir = make_tiny_model_dir(tmp_path / "policy", seed=2)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    calls = []
    f = reward_function(tiny_scorer)

    def counted(prompts, completions, **kw):
        out = f(prompts, completions, **kw)
        calls.append(out)
        return out

    counted.__name__ = f.__name__
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS[:2]] * 2})
    cfg = trl.GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                         num_generations=2, max_completion_length=6, learning_rate=1e-3, logging_steps=1,
                         report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0,
                         dataloader_num_workers=0, temperature=1.0)
    trainer = trl.GRPOTrainer(model=model, processing_class=tok, reward_funcs=[counted], args=cfg, train_dataset=ds)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert len(calls) >= 2 and all(len(c) == 2 for c in calls)
    logged = [h for h in trainer.state.log_history if any(k.startswith("rewards/freeprm_min") for k in h)]
    assert len(logged) == 2
    vals = [v for h in logged for k, v in h.items() if k.startswith("rewards/freeprm_min") and k.endswith("mean")]
    assert vals and all(math.isfinite(v) for v in vals)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
