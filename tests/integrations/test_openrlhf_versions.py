"""``freeprm serve`` called the way each OpenRLHF release calls a remote reward model, read back the way it reads.

Each client below re-does, with the test's tokenizer, what the named release does (read from its wheel,
``openrlhf/utils/remote_rm_utils.py``, ``trainer/ppo_utils/experience_maker.py``, ``utils/agent.py``):
which fields it posts, how it builds ``query`` (padding, truncation, ``skip_special_tokens=False``) and how it
turns the JSON reply into tensors. OpenRLHF itself is not installed (it pulls vLLM/DeepSpeed).
"""

import json
import urllib.error
import urllib.request

import pytest
import torch

from freeprm.integrations.openrlhf import RewardServer

PAIRS = [("What is 48 / 2 + 48?", "48 / 2 = 24.\n\n24 + 48 = 72.\n\nThe answer is 72."),
         ("What is 7 * 6?", "7 * 6 = 42.\n\nThe answer is 42."),
         ("Natalia sold clips.", "She sold 48 + 24 = 72 clips.\n\nThe answer is 72.")]


class HTTPFailed(Exception):
    """What OpenRLHF's request wrapper ends in after its retries (raise_for_status on every try)."""


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url + "/get_reward", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=180) as r:  # the first score() may build the C++ kernel
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # requests' raise_for_status -> retried, then an exception
        raise HTTPFailed(f"{e.code}: {e.read()[:300]!r}") from None


def chat_prompt(tok, question: str) -> str:
    """The prompt text OpenRLHF posts (its dataset applied the chat template with the generation prompt)."""
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)


def generate(tok, response: str) -> list[int]:
    """Stand-in for vLLM: the response's token ids, ending with EOS (finish_reason 'stop')."""
    return tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


@pytest.fixture(scope="module")
def raw_scorer(tiny_model_dir, tiny_ref_dir):
    from freeprm.engine import Scorer

    return Scorer(tiny_model_dir, tiny_ref_dir, beta=0.5, prompt_format="raw")  # what `freeprm serve` builds


def _want(scorer, prompts, responses):
    return [r.score for r in scorer.score([{"prompt": p, "response": r} for p, r in zip(prompts, responses)])]


