"""One loaded SmolLM2 (and MiniLM) per test session, shared by every test that needs it.

The first load ever converts the GGUF to a cached safetensors folder (tens of
seconds); later sessions read the cache (about a second).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the `models` extra")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny inputs run faster on one thread, and far faster on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, float32, eval mode."""
    from attnlab.models import load

    return load("smollm2")


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer) of the embedded all-MiniLM-L6-v2 encoder."""
    from attnlab.models import load

    return load("minilm")


@pytest.fixture
def short_text():
    return (
        "It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness, it was the epoch of belief, it was the epoch of "
        "incredulity, it was the season of Light, it was the season of Darkness."
    )
