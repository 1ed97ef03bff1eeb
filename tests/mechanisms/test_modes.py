"""Eval and training mode (DESIGN.md: in eval mode a mechanism is deterministic).

Mechanisms start in eval mode; running statistics (affine's moving average of α,
routing's centroids) move only in training mode and only from finite inputs.
"""

from __future__ import annotations

import pytest
import torch

import attnlab

from .contract import ALL, inputs, poisoned


def _tiny(name):
    return attnlab.core.mechanism_class(name).tiny_config


@pytest.mark.parametrize("name", ALL)
def test_get_returns_a_mechanism_in_eval_mode(name):
    assert not attnlab.get(name, **_tiny(name)).training


@pytest.mark.parametrize("name", ALL)
def test_identical_calls_give_identical_outputs(name):
    mech = attnlab.get(name, **_tiny(name))
    q, k, v = inputs()
    causal = not attnlab.spec(name).noncausal
    first = mech(q, k, v, causal=causal)
    state = {key: t.clone() for key, t in mech.state_dict().items()}
    assert torch.equal(mech(q, k, v, causal=causal), first)
    for key, t in mech.state_dict().items():
        assert torch.equal(t, state[key]), f"{name}: {key} moved in eval mode"


@pytest.mark.parametrize(
    ("name", "options"),
    [("affine", {"init_alpha": 0.5, "init_std": 0.5}), ("routing", {"decay": 0.0})],
)
def test_the_functional_face_moves_no_statistic(name, options):
    """attention() equals the eval-mode module: the running statistic is read, not updated
    with this batch (as in training mode, where a second call already differs)."""
    q, k, v = inputs()
    torch.manual_seed(0)  # affine draws its gate weights on the first call
    got = attnlab.attention(q, k, v, mechanism=name, **options)
    torch.manual_seed(0)
    assert torch.equal(got, attnlab.get(name, **options).eval()(q, k, v))
    torch.manual_seed(0)
    training = attnlab.get(name, **options).train()
    training(q, k, v)
    assert not torch.equal(got, training(q, k, v))


def test_affine_statistic_skips_a_nan_batch_sample():
    mech = attnlab.get("affine", init_std=0.5).train()
    q, k, v = inputs()
    mech(q, k, v)
    before = mech.alpha_ma.clone()
    mech(poisoned(q, (1, 0, 4), float("nan")), k, v)
    assert torch.isfinite(mech.alpha_ma).all()
    assert not torch.equal(mech.alpha_ma, before)  # the finite α still moved it
    assert torch.isfinite(mech.eval()(q, k, v)).all()


def test_routing_centroids_skip_non_finite_vectors():
    mech = attnlab.get("routing", clusters=3).train()
    q, k, v = inputs()
    mech(poisoned(q, (0, 1, 2), float("nan")), poisoned(k, (1, 0, 5), float("inf")), v)
    assert torch.isfinite(mech.centroids).all()
    assert torch.isfinite(mech.eval()(q, k, v)).all()
