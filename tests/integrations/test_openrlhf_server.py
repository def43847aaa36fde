"""freeprm.integrations.openrlhf.RewardServer on a loopback ephemeral port, and the ``freeprm serve`` command."""

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from freeprm.integrations.openrlhf import RewardServer, is_loopback

ITEMS = [("What is 48 / 2 + 48?", "48 / 2 = 24.\n\n24 + 48 = 72.\n\nThe answer is 72."),
         ("What is 7 * 6?", "7 * 6 = 42.\n\nThe answer is 42."),
         ("Natalia sold clips.", "She sold 48 + 24 = 72 clips.\n\nThe answer is 72.")]


def _post(url, payload, raw=None):
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url + "/get_reward", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _payload(pairs, **kw):
    return {"query": [p + r for p, r in pairs], "prompts": [p for p, _ in pairs], **kw}


@pytest.fixture(scope="module")
def server(tiny_scorer):
    with RewardServer(tiny_scorer, "127.0.0.1", 0, max_batch_size=64, batch_wait_ms=100) as s:
        yield s


def test_rewards_equal_scorer(server, tiny_scorer):
    code, out = _post(server.url, _payload(ITEMS, labels=["72", "42", "72"], return_step_rewards=True))
    assert code == 200
    want = tiny_scorer.score([{"prompt": p, "response": r} for p, r in ITEMS])
    assert out["rewards"] == pytest.approx([w.score for w in want], abs=1e-5)
    assert out["scores"] == out["rewards"]
    for got, w in zip(out["step_rewards"], want):
        assert got == pytest.approx(w.step_rewards.tolist(), abs=1e-5)
    assert out["extra_logs"]["prm_num_steps"] == [len(w.step_rewards) for w in want]
    assert out["extra_logs"]["prm_num_tokens"] == [len(w.token_rewards) for w in want]
    code, out = _post(server.url, _payload(ITEMS[:1]))
    assert code == 200 and "step_rewards" not in out


def test_empty_response_and_health(server):
    code, out = _post(server.url, _payload([("Hi", ""), ITEMS[1]]))
    assert code == 200 and out["rewards"][0] == 0.0 and out["extra_logs"]["prm_num_steps"][0] == 0
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


@pytest.mark.parametrize("raw,payload,msg", [
    (b"{not json", None, "not valid JSON"),
    (None, [1, 2], "JSON object"),
    (None, {"query": "abc", "prompts": ["a"]}, "'query' must be a list"),
    (None, {"query": ["ab"]}, "0.4.6) sends only 'query' and is not supported"),
    (None, {"query": ["ab"], "prompts": "a"}, "'prompts' must be a list"),
    (None, {"query": ["ab", "cd"], "prompts": ["a"]}, "'prompts' has 1 entries"),
    (None, {"query": ["ab"], "prompts": ["a"], "labels": [1, 2]}, "'labels'"),
    (None, {"query": ["ab"], "prompts": ["a"], "return_step_rewards": "yes"}, "return_step_rewards"),
])
def test_bad_requests_are_400(server, raw, payload, msg):
    code, out = _post(server.url, payload, raw)
    assert code == 400 and msg in out["error"]


def test_row_that_does_not_fit_its_prompt_is_a_row_error(server):
    code, out = _post(server.url, {"query": ["ab", ITEMS[1][0] + ITEMS[1][1]], "prompts": ["x", ITEMS[1][0]]})
    assert code == 200 and out["rewards"][0] == 0.0 and "does not start with" in out["errors"][0]
    assert out["errors"][1] is None and out["extra_logs"]["prm_invalid"] == [1, 0]


