"""Seeded fuzz of ``freeprm score``'s input path on the tiny model.

Each case is a small JSONL file built from line kinds whose fate is known: good lines (plain,
explicit steps, non-ASCII, CRLF, extra and clashing keys, a BOM before line 1, no final
newline), bad lines (invalid UTF-8, lone surrogates, NaN, non-objects, cut JSON, raw CR, deep
nesting, huge numbers, missing or mistyped fields, empty responses, steps that are not the
response, over-long by bytes or by tokens), blank lines, and random byte mutations of a good
line (either fate, but exactly one). Split: ``N_READ`` cases through the reading and validation
layer (``read_items`` with a loaded tiny ``Scorer``: everything the CLI does before model work),
``N_WHOLE`` cases through ``freeprm.cli.main(["score", ...])`` end to end (model run, output file).
Asserted: no exception escapes, every good line is scored exactly once and in input order,
every bad line is reported once with its own line number (and the reason for its kind).

Then hostile command lines (issue 19), for ``score``, ``rerank`` and ``serve``: damaged model
directories (truncated, garbage and empty safetensors, a ``vocab_size`` that does not fit the
weights, a pickle ``torch.load`` refuses), a regex repeat count that overflows, a ``--max-length``
beyond any integer, ``serve --port`` out of range (checked by the server's option check), outputs below a file or in ``/proc`` / ``/sys``: each
is one line naming the file or option, exit 2, no traceback, nothing written.
"""

import json
import os
import random

import pytest

from freeprm.cli import main
from freeprm.engine.cli import read_items

N_READ, N_WHOLE = 2000, 60
LINE_LIMIT, MAX_LENGTH = 8192, 1024
WORDS = ["two", "plus", "3", "=", "5.", "héllo", "数学", "naïve", "Ω", "x²", "🙂", "tab\there", "cr\rhere",
         "a\u2028b", "\\", '"q"', "end."]


def _words(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _good_obj(rng, i):
    steps = [_words(rng, 1, 5) for _ in range(rng.randint(1, 4))]
    obj = {"prompt": _words(rng, 1, 6)}
    form = rng.randrange(3)
    if form != 1:
        obj["response"] = "\n\n".join(steps)
    if form != 0:
        obj["steps"] = steps
    obj["id"] = i
    if rng.random() < 0.2:
        obj[rng.choice(["score", "line", "aggregation", "meta"])] = rng.choice([1, "x", None, [1]])
    return obj


def _dumps(rng, obj) -> bytes:
    return json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode("utf-8")


def _with(rng, i, text: str) -> bytes:
    """A good object with ``text`` (raw JSON) spliced in as the value of an extra key."""
    return _dumps(rng, _good_obj(rng, i))[:-1] + b', "x": ' + text.encode() + b"}"


BAD = {  # kind -> (line maker, words the report must contain)
    "bad_utf8": (lambda rng, i: _dumps(rng, {"prompt": "p", "response": "a b"}).replace(b"a b", b"a \xff\xfe b"),
                 "invalid UTF-8"),
    "surrogate": (lambda rng, i: _with(rng, i, '"x\\udc80y"'), "surrogate"),
    "surrogate_key": (lambda rng, i: _with(rng, i, '{"\\ud83d": 1}'), "surrogate"),
    "nan": (lambda rng, i: _with(rng, i, rng.choice(["NaN", "Infinity", "-Infinity"])), "non-standard JSON"),
    "overflow": (lambda rng, i: _with(rng, i, "1e999"), "finite"),
    "big_int": (lambda rng, i: _with(rng, i, "1" + "0" * 5000), "invalid JSON"),
    "deep": (lambda rng, i: _with(rng, i, "[" * (n := rng.choice([201, 900, 3000])) + "]" * n), "nest"),
    "non_object": (lambda rng, i: rng.choice([b"[1, 2]", b'"s"', b"3", b"null", b"true"]), "must be a JSON object"),
    "cut": (lambda rng, i: (t := _dumps(rng, _good_obj(rng, i)))[:rng.randint(1, len(t) - 2)], "invalid"),  # JSON, or UTF-8 when cut mid-character
    "raw_cr": (lambda rng, i: b'{"prompt": "a\rb", "response": "c"}', "control character"),
    "missing": (lambda rng, i: _dumps(rng, {"response": "a"}), "prompt"),
    "mistyped": (lambda rng, i: _dumps(rng, rng.choice([{"prompt": 5, "response": "a"}, {"prompt": "p", "response": [1]},
                                                        {"prompt": "p", "steps": "ab"}])), "must be"),
    "empty": (lambda rng, i: _dumps(rng, {"prompt": "p", "response": rng.choice(["", " ", "\n\n \n\n"])}), ""),
    "mismatch": (lambda rng, i: _dumps(rng, {"prompt": "p", "response": "a b", "steps": ["zzz"]}), ""),
    "too_long": (lambda rng, i: _dumps(rng, {"prompt": "p", "response": "w " * LINE_LIMIT}), "longer than the limit"),
    "too_many_tokens": (lambda rng, i: _dumps(rng, {"prompt": "p", "response": "".join(
        rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3000))}), "max_length"),
}


