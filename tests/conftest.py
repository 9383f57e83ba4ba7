import pytest
from mlx_lm.utils import load_tokenizer

from infini_mlx.utils import DEFAULT_MODEL


@pytest.fixture(scope="session")
def tokenizer_dir():
    """The shipped model's directory (its tokenizer is the project's tokenizer)."""
    assert (DEFAULT_MODEL / "tokenizer.json").exists(), "the embedded model is missing"
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def default_tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)
