"""The attention hook as a user meets it: registration on import, attention weights,
threads, the model's mode."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import attnlab
from attnlab.models import use

SRC = str(Path(attnlab.__file__).resolve().parents[1])


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_import_attnlab_is_enough_for_attn_implementation(smollm2):
    """``import attnlab`` (without importing transformers) makes ``attnlab:window`` a valid
    ``attn_implementation`` for a real ``from_pretrained`` of the embedded SmolLM2."""
    run = _python(
        "import sys, torch, attnlab\n"
        "assert 'transformers' not in sys.modules, 'import attnlab imported transformers'\n"
        "from attnlab.models.loading import resolve\n"
        "from transformers import AutoModelForCausalLM\n"
        "folder, _ = resolve('smollm2')\n"
        "m = AutoModelForCausalLM.from_pretrained(folder, attn_implementation='attnlab:window')\n"
        "assert m.config._attn_implementation == 'attnlab:window'\n"
        "with torch.no_grad():\n"
        "    out = m(input_ids=torch.tensor([[1, 2, 3, 4]])).logits\n"
        "print('ok', tuple(out.shape), bool(torch.isfinite(out).all()))\n"
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["ok", "(1,", "4,", "49152)", "True"]


def test_transformers_imported_first_registers_at_once():
    run = _python(
        "import transformers.modeling_utils\n"
        "import attnlab\n"
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "names = set(AttentionInterface._global_mapping)\n"
        "masks = set(AttentionMaskInterface._global_mapping)\n"
        "wanted = {'attnlab:' + n for n in attnlab.core.names()}\n"
        "print(wanted <= names, wanted <= masks)\n"
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "True"]


def _eager(model, batch):
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**batch, output_attentions=True)
    finally:
        model.set_attn_implementation(before)


@pytest.mark.parametrize("name", ["softmax", "chunked"])
def test_output_attentions_under_an_exact_mechanism(smollm2, short_text, name):
    model, tok = smollm2
    batch = tok(short_text, return_tensors="pt")
    eager = _eager(model, batch)
    with use(model, name), torch.no_grad():
        out = model(**batch, output_attentions=True)
    assert len(out.attentions) == 30
    for layer in (0, 29):
        torch.testing.assert_close(
            out.attentions[layer], eager.attentions[layer], rtol=1e-4, atol=1e-5
        )
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-4, atol=2e-4)


def test_output_attentions_without_weights_says_so(smollm2, short_text):
    model, tok = smollm2
    batch = tok(short_text, return_tensors="pt")
    with (
        use(model, "window", window=4),
        torch.no_grad(),
        pytest.raises(attnlab.AttnInputError, match=r"output_attentions: .*'window'"),
    ):
        model(**batch, output_attentions=True)
    with use(model, "window", window=4), torch.no_grad():
        assert model(**batch).attentions is None or model(**batch).attentions == ()


def test_two_threads_each_run_their_own_mechanism(smollm2, short_text):
    """Two threads inside ``use`` with different mechanisms at the same time: each runs
    its own (the last to enter does not win)."""
    model, tok = smollm2
    batch = tok(short_text, return_tensors="pt")
    with torch.no_grad():
        with use(model, "window", window=2):
            want_window = model(**batch).logits
        want_softmax = model(**batch).logits
    assert not torch.allclose(want_window, want_softmax, atol=1e-3)
    entered = threading.Barrier(2, timeout=120)
    got: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(label: str, name: str, **config) -> None:
        try:
            with use(model, name, **config), torch.no_grad():
                entered.wait()  # both threads are inside `use` before either runs
                got[label] = model(**batch).logits
                entered.wait()  # neither leaves before both have run
        except BaseException as exc:  # reported below
            errors.append(exc)
            entered.abort()

    threads = [
        threading.Thread(target=run, args=("window", "window"), kwargs={"window": 2}),
        threading.Thread(target=run, args=("softmax", "softmax")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    torch.testing.assert_close(got["window"], want_window, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(got["softmax"], want_softmax, rtol=1e-4, atol=2e-4)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["routing", "affine"])
def test_a_swapped_mechanism_follows_the_model_mode(smollm2, short_text, name):
    model, tok = smollm2
    batch = tok(short_text, return_tensors="pt")
    assert not model.training
    with use(model, name) as mechanism, torch.no_grad():
        assert not mechanism.training
        first = model(**batch).logits
        second = model(**batch).logits
        assert not mechanism.training
        torch.testing.assert_close(second, first, rtol=0, atol=0)
        model.train()
        try:
            model(**batch)
            assert mechanism.training
        finally:
            model.eval()
        model(**batch)
        assert not mechanism.training