def _mutate(rng, line: bytes) -> bytes:
    b = bytearray(line)
    for _ in range(rng.randint(1, 3)):
        op, k = rng.randrange(3), rng.randrange(len(b))
        if op == 0:
            b[k] = rng.randrange(256)
        elif op == 1:
            b.insert(k, rng.randrange(256))
        elif len(b) > 1:
            del b[k]
    return bytes(b).replace(b"\n", b" ")


def make_case(seed: int) -> tuple[bytes, dict]:
    """A JSONL file and the fate of each line number: "good", "bad:<kind>", "either" or "blank"."""
    rng = random.Random(seed)
    lines, fate = [], {}
    for n in range(1, rng.randint(1, 8) + 1):
        r = rng.random()
        if r < 0.4:
            line, f = _dumps(rng, _good_obj(rng, n)), "good"
            if rng.random() < 0.2:
                line += b"\r"  # CRLF
        elif r < 0.85:
            kind = rng.choice(sorted(BAD))
            line, f = BAD[kind][0](rng, n), f"bad:{kind}"
        elif r < 0.95:
            line, f = _mutate(rng, _dumps(rng, _good_obj(rng, n))), "either"
        else:
            line, f = rng.choice([b"", b"  ", b"\t", b"\r"]), "blank"
        lines.append(line)
        fate[n] = f
    data = b"\n".join(lines) + (b"\n" if rng.random() < 0.7 else b"")
    if rng.random() < 0.3:
        data = b"\xef\xbb\xbf" + data
    return data, fate


def check(fate: dict, scored: list[int], reported: dict[int, str]) -> None:
    assert scored == sorted(scored) and len(set(scored)) == len(scored), scored
    assert not set(scored) & set(reported)
    for n, f in fate.items():
        if f == "good":
            assert n in scored, (n, reported.get(n))
        elif f.startswith("bad:"):
            assert n in reported, (n, f)
            assert BAD[f[4:]][1] in reported[n], (n, f, reported[n])
        elif f == "blank":
            assert n not in scored and n not in reported
        else:
            assert (n in scored) != (n in reported)
    assert set(scored) | set(reported) <= set(fate)


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    from freeprm.engine import Scorer

    return Scorer(tiny_model_dir, max_length=MAX_LENGTH)


def test_fuzz_reading_and_validation(scorer, tmp_path):
    path = tmp_path / "in.jsonl"
    kinds = set()
    for seed in range(N_READ):
        data, fate = make_case(seed)
        kinds |= set(fate.values())
        path.write_bytes(data)
        said: list[str] = []
        _, scored, errors = read_items(str(path), scorer, False, max_line_bytes=LINE_LIMIT, report=said.append)
        reported = dict(errors)
        assert len(reported) == len(errors) and len([m for m in said if "skipping" in m]) == len(errors)
        try:
            check(fate, scored, reported)
        except AssertionError:
            print(f"seed {seed}: {data[:2000]!r}")
            raise
    assert {f"bad:{k}" for k in BAD} | {"good", "either", "blank"} <= kinds  # every kind was drawn


def test_fuzz_whole_files(tiny_model_dir, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    for seed in range(N_WHOLE):
        data, fate = make_case(10_000 + seed)
        inp.write_bytes(data)
        rc = main(["score", "--policy", tiny_model_dir, "-i", str(inp), "-o", str(out), "--no-progress",
                   "--max-line-bytes", str(LINE_LIMIT), "--max-length", str(MAX_LENGTH)])
        err = capsys.readouterr().err
        assert rc == 0 and "Traceback" not in err
        rows = [json.loads(x, parse_constant=lambda c: pytest.fail(c)) for x in out.read_text("utf-8").split("\n") if x]
        scored = [r["line"] for r in rows]
        reported = {}
        for msg in err.splitlines():
            if msg.startswith("freeprm score: skipping "):
                n = int(msg.split(f"{inp}:", 1)[1].split(":", 1)[0])
                assert n not in reported
                reported[n] = msg
        check(fate, scored, reported)
        good = [n for n, f in fate.items() if f == "good"]
        by_line = {r["line"]: r for r in rows}
        for n in good:  # the passed-through id is the line's own
            assert by_line[n]["id"] == n
        assert f"scored {len(rows)} responses, skipped {len(reported)} malformed lines" in err


# ---------------------------------------------------------------------- hostile options and damaged files (issue 19)
def _damaged_models(base: str, root) -> dict:
    """Copies of the tiny model, each damaged one way."""
    import shutil
    from pathlib import Path

    def variant(name, damage):
        d = Path(root) / name
        shutil.copytree(base, d)
        damage(d)
        return str(d)

    st = "model.safetensors"

    def vocab(d):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(cfg | {"vocab_size": cfg["vocab_size"] + 7}))

    def pickle_only(d):
        (d / st).unlink()
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle torch.load accepts")

    return {
        "truncated": variant("truncated", lambda d: (d / st).write_bytes((d / st).read_bytes()[:5000])),
        "garbage": variant("garbage", lambda d: (d / st).write_bytes(b"\xff" * 8 + b"garbage" * 50)),
        "empty": variant("empty", lambda d: (d / st).write_bytes(b"")),
        "vocab": variant("vocab", vocab),
        "pickle": variant("pickle", pickle_only),
    }


