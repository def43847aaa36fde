"""verl adapter (``freeprm/integrations/_verl.py`` holds the code and its documentation).

This module only re-exports, with absolute imports, so verl can load it either way its reward-loop config
allows: ``pkg://freeprm.integrations.verl`` or this file's path (verl then imports it under another module
name, where relative imports would fail). Either way there is one class, registered once as ``"freeprm"``.
"""

from freeprm.integrations._verl import (  # noqa: F401
    AGGREGATES,
    GRANULARITIES,
    REGISTRIES,
    TESTED_VERL,
    FreePRMRewardManager,
    check_verl_version,
    registered_in,
    settings_from_config,
)

__all__ = ["FreePRMRewardManager", "check_verl_version", "settings_from_config"]
