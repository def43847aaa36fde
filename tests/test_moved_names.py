"""Names moved by the issue-15 redesign still import for one release, with a DeprecationWarning."""

import importlib
import sys

import pytest


def test_rl_auroc_alias():
    import freeprm.rl
    from freeprm.eval.metrics import auroc

    with pytest.warns(DeprecationWarning, match="freeprm.eval.metrics.auroc"):
        assert freeprm.rl.auroc is auroc
    with pytest.raises(AttributeError):
        freeprm.rl.not_a_name  # noqa: B018


def test_trainer_trainer_alias():
    import freeprm.trainer

    sys.modules.pop("freeprm.trainer.trainer", None)
    with pytest.warns(DeprecationWarning, match="freeprm.trainer.trainer is deprecated"):
        mod = importlib.import_module("freeprm.trainer.trainer")
    assert mod is freeprm.trainer and mod.Trainer is freeprm.trainer.Trainer and mod.train is freeprm.trainer.train
