"""Train an implicit PRM: an ORM on response-level labels with ``r = beta * log(pi_theta / pi_ref)``.

``train(policy, data, out, config=TrainConfig(...))`` is the whole run: load the policy, read
and tokenize the data (``data.py``), fetch the reference log-probs from the cache
(``ref_cache.py``; the reference defaults to the initial policy, as in the paper, and is then
computed by the policy itself before its first update), then optimize:

* AdamW, linear warmup then cosine / linear / constant schedule, gradient accumulation,
  gradient-norm clipping, optional gradient checkpointing, bf16 autocast on CUDA, seeds;
* policy log-probs from ``freeprm.engine.sequence_logprobs`` (LM head only at response tokens,
  never ``[tokens x vocab]`` logits), reference log-probs from the cache: no reference forward;
* one JSON line of metrics per optimizer step in ``<out>/metrics.jsonl`` and a tqdm bar;
* checkpoints ``<out>/checkpoint-<step>/`` (``save_pretrained`` safetensors + tokenizer +
  trainer state) and the final model in ``<out>/final/``, each loadable by ``load_model``.

Resume (``resume="auto"`` or a checkpoint path) restores weights, optimizer, scheduler, RNG
states and the data position (epoch + offset into that epoch's seeded permutation), so N steps,
save, resume, N more steps give the same weights as 2N uninterrupted steps.

Modules: ``config.py`` (``TrainConfig``), ``schedule.py`` (lr schedule), ``loop.py``
(``Trainer``), ``checkpoint.py`` (checkpoint I/O), ``run.py`` (``train``); the losses and their
registry are in ``losses.py``. Their public names are re-exported here (this package's ``__init__``).
"""

from .checkpoint import STATE_FORMAT, latest_checkpoint, read_state
from .config import SCHEDULES, TrainConfig
from .loop import StepMetrics, Trainer, freeze_all_but_last_layers
from .losses import ce_loss, dpo_loss, kto_loss, kto_ref_point, nca_loss, response_rewards
from .run import TrainResult, train
from .schedule import lr_lambda

__all__ = ["ce_loss", "dpo_loss", "kto_loss", "kto_ref_point", "nca_loss", "response_rewards",
           "STATE_FORMAT", "SCHEDULES", "StepMetrics", "TrainConfig", "TrainResult", "Trainer",
           "freeze_all_but_last_layers", "latest_checkpoint", "lr_lambda", "read_state", "train"]
