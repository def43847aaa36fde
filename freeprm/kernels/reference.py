"""Deprecated alias of :mod:`freeprm.kernels.oracle` (renamed: "reference" means pi_ref); removed in the next release."""

import sys
import warnings

from . import oracle

warnings.warn("freeprm.kernels.reference is deprecated; import freeprm.kernels.oracle instead", DeprecationWarning,
              stacklevel=2)
sys.modules[__name__] = oracle
