"""The adapters accept a ``freeprm.rl.ImplicitPRM`` (skipped until freeprm.rl is present)."""

import json
import urllib.request

import pytest
import torch

rl = pytest.importorskip("freeprm.rl")

ITEMS = [{"prompt": "What is 48 / 2 + 48?", "response": "48 / 2 = 24.\n\n24 + 48 = 72.\n\nThe answer is 72."},
         {"prompt": "What is 7 * 6?", "response": "7 * 6 = 42.\n\nThe answer is 42."}]


@pytest.fixture(scope="module")
def prm(tiny_model_dir, tiny_ref_dir):
    return rl.ImplicitPRM(tiny_model_dir, reference=tiny_ref_dir, beta=0.5, lr=1e-2, device="cpu")


def test_trl_reward_function_with_implicit_prm(prm, tiny_scorer):
    from freeprm.integrations.trl import reward_function

    f = reward_function(prm)
    got = f([it["prompt"] for it in ITEMS], [it["response"] for it in ITEMS])
    want = [r.score for r in tiny_scorer.score(ITEMS)]  # same models and beta, before any update
    assert got == pytest.approx(want, abs=1e-5)


def test_verl_manager_and_server_report_version(prm, tiny_scorer):
    from freeprm.integrations.openrlhf import RewardServer
    from freeprm.integrations.verl import FreePRMRewardManager

    from test_verl_manager import make_batch

    data = make_batch(tiny_scorer, ITEMS)
    mgr = FreePRMRewardManager(tiny_scorer.tokenizer, 0, prm=prm)
    before = mgr(data, return_dict=True)
    v0 = prm.version
    assert before["reward_extra_info"]["prm_version"] == [v0, v0]
    want = tiny_scorer.score(ITEMS)
    for i, w in enumerate(want):
        assert torch.allclose(before["reward_tensor"][i, :len(w.token_rewards)], w.token_rewards, atol=1e-5)

    p = data.batch["prompts"].shape[1]
    ids = torch.cat([data.batch["prompts"], data.batch["responses"]], 1)
    rm = torch.zeros_like(data.batch["attention_mask"], dtype=torch.bool)
    rm[:, p:] = data.batch["attention_mask"][:, p:].bool()
    prm.update(ids, data.batch["attention_mask"], rm, torch.tensor([1.0, 0.0]))
    after = mgr(data, return_dict=True)
    assert after["reward_extra_info"]["prm_version"] == [v0 + 1] * 2
    assert not torch.allclose(after["reward_tensor"], before["reward_tensor"])  # the manager sees the update

    with RewardServer(prm, "127.0.0.1", 0) as s:
        body = json.dumps({"query": [it["prompt"] + it["response"] for it in ITEMS],
                           "prompts": [it["prompt"] for it in ITEMS]}).encode()
        with urllib.request.urlopen(urllib.request.Request(s.url + "/get_reward", data=body), timeout=60) as r:
            out = json.loads(r.read())
    assert out["extra_logs"]["model_version"] == [v0 + 1] * 2
    assert out["rewards"] == pytest.approx([r.score for r in prm.score(ITEMS)], abs=1e-5)
