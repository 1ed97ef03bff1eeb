"""The shared model fixtures of tests/models."""

from tests.models.conftest import minilm, one_thread, short_text, smollm2  # noqa: F401
