"""One loaded SmolLM2 (and MiniLM) per test session, shared by every test that needs it.

Other test folders reuse these fixtures with
``from tests.models.conftest import minilm, short_text, smollm2, one_thread  # noqa: F401``;
the models are cached at module level, so every importer gets the same objects.
The first load ever converts the GGUF to a cached safetensors folder (tens of
seconds); later sessions read the cache (about a second).
"""

import functools

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the `models` extra")


@functools.cache
def _loaded(name):
    from attnlab.models import load

    return load(name)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny inputs run faster on one thread, and far faster on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, float32, eval mode."""
    return _loaded("smollm2")


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer) of the embedded all-MiniLM-L6-v2 encoder."""
    return _loaded("minilm")


@pytest.fixture
def short_text():
    return (
        "It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness, it was the epoch of belief, it was the epoch of "
        "incredulity, it was the season of Light, it was the season of Darkness."
    )
