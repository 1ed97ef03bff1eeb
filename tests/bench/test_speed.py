"""The speed bench measures side by side and reports ratios, memory and FLOP bounds."""

import torch

from attnlab.bench import memory, speed


def test_run_speed_records_every_mechanism_and_mode():
    records = speed.run_speed(["softmax", "online"], [64], repeats=2, heads=2, head_dim=8)
    names = {(r.mechanism, r.causal) for r in records}
    assert names == {(m, c) for m in ("sdpa", "softmax", "online") for c in (False, True)}
    for r in records:
        assert r.ms is not None and r.ms > 0 and len(r.ms_repeats) == 2
        assert r.speedup is not None and r.speedup > 0
        assert r.scores_mib == 2 * 64 * 64 * 4 / 2**20 and r.device == "cpu"
    base = [r for r in records if r.mechanism == "sdpa"]
    assert all(abs(r.speedup - 1.0) < 1e-12 for r in base)


def test_peak_memory_sees_a_large_temporary():
    if not memory.available():
        return
    size = 256 * 2**20

    def allocate():
        x = torch.ones(size // 4)
        return float(x[0])

    _, extra = memory.peak_extra_bytes(allocate)
    assert extra is not None and extra >= 0.9 * size
    _, small = memory.peak_extra_bytes(lambda: torch.ones(16).sum())
    assert small < 0.1 * size


def test_full_attention_density():
    assert speed.full_density(8, causal=False) == 1.0
    assert speed.full_density(8, causal=True) == 9 / 16


def test_grad_mode_records_the_graph_and_backward_adds_the_pass(monkeypatch):
    """grad=True: inputs require grad (outputs carry a graph); backward=True: every timed
    call is a forward and a backward pass."""
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        out = real_sdpa(*args, **kwargs)
        seen.append(out.requires_grad)
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    speed.run_speed(["window"], [64], causal_modes=(True,), repeats=1, heads=2, head_dim=8)
    assert seen and not any(seen)
    seen.clear()
    records = speed.run_speed(
        ["window"], [64], causal_modes=(True,), repeats=1, heads=2, head_dim=8, grad=True
    )
    assert seen and all(seen) and all(r.grad and not r.backward for r in records)
    backward_calls = []
    real = torch.Tensor.backward

    def counting(self, *args, **kwargs):
        backward_calls.append(self.shape)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", counting)
    records = speed.run_speed(
        ["window"], [64], causal_modes=(True,), repeats=2, heads=2, head_dim=8, backward=True
    )
    assert {r.mechanism for r in records} == {"sdpa", "window"}
    assert all(r.grad and r.backward and r.ms > 0 for r in records)
    assert len(backward_calls) == 2 * 3  # two calls (SDPA, window) x (warm-up + 2 repeats)
