"""OpenRLHF remote reward server: ``freeprm serve`` answers ``POST /get_reward``.

OpenRLHF (``--remote_rm_url http://host:port/get_reward``) posts ``{"query": [...], "prompts": [...],
"labels": [...]}``: each ``query`` is the full text the policy saw and wrote (prompt + response, the
prompt already through the policy's chat template, decoded with special tokens kept) and ``prompts[i]``
is that prompt. ``split_query`` finds the response: ``query[i]`` minus ``prompts[i]``; failing that, the
same after removing the tokenizer's pad text from both ends of the query (OpenRLHF 0.6 decodes its padded
batch); failing that, minus the longest suffix of the prompt (>= 16 characters) the query starts with
(OpenRLHF 0.11 left-truncates long prompts yet posts the original prompt text; that suffix is then the
prompt scored). A trailing EOS / pad text is not scored (``freeprm/engine/tokenization.py``). The reply::

    {"rewards": [float], "scores": [float],
     "extra_logs": {"prm_num_steps": [int], "prm_num_tokens": [int], "prm_min_step": [float], "prm_invalid": [0|1]},
     "errors": [null | str],          # only when some row could not be scored
     "step_rewards": [[float]]}       # only when the request has "return_step_rewards": true

``rewards[i]`` is the response's aggregate implicit reward (``--aggregate``, default min step reward);
``scores`` repeats it (OpenRLHF uses ``scores`` for dynamic filtering and logs). ``extra_logs`` values are
per-response lists (``model_version`` added when the PRM counts its updates); ``extra_logs=False``
(``--no-extra-logs``) leaves the field out: OpenRLHF 0.8.x ``torch.cat``s its values and fails on lists.
An empty response (nothing after the prompt but end markers) gets reward 0.0 and ``prm_num_steps`` 0.
``labels`` are optional, length-checked and passed to the scorer as item metadata.

Errors. Per row (HTTP 200; the other rows are scored): a query that does not fit its prompt, or a response
the scorer rejects (e.g. over ``max_length``) -> ``rewards[i] = invalid_reward`` (``--invalid-reward``,
default 0.0; JSON has no NaN and OpenRLHF needs a number), ``errors[i]`` says why, ``prm_invalid[i] = 1``.
Per request: malformed JSON (also integers over Python's 4300-digit limit, nesting too deep), wrong types,
mismatched lengths, no ``prompts`` (OpenRLHF 0.4.x sends only ``query``: unsupported) -> 400
``{"error"}``. Unknown paths -> 404. ``GET /health`` -> ``{"status": "ok", ...}`` (503 ``"dead"`` once
the scoring thread has stopped).

Batching: request handler threads put parsed requests on a queue; one scoring thread takes the first
waiting request, then gathers more until it holds ``max_batch_size`` responses or ``batch_wait_ms`` has
passed, and scores them all in one ``score`` call (a request is never split; one larger than
``max_batch_size`` is scored alone). Rewards do not depend on batch mates (the engine guarantees it), so
batching changes throughput, not results. If the joint call rejects an item, the items are scored one by
one so only the bad ones get their error.

Hostile clients: every numeric option is bounded (``LIMITS``; checked before a model loads); each socket
read waits at most ``read_timeout_s`` and a body must arrive within it in all; at most ``max_connections``
connections are handled at once (one more gets 503 and is closed); a client that disconnects or times out
costs one log line, never a traceback. If the scoring thread stops for any reason, the reason is logged once
and every waiting and later request gets 503 with it (requests poll, so none waits forever).

Binding: loopback (127.0.0.1) by default. Any other host requires ``allow_remote=True``
(``--allow-remote``) and prints a warning: the server has no authentication.
"""

from __future__ import annotations

import ipaddress
import json
import math
import queue
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from freeprm.engine.tokenization import strip_end_markers
from freeprm.integrations._common import check_reward_model, finite_or_none, model_version, score_items

MAX_BODY_BYTES = 64 * 1024 * 1024


class RequestError(ValueError):
    """A request the server answers with HTTP 400."""


