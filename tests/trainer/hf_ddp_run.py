"""Run by tests/trainer/test_hf_trainer.py: a few ImplicitPRMTrainer steps, one process or under torchrun (gloo, CPU).

argv: policy_dir data.jsonl out_dir per_device_batch loss. Rank 0 saves the weights to out_dir/weights.pt.
"""

import os
import sys

import torch
from transformers import TrainingArguments

from freeprm.engine import load_model
from freeprm.trainer.hf import ImplicitPRMTrainer, prm_dataset


class InOrder(ImplicitPRMTrainer):
    def _get_train_sampler(self, train_dataset=None):  # the same item order in every run (no shuffle)
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


def main() -> None:
    policy, data, out, per_device, loss = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    torch.manual_seed(0)
    model, tok = load_model(policy)
    model.train()
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=per_device, max_steps=2, learning_rate=1e-3,
                             lr_scheduler_type="constant", use_cpu=True, report_to=[],
                             ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
                             save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0,
                             disable_tqdm=True, ddp_find_unused_parameters=False)
    with args.main_process_first():
        ds = prm_dataset(model, tok, data, loss=loss, cache_dir=out + "/refcache")
    trainer = InOrder(model=model, args=args, train_dataset=ds, processing_class=tok, loss=loss, beta=0.5,
                      reference=policy)
    trainer.train()
    trainer.save_model(out + "/final")
    if trainer.is_world_process_zero():
        torch.save({k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(model).state_dict().items()},
                   out + "/weights.pt")
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        torch.save(torch.tensor(losses), out + "/losses.pt")


if __name__ == "__main__":
    main()
