"""The ``freeprm`` command line.

Each subpackage owns its subcommands: a module with ``register(subparsers)`` that adds
its parsers and sets ``func`` (called with the parsed args, returns an exit code).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

# subcommand modules, all imported when the parser is built (so ``freeprm --help`` imports torch through the
# subpackages' ``__init__``); each keeps model loading and other heavy work inside its command function
_COMMAND_MODULES = (
    "freeprm.engine.cli",   # score, demo
    "freeprm.trainer.cli",  # train
    "freeprm.eval.cli",     # bon
    "freeprm.integrations.cli",  # serve
    "freeprm.batch.cli",    # rerank
    "freeprm.search.cli",   # search
    "freeprm.eval.data_cli",  # data rollouts | steps, eval steps
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freeprm",
        description="Implicit process reward models: score, train, evaluate best-of-N.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except OSError as e:  # a full disk or a file too large, wherever it struck: one line, no traceback
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        from .cliargs import error
        from .io import os_error_message

        return error(args.command, os_error_message(e, e.filename or "an output file"))


if __name__ == "__main__":
    sys.exit(main())