class Unavailable(RuntimeError):
    """The server cannot score (shutting down, or its scoring thread stopped): HTTP 503."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


MIN_TRUNCATED_PROMPT_CHARS = 16


def split_query(query: str, prompt: str, pad_texts: Sequence[str] = ()) -> tuple[str, str]:
    """``(prompt the policy saw, response)`` from one OpenRLHF query; ``RequestError`` when they do not fit.

    In order: (1) ``query`` starts with ``prompt``; (2) the same after removing the pad token's text from
    both ends of ``query`` (OpenRLHF 0.6 decodes the padded batch with ``skip_special_tokens=False``);
    (3) ``query`` starts with a suffix of ``prompt`` of at least ``MIN_TRUNCATED_PROMPT_CHARS`` characters
    (OpenRLHF 0.11 left-truncates long prompts to their last tokens but sends the original prompt): the
    longest such suffix is taken as the prompt the policy saw.
    """
    if query.startswith(prompt):
        return prompt, query[len(prompt):]
    q = query
    for pad in pad_texts:
        if not pad:
            continue
        while q.startswith(pad):
            q = q[len(pad):]
        while q.endswith(pad):
            q = q[:-len(pad)]
    if q.startswith(prompt):
        return prompt, q[len(prompt):]
    k = _longest_suffix_prefix(prompt, q)
    if k >= min(MIN_TRUNCATED_PROMPT_CHARS, len(prompt)) and k > 0:
        return prompt[len(prompt) - k:], q[k:]
    raise RequestError("the query does not start with its prompt (nor, after removing pad tokens, with the prompt or "
                       f"with its last {MIN_TRUNCATED_PROMPT_CHARS}+ characters); each query must be its prompt "
                       "followed by the response")


def _longest_suffix_prefix(prompt: str, query: str) -> int:
    """Length of the longest suffix of ``prompt`` that is a prefix of ``query`` (KMP failure function, O(n))."""
    n = min(len(prompt), len(query))
    if n == 0:
        return 0
    pat = query[:n]
    fail = [0] * n  # fail[i]: longest proper border of pat[:i + 1]
    k = 0
    for i in range(1, n):
        while k and pat[i] != pat[k]:
            k = fail[k - 1]
        if pat[i] == pat[k]:
            k += 1
        fail[i] = k
    k = 0  # match pat against the last n characters of prompt; k at the end = matched prefix length
    for ch in prompt[len(prompt) - n:]:
        while k and (k == n or ch != pat[k]):
            k = fail[k - 1]
        if ch == pat[k]:
            k += 1
    return k


@dataclass
class Parsed:
    """A parsed ``/get_reward`` body: one item per query (None where ``errors[i]`` says why it cannot be scored)."""

    items: list[dict | None]
    errors: list[str | None]
    step_rewards: bool


def parse_request(body: bytes, pad_texts: Sequence[str] = ()) -> Parsed:
    """A ``/get_reward`` body -> ``Parsed``; ``RequestError`` (HTTP 400) when the request as a whole is wrong.

    A query that does not fit its prompt is a per-row error (``Parsed.errors[i]``), not a request error.
    """
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and ints over the 4300-digit limit
        raise RequestError(f"the body is not valid JSON: {str(e)[:200]}") from None
    except RecursionError:
        raise RequestError("the body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise RequestError("the body must be a JSON object with 'query' and 'prompts' lists")
    query, prompts, labels = payload.get("query"), payload.get("prompts"), payload.get("labels")
    if not isinstance(query, list) or not all(isinstance(q, str) for q in query):
        raise RequestError("'query' must be a list of strings (prompt + response, as the policy saw them)")
    if prompts is None:
        raise RequestError("the body has no 'prompts': freeprm needs each query's prompt to find where the response "
                           "starts. OpenRLHF 0.4.x (e.g. 0.4.6) sends only 'query' and is not supported; OpenRLHF "
                           "0.6 and later send 'prompts'")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError("'prompts' must be a list of strings (each query's prompt prefix); freeprm needs them "
                           "to find where the response starts")
    if len(prompts) != len(query):
        raise RequestError(f"'prompts' has {len(prompts)} entries but 'query' has {len(query)}")
    if labels is not None and (not isinstance(labels, list) or len(labels) != len(query)):
        raise RequestError(f"'labels' must be a list with one entry per query ({len(query)})")
    step = payload.get("return_step_rewards", False)
    if not isinstance(step, bool):
        raise RequestError("'return_step_rewards' must be true or false")
    items: list[dict | None] = []
    errors: list[str | None] = []
    for i, (q, p) in enumerate(zip(query, prompts)):
        try:
            prompt, response = split_query(q, p, pad_texts)
        except RequestError as e:
            items.append(None)
            errors.append(f"query {i}: {e}")
            continue
        item = {"prompt": prompt, "response": response}
        if labels is not None:
            item["label"] = labels[i]
        items.append(item)
        errors.append(None)
    return Parsed(items, errors, step)


@dataclass
class _Job:
    items: list[dict]
    step_rewards: bool
    done: threading.Event = field(default_factory=threading.Event)
    results: list | None = None  # per item: a ScoreResult, None (empty response) or an error string
    error: str | None = None  # the whole job failed (503)


# bounds of the numeric options: a value outside them is refused when the server is built
LIMITS = {"port": (0, 65535), "max_batch_size": (1, 65536), "batch_wait_ms": (0.0, 10_000.0),
          "read_timeout_s": (0.1, 3600.0), "max_connections": (1, 4096)}


def check_options(**opts) -> None:
    """``ValueError`` naming the first option (``port``, ``max_batch_size``, ...) outside ``LIMITS`` or not finite."""
    for name, value in opts.items():
        lo, hi = LIMITS[name]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if isinstance(lo, int) and not isinstance(value, int):
            ok = False
        if not ok or not lo <= value <= hi:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{name} ({flag}) must be a finite {'integer' if isinstance(lo, int) else 'number'} "
                             f"from {lo} to {hi}, got {value!r}")


def _log(msg: str) -> None:
    print(f"freeprm serve: {msg}", file=sys.stderr, flush=True)


class RewardServer:
    """An OpenRLHF-compatible reward server over a Scorer or ImplicitPRM (see the module docstring).

    ``start()`` serves in background threads and returns; ``serve_forever()`` blocks; ``shutdown()``
    stops both the HTTP server and the scoring thread. ``port=0`` picks a free port (``self.port``).
    """

    def __init__(self, prm, host: str = "127.0.0.1", port: int = 5000, *, aggregate: str | None = None,
                 max_batch_size: int = 64, batch_wait_ms: float = 5.0, allow_remote: bool = False,
                 log_requests: bool = False, extra_logs: bool = True, invalid_reward: float = 0.0,
                 read_timeout_s: float = 60.0, max_connections: int = 64) -> None:
        check_reward_model(prm)
        check_options(port=port, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                      read_timeout_s=read_timeout_s, max_connections=max_connections)
        if not (isinstance(invalid_reward, (int, float)) and math.isfinite(invalid_reward)):
            raise ValueError(f"invalid_reward must be a finite number (JSON has no NaN), got {invalid_reward!r}")
        if not is_loopback(host):
            if not allow_remote:
                raise ValueError(f"host {host!r} is not a loopback address; the server has no authentication, so "
                                 "binding it to a network interface needs allow_remote=True (--allow-remote)")
            print(f"WARNING: serving rewards on {host}:{port} without authentication; anyone who can reach this "
                  "address can use the model", file=sys.stderr)
        self.prm, self.aggregate = prm, aggregate
        self.max_batch_size, self.batch_wait = int(max_batch_size), batch_wait_ms / 1000.0
        self.extra_logs, self.invalid_reward = bool(extra_logs), float(invalid_reward)
        self.read_timeout = float(read_timeout_s)
        tok = getattr(prm, "tokenizer", None)
        self.pad_texts = tuple(t for t in [getattr(tok, "pad_token", None)] if isinstance(t, str) and t)
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.dead_reason: str | None = None  # set when the scoring thread stopped on an error
        self._inflight: list[_Job] = []  # the batch being scored (failed with dead_reason if the thread dies)
        self.batches_scored = 0  # number of score() calls made (for tests and logs)
        server_cls = _IPv6Server if ":" in host else _Server
        self.httpd = server_cls((host, port), _make_handler(self, log_requests))
        self.httpd.daemon_threads = True
        self.httpd.slots = threading.BoundedSemaphore(int(max_connections))
        self.httpd.max_connections = int(max_connections)
        self.max_connections = int(max_connections)
        self.host, self.port = host, self.httpd.server_address[1]
        self._threads: list[threading.Thread] = []
        self._serving = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> RewardServer:
        """Serve in background threads; returns self."""
        self._threads = [threading.Thread(target=self._score_loop, name="freeprm-score", daemon=True),
                         threading.Thread(target=self.httpd.serve_forever, name="freeprm-http", daemon=True)]
        self._serving = True
        for t in self._threads:
            t.start()
        return self

    def serve_forever(self) -> None:
        """Serve until interrupted (Ctrl-C) or ``shutdown()``."""
        scorer = threading.Thread(target=self._score_loop, name="freeprm-score", daemon=True)
        scorer.start()
        self._serving = True
        try:
            self.httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self._stop.set()
            self._queue.put(None)
            scorer.join(timeout=5)
            self.httpd.server_close()

    def shutdown(self) -> None:
        """Stop serving; waiting requests are answered with an error, the port is released."""
        self._stop.set()
        self._queue.put(None)
        if self._serving:
            self._serving = False
            self.httpd.shutdown()
        for t in self._threads:
            t.join(timeout=10)
        self.httpd.server_close()
        self._fail_queued("the server is shutting down")

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ scoring
    def submit(self, items: list[dict], step_rewards: bool = False, timeout: float | None = None) -> list:
        """Score ``items`` through the batching queue (what a request does): one entry per item, a
        ``ScoreResult``, None (empty response) or an error string. ``Unavailable`` when the server cannot score."""
        if self.dead_reason is not None:
            raise Unavailable(self.dead_reason)
        if self._stop.is_set():
            raise Unavailable("the server is shutting down")
        job = _Job(items, step_rewards)
        self._queue.put(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not job.done.wait(0.2):  # poll, so a scoring thread that died after the put cannot leave us waiting
            if self.dead_reason is not None and not job.done.is_set():
                raise Unavailable(self.dead_reason)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("scoring did not finish in time")
        if job.error is not None:
            raise Unavailable(job.error)
        return job.results

    def _score_loop(self) -> None:
        try:
            self._gather_and_score()
        except BaseException as e:  # noqa: BLE001 - whatever stopped the thread, nobody may wait forever
            self.dead_reason = f"the scoring thread stopped ({type(e).__name__}: {e}); restart the server"
            _log(f"ERROR: {self.dead_reason}; every waiting and later request is answered 503")
            for job in self._inflight:
                job.error = self.dead_reason
                job.done.set()
            self._fail_queued(self.dead_reason)

    def _fail_queued(self, reason: str) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.error = reason
                job.done.set()

    def _gather_and_score(self) -> None:
        carry = None  # a request that did not fit the last batch: first in the next one
        while True:
            job = carry if carry is not None else self._queue.get()
            carry = None
            if job is None:
                break
            jobs, n, stop = [job], len(job.items), False
            deadline = time.monotonic() + self.batch_wait
            while n < self.max_batch_size:
                wait = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if n + len(nxt.items) > self.max_batch_size:
                    carry = nxt
                    break
                jobs.append(nxt)
                n += len(nxt.items)
            self._inflight = jobs + ([carry] if carry is not None else [])
            self._run(jobs)
            self._inflight = []
            if stop:
                break
        if carry is not None:
            self._queue.put(carry)

    def _run(self, jobs: list[_Job]) -> None:
        """Score every non-empty item of ``jobs`` in one call; if the scorer rejects it, item by item."""
        todo = [(j, k) for j in jobs for k, it in enumerate(j.items)
                if it is not None and self._strip(it["response"]).strip()]
        for j in jobs:
            j.results = [None] * len(j.items)
        try:
            try:
                results = score_items(self.prm, [j.items[k] for j, k in todo], self.aggregate)
                self.batches_scored += 1
            except ValueError:  # find the bad item(s): the others are still scored
                results = []
                for j, k in todo:
                    try:
                        results.append(score_items(self.prm, [j.items[k]], self.aggregate)[0])
                    except ValueError as e:
                        results.append(f"query {k}: {e}")
                self.batches_scored += 1
            for (j, k), r in zip(todo, results):
                j.results[k] = r
        except Exception as e:  # noqa: BLE001 - a server must answer, not die
            _log(f"internal error while scoring {len(todo)} responses: {type(e).__name__}: {e}")
            for j in jobs:
                j.error = f"internal error: {type(e).__name__}: {e}"
        for j in jobs:  # not in a finally: after a BaseException _score_loop sets the error, then done
            j.done.set()

    def _strip(self, response: str) -> str:
        tok = getattr(self.prm, "tokenizer", None)
        return strip_end_markers(response, tok) if tok is not None else response

    def reply(self, parsed: Parsed, results: list) -> dict:
        """The JSON reply for a parsed request and its per-item results (see the module docstring)."""
        version = model_version(self.prm)
        rewards, steps, ntok, min_step, invalid, step_lists, errors = [], [], [], [], [], [], []
        for err, r in zip(parsed.errors, results):
            if err is None and isinstance(r, str):
                err = r
            if err is not None:  # a row that cannot be scored: the sentinel reward, and why
                rewards.append(self.invalid_reward), steps.append(0), ntok.append(0), min_step.append(0.0)
                invalid.append(1), step_lists.append([]), errors.append(err)
                continue
            errors.append(None), invalid.append(0)
            if r is None:  # empty response
                rewards.append(0.0), steps.append(0), ntok.append(0), min_step.append(0.0), step_lists.append([])
                continue
            rewards.append(finite_or_none(r.score) or 0.0)
            steps.append(len(r.step_rewards))
            ntok.append(len(r.token_rewards))
            min_step.append(float(r.step_rewards.min()) if len(r.step_rewards) else 0.0)
            step_lists.append([float(x) for x in r.step_rewards])
        out: dict = {"rewards": rewards, "scores": list(rewards)}
        if self.extra_logs:
            logs = {"prm_num_steps": steps, "prm_num_tokens": ntok, "prm_min_step": min_step, "prm_invalid": invalid}
            if version is not None:
                logs["model_version"] = [version] * len(rewards)
            out["extra_logs"] = logs
        if any(e is not None for e in errors):
            out["errors"] = errors
        if parsed.step_rewards:
            out["step_rewards"] = step_lists
        return out


class _Server(ThreadingHTTPServer):
    """At most ``slots`` connections are handled at once; one more is answered 503 and closed."""

    slots: threading.BoundedSemaphore
    max_connections: int
    request_queue_size = 64

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            _log(f"refused a connection from {client_address[0]}: {self.max_connections} connections open "
                 "(--max-connections)")
            body = b'{"error": "too many open connections; retry later"}'
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):  # one line, not a traceback
        err = sys.exc_info()[1]
        _log(f"connection from {client_address[0]} ended: {type(err).__name__}: {err}")


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


_DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout, TimeoutError)


def _make_handler(server: RewardServer, log_requests: bool):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = server.read_timeout  # per socket read: a client that stops sending is dropped

        def log_message(self, fmt, *args):  # noqa: D401 - quiet unless asked
            if log_requests:
                super().log_message(fmt, *args)

        def log_error(self, fmt, *args):  # timeouts and malformed request lines: always, one line
            _log(f"client {self.client_address[0]}: {fmt % args}")

        def handle(self):
            try:
                super().handle()
            except _DISCONNECTS as e:
                what = "timed out" if isinstance(e, (socket.timeout, TimeoutError)) else "disconnected"
                _log(f"client {self.client_address[0]} {what} mid-request ({type(e).__name__}); connection closed")
                self.close_connection = True

        def _send(self, code: int, obj: dict) -> None:
            body = json.dumps(obj, allow_nan=False).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            if self.path.rstrip("/") == "/health":
                status = "ok" if server.dead_reason is None else "dead"
                self._send(200 if status == "ok" else 503,
                           {"status": status, "aggregate": server.aggregate, "error": server.dead_reason,
                            "max_batch_size": server.max_batch_size, "model_version": model_version(server.prm)})
            else:
                self._send(404, {"error": f"unknown path {self.path!r}; use POST /get_reward or GET /health"})

        def _read_body(self, length: int) -> bytes | None:
            """The body, read within ``read_timeout`` in all; None (and the connection closed) otherwise."""
            deadline = time.monotonic() + server.read_timeout
            chunks, got = [], 0
            while got < length:
                if time.monotonic() > deadline:
                    raise TimeoutError("the body took longer than the read timeout")
                chunk = self.rfile.read1(min(length - got, 1 << 20)) if hasattr(self.rfile, "read1") \
                    else self.rfile.read(min(length - got, 1 << 20))
                if not chunk:
                    _log(f"client {self.client_address[0]} disconnected mid-request ({got} of {length} body bytes)")
                    self.close_connection = True
                    return None
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks)

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/get_reward":
                self._send(404, {"error": f"unknown path {self.path!r}; use POST /get_reward"})
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._send(411, {"error": "a Content-Length header is required"})
                self.close_connection = True
                return
            if length < 0 or length > MAX_BODY_BYTES:
                self._send(413, {"error": f"the body must be at most {MAX_BODY_BYTES} bytes; send fewer queries"})
                self.close_connection = True
                return
            body = self._read_body(length)
            if body is None:
                return
            try:
                parsed = parse_request(body, server.pad_texts)
                results = server.submit([it for it in parsed.items], parsed.step_rewards)
            except RequestError as e:
                self._send(400, {"error": str(e)})
                return
            except Unavailable as e:
                self._send(503, {"error": str(e)})
                return
            self._send(200, server.reply(parsed, results))

    return Handler
