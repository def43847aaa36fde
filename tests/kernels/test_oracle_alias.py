"""The deprecated ``freeprm.kernels.reference`` name still imports the oracle module, with a warning."""

import importlib
import sys

import pytest


def test_reference_alias_is_the_oracle_module_and_warns():
    from freeprm.kernels import oracle

    sys.modules.pop("freeprm.kernels.reference", None)
    with pytest.warns(DeprecationWarning, match="freeprm.kernels.oracle"):
        alias = importlib.import_module("freeprm.kernels.reference")
    assert alias is oracle
    from freeprm.kernels import reference  # the attribute form used by old code
    assert reference is oracle and reference.SEGMENT_OPS == oracle.SEGMENT_OPS
