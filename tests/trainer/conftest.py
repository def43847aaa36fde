"""Trainer fixtures: a small labeled arithmetic data set (the tiny model is ``tiny_model_dir`` of tests/conftest.py)."""

import json

import pytest


def arithmetic_rows(n_prompts: int = 8):
    """Per prompt a correct and an incorrect response that differ in one number."""
    rows = []
    for i in range(n_prompts):
        a, b = 3 + i, 4 + 2 * i
        p = f"What is {a} + {b}?"
        rows.append({"prompt": p, "response": f"{a} + {b} = {a + b}.\nThe answer is {a + b}.", "label": 1})
        rows.append({"prompt": p, "response": f"{a} + {b} = {a + b + 1}.\nThe answer is {a + b + 1}.", "label": 0})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def rows_file():
    """``rows_file(path, n_prompts)``: write the arithmetic data set with ``n_prompts`` prompts."""
    return lambda path, n_prompts=8: write_jsonl(path, arithmetic_rows(n_prompts))


@pytest.fixture
def data_path(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", arithmetic_rows())