# --------------------------------------------------------------------------- 0.4.6
def test_openrlhf_0_4_6_query_only_is_refused_with_a_clear_message(raw_scorer):
    """0.4.6 ``remote_rm_fn`` posts ``{"query": queries}`` only; freeprm cannot split it and says so."""
    tok = raw_scorer.tokenizer
    queries = [chat_prompt(tok, q) + r for q, r in PAIRS]
    with RewardServer(raw_scorer, "127.0.0.1", 0) as s:
        req = urllib.request.Request(s.url + "/get_reward", data=json.dumps({"query": queries}).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400
        msg = json.loads(e.value.read())["error"]
    assert "0.4" in msg and "not supported" in msg and "'prompts'" in msg


# --------------------------------------------------------------------------- 0.6.0
def openrlhf_0_6_0_queries(tok, prompts, responses) -> list[str]:
    """0.6.0 ``_generate_vllm`` + ``process_sequences`` + ``batch_decode(sequences, skip_special_tokens=False)``:
    prompts left-padded, outputs right-padded with the pad id, EOS written after the last real token."""
    pad, eos = tok.pad_token_id, tok.eos_token_id
    p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    o_ids = [generate(tok, r) for r in responses]
    pl, ol = max(map(len, p_ids)), max(map(len, o_ids))
    seqs = torch.tensor([[pad] * (pl - len(p)) + p + o + [pad] * (ol - len(o)) for p, o in zip(p_ids, o_ids)])
    mask = (seqs.ne(eos) & seqs.ne(pad)).long()
    eos_idx = seqs.size(1) - mask.fliplr().argmax(dim=1, keepdim=True).clamp(min=1)
    seqs.scatter_(1, eos_idx, eos)
    return tok.batch_decode(seqs, skip_special_tokens=False)


def openrlhf_0_6_0_read(reply: dict) -> torch.Tensor:
    """0.6.0 ``request_api_wrapper``: ``assert "rewards" in response``; ``remote_rm_fn``: ``torch.tensor(scores)``."""
    assert "rewards" in reply, reply
    return torch.tensor(reply["rewards"])


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_openrlhf_0_6_0_padded_queries(raw_scorer, tiny_model_dir, tiny_ref_dir, pad_is_eos):
    """Pad text at both ends and the EOS text are stripped; rewards equal the Scorer's on the bare response.

    ``pad_is_eos``: SmolLM2's tokenizer pads with ``<|im_end|>``, its EOS."""
    scorer = raw_scorer
    if pad_is_eos:
        from freeprm.engine import Scorer

        scorer = Scorer(tiny_model_dir, tiny_ref_dir, beta=0.5, prompt_format="raw")
        scorer.tokenizer.pad_token = scorer.tokenizer.eos_token
    tok = scorer.tokenizer
    prompts = [chat_prompt(tok, q) for q, _ in PAIRS]
    responses = [r for _, r in PAIRS]
    queries = openrlhf_0_6_0_queries(tok, prompts, responses)
    assert any(q.startswith(tok.pad_token) for q in queries)  # what 0.6.0 really sends: left pads,
    assert all(q.endswith(tok.pad_token) or q.endswith(tok.eos_token) for q in queries)  # EOS and right pads
    with RewardServer(scorer, "127.0.0.1", 0) as s:
        rewards = openrlhf_0_6_0_read(_post(s.url, {"query": queries, "prompts": prompts, "labels": ["72", "42", "72"]}))
    assert rewards.tolist() == pytest.approx(_want(scorer, prompts, responses), abs=1e-5)


def test_openrlhf_0_6_0_one_bad_row_does_not_fail_the_request(raw_scorer):
    """A row whose query does not hold its prompt gets the sentinel reward and an 'errors' entry; others score."""
    tok = raw_scorer.tokenizer
    prompts = [chat_prompt(tok, q) for q, _ in PAIRS]
    responses = [r for _, r in PAIRS]
    queries = openrlhf_0_6_0_queries(tok, prompts, responses)
    queries[1] = "something else entirely " + responses[1]
    with RewardServer(raw_scorer, "127.0.0.1", 0, invalid_reward=-1.5) as s:
        reply = _post(s.url, {"query": queries, "prompts": prompts, "labels": [None] * 3})
    rewards = openrlhf_0_6_0_read(reply)
    want = _want(raw_scorer, prompts, responses)
    assert rewards[0] == pytest.approx(want[0], abs=1e-5) and rewards[2] == pytest.approx(want[2], abs=1e-5)
    assert rewards[1] == -1.5
    assert reply["errors"][0] is None and reply["errors"][2] is None and "query 1" in reply["errors"][1]
    assert reply["extra_logs"]["prm_invalid"] == [0, 1, 0]


# --------------------------------------------------------------------------- 0.8.11
def openrlhf_0_8_11_queries(tok, prompts, responses) -> list[str]:
    """0.8.11: ``sequences = prompt_token_ids + output token_ids`` (no padding: ``remove_pad_token``), decoded with
    ``skip_special_tokens=False``."""
    return tok.batch_decode([tok(p, add_special_tokens=False)["input_ids"] + generate(tok, r)
                             for p, r in zip(prompts, responses)], skip_special_tokens=False)


def openrlhf_0_8_11_update_samples_with_rewards(rewards_info: list[dict], samples_len: list[int]):
    """0.8.11 ``experience_maker.update_samples_with_rewards`` (the tensor handling, verbatim in effect)."""
    rewards = torch.cat([torch.as_tensor(info["rewards"]) for info in rewards_info], dim=0).split(samples_len)
    if "scores" in rewards_info[0]:
        scores = torch.cat([torch.as_tensor(info["scores"]) for info in rewards_info], dim=0).split(samples_len)
    else:
        scores = rewards
    logs = {}
    if "extra_logs" in rewards_info[0]:
        logs = {key: torch.cat([info["extra_logs"][key] for info in rewards_info], dim=0).split(samples_len)
                for key in rewards_info[0]["extra_logs"].keys()}
    return rewards, scores, logs


def test_openrlhf_0_8_11_needs_no_extra_logs(raw_scorer):
    """0.8.11 ``torch.cat``s the ``extra_logs`` values, which JSON delivers as lists: with the default reply its
    loop raises TypeError (upstream's own server fails the same way); ``extra_logs=False`` (``--no-extra-logs``)
    leaves them out and the rewards arrive."""
    tok = raw_scorer.tokenizer
    prompts = [chat_prompt(tok, q) for q, _ in PAIRS]
    responses = [r for _, r in PAIRS]
    queries = openrlhf_0_8_11_queries(tok, prompts, responses)
    payload = {"query": queries, "prompts": prompts, "labels": ["72", "42", "72"]}
    with RewardServer(raw_scorer, "127.0.0.1", 0) as s:
        reply = _post(s.url, payload)
    with pytest.raises(TypeError):
        openrlhf_0_8_11_update_samples_with_rewards([reply], [3])
    with RewardServer(raw_scorer, "127.0.0.1", 0, extra_logs=False) as s:
        reply = _post(s.url, payload)
    assert "extra_logs" not in reply
    rewards, scores, _ = openrlhf_0_8_11_update_samples_with_rewards([reply], [3])
    assert rewards[0].tolist() == pytest.approx(_want(raw_scorer, prompts, responses), abs=1e-5)
    assert torch.equal(scores[0], rewards[0])


# --------------------------------------------------------------------------- 0.11.2
def openrlhf_0_11_2_request(tok, prompt: str, response: str, max_prompt_length: int) -> dict:
    """0.11.2 ``SingleTurnAgentExecutor.execute``: one query per request, the prompt's token ids left-truncated to
    ``max_prompt_length``, ``query = decode(prompt_ids + action_ids, skip_special_tokens=False)``, but the original
    ``prompt`` text posted."""
    prompt_ids = tok(text=prompt, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    query = tok.decode(prompt_ids + generate(tok, response), skip_special_tokens=False)
    return {"query": [query], "prompts": [prompt], "labels": [None]}


def openrlhf_0_11_2_read(reply: dict) -> dict:
    """0.11.2: ``scores`` (else ``rewards``) of the first reply; ``_process_response_into_experience`` makes
    ``torch.tensor([reward_val])`` and ``torch.tensor([value])`` of every ``extra_logs`` value."""
    score = reply.get("scores")
    if score is None:
        score = reply.get("rewards")
    info = {"reward": torch.tensor([reply.get("rewards")]), "score": torch.tensor([score])}
    for key, value in (reply.get("extra_logs") or {}).items():
        info[key] = torch.tensor([value])
    return info


def test_openrlhf_0_11_2_left_truncated_prompt_still_gets_a_reward(raw_scorer):
    tok = raw_scorer.tokenizer
    question = "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. " * 3
    prompt, response = chat_prompt(tok, question), PAIRS[2][1]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    keep = n_prompt // 2
    payload = openrlhf_0_11_2_request(tok, prompt, response, max_prompt_length=keep)
    assert not payload["query"][0].startswith(prompt)  # what made freeprm answer 400 before
    seen = tok.decode(tok(prompt, add_special_tokens=False)["input_ids"][-keep:])  # the prompt the policy saw
    with RewardServer(raw_scorer, "127.0.0.1", 0) as s:
        info = openrlhf_0_11_2_read(_post(s.url, payload))
        short = openrlhf_0_11_2_read(_post(s.url, openrlhf_0_11_2_request(tok, prompt, response, n_prompt)))
    want = _want(raw_scorer, [seen], [response])[0]
    assert info["reward"].flatten().tolist() == pytest.approx([want], abs=1e-5)
    assert info["score"].flatten().tolist() == pytest.approx([want], abs=1e-5)
    assert info["prm_num_tokens"].item() == len(tok(response, add_special_tokens=False)["input_ids"])
    assert short["reward"].item() == pytest.approx(_want(raw_scorer, [prompt], [response])[0], abs=1e-5)


# --------------------------------------------------------------------------- trailing EOS, everywhere
def test_trailing_eos_is_not_scored_in_serve_scorer_and_trl(raw_scorer):
    """OpenRLHF decodes with special tokens kept, so its responses end in the EOS text; TRL strips it. The EOS
    text is not part of the response: the same rewards, token count and steps either way."""
    from freeprm.integrations.trl import reward_function

    tok = raw_scorer.tokenizer
    prompt, response = chat_prompt(tok, PAIRS[1][0]), PAIRS[1][1]
    eos = tok.eos_token
    bare, with_eos = raw_scorer.score([{"prompt": prompt, "response": response},
                                       {"prompt": prompt, "response": response + eos}])
    assert len(with_eos.token_rewards) == len(bare.token_rewards)
    assert torch.equal(with_eos.token_rewards, bare.token_rewards) and torch.equal(with_eos.step_rewards, bare.step_rewards)
    f = reward_function(raw_scorer, aggregate="min")
    assert f(prompts=[prompt, prompt], completions=[response, response + eos + tok.pad_token]) == \
        pytest.approx([bare.score] * 2, abs=1e-6)
    assert f(prompts=[prompt], completions=[eos]) == [None]  # an EOS-only completion has nothing to score
    query = openrlhf_0_8_11_queries(tok, [prompt], [response])[0]
    assert query.endswith(eos)
    with RewardServer(raw_scorer, "127.0.0.1", 0) as s:
        reply = _post(s.url, {"query": [query, prompt + eos], "prompts": [prompt, prompt]})
    assert reply["rewards"][0] == pytest.approx(bare.score, abs=1e-5)
    assert reply["extra_logs"]["prm_num_tokens"] == [len(bare.token_rewards), 0]
    assert reply["rewards"][1] == 0.0 and "errors" not in reply  # EOS alone: an empty response


def test_split_query_rules_and_suffix_search():
    """The three rules of ``split_query``, and the O(n) suffix search against a brute force on random strings."""
    import random

    from freeprm.integrations.openrlhf import RequestError, _longest_suffix_prefix, split_query

    rng = random.Random(0)
    for _ in range(300):
        p = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        q = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        brute = max(k for k in range(min(len(p), len(q)) + 1) if p[len(p) - k:] == q[:k])
        assert _longest_suffix_prefix(p, q) == brute, (p, q)
    prompt = "<|im_start|>user\nA long question about clips and friends?<|im_end|>\n<|im_start|>assistant\n"
    assert split_query(prompt + "R", prompt) == (prompt, "R")
    assert split_query("<pad><pad>" + prompt + "R<pad>", prompt, ["<pad>"]) == (prompt, "R")
    assert split_query(prompt[-30:] + "R", prompt) == (prompt[-30:], "R")
    with pytest.raises(RequestError, match="does not start with its prompt"):
        split_query(prompt[-10:] + "R", prompt)  # under 16 characters of the prompt: not taken as truncation
    n = 200_000  # a border-heavy worst case stays linear
    assert _longest_suffix_prefix("a" * n, "a" * (n - 1) + "b") == n - 1
