"""OpenRLHF remote reward server: ``freeprm serve`` answers ``POST /get_reward``.

OpenRLHF (``--remote_rm_url http://host:port/get_reward``) posts ``{"query": [...], "prompts": [...],
"labels": [...]}``: each ``query`` is the full text the policy saw and wrote (prompt + response, the
prompt already through the policy's chat template) and ``prompts[i]`` is that prompt, so the response is
``query[i][len(prompts[i]):]``. The server answers::

    {"rewards": [float], "scores": [float], "extra_logs": {"prm_num_steps": [int], "prm_num_tokens": [int],
     "prm_min_step": [float], ...},  "step_rewards": [[float]]   # only when the request has "return_step_rewards": true}

``rewards[i]`` is the response's aggregate implicit reward (``--aggregate``, default min step reward);
``scores`` repeats it (OpenRLHF uses ``scores`` for dynamic filtering and logs; with no verifier the PRM
score is the score). ``extra_logs`` values are per-response lists (OpenRLHF averages them in its logs);
``model_version`` is added when the reward model counts its updates (``ImplicitPRM.version``).
``labels`` are optional; when given they must match ``query`` in length and are passed through to the
scorer as item metadata (they do not change the reward). An empty response (``query == prompt``) gets
reward 0.0 (no tokens, nothing to score) and ``prm_num_steps`` 0.

Prompts arrive already formatted, so the CLI builds its Scorer with ``prompt_format="raw"`` by default
(``--prompt-format chat`` if your prompts are bare questions).

Errors: malformed JSON, wrong types, mismatched lengths, a query that does not start with its prompt, or
an item the scorer rejects (e.g. over ``max_length``) -> HTTP 400 ``{"error": "..."}``; nothing else in
the server is affected. Unknown paths -> 404. ``GET /health`` -> ``{"status": "ok", ...}``.

Batching: request handler threads put parsed requests on a queue; one scoring thread takes the first
waiting request, then gathers more until it holds ``max_batch_size`` responses or ``batch_wait_ms`` has
passed, and scores them all in one ``score`` call (a request is never split; one larger than
``max_batch_size`` is scored alone). Rewards do not depend on batch mates (the engine guarantees it), so
batching changes throughput, not results. If the joint call rejects an item, each request is scored on its
own so only the bad one gets its 400.

Binding: loopback (127.0.0.1) by default. Any other host requires ``allow_remote=True``
(``--allow-remote``) and prints a warning: the server has no authentication.
"""

from __future__ import annotations

import ipaddress
import json
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ._common import check_reward_model, finite_or_none, model_version, score_items

MAX_BODY_BYTES = 64 * 1024 * 1024


class RequestError(ValueError):
    """A request the server answers with HTTP 400."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_request(body: bytes) -> tuple[list[dict], bool]:
    """A ``/get_reward`` body -> (scorer items, return_step_rewards); ``RequestError`` says what is wrong."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the body is not valid JSON: {e}") from None
    if not isinstance(payload, dict):
        raise RequestError("the body must be a JSON object with 'query' and 'prompts' lists")
    query, prompts, labels = payload.get("query"), payload.get("prompts"), payload.get("labels")
    if not isinstance(query, list) or not all(isinstance(q, str) for q in query):
        raise RequestError("'query' must be a list of strings (prompt + response, as the policy saw them)")
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
    items = []
    for i, (q, p) in enumerate(zip(query, prompts)):
        if not q.startswith(p):
            raise RequestError(f"query {i} does not start with prompts[{i}]; each query must be its prompt followed "
                               "by the response")
        item = {"prompt": p, "response": q[len(p):]}
        if labels is not None:
            item["label"] = labels[i]
        items.append(item)
    return items, step


@dataclass
class _Job:
    items: list[dict]
    step_rewards: bool
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None
    error: str | None = None


