"""Every ``--option`` the docs mention exists on the command it documents."""

import argparse
import re
from pathlib import Path

import pytest

from freeprm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def options(parser: argparse.ArgumentParser, path: tuple = ()) -> dict[tuple, set[str]]:
    """``{(command, subcommand...): {--option, ...}}`` for the whole parser tree."""
    out = {path: {s for a in parser._actions for s in a.option_strings}}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                out.update(options(sub, path + (name,)))
    return out


def mentioned(doc: Path, section: str | None = None) -> set[str]:
    text = doc.read_text()
    if section:  # only that "## " section (the README's set-up part quotes pip options)
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))


@pytest.mark.parametrize("doc, commands", [
    ("docs/trainer.md", [("train",), ("score",)]),
    ("docs/eval.md", [("bon", s) for s in ("generate", "score", "report", "all")]
     + [("data", "rollouts"), ("data", "steps"), ("eval", "steps"), ("train",)]),
    ("docs/search.md", [("search",)]),
    ("docs/cli.md", None),
    ("docs/config.md", None),
    ("README.md#Command line", None),
])
def test_documented_options_exist(doc, commands):
    tree = options(build_parser())
    known = set().union(*(tree[c] for c in (commands or tree)))
    path, _, section = doc.partition("#")
    missing = sorted(mentioned(ROOT / path, section or None) - known)
    assert not missing, f"{doc} documents options its commands do not have: {missing}"


def test_train_last_layers_reaches_the_config(monkeypatch, tmp_path):
    import freeprm.trainer.run as trainer_mod
    from freeprm.cli import main

    seen = {}

    def fake_train(policy, data, out, *, config, **kw):
        seen["config"] = config
        raise ValueError("stop here")

    monkeypatch.setattr(trainer_mod, "train", fake_train)
    assert main(["train", "--policy", "p", "--data", "d", "--output", str(tmp_path), "--train-last-layers", "2"]) == 2
    assert seen["config"].train_last_layers == 2
    with pytest.raises(SystemExit):
        main(["train", "--policy", "p", "--data", "d", "--output", str(tmp_path), "--train-last-layers", "0"])


def _parsers(parser: argparse.ArgumentParser, path: tuple = ()):
    yield path, parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _parsers(sub, path + (name,))


def test_escapes_round_trip():
    from freeprm.cliargs import decode_escapes, encode_escapes

    for s in ["\n\n", "\t", "\r\n", "\\", "a\\nb", "。", "\u2028", "\u200b", "\x00\x7f", " x ", "é😀", ""]:
        assert decode_escapes(encode_escapes(s)) == s, repr(s)
    assert encode_escapes("\n\n") == "\\n\\n" and encode_escapes("。") == "。"
    assert encode_escapes("\u2028") == "\\u2028"


def test_help_shows_every_default_readably(monkeypatch):
    """`--help` of every command prints (UTF-8-encodable), and a string default such as --step-delimiter's
    "\\n\\n" is shown as one types it ('\\n\\n'), not as blank lines."""
    from freeprm.cliargs import decode_escapes, show_default

    monkeypatch.setenv("COLUMNS", "250")  # no wrapping inside "(default: ...)"
    seen = set()
    for path, p in _parsers(build_parser()):
        text = p.format_help()
        text.encode("utf-8")  # `freeprm score --help` used to crash on a lone surrogate in its description
        for a in p._actions:
            d = a.default
            if not a.option_strings or not a.help or d is None or d is False or d == argparse.SUPPRESS:
                continue
            if "default" in a.help.lower():
                continue
            assert f"(default: {show_default(d)})" in text, (path, a.option_strings)
            if isinstance(d, str):
                shown = show_default(d)
                assert decode_escapes(shown.strip("'")) == d and shown.isprintable(), (path, a.option_strings)
        if any("--step-delimiter" in a.option_strings for a in p._actions):
            assert "recorded split, else '\\n\\n')" in text, path  # left out: a trained PRM's split, else this
            seen.add(path)
    assert {("score",), ("demo",), ("serve",), ("rerank",), ("bon", "score"), ("bon", "all")} <= seen
