import infini_mlx  # noqa: F401  first: on Linux it loads OpenBLAS before MLX loads

# isort: split
import shutil
from pathlib import Path

import pytest
from mlx_lm.utils import load_tokenizer

from infini_mlx.utils import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tokenizer_dir():
    """The shipped model's directory (its tokenizer is the project's tokenizer)."""
    assert (DEFAULT_MODEL / "tokenizer.json").exists(), "the embedded model is missing"
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def default_tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def books_dir(tmp_path_factory):
    """A books directory holding one training book (the repo's Alice), so tests
    never depend on the shared collection beside the checkout."""
    d = tmp_path_factory.mktemp("books")
    shutil.copy(REPO / "examples" / "alice.txt", d / "alice_in_wonderland_pg11.txt")
    return d
