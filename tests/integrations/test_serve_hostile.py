"""``freeprm serve`` / ``RewardServer`` under hostile or broken clients (issue 19, item 6).

Every test is bounded: clients use short socket timeouts, so a server that hangs fails the test instead of
stalling the suite.
"""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from freeprm.integrations.openrlhf import RewardServer

ITEM = ("What is 7 * 6?", "7 * 6 = 42.\n\nThe answer is 42.")


def _post(url, body: bytes, timeout=180):  # the first score() may build the C++ kernel (~1 min)
    req = urllib.request.Request(url + "/get_reward", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _good_body(i=0):
    p, r = ITEM
    return json.dumps({"query": [f"{p} #{i}" + r], "prompts": [f"{p} #{i}"]}).encode()


def _connect(s: RewardServer) -> socket.socket:
    c = socket.create_connection((s.host, s.port), timeout=10)
    c.settimeout(10)
    return c


def _closed_by_server(c: socket.socket, within: float) -> bool:
    """True if the server closes ``c`` (EOF or reset) within ``within`` seconds (anything it sends is read)."""
    c.settimeout(within)
    try:
        while c.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


@pytest.fixture
def server(tiny_scorer):
    with RewardServer(tiny_scorer, "127.0.0.1", 0, batch_wait_ms=1, read_timeout_s=1.0, max_connections=8) as s:
        yield s


@pytest.fixture
def plain_server(tiny_scorer):
    """A server built with the options it always had (so these tests also ran against the code before the fix)."""
    with RewardServer(tiny_scorer, "127.0.0.1", 0, batch_wait_ms=1) as s:
        yield s


def test_huge_integer_and_deep_nesting_are_400(plain_server):
    code, out = _post(plain_server.url, b'{"query": [' + b"7" * 5000 + b'], "prompts": ["a"]}')
    assert code == 400 and "not valid JSON" in out["error"]
    code, out = _post(plain_server.url, b"[" * 200_000 + b"]" * 200_000)
    assert code == 400 and "nested too deeply" in out["error"]
    assert _post(plain_server.url, _good_body())[0] == 200  # and the server still answers


@pytest.mark.parametrize("opts,name", [
    ({"batch_wait_ms": float("inf")}, "batch_wait_ms"), ({"batch_wait_ms": 1e12}, "batch_wait_ms"),
    ({"batch_wait_ms": float("nan")}, "batch_wait_ms"), ({"batch_wait_ms": -1}, "batch_wait_ms"),
    ({"max_batch_size": 0}, "max_batch_size"), ({"max_batch_size": 10**9}, "max_batch_size"),
    ({"port": 70000}, "port"), ({"port": -1}, "port"), ({"read_timeout_s": 0}, "read_timeout_s"),
    ({"read_timeout_s": float("inf")}, "read_timeout_s"), ({"max_connections": 0}, "max_connections"),
    ({"invalid_reward": float("nan")}, "invalid_reward"),
])
def test_numeric_options_are_bounded(tiny_scorer, opts, name):
    with pytest.raises(ValueError, match=name):
        RewardServer(tiny_scorer, "127.0.0.1", **{"port": 0, **opts})


@pytest.mark.parametrize("argv,flag", [
    (["--port", "70000"], "--port"), (["--port", "-1"], "--port"), (["--batch-wait-ms", "inf"], "--batch-wait-ms"),
    (["--batch-wait-ms", "1e12"], "--batch-wait-ms"), (["--max-batch-size", "0"], "--max-batch-size"),
    (["--read-timeout-s", "nan"], "--read-timeout-s"), (["--max-connections", "100000"], "--max-connections"),
])
def test_serve_cli_checks_options_before_loading_the_model(tmp_path, capsys, argv, flag):
    """A model path that does not exist: the option's message comes first, so nothing was loaded."""
    from freeprm.cli import main

    assert main(["serve", "--policy", str(tmp_path / "no-such-model"), *argv]) == 2
    err = capsys.readouterr().err
    assert flag in err and "no-such-model" not in err and "Traceback" not in err


def test_half_sent_requests_time_out_and_free_their_threads(server, capfd):
    before = threading.active_count()
    idle = [_connect(server) for _ in range(3)]  # connected, nothing sent
    half = _connect(server)
    half.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"query\"")  # body cut short
    for c in idle + [half]:
        assert _closed_by_server(c, within=5.0)
        c.close()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before
    err = capfd.readouterr().err
    assert "timed out" in err and "Traceback" not in err
    assert _post(server.url, _good_body())[0] == 200


