"""Command-line helpers shared by ``freeprm score``, ``rerank``, ``serve``, ``bon`` and ``train``.

The checks raise ``ValueError`` (or ``argparse.ArgumentTypeError`` when used as an argparse
``type=``) with a message that says what to pass instead; all run before any model is loaded.
``HelpFormatter`` is the one help layout of every subcommand: defaults shown as one would type them
(``--step-delimiter``'s ``"\n\n"`` as ``'\n\n'``, not as two blank lines).
"""

from __future__ import annotations

import argparse

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_UNESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def decode_escapes(text: str) -> str:
    r"""Interpret ``\n``, ``\t``, ``\r``, ``\\`` and ``\uXXXX`` in ``text``; every other character is kept as is.

    Unlike ``codecs``' ``unicode_escape`` this never touches non-ASCII text ("。", U+2028 stay
    themselves). A backslash followed by anything else, a lone trailing backslash, a short
    ``\u`` or a ``\u`` naming a surrogate raise ``ValueError``.
    """
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        if i + 1 == len(text):
            raise ValueError(f"{text!r} ends with a lone backslash; write \\\\ for a literal backslash")
        e = text[i + 1]
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        elif e == "u":
            hexd = text[i + 2:i + 6]
            if len(hexd) != 4 or any(h not in "0123456789abcdefABCDEF" for h in hexd):
                raise ValueError(f"{text!r}: \\u must be followed by 4 hex digits, e.g. \\u3002")
            cp = int(hexd, 16)
            if 0xD800 <= cp <= 0xDFFF:
                raise ValueError(f"{text!r}: \\u{hexd} is a surrogate, not a character")
            out.append(chr(cp))
            i += 6
        else:
            raise ValueError(f"{text!r}: unknown escape \\{e}; understood: \\n \\t \\r \\\\ \\uXXXX "
                             "(write \\\\ for a literal backslash)")
    return "".join(out)


def encode_escapes(text: str) -> str:
    r"""The inverse of ``decode_escapes``: ``text`` as one types it, e.g. ``"\n\n"`` -> ``'\n\n'`` (4 characters).

    Backslash, newline, tab and CR get their escapes; other characters that do not print as
    themselves (control and format characters, line/paragraph separators, non-space whitespace)
    become ``\uXXXX``; everything else, non-ASCII included, is kept.
    ``decode_escapes(encode_escapes(s)) == s`` for any string without surrogates.
    """
    out = []
    for c in text:
        if c == "\\":
            out.append("\\\\")
        elif c in _UNESCAPES:
            out.append(_UNESCAPES[c])
        elif (not c.isprintable() or (c.isspace() and c != " ")) and ord(c) <= 0xFFFF:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out)


def show_default(value) -> str:
    r"""A default as help text: strings through ``encode_escapes``, quoted when that changed them or when
    they are empty or have outer spaces (so ``"\n\n"`` reads ``'\n\n'``, ``""`` reads ``''``); lists comma-joined."""
    if isinstance(value, str):
        shown = encode_escapes(value)
        return f"'{shown}'" if shown != value or not value or value.strip() != value else value
    if isinstance(value, (list, tuple)):
        return ",".join(show_default(v) for v in value)
    return str(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help of every ``freeprm`` subcommand: the description as written, and each option's default
    (``show_default``) appended, unless it is None/False or the help text already speaks of its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""  # a %-template: only the default we add is escaped
        d = action.default
        if (text == argparse.SUPPRESS or not action.option_strings or d is None or d is False
                or d == argparse.SUPPRESS or "default" in text.lower()):
            return text
        return f"{text} (default: {show_default(d).replace('%', '%%')})".lstrip()


def escapes_arg(text: str) -> str:
    """``decode_escapes`` as an argparse ``type=``."""
    try:
        return decode_escapes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    """An argparse ``type=`` for integers >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def positive_float(text: str) -> float:
    """An argparse ``type=`` for finite numbers > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def add_force_reference_arg(p) -> None:
    """``--force-reference``: use a reference whose content differs from the one a trained PRM records."""
    p.add_argument("--force-reference", action="store_true",
                   help="use --reference even if its content differs from the reference the PRM was trained against")


def check_device(device: str | None) -> None:
    """``ValueError`` unless ``device`` (``None`` = automatic) names a device this machine has."""
    if device is None:
        return
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"unknown device {device!r} ({str(e).splitlines()[0]}); use cpu, cuda, cuda:N or mps") \
            from None
    if d.type == "cpu":
        return
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}); use --device cpu or omit --device")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        return
    if d.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")
        return
    mod = getattr(torch, d.type, None)
    if mod is None or not hasattr(mod, "is_available") or not mod.is_available():
        raise ValueError(f"--device {device}: no {d.type} device is available here; use cpu or cuda")


def error(command: str, err: BaseException | str) -> int:
    """The one error format of every command: ``freeprm COMMAND: error: MESSAGE`` on stderr; returns exit code 2.

    The same shape argparse uses for a bad option, so every failure a user sees reads alike.
    """
    import sys

    print(f"freeprm {command}: error: {err}", file=sys.stderr)
    return 2


class DeprecatedAlias(argparse.Action):
    """``store`` (or ``store_true`` with ``nargs=0``) that warns when an old spelling of the option is used.

    ``p.add_argument("--output", "-o", "--out", action=DeprecatedAlias, deprecated=("--out",))``: ``--out`` still
    works for one release and prints ``freeprm: warning: --out is deprecated; use --output`` (and raises a
    ``DeprecationWarning`` for code that calls ``main``).
    """

    def __init__(self, option_strings, dest, deprecated=(), **kwargs) -> None:
        self.deprecated = tuple(deprecated)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string in self.deprecated:
            import sys
            import warnings

            new = next(o for o in self.option_strings if o.startswith("--") and o not in self.deprecated)
            msg = f"{option_string} is deprecated; use {new}"
            warnings.warn(msg, DeprecationWarning, stacklevel=2)
            print(f"freeprm: warning: {msg}", file=sys.stderr)
        setattr(namespace, self.dest, values)
