"""Trainer: gradients vs the naive full-logits path, learning on a tiny model, accumulation, resume, checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file

from freeprm.engine import load_model, sequence_logprobs
from freeprm.testing import naive_sequence_logprobs
from freeprm.trainer import TrainConfig, losses, train
from freeprm.trainer.data import build_items, collate, load_examples


def _cfg(**kw):
    base = dict(lr=3e-3, beta=0.1, batch_size=4, max_steps=6, progress=False, warmup_steps=1, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_grads_match_naive_full_logits(tiny_model_dir, data_path):
    """The same CE/DPO losses through sequence_logprobs and through [B, T, V] logits: values and every param grad."""
    model, tok = load_model(tiny_model_dir)
    items, _ = build_items(tok, load_examples(data_path, "ce"), "ce", max_length=64)
    seqs = [it.seqs[0] for it in items[:6]]
    b = collate(seqs, pad_id=tok.pad_token_id)  # ragged lengths: padding exercised
    y = torch.tensor([it.label for it in items[:6]])
    ref = torch.randn(b.input_ids.shape, generator=torch.Generator().manual_seed(1)) * b.target_mask

    def run(fn):
        model.zero_grad()
        lp = fn(model, b.input_ids, b.attention_mask, b.target_mask)
        r = losses.response_rewards(lp, ref, b.target_mask, beta=0.7)
        loss = losses.ce_loss(r, y) + 0.3 * losses.dpo_loss(r[0::2], r[1::2])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    l_lean, g_lean = run(lambda *a: sequence_logprobs(*a, impl="torch"))
    l_naive, g_naive = run(naive_sequence_logprobs)
    torch.testing.assert_close(l_lean, l_naive, rtol=1e-5, atol=1e-6)
    for n in g_naive:
        scale = g_naive[n].abs().max().item() + 1e-12
        torch.testing.assert_close(g_lean[n], g_naive[n], rtol=1e-4, atol=1e-5 * scale, msg=n)


def _rewards(model_dir, ref_dir, items):
    """Response rewards of items' first sequences under a trained model vs its reference (ref_dir)."""
    pol, tok = load_model(model_dir)
    ref, _ = load_model(ref_dir)
    b = collate([it.seqs[0] for it in items], pad_id=tok.pad_token_id)
    with torch.no_grad():
        lp = sequence_logprobs(pol, b.input_ids, b.attention_mask, b.target_mask)
        lr = sequence_logprobs(ref, b.input_ids, b.attention_mask, b.target_mask)
    return losses.response_rewards(lp, lr, b.target_mask, beta=0.1)