HOSTILE = {  # name -> (argv after the command's own -i/-o, words the one message must contain)
    "safetensors_truncated": ("{truncated}", "model.safetensors is damaged"),
    "safetensors_garbage": ("{garbage}", "model.safetensors is damaged"),
    "safetensors_empty": ("{empty}", "model.safetensors is damaged"),
    "vocab_size": ("{vocab}", "do not fit its config.json"),
    "pickle_refused": ("{pickle} --allow-pickle", "pickle checkpoint"),
    "regex_repeat": ("{ok} --step-pattern a{{99999999999}}", "step"),
    "max_length": ("{ok} --max-length 99999999999999999999", "at most 2147483647"),
}


@pytest.fixture(scope="module")
def damaged(tiny_model_dir, tmp_path_factory):
    return _damaged_models(tiny_model_dir, tmp_path_factory.mktemp("damaged")) | {"ok": tiny_model_dir}


def _one_message(err: str, prefixes=("freeprm ", "error: ")) -> list[str]:
    """The lines of stderr that are freeprm's own (not a library's progress bar or load report)."""
    return [x for x in err.splitlines() if x.startswith(prefixes)]


@pytest.mark.parametrize("cmd", ["score", "rerank", "serve"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_options_and_damaged_models_are_one_message(cmd, case, damaged, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 1, "prompt": "p", "response": "a\n\nb", "candidates": ["a\n\nb"]}) + "\n")
    out = tmp_path / "out"
    args, words = HOSTILE[case]
    model_and_opts = args.format(**damaged).split(" ")
    io_args = {"score": ["-i", str(inp), "-o", str(out)], "rerank": ["-i", str(inp), "-o", str(out)],
               "serve": ["--port", "0"]}[cmd]
    rc = main([cmd, "--policy", *model_and_opts, *io_args, *(["--no-progress"] if cmd != "serve" else [])])
    err = capsys.readouterr().err
    said = _one_message(err)
    assert rc == 2 and "Traceback" not in err and len(said) == 1, err[-3000:]
    assert words in said[0], said[0]
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_serve_port_out_of_range_is_refused_before_loading(port, capsys):
    rc = main(["serve", "--policy", "/no/such/model", "--port", port])  # the port is named, not the model
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "port" in err and "/no/such/model" not in err, err


@pytest.mark.parametrize("cmd", ["score", "rerank"])
@pytest.mark.parametrize("where", ["below_a_file", "proc", "sys"])
def test_impossible_output_paths_are_one_message(cmd, where, tiny_model_dir, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 1, "prompt": "p", "response": "a\n\nb", "candidates": ["a\n\nb"]}) + "\n")
    (tmp_path / "afile").write_text("keep")
    out = {"below_a_file": str(tmp_path / "afile" / "sub"), "proc": "/proc/freeprm-fuzz", "sys": "/sys/freeprm-fuzz"}[where]
    rc = main([cmd, "--policy", tiny_model_dir, "-i", str(inp), "-o", out, "--no-progress"])
    err = capsys.readouterr().err
    said = _one_message(err)
    assert rc == 2 and "Traceback" not in err and len(said) == 1 and out in said[0], err[-3000:]
    assert (tmp_path / "afile").read_text() == "keep" and not os.path.exists(out)


def test_help_and_directory_input_messages(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    assert "split on ``\\n`` only" in capsys.readouterr().out  # the two characters, not a line break
    for cmd in ("score", "rerank"):
        rc = main([cmd, "-i", str(tmp_path), "-o", str(tmp_path / "o"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and f"input {tmp_path} is a directory" in err and "not found" not in err
