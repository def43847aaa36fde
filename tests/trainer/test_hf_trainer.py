"""freeprm's losses and reference cache inside transformers.Trainer (freeprm/trainer/hf.py): one process, and DDP
with two CPU processes (gloo) giving the weights of one process with the doubled batch."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from freeprm.engine import load_model
from freeprm.testing import naive_sequence_logprobs
from freeprm.trainer import losses
from freeprm.trainer.hf import ImplicitPRMTrainer, PRMCollator, prm_dataset

ROOT = Path(__file__).resolve().parents[2]


def write_rows(path, n_prompts=4):
    """Per prompt a correct and an incorrect response (the arithmetic set of tests/trainer/conftest.py)."""
    import json

    rows = []
    for i in range(n_prompts):
        a, b = 3 + i, 4 + 2 * i
        p = f"What is {a} + {b}?"
        rows += [{"prompt": p, "response": f"{a} + {b} = {a + b}.\nThe answer is {a + b}.", "label": 1},
                 {"prompt": p, "response": f"{a} + {b} = {a + b + 1}.\nThe answer is {a + b + 1}.", "label": 0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=1,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, **kw)


@pytest.mark.parametrize("loss", ["ce", "dpo", "kto"])
def test_compute_loss_and_gradients_equal_the_naive_loss(tiny_model_dir, tmp_path, loss):
    model, tok = load_model(tiny_model_dir)
    data = write_rows(tmp_path / "d.jsonl")
    ds = prm_dataset(model, tok, data, loss=loss, cache_dir=tmp_path / "rc")
    ref_model = copy.deepcopy(model)  # the initial policy is the reference
    batch = PRMCollator(tok.pad_token_id)([ds[i] for i in range(4)])
    for mode in ("chunked", "full"):
        m = copy.deepcopy(model).train()
        trainer = ImplicitPRMTrainer(model=m, args=_args(tmp_path), train_dataset=ds, processing_class=tok, loss=loss,
                                     beta=0.5, logprobs=mode)
        got = trainer.compute_loss(m, dict(batch))
        got.backward()
        # the oracle: full logits of policy and reference, the registered loss on the summed rewards
        n = 4
        q = copy.deepcopy(model).train()
        ids, am, tm = batch["input_ids"], batch["attention_mask"], batch["target_mask"]
        with torch.no_grad():
            lref = naive_sequence_logprobs(ref_model, ids, am, tm)
        lp = naive_sequence_logprobs(q, ids, am, tm)
        r = 0.5 * ((lp - lref) * tm).sum(-1)
        if loss == "dpo":
            want = losses.dpo_loss(r[:n], r[n:])
        elif loss == "ce":
            want = losses.ce_loss(r, batch["labels"])
        else:
            want = losses.kto_loss(r[:n], batch["labels"], losses.kto_ref_point(r[n:].detach()))
        want.backward()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for (name, a), (_, b) in zip(m.named_parameters(), q.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_ddp_two_cpu_processes_equal_one_process(tiny_model_dir, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): 2 x 2 items per step give the weights of 1 process x 4 items."""
    data = write_rows(tmp_path / "d.jsonl")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false",
               FREEPRM_CPU_EXT="0")  # the exact torch path: no C++ build in the children
    env.pop("CUDA_VISIBLE_DEVICES", None)
    script = str(ROOT / "tests" / "trainer" / "hf_ddp_run.py")
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, script, tiny_model_dir, str(data), str(one), "4", "ce"], env=env,
                        capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                         "--nproc_per_node", "2", script, tiny_model_dir, str(data), str(two), "2", "ce"], env=env,
                        capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = torch.load(one / "weights.pt"), torch.load(two / "weights.pt")
    init = load_model(tiny_model_dir)[0].state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    torch.testing.assert_close(torch.load(two / "losses.pt"), torch.load(one / "losses.pt"), atol=1e-4, rtol=1e-4)
    from freeprm.prm_meta import read_meta

    meta = read_meta(two / "final")  # the saved model describes itself: beta, the reference and its digest
    assert meta.scoring.beta == 0.5 and meta.training["loss"] == "ce" and meta.training["steps"] == 2
    assert meta.scoring.reference == str(Path(tiny_model_dir).resolve()) and meta.reference_digest.startswith("files:")
