"""The synthetic tasks: determinism, shapes, where labels sit, metrics at the extremes."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.tasks import IGNORE, get_task, task_names
from attnlab.tasks.recall import MQAR

ALL = task_names()


def test_registry_names_the_tasks():
    assert set(ALL) == {
        "mqar",
        "associative-recall",
        "selective-copy",
        "induction",
        "in-context-regression",
        "needle",
    }
    with pytest.raises(attnlab.AttnInputError, match="task"):
        get_task("no-such-task")
    with pytest.raises(attnlab.AttnInputError, match="config"):
        get_task("mqar", vocab_size=10)
    with pytest.raises(attnlab.AttnInputError, match="setting"):
        get_task("mqar", setting="nope")


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_examples(name):
    task = get_task(name)
    a, b, c = task.generate(6, 3), task.generate(6, 3), task.generate(6, 4)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("name", ALL)
def test_shapes(name):
    task = get_task(name)
    batch = task.generate(5, 0)
    if task.kind == "tokens":
        assert batch.inputs.shape == batch.targets.shape == (5, task.seq_len)
        assert batch.inputs.dtype == torch.long
        assert batch.inputs.min() >= 0 and batch.inputs.max() < task.vocab
        labelled = batch.targets[batch.targets != IGNORE]
        assert labelled.numel() > 0 and labelled.max() < task.vocab
        assert torch.equal(batch.scored, batch.targets != IGNORE)
    else:
        assert batch.inputs.shape == (5, task.seq_len, task.input_dim)
        assert batch.targets.shape == (5, task.seq_len, task.output_dim)


@pytest.mark.parametrize("name", ALL)
def test_metric_is_one_on_perfect_predictions_and_chance_on_random(name):
    task = get_task(name)
    batch = task.generate(400, 1)
    if task.kind == "tokens":
        perfect = torch.where(batch.scored, batch.targets, torch.zeros_like(batch.targets))
        assert task.metric(perfect, batch) == 1.0
        logits = torch.zeros(*batch.targets.shape, task.vocab)
        logits.scatter_(-1, perfect[..., None], 1.0)
        assert task.metric(logits, batch) == 1.0
        noise = torch.randint(0, task.vocab, batch.targets.shape)
        scored = int(batch.scored.sum())
        tolerance = 4 * (task.chance() / scored) ** 0.5 + 1e-9
        assert abs(task.metric(noise, batch) - task.chance()) < tolerance
    else:
        assert task.metric(batch.targets.clone(), batch) == pytest.approx(1.0)
        zero = torch.zeros_like(batch.targets)
        assert task.metric(zero, batch) == pytest.approx(task.chance())


@pytest.mark.parametrize("name", ALL)
def test_the_metric_reads_only_the_labelled_positions(name):
    """Changing the predictions where nothing is labelled leaves the metric unchanged."""
    task = get_task(name)
    batch = task.generate(20, 2)
    scored = batch.scored
    if task.kind == "tokens":
        right = torch.where(scored, batch.targets, torch.zeros_like(batch.targets))
        wrong = torch.where(scored, batch.targets, (right + 1) % task.vocab)
        assert task.metric(wrong, batch) == 1.0
    else:
        right = batch.targets.clone()
        right[~scored] = 123.0
        assert task.metric(right, batch) == pytest.approx(1.0)


def test_mqar_follows_zoology():
    task = get_task("mqar", vocab=128, seq_len=64, num_kv_pairs=8, random_non_queries=False)
    batch = task.generate(50, 0)
    half = 64
    for x, y in zip(batch.inputs, batch.targets, strict=True):
        keys, values = x[0:16:2], x[1:16:2]
        assert len(set(keys.tolist())) == 8
        assert keys.min() >= 1 and keys.max() < half
        assert values.min() >= half and values.max() < 128
        where = (y != IGNORE).nonzero().flatten()
        assert len(where) == 8
        assert (where >= 16).all() and ((where - 16) % 2 == 0).all()
        answer = dict(zip(keys.tolist(), values.tolist(), strict=True))
        for p in where.tolist():
            assert y[p] == answer[x[p].item()]  # the query is a key; its label is its value
        rest = torch.ones(64, dtype=torch.bool)
        rest[:16] = False
        rest[where] = False
        assert (x[rest] == 0).all()
    noisy = get_task("mqar", vocab=128, seq_len=64, num_kv_pairs=8).generate(50, 0)
    assert torch.equal(noisy.targets, batch.targets)
    assert (noisy.inputs != 0).float().mean() > 0.9


def test_mqar_power_law_puts_queries_early():
    p = get_task("mqar").gap_probabilities()
    assert p[0] > 10 * p[-1] and torch.all(p[1:] <= p[:-1])
    uniform = get_task("mqar", power_a=1.0).gap_probabilities()
    torch.testing.assert_close(uniform, torch.full_like(uniform, 1 / len(uniform)))
    batch = get_task("mqar", vocab=512, seq_len=256, num_kv_pairs=8).generate(200, 0)
    where = (batch.targets != IGNORE).nonzero()[:, 1].float()
    assert where.median() < 16 + (256 - 16) / 2


def test_zoology_settings_by_name():
    task = get_task("mqar/zoology-256")
    assert (task.vocab, task.seq_len, task.config.num_kv_pairs) == (8192, 256, 16)
    assert set(MQAR.settings) >= {"zoology-64", "zoology-128", "zoology-256", "zoology-512"}
    assert get_task("mqar", setting="zoology-64", num_kv_pairs=8).config.num_kv_pairs == 8


def test_associative_recall_asks_one_key():
    batch = get_task("associative-recall").generate(30, 0)
    for x, y in zip(batch.inputs, batch.targets, strict=True):
        pairs = dict(zip(x[0:-1:2].tolist(), x[1:-1:2].tolist(), strict=True))
        assert (y[:-1] == IGNORE).all() and y[-1] == pairs[x[-1].item()]


def test_selective_copy_copies_data_in_order():
    task = get_task("selective-copy")
    batch = task.generate(30, 0)
    region = task.config.region
    for x, y in zip(batch.inputs, batch.targets, strict=True):
        data = x[:region][x[:region] >= 2]
        assert torch.equal(y[region:], data)
        assert (x[region:] == 1).all()


def test_induction_repeats_the_run():
    task = get_task("induction")
    batch = task.generate(10, 0)
    half = task.seq_len // 2
    assert torch.equal(batch.inputs[:, :half], batch.inputs[:, half:])
    assert torch.equal(batch.targets[:, half:-1], batch.inputs[:, half + 1 :])
    assert (batch.targets[:, :half] == IGNORE).all()


def test_needle_depth():
    task = get_task("needle", seq_len=64, min_depth=0.0, max_depth=0.1)
    batch = task.generate(40, 0)
    marker = (batch.inputs[:, :-1] == 0).float().argmax(dim=1)
    assert marker.max() <= 7
    assert torch.equal(batch.targets[:, -1], batch.inputs[torch.arange(40), marker + 1])


def test_regression_targets_are_linear_in_the_inputs():
    task = get_task("in-context-regression", dim=3, pairs=10, queries=4)
    batch = task.generate(8, 0)
    x, shown = batch.inputs[..., :3], batch.inputs[..., 3]
    # the weights that fit the shown pairs also give the targets at the queries
    for i in range(8):
        w = torch.linalg.lstsq(x[i, :10].double(), shown[i, :10].double()).solution
        torch.testing.assert_close(x[i, 10:].double() @ w, batch.targets[i, 10:, 0].double())
    assert (shown[:, 10:] == 0).all()