def test_connections_over_the_bound_get_503(tiny_scorer):
    with RewardServer(tiny_scorer, "127.0.0.1", 0, read_timeout_s=5.0, max_connections=2) as s:
        held = [_connect(s) for _ in range(2)]
        time.sleep(0.2)
        extra = _connect(s)
        extra.settimeout(5)
        reply = extra.recv(4096)
        assert reply.startswith(b"HTTP/1.1 503") and b"too many open connections" in reply
        for c in held + [extra]:
            c.close()
        deadline = time.monotonic() + 5
        code = None
        while time.monotonic() < deadline:  # the slots come back once the held connections are closed
            try:
                code = _post(s.url, _good_body())[0]
            except (urllib.error.URLError, ConnectionError):  # refused while a closed slot is not yet released
                code = None
            if code == 200:
                break
            time.sleep(0.1)
        assert code == 200


def test_client_disconnecting_mid_request_logs_one_line(plain_server, capfd):
    server = plain_server
    c = _connect(server)
    c.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"query\": [")
    c.close()
    deadline = time.monotonic() + 5
    err = ""
    while "disconnected" not in err and time.monotonic() < deadline:
        time.sleep(0.05)
        err += capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "disconnected mid-request" in lines[0] and "Traceback" not in err
    assert _post(server.url, _good_body())[0] == 200


class _DyingPRM:
    """Scores like the wrapped scorer until ``die`` is set; then raises a BaseException the loop cannot absorb."""

    def __init__(self, scorer):
        self.scorer, self.tokenizer, self.die = scorer, scorer.tokenizer, False

    def score(self, items, *, aggregate="min"):
        if self.die:
            raise SystemExit("simulated crash of the scoring thread")
        return self.scorer.score(items, aggregate=aggregate)


@pytest.mark.parametrize("how", ["overflow", "crash"])
def test_dead_scoring_thread_answers_503_and_never_hangs(tiny_scorer, capfd, how):
    """``overflow``: the OverflowError that ``--batch-wait-ms inf`` caused (forced past the option check);
    ``crash``: a BaseException inside score(). Waiting and later requests get 503 with the reason; /health too."""
    prm = _DyingPRM(tiny_scorer)
    with RewardServer(prm, "127.0.0.1", 0, batch_wait_ms=0) as s:
        assert _post(s.url, _good_body())[0] == 200
        if how == "overflow":
            s.batch_wait = float("inf")
        else:
            prm.die = True
        results = [None] * 3

        def go(i):
            results[i] = _post(s.url, _good_body(i), timeout=15)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        later = _post(s.url, _good_body(9), timeout=15)
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(s.url + "/health", timeout=10)
    want = "OverflowError" if how == "overflow" else "SystemExit"
    for code, out in results + [later]:
        assert code == 503 and "scoring thread stopped" in out["error"] and want in out["error"]
    assert health.value.code == 503
    err = capfd.readouterr().err
    assert err.count("the scoring thread stopped") == 1 and want in err


def test_load_slow_disconnecting_and_good_clients(tiny_scorer):
    """Bounded loopback load: 4 slow clients (headers, then silence), 4 that disconnect mid-body, 4 that
    disconnect before the reply, and 8 good clients x 2 requests, all at once. Every good request is answered
    200 with the Scorer's reward."""
    pairs = [(f"Question {i}: what is {i} + {i}?", f"{i} + {i} = {2 * i}.\n\nThe answer is {2 * i}.") for i in range(8)]
    want = [r.score for r in tiny_scorer.score([{"prompt": p, "response": r} for p, r in pairs])]
    good: dict = {}
    start = threading.Barrier(20)
    with RewardServer(tiny_scorer, "127.0.0.1", 0, batch_wait_ms=20, read_timeout_s=1.0, max_connections=32) as s:
        def slow(_):
            c = _connect(s)
            start.wait()
            c.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            _closed_by_server(c, within=10)
            c.close()

        def cut_body(_):
            c = _connect(s)
            start.wait()
            c.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"query\": [\"a")
            c.close()

        def leave_early(i):
            c = _connect(s)
            start.wait()
            body = _good_body(100 + i)
            c.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            c.close()

        def good_client(i):
            start.wait()
            p, r = pairs[i]
            good[i] = [_post(s.url, json.dumps({"query": [p + r], "prompts": [p]}).encode(), timeout=180)
                       for _ in range(2)]

        threads = [threading.Thread(target=f, args=(i,)) for f in (slow, cut_body, leave_early) for i in range(4)]
        threads += [threading.Thread(target=good_client, args=(i,)) for i in range(8)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads) and time.monotonic() - t0 < 120
    assert sorted(good) == list(range(8))
    for i, answers in good.items():
        for code, out in answers:
            assert code == 200 and out["rewards"][0] == pytest.approx(want[i], abs=1e-5)