def test_scorer_rejection_is_a_row_error_and_others_unaffected(server, tiny_scorer):
    """A response the scorer rejects (too long) fails alone, even batched with good ones: its row gets the
    sentinel reward and an 'errors' entry; the other rows and requests are scored."""
    too_long = ("Q", "7 * 6 = 42. " * (tiny_scorer.max_length // 2))
    results = {}
    barrier = threading.Barrier(3)

    def go(key, pairs):
        barrier.wait()
        results[key] = _post(server.url, _payload(pairs))

    threads = [threading.Thread(target=go, args=(k, v)) for k, v in
               [("bad", [too_long, ITEMS[0]]), ("good1", ITEMS[:1]), ("good2", ITEMS[1:])]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = [r.score for r in tiny_scorer.score([{"prompt": p, "response": r} for p, r in ITEMS])]
    code, bad = results["bad"]
    assert code == 200 and "max_length" in bad["errors"][0] and bad["errors"][1] is None
    assert bad["rewards"][0] == 0.0 and bad["rewards"][1] == pytest.approx(want[0], abs=1e-5)
    assert results["good1"][0] == 200 and results["good1"][1]["rewards"] == pytest.approx(want[:1], abs=1e-5)
    assert results["good2"][0] == 200 and results["good2"][1]["rewards"] == pytest.approx(want[1:], abs=1e-5)


def test_unknown_path_404(server):
    req = urllib.request.Request(server.url + "/nope", data=b"{}")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 404


def test_concurrent_requests_batched(tiny_scorer):
    pairs = [(f"Question {i}: what is {i} + {i}?", f"{i} + {i} = {2 * i}.\n\nThe answer is {2 * i}.") for i in range(8)]
    want = [r.score for r in tiny_scorer.score([{"prompt": p, "response": r} for p, r in pairs])]
    results = [None] * 8
    barrier = threading.Barrier(8)
    with RewardServer(tiny_scorer, "127.0.0.1", 0, max_batch_size=64, batch_wait_ms=300) as s:
        def go(i):
            barrier.wait()
            results[i] = _post(s.url, _payload([pairs[i]]))

        threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batches = s.batches_scored
    assert all(code == 200 for code, _ in results)
    assert [out["rewards"][0] for _, out in results] == pytest.approx(want, abs=1e-5)
    assert batches < 8  # requests were scored together


def test_max_batch_size_one_and_shutdown(tiny_scorer):
    s = RewardServer(tiny_scorer, "127.0.0.1", 0, max_batch_size=1, batch_wait_ms=0).start()
    code, out = _post(s.url, _payload(ITEMS[:2]))  # a request larger than the batch is scored whole
    assert code == 200 and len(out["rewards"]) == 2
    url = s.url
    s.shutdown()
    assert not any(t.is_alive() for t in s._threads)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/health", timeout=5)


def test_loopback_only_by_default(tiny_scorer):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.com")
    with pytest.raises(ValueError, match="allow_remote"):
        RewardServer(tiny_scorer, "0.0.0.0", 0)
    with pytest.raises(ValueError, match="max_batch_size"):
        RewardServer(tiny_scorer, "127.0.0.1", 0, max_batch_size=0)


def test_serve_cli(tiny_model_dir):
    """``freeprm serve`` starts, answers, refuses a public host without --allow-remote, and stops on SIGINT."""
    from freeprm.cli import main

    assert main(["serve", "--policy", tiny_model_dir, "--host", "0.0.0.0"]) == 2
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "freeprm.cli", "serve", "--policy", tiny_model_dir, "--port", "0",
                             "--prompt-format", "chat", "--aggregate", "sum"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while not lines or "serving rewards at" not in lines[-1]:  # model loading may print progress first
            lines.append(proc.stderr.readline())
            assert lines[-1] and len(lines) < 50, lines
        line = lines[-1]
        url = line.split(" at ")[1].split("/get_reward")[0]
        code, out = _post(url, _payload(ITEMS[:1]))
        from freeprm.engine import Scorer

        want = Scorer(tiny_model_dir, aggregate="sum").score([{"prompt": ITEMS[0][0], "response": ITEMS[0][1]}])[0]
        assert code == 200 and out["rewards"][0] == pytest.approx(want.score, abs=1e-5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_docs_curl_body_is_a_valid_request():
    """The curl example in docs/rl.md parses as a request: query = prompt + a two-step response."""
    import re
    from pathlib import Path

    from freeprm.integrations.openrlhf import parse_request

    text = (Path(__file__).resolve().parents[2] / "docs" / "rl.md").read_text()
    body = re.search(r"-d '(\{.*?\})'", text, re.S).group(1)
    parsed = parse_request(body.encode())
    items, step = parsed.items, parsed.step_rewards
    assert step is True and parsed.errors == [None] and len(items) == 1 and items[0]["label"] == "42"
    assert items[0]["response"] == "7 * 6 = 42.\n\nThe answer is 42."