class RewardServer:
    """An OpenRLHF-compatible reward server over a Scorer or ImplicitPRM (see the module docstring).

    ``start()`` serves in background threads and returns; ``serve_forever()`` blocks; ``shutdown()``
    stops both the HTTP server and the scoring thread. ``port=0`` picks a free port (``self.port``).
    """

    def __init__(self, prm, host: str = "127.0.0.1", port: int = 5000, *, aggregate: str | None = None,
                 max_batch_size: int = 64, batch_wait_ms: float = 5.0, allow_remote: bool = False,
                 log_requests: bool = False) -> None:
        check_reward_model(prm)
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1 (1 = no batching across requests)")
        if batch_wait_ms < 0:
            raise ValueError("batch_wait_ms must be >= 0")
        if not is_loopback(host):
            if not allow_remote:
                raise ValueError(f"host {host!r} is not a loopback address; the server has no authentication, so "
                                 "binding it to a network interface needs allow_remote=True (--allow-remote)")
            print(f"WARNING: serving rewards on {host}:{port} without authentication; anyone who can reach this "
                  "address can use the model", file=sys.stderr)
        self.prm, self.aggregate = prm, aggregate
        self.max_batch_size, self.batch_wait = int(max_batch_size), batch_wait_ms / 1000.0
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.batches_scored = 0  # number of score() calls made (for tests and logs)
        server_cls = _IPv6Server if ":" in host else ThreadingHTTPServer
        self.httpd = server_cls((host, port), _make_handler(self, log_requests))
        self.httpd.daemon_threads = True
        self.host, self.port = host, self.httpd.server_address[1]
        self._threads: list[threading.Thread] = []
        self._serving = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "RewardServer":
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
        while True:  # fail anything that arrived after the scoring thread stopped
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.error = "the server is shutting down"
                job.done.set()

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ scoring
    def submit(self, items: list[dict], step_rewards: bool = False, timeout: float | None = None) -> dict:
        """Score ``items`` through the batching queue (what a request does); ``RequestError`` on a bad item."""
        if self._stop.is_set():
            raise RuntimeError("the server is shutting down")
        job = _Job(items, step_rewards)
        self._queue.put(job)
        if not job.done.wait(timeout):
            raise TimeoutError("scoring did not finish in time")
        if job.error is not None:
            raise RequestError(job.error)
        return job.result

    def _score_loop(self) -> None:
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
            self._run(jobs)
            if stop:
                break
        if carry is not None:
            self._queue.put(carry)

    def _run(self, jobs: list[_Job]) -> None:
        try:
            self._score_jobs(jobs)
        except ValueError:
            if len(jobs) == 1:
                self._fail(jobs[0])
            else:  # find the bad request(s): score each on its own
                for job in jobs:
                    try:
                        self._score_jobs([job])
                    except Exception:  # noqa: BLE001 - reported to the client
                        self._fail(job)
        except Exception:  # noqa: BLE001 - a server must answer, not die
            for job in jobs:
                self._fail(job, prefix="internal error: ")
        finally:
            for job in jobs:
                job.done.set()

    @staticmethod
    def _fail(job: _Job, prefix: str = "") -> None:
        err = sys.exc_info()[1]
        job.error = f"{prefix}{err}"

    def _score_jobs(self, jobs: list[_Job]) -> None:
        scored = [(j, k) for j in jobs for k, it in enumerate(j.items) if it["response"].strip()]
        results = score_items(self.prm, [j.items[k] for j, k in scored], self.aggregate)
        self.batches_scored += 1
        by_job: dict[int, dict[int, object]] = {}
        for (j, k), r in zip(scored, results):
            by_job.setdefault(id(j), {})[k] = r
        version = model_version(self.prm)
        for j in jobs:
            res = by_job.get(id(j), {})
            rewards, steps, ntok, min_step, step_lists = [], [], [], [], []
            for k in range(len(j.items)):
                r = res.get(k)
                if r is None:  # empty response
                    rewards.append(0.0), steps.append(0), ntok.append(0), min_step.append(0.0), step_lists.append([])
                    continue
                rewards.append(finite_or_none(r.score) or 0.0)
                steps.append(len(r.step_rewards))
                ntok.append(len(r.token_rewards))
                min_step.append(float(r.step_rewards.min()) if len(r.step_rewards) else 0.0)
                step_lists.append([float(x) for x in r.step_rewards])
            logs = {"prm_num_steps": steps, "prm_num_tokens": ntok, "prm_min_step": min_step}
            if version is not None:
                logs["model_version"] = [version] * len(j.items)
            out = {"rewards": rewards, "scores": list(rewards), "extra_logs": logs}
            if j.step_rewards:
                out["step_rewards"] = step_lists
            j.result = out


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _make_handler(server: RewardServer, log_requests: bool):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # noqa: D401 - quiet unless asked
            if log_requests:
                super().log_message(fmt, *args)

        def _send(self, code: int, obj: dict) -> None:
            body = json.dumps(obj).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            if self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok", "aggregate": server.aggregate,
                                 "max_batch_size": server.max_batch_size, "model_version": model_version(server.prm)})
            else:
                self._send(404, {"error": f"unknown path {self.path!r}; use POST /get_reward or GET /health"})

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/get_reward":
                self._send(404, {"error": f"unknown path {self.path!r}; use POST /get_reward"})
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._send(411, {"error": "a Content-Length header is required"})
                return
            if length < 0 or length > MAX_BODY_BYTES:
                self._send(413, {"error": f"the body must be at most {MAX_BODY_BYTES} bytes; send fewer queries"})
                self.close_connection = True
                return
            body = self.rfile.read(length)
            try:
                items, step = parse_request(body)
                result = server.submit(items, step)
            except RequestError as e:
                self._send(400, {"error": str(e)})
                return
            except RuntimeError as e:
                self._send(503, {"error": str(e)})
                return
            self._send(200, result)

    return Handler
