"""``FreePRMRewardManager`` driven the way verl 0.5.0 and verl 0.9.1 drive a reward manager, with stand-ins.

verl is not installed in CI (it pulls Ray, vLLM, ...). The stand-ins below re-do, in a few lines each, what
the named release does (read from its wheel): where ``register`` puts the class and how the trainer looks it
up (``verl/workers/reward_manager/registry.py`` in 0.5.0; ``verl/experimental/reward_loop/reward_manager/
registry.py`` in 0.9.1), how ``load_reward_manager`` constructs it (``verl/trainer/ppo/reward.py``), how a
module is loaded from ``pkg://`` or a file path (0.9.1 ``verl/utils/import_utils.load_module``), and how the
0.9.1 reward-loop worker calls ``run_single`` (``RewardLoopWorker.compute_score_batch``) and assembles
``rm_scores``. ``test_verl_real.py`` runs the same against a real verl where one is importable.
"""

import asyncio
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

import freeprm.integrations._verl as impl
from freeprm.integrations.verl import FreePRMRewardManager, check_verl_version, settings_from_config

from test_verl_manager import ITEMS, FakeDataProto, make_batch


class SlicingDataProto(FakeDataProto):
    """DataProto's ``data[i:i + 1]`` (0.9.1's worker hands ``run_single`` one-row slices) and ``len``."""

    def __getitem__(self, item):
        assert isinstance(item, slice)
        return SlicingDataProto({k: v[item] for k, v in self.batch.items()},
                                {k: v[item] for k, v in self.non_tensor_batch.items()})


def _registry_module(name: str) -> types.ModuleType:
    """A registry as both releases write it: ``register(name)`` refuses a second, different class."""
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.REGISTRY = {}

    def register(key):
        def deco(cls):
            if key in mod.REGISTRY and mod.REGISTRY[key] is not cls:
                raise ValueError(f"reward manager {key} has already been registered")
            mod.REGISTRY[key] = cls
            return cls
        return deco

    def get_reward_manager_cls(key):
        if key not in mod.REGISTRY:
            raise ValueError(f"Unknown reward manager: {key}")
        return mod.REGISTRY[key]

    mod.register, mod.get_reward_manager_cls = register, get_reward_manager_cls
    return mod


@pytest.fixture
def fake_verl(monkeypatch):
    """Install a stand-in ``verl`` of a given version and its registries; returns (version) -> registries."""
    def install(version: str):
        verl = types.ModuleType("verl")
        verl.__spec__ = importlib.machinery.ModuleSpec("verl", None)
        verl.__version__ = version
        monkeypatch.setitem(sys.modules, "verl", verl)
        regs = {"legacy": _registry_module("verl.workers.reward_manager")}
        monkeypatch.setitem(sys.modules, "verl.workers.reward_manager", regs["legacy"])
        if version.startswith("0.9"):  # 0.9.1 ships both packages; its trainer reads only the reward loop's
            regs["loop"] = _registry_module("verl.experimental.reward_loop.reward_manager")
            monkeypatch.setitem(sys.modules, "verl.experimental.reward_loop.reward_manager", regs["loop"])
        else:
            monkeypatch.setitem(sys.modules, "verl.experimental.reward_loop.reward_manager", None)
        monkeypatch.setattr(impl, "registered_in", [])
        impl._register_with_verl()
        return regs
    return install


def test_verl_0_9_1_registration_where_its_trainer_looks(fake_verl):
    regs = fake_verl("0.9.1")
    assert regs["loop"].get_reward_manager_cls("freeprm") is FreePRMRewardManager  # 0.9.1 resolve_reward_manager_cls
    assert regs["legacy"].get_reward_manager_cls("freeprm") is FreePRMRewardManager
    impl._register_with_verl()  # importing twice (train + validation actors) registers the same class again: fine


def test_verl_0_5_0_registration(fake_verl):
    regs = fake_verl("0.5.0")
    assert regs["legacy"].get_reward_manager_cls("freeprm") is FreePRMRewardManager
    assert impl.registered_in == ["verl.workers.reward_manager"]


def test_unsupported_verl_is_not_registered_and_says_why(fake_verl):
    with pytest.warns(RuntimeWarning, match=r"verl 0\.3\.1 is not supported.*0\.5\.0 and 0\.9\.1"):
        regs = fake_verl("0.3.1")
    with pytest.raises(ValueError, match="Unknown reward manager"):
        regs["legacy"].get_reward_manager_cls("freeprm")


@pytest.mark.parametrize("version,kind", [("0.4.1", "reward_manager"), ("0.5.0", "reward_manager"),
                                          ("0.9.1", "reward_loop"), ("0.7.0", "reward_manager+reward_loop"),
                                          ("0.9.1.dev0+abc", "reward_loop")])
