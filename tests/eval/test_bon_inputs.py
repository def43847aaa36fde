"""``freeprm bon score``: a bad candidate is named by its file line, before any scoring."""

import json

from freeprm.cli import main


def test_bad_candidate_named_by_file_line(tiny_model_dir, tmp_path, capsys):
    own = tmp_path / "mine.jsonl"
    recs = [{"problem_id": "q", "candidate_id": i, "prompt": "p?", "response": f"step {i}.\n\nThe answer is {i}.",
             "task": "gsm8k", "gold": "1"} for i in range(5)]
    recs[3]["steps"] = ["not in the response"]  # line 4 (second chunk with --score-chunk 2)
    own.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out"
    assert main(["bon", "score", "--output", str(out), "--candidates", str(own), "--policy", tiny_model_dir, "--no-progress",
                 "--score-chunk", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{own}:4: " in err and "item" not in err.split(f"{own}:4: ")[1].split("\n")[0]
    assert not (out / "scores.jsonl").exists()  # validated before any model work


def test_bad_candidate_record_named_by_file_line(tmp_path, capsys):
    own = tmp_path / "mine.jsonl"
    first = json.dumps({"problem_id": "q", "candidate_id": 0, "prompt": "p", "response": "r"}) + "\n"
    for second, needle in [(json.dumps({"problem_id": "q", "prompt": "p", "response": "r"}),
                            "candidate record lacks ['candidate_id']"),
                           ('{"problem_id": "q", "candidate_id": 2, "prompt": "p", "response": "\\ud800"}',
                            "invalid \\ud800 surrogate in key 'response'"),
                           ('{"problem_id": "q", "candidate_id": "x", "prompt": "p", "response": "r"}',
                            "candidate_id must be an integer")]:
        own.write_text(first + second + "\n")
        assert main(["bon", "report", "--output", str(tmp_path / "o"), "--candidates", str(own), "--no-scores"]) == 2
        assert f"{own}:2: {needle}" in capsys.readouterr().err


def test_bon_step_delimiter_keeps_non_ascii():
    from freeprm.cli import build_parser

    args = build_parser().parse_args(["bon", "score", "--output", "o", "--step-delimiter", "。"])
    assert args.step_delimiter == "。"
