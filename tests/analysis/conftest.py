"""Real-model fixtures: the session-wide loaded models of tests/models (loaded once)."""

from tests.models.conftest import minilm, smollm2  # noqa: F401
