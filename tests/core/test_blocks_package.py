"""The block-sparse engine and MoBA as modules with one job each, passing named records
(issue 13): every import the rest of the repository makes still resolves, no module
of the split is long, and the planner's runs, band splits and pieces are frozen
dataclasses read by name."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import pathlib

import pytest
import torch

import attnlab
import attnlab.core.blocks as blocks
from attnlab.core.blocks import BandSplit, Run, band_runs
from attnlab.core.blocks.autograd import Part, Piece, grad_pieces

SRC = pathlib.Path(attnlab.__file__).parent
REPO = SRC.parent.parent
SPLIT = [SRC / "core" / "blocks", SRC / "mechanisms" / "sparse"]


def _split_modules() -> list[pathlib.Path]:
    return sorted(SPLIT[0].glob("*.py")) + sorted(SPLIT[1].glob("*moba*.py"))


def test_blocks_is_a_package_of_short_modules():
    assert (SPLIT[0] / "__init__.py").is_file(), "core/blocks is no package"
    assert not (SRC / "core" / "blocks.py").exists()
    modules = _split_modules()
    assert len(modules) >= 8
    long = {p.name: n for p in modules if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"


def test_every_name_imported_from_the_package_exists():
    """Each ``from attnlab.core.blocks import X`` in src/ and tests/ resolves."""
    wanted = set()
    for path in itertools.chain(SRC.rglob("*.py"), (REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "attnlab.core.blocks":
                wanted |= {alias.name for alias in node.names}
    assert {"StaticBlockSparse", "BlockLayout", "ranges_to_candidates"} <= wanted
    missing = sorted(name for name in wanted if not hasattr(blocks, name))
    assert not missing, f"not exported by attnlab.core.blocks: {missing}"
    assert set(blocks.__all__) >= wanted


def test_planner_records_are_named_frozen_dataclasses():
    mech = attnlab.get("blocksparse", local=2, global_blocks=1, random=2, block=4)
    layout = mech.layout(96, 96, True, 2)
    runs = layout.runs(2)
    assert runs and all(isinstance(r, Run) for r in runs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        runs[0].c0 = 1
    split = band_runs(layout, 2, torch.float64)
    assert any(isinstance(r.band, BandSplit) for r in split), "no run split into a band"
    assert all(r.band is None for r in runs)
    forward, backward = grad_pieces(layout, 1, 2, 2, 8, torch.float64)
    for pieces in (forward, backward):
        assert all(isinstance(p, Piece) for p in pieces)
        assert all(isinstance(part, Part) for p in pieces for part in p.parts)
        # the pieces cover every query block once, in order
        assert pieces[0].c0 == 0 and pieces[-1].c1 == layout.q_blocks
        assert all(a.c1 == b.c0 for a, b in itertools.pairwise(pieces))
