"""``freeprm serve``: the OpenRLHF remote reward server (``freeprm/integrations/openrlhf.py``)."""

from __future__ import annotations

import sys


def register(sub) -> None:
    from ..cliargs import HelpFormatter
    from ..engine.cli import _scorer_args

    p = sub.add_parser(
        "serve", help="serve implicit process rewards over HTTP (OpenRLHF --remote_rm_url)",
        description="POST /get_reward {query, prompts, labels} -> {rewards, scores, extra_logs}; GET /health. "
                    "Loopback only unless --allow-remote.",
        formatter_class=HelpFormatter)
    _scorer_args(p)
    p.set_defaults(prompt_format="raw")  # OpenRLHF prompts arrive already through the chat template
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless --allow-remote)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host (no authentication: anyone who can reach it can use it)")
    p.add_argument("--max-batch-size", type=int, default=64,
                   help="responses scored together across concurrent requests (1 = no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long the scoring thread waits for more requests to fill a batch")
    p.add_argument("--log-requests", action="store_true", help="log each HTTP request to stderr")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    from ..engine.cli import _make_scorer
    from ..engine.scorer import AGGREGATIONS
    from .openrlhf import RewardServer, is_loopback

    if args.aggregate not in AGGREGATIONS:
        print(f"error: --aggregate must be one of {AGGREGATIONS}", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and not args.allow_remote:
        print(f"error: --host {args.host} is not a loopback address; the server has no authentication. "
              "Pass --allow-remote to bind it anyway.", file=sys.stderr)
        return 2
    try:
        scorer = _make_scorer(args)
        server = RewardServer(scorer, args.host, args.port, aggregate=args.aggregate,
                              max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                              allow_remote=args.allow_remote, log_requests=args.log_requests)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"freeprm: serving rewards at {server.url}/get_reward (GET {server.url}/health); Ctrl-C stops",
          file=sys.stderr, flush=True)
    server.serve_forever()
    return 0
