"""Run FreePRMRewardManager inside a real verl (0.5.x or 0.9.x) on a real ``DataProto``; prints "OK <version>".

Run by ``test_verl_real.py`` in a subprocess whose PYTHONPATH holds one verl (two versions cannot share a
process). Uses verl's own ``load_reward_manager`` / ``compute_reward`` (0.5) and ``load_reward_manager`` /
``resolve_reward_manager_cls`` / ``RewardManagerBase.assemble_rm_scores`` (0.9), the tiny random models of
``freeprm.testing`` and compares with ``Scorer.score``.
"""

import asyncio
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    import verl
    from omegaconf import OmegaConf
    from verl import DataProto

    from freeprm.engine import Scorer
    from freeprm.integrations import verl as fv
    from freeprm.testing import make_tiny_model_dir

    from test_verl_manager import ITEMS, make_batch

    kind = "reward_loop" if verl.__version__.startswith("0.9") else "reward_manager"  # what this script checks
    tmp = Path(tempfile.mkdtemp())
    policy = make_tiny_model_dir(tmp / "policy", seed=0)
    reference = make_tiny_model_dir(tmp / "reference", seed=1)
    scorer = Scorer(policy, reference, beta=0.5)
    fake = make_batch(scorer, ITEMS)
    data = DataProto.from_dict(tensors=dict(fake.batch), non_tensors=dict(fake.non_tensor_batch))
    want = scorer.score(ITEMS)
    kwargs = {"policy": policy, "reference": reference, "beta": 0.5}
    tok = scorer.tokenizer
    p = fake.batch["prompts"].shape[1]
    n = fake.batch["attention_mask"][:, p:].sum(1)

    if kind == "reward_manager":  # 0.4 / 0.5: registry lookup + reward_kwargs, compute_reward(return_dict=True)
        from verl.trainer.ppo.reward import compute_reward, load_reward_manager

        config = OmegaConf.create({"reward_model": {"reward_manager": "freeprm", "reward_kwargs": kwargs,
                                                    "sandbox_fusion": {"url": None}},
                                   "data": {"reward_fn_key": "data_source"},
                                   "custom_reward_function": {"path": None, "name": "compute_score"}})
        reward_fn = load_reward_manager(config, tok, num_examine=0, **config.reward_model.get("reward_kwargs", {}))
        assert isinstance(reward_fn, fv.FreePRMRewardManager)
        reward_tensor, extra = compute_reward(data, reward_fn)
        for i, w in enumerate(want):
            assert torch.allclose(reward_tensor[i, :len(w.token_rewards)], w.token_rewards, atol=1e-5)
            assert (reward_tensor[i, len(w.token_rewards):] == 0).all()
        assert extra["prm_num_tokens"] == [len(w.token_rewards) for w in want]
    else:  # 0.9: reward loop; registry, pkg:// and file path
        from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
        from verl.trainer.ppo.reward import load_reward_manager, resolve_reward_manager_cls

        def config_for(source, path=None, name="freeprm"):
            return OmegaConf.create({"reward": {"reward_manager": {"name": name, "source": source,
                                                                   "module": {"path": path}},
                                                "custom_reward_function": {"path": None}, "sandbox_fusion": None,
                                                "reward_kwargs": kwargs},
                                     "data": {"reward_fn_key": "data_source"}})

        file_path = str(Path(fv.__file__))
        for cfg in (config_for("register"), config_for("importlib", "pkg://freeprm.integrations.verl",
                                                       "FreePRMRewardManager"),
                    config_for("importlib", file_path, "FreePRMRewardManager")):
            assert resolve_reward_manager_cls(cfg) is fv.FreePRMRewardManager, cfg.reward.reward_manager
        manager = load_reward_manager(config_for("register"), tok, reward_router_address=None,
                                      reward_model_tokenizer=None)

        async def batch():
            return await asyncio.gather(*[manager.run_single(data[i:i + 1]) for i in range(len(data))])

        outputs = asyncio.run(batch())
        scores = [o["reward_score"] for o in outputs]
        for i, w in enumerate(want):
            assert abs(scores[i] - float(w.token_rewards.sum())) < 1e-4, (scores[i], w.token_rewards.sum())
        ours = fv.FreePRMRewardManager.assemble_rm_scores(data, scores)
        theirs = RewardManagerBase.assemble_rm_scores(data, scores)
        assert torch.equal(ours, theirs)
        assert ours[np.arange(len(n)), n - 1].tolist() == scores
    assert fv.check_verl_version(verl.__version__) == kind
    print("OK", verl.__version__, kind)


if __name__ == "__main__":
    main()
