"""Implicit-PRM training: losses over response rewards, data, reference log-prob cache, the trainer."""

from .losses import ce_loss, dpo_loss, kto_loss, kto_ref_point, nca_loss, response_rewards
from .trainer import TrainConfig, Trainer, TrainResult, train

__all__ = ["ce_loss", "dpo_loss", "kto_loss", "kto_ref_point", "nca_loss", "response_rewards",
           "TrainConfig", "Trainer", "TrainResult", "train"]
