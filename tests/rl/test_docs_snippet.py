"""The API snippet in docs/rl.md runs (on the tiny model instead of SmolLM2)."""

import re
from pathlib import Path


def test_docs_rl_snippet_runs(tiny_model_dir, tmp_path):
    text = (Path(__file__).resolve().parents[2] / "docs" / "rl.md").read_text()
    code = re.search(r"## API\n\n```python\n(.*?)```", text, re.S).group(1)
    code = code.replace('"smollm2"', repr(tiny_model_dir)).replace('"runs/prm"', repr(str(tmp_path / "prm")))
    ns = {}
    exec(compile(code, "docs/rl.md", "exec"), ns)
    assert ns["out"]["version"] == 1 and ns["v"] == 1 and ns["prm"].version == 1
    assert ns["adv"].shape == ns["ids"].shape
