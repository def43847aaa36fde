"""Adapters that put an implicit PRM into RL frameworks (``docs/rl.md``, section Adapters).

* ``freeprm.integrations.trl.reward_function``: a TRL ``GRPOTrainer`` reward function.
* ``freeprm.integrations.openrlhf.RewardServer`` / ``freeprm serve``: OpenRLHF's remote reward protocol over HTTP.
* ``freeprm.integrations.verl.FreePRMRewardManager``: a verl reward manager with dense token rewards.
* ``freeprm.integrations.search_and_learn.SearchAndLearnPRM``: HF search-and-learn's ``PRM`` interface
  (step scores in [0, 1]; ``docs/search.md``).

Each accepts a ``freeprm.engine.Scorer`` or a ``freeprm.rl.ImplicitPRM`` (see ``_common.py`` for the
contract). Submodules are imported on use, so none of TRL / verl is needed to import this package.
"""
