import pytest

from freeprm.testing import make_tiny_model_dir


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random Llama + tokenizer (with chat template) as an HF directory."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0)
