"""pyproject.toml: attnlab installs next to a user's own torch."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def test_torch_is_a_lower_bound_not_a_pin():
    """A pin (torch==X) made `pip install attnlab` replace the user's torch; attnlab needs
    FlexAttention's BlockMask.from_kv_blocks and SDPA's enable_gqa (torch 2.5)."""
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    torch_req = [d.replace(" ", "") for d in deps if d.split(">")[0].split("=")[0] == "torch"]
    assert torch_req == ["torch>=2.5"]


def test_the_entry_point_is_the_cli_app():
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert scripts == {"attnlab": "attnlab.cli:app"}
    from attnlab.cli import app

    assert callable(app)