def test_check_verl_version(version, kind):
    assert check_verl_version(version) == kind


@pytest.mark.parametrize("version", ["0.3.1", "1.0.0", "banana"])
def test_check_verl_version_refuses(version):
    with pytest.raises(ValueError, match="verl"):
        check_verl_version(version)


def _load_module_like_verl_0_9_1(module_path: str):
    """0.9.1 ``load_module``: ``pkg://a.b`` -> import_module("a.b"); a file path -> exec under a unique name."""
    if module_path.startswith("pkg://"):
        return importlib.import_module(module_path[len("pkg://"):].replace("/", "."))
    spec = importlib.util.spec_from_file_location(f"custom_module_{hash(module_path)}", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_verl_0_9_1_loads_the_class_by_pkg_and_by_file_path():
    """Both give the one registered class (before: the file path failed on the relative imports)."""
    by_pkg = _load_module_like_verl_0_9_1("pkg://freeprm.integrations.verl").FreePRMRewardManager
    path = Path(impl.__file__).with_name("verl.py")
    by_file = _load_module_like_verl_0_9_1(str(path)).FreePRMRewardManager
    assert by_pkg is FreePRMRewardManager and by_file is FreePRMRewardManager


def _verl_0_9_1_load_reward_manager(cls, config, tokenizer, compute_score):
    """0.9.1 ``load_reward_manager``: keyword construction from the config, no ``reward_kwargs``."""
    return cls(config=config, tokenizer=tokenizer, compute_score=compute_score, reward_router_address=None,
               reward_model_tokenizer=None)


def _verl_0_9_1_compute_rm_score(manager, data):
    """0.9.1 ``RewardLoopWorker.compute_score_batch`` (one ``run_single`` task per row, gathered) then
    ``RewardLoopManager.compute_rm_score``'s ``assemble_rm_scores`` and extra-info collection."""
    async def batch():
        return await asyncio.gather(*[manager.run_single(data[i:i + 1]) for i in range(len(data))])

    outputs = asyncio.run(batch())
    scores = [o["reward_score"] for o in outputs]
    rm_scores = type(manager).assemble_rm_scores(data, scores)
    keys = list(outputs[0]["reward_extra_info"].keys())
    return rm_scores, {k: [o["reward_extra_info"][k] for o in outputs] for k in keys}


class CountingPRM:
    def __init__(self, scorer):
        self.scorer, self.tokenizer, self.calls = scorer, scorer.tokenizer, 0

    def score(self, items, *, aggregate="min"):
        return self.scorer.score(items, aggregate=aggregate)

    def token_rewards_from_ids(self, *args):
        self.calls += 1
        return self.scorer.token_rewards_from_ids(*args)


def test_verl_0_9_1_run_single_from_config(tiny_scorer, tiny_model_dir, tiny_ref_dir):
    """Settings come from ``config.reward.reward_kwargs`` (where 0.9.1 migrates ``reward_model.reward_kwargs``);
    each response's reward sits on its last valid token: prm_coef * sum(dense) + outcome_coef * outcome."""
    data = make_batch(tiny_scorer, ITEMS)
    data = SlicingDataProto(data.batch, data.non_tensor_batch)

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        return {"score": float(ground_truth in solution_str)}

    config = {"reward": {"reward_kwargs": {"policy": tiny_model_dir, "reference": tiny_ref_dir, "beta": 0.5,
                                           "prm_coef": 0.5, "outcome_coef": 2.0, "overlong_buffer_cfg": None}},
              "data": {"reward_fn_key": "data_source"}}
    manager = _verl_0_9_1_load_reward_manager(FreePRMRewardManager, config, tiny_scorer.tokenizer, compute_score)
    rm, extra = _verl_0_9_1_compute_rm_score(manager, data)
    want = tiny_scorer.score(ITEMS)
    outcome = [1.0, 0.0, 1.0]
    p = data.batch["prompts"].shape[1]
    n = data.batch["attention_mask"][:, p:].sum(1)
    for i, w in enumerate(want):
        expected = 0.5 * float(w.token_rewards.sum()) + 2.0 * outcome[i]
        assert rm[i, n[i] - 1].item() == pytest.approx(expected, abs=1e-4)
        assert (rm[i, :n[i] - 1] == 0).all() and (rm[i, n[i]:] == 0).all()
    assert extra["outcome_score"] == outcome
    assert extra["prm_num_tokens"] == [len(w.token_rewards) for w in want]


def test_verl_0_9_1_min_step_and_one_forward_per_gather(tiny_scorer):
    data = make_batch(tiny_scorer, ITEMS)
    data = SlicingDataProto(data.batch, data.non_tensor_batch)
    prm = CountingPRM(tiny_scorer)
    manager = FreePRMRewardManager(config={"freeprm": {"aggregate": "min"}}, tokenizer=tiny_scorer.tokenizer,
                                   compute_score=None, prm=prm)  # a model object as an argument, the rest from config
    rm, extra = _verl_0_9_1_compute_rm_score(manager, data)
    want = tiny_scorer.score(ITEMS, aggregate="min")
    assert prm.calls == 1  # the three gathered run_single calls shared one forward
    assert extra["prm_min_step"] == pytest.approx([w.score for w in want], abs=1e-4)
    assert rm.sum(1).tolist() == pytest.approx([w.score for w in want], abs=1e-4)


def test_verl_0_9_1_async_compute_score_and_errors(tiny_scorer):
    data = make_batch(tiny_scorer, ITEMS[:2])
    data = SlicingDataProto(data.batch, data.non_tensor_batch)

    async def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        return float(ground_truth in solution_str)

    manager = FreePRMRewardManager(config={"reward": {"reward_kwargs": {"outcome_coef": 1.0, "prm_coef": 0.0}}},
                                   tokenizer=tiny_scorer.tokenizer, compute_score=compute_score, prm=tiny_scorer)
    rm, extra = _verl_0_9_1_compute_rm_score(manager, data)
    assert extra["outcome_score"] == [1.0, 0.0] and rm.sum(1).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"reward\.reward_kwargs\.policy"):
        FreePRMRewardManager(config={"reward": {}}, tokenizer=tiny_scorer.tokenizer, compute_score=None)
    with pytest.raises(ValueError, match="aggregate"):
        FreePRMRewardManager(config={"freeprm": {"aggregate": "median"}}, prm=tiny_scorer)


