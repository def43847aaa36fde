"""``freeprm serve``: the OpenRLHF remote reward server (``freeprm/integrations/openrlhf.py``)."""

from __future__ import annotations

import math
import sys


def register(sub) -> None:
    from ..cliargs import HelpFormatter
    from ..scorer_cli import add_scorer_args

    p = sub.add_parser(
        "serve", help="serve implicit process rewards over HTTP (OpenRLHF --remote_rm_url)",
        description="POST /get_reward {query, prompts, labels} -> {rewards, scores, extra_logs}; GET /health. "
                    "Loopback only unless --allow-remote.",
        formatter_class=HelpFormatter)
    add_scorer_args(p, defaults={"prompt_format": "raw"})  # OpenRLHF prompts arrive already through the chat template
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless --allow-remote)")
    p.add_argument("--port", type=int, default=5000, help="TCP port, 0-65535 (0: any free port)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host (no authentication: anyone who can reach it can use it)")
    p.add_argument("--max-batch-size", type=int, default=64,
                   help="responses scored together across concurrent requests (1 = no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long the scoring thread waits for more requests to fill a batch (0-10000)")
    p.add_argument("--read-timeout-s", type=float, default=60.0,
                   help="a client that sends nothing for this long, or whose body takes longer, is dropped (0.1-3600)")
    p.add_argument("--max-connections", type=int, default=64,
                   help="connections handled at once; one more is answered 503 (1-4096)")
    p.add_argument("--no-extra-logs", dest="extra_logs", action="store_false",
                   help="leave 'extra_logs' out of replies (OpenRLHF 0.8.x torch.cat's them and fails on JSON lists)")
    p.add_argument("--invalid-reward", type=float, default=0.0,
                   help="reward sent for a query that cannot be scored (its reason is in the reply's 'errors')")
    p.add_argument("--log-requests", action="store_true", help="log each HTTP request to stderr")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    from ..cliargs import error
    from ..scorer_cli import check_scorer_args, make_scorer
    from .openrlhf import RewardServer, check_options, is_loopback

    if not is_loopback(args.host) and not args.allow_remote:
        return error("serve", f"--host {args.host} is not a loopback address; the server has no authentication. "
                              "Pass --allow-remote to bind it anyway.")
    try:  # every option is checked before the model loads
        check_scorer_args(args)
        check_options(port=args.port, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                      read_timeout_s=args.read_timeout_s, max_connections=args.max_connections)
        if not math.isfinite(args.invalid_reward):
            raise ValueError(f"--invalid-reward must be a finite number, got {args.invalid_reward}")
    except ValueError as e:
        return error("serve", e)
    try:
        scorer = make_scorer(args)
        server = RewardServer(scorer, args.host, args.port, aggregate=scorer.aggregate_name,
                              max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                              allow_remote=args.allow_remote, log_requests=args.log_requests,
                              extra_logs=args.extra_logs, invalid_reward=args.invalid_reward,
                              read_timeout_s=args.read_timeout_s, max_connections=args.max_connections)
    except (ValueError, OSError) as e:
        return error("serve", e)
    print(f"freeprm: serving rewards at {server.url}/get_reward (GET {server.url}/health); Ctrl-C stops",
          file=sys.stderr, flush=True)
    server.serve_forever()
    return 0