@pytest.mark.parametrize("loss", ["ce", "dpo", "nca", "kto"])
def test_tiny_run_learns(tiny_model_dir, data_path, tmp_path, loss):
    """Loss falls, and at the end correct responses get higher rewards than incorrect ones."""
    res = train(tiny_model_dir, data_path, tmp_path / "out", config=_cfg(loss=loss, max_steps=16, ref_cache_dir=str(tmp_path / "rc")))
    first = sum(r["loss"] for r in res.metrics[:3]) / 3
    last = sum(r["loss"] for r in res.metrics[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    _, tok = load_model(tiny_model_dir)
    items, _ = build_items(tok, load_examples(data_path, "ce"), "ce")
    r = _rewards(res.final_dir, tiny_model_dir, items)
    y = torch.tensor([it.label for it in items]).bool()
    assert float(r[y].mean()) > float(r[~y].mean()) + 0.1
    wins = (r[0::2] > r[1::2]).float().mean()  # rows alternate correct, incorrect of one prompt
    assert float(wins) >= 0.75, r
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {"loss", "reward_correct", "reward_incorrect", "accuracy", "margin", "lr"} <= set(rows[0])
    assert rows[-1]["margin"] > 0 and rows[-1]["accuracy"] >= 0.75


def test_reference_free_run(tiny_model_dir, data_path, tmp_path):
    res = train(tiny_model_dir, data_path, tmp_path / "out", config=_cfg(reference_free=True, max_steps=3))
    assert res.ref_cache is None and res.steps == 3 and res.final_dir is not None
    assert res.metrics[-1]["reward_correct"] < 0  # r = beta * log pi: negative without a reference


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_grad_accumulation_and_checkpointing_keep_the_gradient(tiny_model_dir, data_path):
    """batch 4 x accum 1, batch 2 x accum 2, and activation checkpointing: one gradient at the optimizer step."""
    from freeprm.trainer import Trainer

    grads = []
    for bs, acc, ckpt in ((4, 1, False), (2, 2, False), (4, 1, True)):
        model, tok = load_model(tiny_model_dir)
        items, _ = build_items(tok, load_examples(data_path, "ce"), "ce")
        trainer = Trainer(model, tok, items, _cfg(batch_size=bs, grad_accum=acc, reference_free=True,
                                                  grad_checkpointing=ckpt))
        trainer.optimizer.step = lambda: grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        row = trainer.train_step()
        assert row["items"] == 4 and trainer.pos == 4
    for other in grads[1:]:
        for k in grads[0]:
            torch.testing.assert_close(other[k], grads[0][k], rtol=1e-4, atol=1e-7, msg=k)


def test_resume_equals_uninterrupted(tiny_model_dir, data_path, tmp_path):
    """N steps, checkpoint, resume, N steps == 2N steps: weights, and the metrics of the resumed steps."""
    rc = str(tmp_path / "rc")
    cfg = _cfg(max_steps=8, batch_size=3, grad_accum=2, weight_decay=0.01, ref_cache_dir=rc)  # 16 items / 6: epoch wraps
    full = train(tiny_model_dir, data_path, tmp_path / "full", config=cfg)
    part = train(tiny_model_dir, data_path, tmp_path / "part", config=cfg, until_step=4)
    assert part.final_dir is None and (tmp_path / "part" / "checkpoint-4" / "optimizer.pt").is_file()
    torch.manual_seed(1234)  # the RNG state must come from the checkpoint, not from here
    rest = train(tiny_model_dir, data_path, tmp_path / "part", config=cfg, resume="auto")
    assert rest.steps == 8 and [r["step"] for r in rest.metrics] == [5, 6, 7, 8]
    for x, y in zip(full.metrics[4:], rest.metrics):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
        assert x["lr"] == pytest.approx(y["lr"])
    wf = load_file(str(full.final_dir / "model.safetensors"))
    wr = load_file(str(rest.final_dir / "model.safetensors"))
    for k in wf:
        torch.testing.assert_close(wf[k], wr[k], rtol=1e-4, atol=1e-6, msg=k)
    rows = [json.loads(ln)["step"] for ln in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 9))
    with pytest.raises(ValueError, match="lr=0.5"):
        train(tiny_model_dir, data_path, tmp_path / "part", config=_cfg(max_steps=8, lr=0.5), resume=tmp_path / "part" / "checkpoint-4")


def test_checkpoint_loads_as_policy_and_scores(tiny_model_dir, data_path, tmp_path):
    res = train(tiny_model_dir, data_path, tmp_path / "out", config=_cfg(max_steps=2, save_every=1, keep_checkpoints=1,
                                                                    grad_checkpointing=True, ref_cache_dir=str(tmp_path / "rc")))
    ckpts = sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-1"]  # saved at step 1; step 2 is the final model
    for d in (res.final_dir, tmp_path / "out" / "checkpoint-1"):
        assert (d / "model.safetensors").is_file() and not list(d.glob("*.bin"))
        model, tok = load_model(str(d))
        assert len(tok) == model.config.vocab_size
    from freeprm.engine import Scorer

    out = Scorer(str(res.final_dir), reference=tiny_model_dir, beta=0.1, step_delimiter="\n").score(
        [{"prompt": "What is 3 + 4?", "response": "3 + 4 = 7.\nThe answer is 7."}])
    assert len(out[0].step_rewards) == 2 and torch.isfinite(out[0].step_rewards).all()


def test_train_last_layers_freezes_the_rest(tiny_model_dir, data_path, tmp_path):
    res = train(tiny_model_dir, data_path, tmp_path / "out", config=_cfg(max_steps=2, train_last_layers=1,
                                                                    ref_cache_dir=str(tmp_path / "rc")))
    before, after = load_file(f"{tiny_model_dir}/model.safetensors"), load_file(str(res.final_dir / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.layers.1.", "model.norm.")) for k in changed), changed
    assert any(k.startswith("model.layers.1.mlp") for k in changed)
    with pytest.raises(ValueError, match="has 2 layers"):
        train(tiny_model_dir, data_path, tmp_path / "o2", config=_cfg(train_last_layers=3, reference_free=True))


def test_bad_config():
    with pytest.raises(ValueError, match="loss must be"):
        TrainConfig(loss="ppo").validate()
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step").validate()


def test_lr_schedule():
    from freeprm.trainer.schedule import lr_lambda

    assert [lr_lambda(s, 10, 2, "cosine", 0.0) for s in (0, 1)] == [0.5, 1.0]
    assert lr_lambda(2, 10, 2, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_lambda(6, 10, 2, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_lambda(6, 10, 2, "linear", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(9, 10, 2, "constant", 0.0) == 1.0


def test_a_registered_loss_trains_without_trainer_changes(tiny_model_dir, data_path, monkeypatch):
    """A new registry entry (a pair hinge loss) is validated, fed pairs and optimized by the unchanged trainer."""
    from freeprm.trainer import Trainer

    spec = losses.LossSpec(lambda x, opt: torch.relu(1.0 - (x.rewards - x.rejected)).mean(), pairs=True)
    monkeypatch.setitem(losses.REGISTRY, "hinge", spec)
    model, tok = load_model(tiny_model_dir)
    items, _ = build_items(tok, load_examples(data_path, "hinge"), "hinge")
    assert all(len(it.seqs) == 2 for it in items)  # labeled rows were paired: the spec says pairs
    trainer = Trainer(model, tok, items, _cfg(loss="hinge", reference_free=True, batch_size=4))
    idx = trainer.epoch_order(0)[:4]
    with torch.no_grad():  # the expected first-step loss, from the model before its update
        b = collate([items[i].seqs[k] for k in (0, 1) for i in idx], pad_id=tok.pad_token_id)
        r = losses.response_rewards(sequence_logprobs(model, b.input_ids, b.attention_mask, b.target_mask),
                                    None, b.target_mask, beta=0.1)
        want = float(torch.relu(1.0 - (r[:4] - r[4:])).mean())
    row = trainer.train_step()
    assert row["loss"] == pytest.approx(want, rel=1e-5) and row["pair_accuracy"] is not None