def test_settings_from_config_precedence():
    config = {"reward_model": {"reward_kwargs": {"policy": "a", "beta": 0.1, "max_resp_len": 8}},
              "reward": {"reward_kwargs": {"beta": 0.2}}, "freeprm": {"granularity": "step"}}
    assert settings_from_config(config) == {"policy": "a", "beta": 0.2, "granularity": "step"}


def test_verl_0_5_0_load_reward_manager_and_compute_reward(fake_verl, tiny_scorer, tiny_model_dir, tiny_ref_dir):
    """0.5.0 ``load_reward_manager`` looks the name up in ``verl.workers.reward_manager`` and passes
    ``reward_kwargs``; ``compute_reward`` calls it with ``return_dict=True``: dense token rewards."""
    regs = fake_verl("0.5.0")
    reward_kwargs = {"policy": tiny_model_dir, "reference": tiny_ref_dir, "beta": 0.5}
    cls = regs["legacy"].get_reward_manager_cls("freeprm")
    reward_fn = cls(tokenizer=tiny_scorer.tokenizer, num_examine=0, compute_score=None, reward_fn_key="data_source",
                    **reward_kwargs)
    data = make_batch(tiny_scorer, ITEMS)
    result = reward_fn(data, return_dict=True)
    rt = result["reward_tensor"]
    for i, w in enumerate(tiny_scorer.score(ITEMS)):
        assert torch.allclose(rt[i, :len(w.token_rewards)], w.token_rewards, atol=1e-5)
    assert set(result["reward_extra_info"]) == {"prm_reward_sum", "prm_num_tokens"}


def test_manager_pickles(tiny_scorer):
    """verl 0.5 with ``launch_reward_fn_async`` ships the manager to a Ray task (pickled)."""
    import pickle

    m = FreePRMRewardManager(tiny_scorer.tokenizer, 0, prm=tiny_scorer)
    m2 = pickle.loads(pickle.dumps(m))
    data = make_batch(tiny_scorer, ITEMS[:1])
    assert torch.allclose(m2(data), m(data), atol=1e-6)


def test_verl_0_9_1_extra_info_keys_on_every_sample(tiny_scorer):
    """0.9.1 builds ``non_tensor_batch[key]`` from the first sample's keys over all samples: an empty response
    must carry the same keys (it gets reward 0)."""
    items = [ITEMS[0], {"prompt": "What is 7 * 6?", "response": "42"}]
    data = make_batch(tiny_scorer, items)
    p = data.batch["prompts"].shape[1]
    data.batch["attention_mask"][1, p:] = 0  # the second response: no tokens
    data = SlicingDataProto(data.batch, data.non_tensor_batch)
    manager = FreePRMRewardManager(config={"freeprm": {"aggregate": "min"}}, tokenizer=tiny_scorer.tokenizer,
                                   compute_score=None, prm=tiny_scorer)
    rm, extra = _verl_0_9_1_compute_rm_score(manager, data)
    assert extra["prm_num_tokens"][1] == 0 and extra["prm_min_step"][1] == 0.0 and rm[1].abs().sum() == 0
