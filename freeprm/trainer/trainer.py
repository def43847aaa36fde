"""Deprecated alias of :mod:`freeprm.trainer` (this module held only the package's re-exports, no Trainer: they
now live in ``freeprm/trainer/__init__.py``); removed in the next release."""

import sys
import warnings

from .. import trainer

warnings.warn("freeprm.trainer.trainer is deprecated; import from freeprm.trainer (or its modules: loop, run, "
              "config, schedule, checkpoint)", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = trainer
