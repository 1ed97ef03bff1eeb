"""`TinyLM`: a small pre-norm decoder whose attention is any attnlab mechanism, per layer.

A stack of pre-norm blocks (Xiong et al., arXiv:2002.04745), each
``x + Attention(RMSNorm(x))`` then ``x + MLP(RMSNorm(x))``, with RMSNorm
(Zhang & Sennrich, arXiv:1910.07467), a SwiGLU (Shazeer, arXiv:2002.05202) or
GELU MLP, and an output head tied to the token embedding (Press & Wolf,
arXiv:1608.05859). Each layer takes its own mechanism or per-head mix, so the
layer schedules of hybrids (BASED's linear + window layers, arXiv:2402.18668;
Hymba's mixed heads, arXiv:2411.13676) are a list. An optional short causal
depthwise convolution before attention in each block is the short filter that
Zoology's and BASED's recall models put next to their attention (Arora et
al., arXiv:2312.04927 and arXiv:2402.18668): it lets one layer bind a value
to the key just before it.

For continuous inputs (in-context regression) ``input_dim`` replaces the
embedding by a linear projection and ``output_dim`` the tied head by an
untied linear read-out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.core.errors import AttnInputError

from .attention import Attention

FORMAT = "attnlab.nn.TinyLM"
POSITIONALS = ("rotary", "learned", "none")
MLPS = ("swiglu", "gelu")


class MLP(nn.Module):
    """The feed-forward sub-layer: SwiGLU (arXiv:2002.05202) or a GELU MLP."""

    def __init__(self, dim: int, hidden: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.up = nn.Linear(dim, 2 * hidden if kind == "swiglu" else hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            return self.down(F.silu(gate) * value)
        return self.down(F.gelu(h))


class ShortConv(nn.Module):
    """A causal depthwise convolution over the last ``kernel`` positions (H3/Zoology's
    short filter, arXiv:2212.14052, arXiv:2312.04927); it decodes with a window of inputs."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim, bias=True)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None):
        """``x`` [B, N, dim] after ``past`` [B, kernel-1, dim] (zeros when None)."""
        if past is None:
            past = x.new_zeros(x.shape[0], self.kernel - 1, x.shape[2])
        full = torch.cat([past, x], dim=1)
        out = self.conv(full.transpose(1, 2)).transpose(1, 2)
        return out, full[:, full.shape[1] - (self.kernel - 1) :]


class Block(nn.Module):
    """Pre-norm block: [short conv,] attention, MLP, each added to the residual stream."""

    def __init__(self, dim, heads, kv_heads, mechanism, config, mlp_ratio, mlp, rotary, conv):
        super().__init__()
        self.conv = ShortConv(dim, conv) if conv > 1 else None
        self.conv_norm = nn.RMSNorm(dim) if conv > 1 else None
        self.attn_norm = nn.RMSNorm(dim)
        self.attn = Attention(dim, heads, kv_heads, mechanism, rotary=rotary, causal=True, **config)
        self.mlp_norm = nn.RMSNorm(dim)
        self.mlp = MLP(dim, int(mlp_ratio * dim), mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            x = x + self.conv(self.conv_norm(x))[0]
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))

    def init_cache(self, batch, dtype, device):
        cache = {"attn": self.attn.init_cache(batch, dtype=dtype, device=device)}
        if self.conv is not None:
            cache["conv"] = torch.zeros(
                batch, self.conv.kernel - 1, self.attn.dim, dtype=dtype, device=device
            )
        return cache

    def step(self, x, cache):
        new = {}
        if self.conv is not None:
            h, new["conv"] = self.conv(self.conv_norm(x), cache["conv"])
            x = x + h
        h, new["attn"] = self.attn.step(self.attn_norm(x), cache["attn"])
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), new


def _layer_mechanisms(mechanism: Any, layers: int) -> list[Any]:
    """One mechanism entry per layer: a name or mix for all, or a list of ``layers`` entries."""
    if isinstance(mechanism, str):
        return [mechanism] * layers
    if isinstance(mechanism, Sequence) and len(mechanism) > 0:
        first = mechanism[0]
        # a single per-head mix [("softmax", 2), ("linear", 2)] serves every layer
        if (
            isinstance(first, Sequence)
            and not isinstance(first, str)
            and len(first) in (2, 3)
            and isinstance(first[0], str)
            and isinstance(first[1], int)
        ):
            return [_as_mix(mechanism)] * layers
        if len(mechanism) != layers:
            raise AttnInputError(
                f"mechanism: expected a name, a per-head mix or a list of {layers} per-layer "
                f"entries, got a list of {len(mechanism)}"
            )
        return [m if isinstance(m, str) else _as_mix(m) for m in mechanism]
    raise AttnInputError(f"mechanism: expected a name or a list, got {mechanism!r}")


def _as_mix(entries: Any) -> list[tuple]:
    """A per-head mix with tuples (JSON gives lists back)."""
    return [tuple(e) for e in entries]


class TinyLM(nn.Module):
    """A small causal language model with any attnlab mechanism in each layer.

    ``TinyLM(vocab, dim, layers, heads)``: token embedding, ``layers`` pre-norm
    blocks, final RMSNorm, head tied to the embedding. ``mechanism`` is one name
    or per-head mix for every layer, or a list with one per layer
    (``["based", "window", "based", "window"]``); ``mechanism_config`` maps a
    mechanism name to its options wherever it appears
    (``{"window": {"window": 16}}``). ``positional`` is ``"rotary"``
    (arXiv:2104.09864), ``"learned"`` absolute embeddings up to ``max_len``, or
    ``"none"``; ``conv`` > 1 adds a short causal convolution of that width
    before attention in every block. ``input_dim``/``output_dim`` make a model
    of vectors (continuous inputs, linear read-out) instead of tokens.
    """

    def __init__(
        self,
        vocab: int | None = None,
        dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        kv_heads: int | None = None,
        mechanism: Any = "softmax",
        mlp_ratio: float = 4,
        max_len: int = 2048,
        *,
        mlp: str = "swiglu",
        positional: str = "rotary",
        conv: int = 0,
        mechanism_config: dict[str, dict[str, Any]] | None = None,
        input_dim: int | None = None,
        output_dim: int | None = None,
    ) -> None:
        super().__init__()
        if (vocab is None) == (input_dim is None):
            raise AttnInputError(
                f"vocab, input_dim: expected exactly one (tokens or vectors), "
                f"got vocab={vocab!r}, input_dim={input_dim!r}"
            )
        if input_dim is not None and output_dim is None:
            raise AttnInputError("output_dim: a model of vectors (input_dim) needs output_dim")
        if mlp not in MLPS:
            raise AttnInputError(f"mlp: expected one of {', '.join(MLPS)}, got {mlp!r}")
        if positional not in POSITIONALS:
            raise AttnInputError(
                f"positional: expected one of {', '.join(POSITIONALS)}, got {positional!r}"
            )
        for name, value in (
            ("dim", dim),
            ("layers", layers),
            ("heads", heads),
            ("max_len", max_len),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AttnInputError(f"{name}: expected an integer >= 1, got {value!r}")
        if isinstance(conv, bool) or not isinstance(conv, int) or conv < 0:
            raise AttnInputError(
                f"conv: expected an integer >= 0 (0: no convolution), got {conv!r}"
            )
        mechanism_config = dict(mechanism_config or {})
        per_layer = _layer_mechanisms(mechanism, layers)
        self.config = {
            "vocab": vocab,
            "dim": dim,
            "layers": layers,
            "heads": heads,
            "kv_heads": kv_heads,
            "mechanism": per_layer,
            "mlp_ratio": mlp_ratio,
            "max_len": max_len,
            "mlp": mlp,
            "positional": positional,
            "conv": conv,
            "mechanism_config": mechanism_config,
            "input_dim": input_dim,
            "output_dim": output_dim,
        }
        if vocab is not None:
            self.embed = nn.Embedding(vocab, dim)
            nn.init.normal_(self.embed.weight, std=dim**-0.5)
        else:
            self.embed = nn.Linear(input_dim, dim)
        self.position = nn.Embedding(max_len, dim) if positional == "learned" else None
        blocks = []
        for entry in per_layer:
            if isinstance(entry, str):
                mech, config = entry, mechanism_config.get(entry, {})
            else:
                mech = [
                    (
                        e[0],
                        e[1],
                        {**mechanism_config.get(e[0], {}), **(e[2] if len(e) == 3 else {})},
                    )
                    for e in entry
                ]
                config = {}
            blocks.append(
                Block(
                    dim, heads, kv_heads, mech, config, mlp_ratio, mlp, positional == "rotary", conv
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(dim)
        self.readout = nn.Linear(dim, output_dim) if output_dim is not None else None

    @property
    def vocab(self) -> int | None:
        return self.config["vocab"]

    # --- the full pass ---------------------------------------------------------------------

    def _embed(self, inputs: torch.Tensor, offset: int) -> torch.Tensor:
        if self.vocab is not None:
            if inputs.dim() != 2 or inputs.dtype not in (torch.long, torch.int32, torch.int64):
                raise AttnInputError(
                    f"ids: expected integer token ids [B, N], got {inputs.dtype} "
                    f"{tuple(inputs.shape)}"
                )
            x = self.embed(inputs)
        else:
            width = self.config["input_dim"]
            if inputs.dim() != 3 or inputs.shape[-1] != width or not inputs.is_floating_point():
                raise AttnInputError(
                    f"inputs: expected float vectors [B, N, {width}], got {inputs.dtype} "
                    f"{tuple(inputs.shape)}"
                )
            x = self.embed(inputs)
        if self.position is not None:
            n = inputs.shape[1]
            if offset + n > self.config["max_len"]:
                raise AttnInputError(
                    f"ids: positions up to {offset + n} exceed max_len={self.config['max_len']}"
                )
            x = x + self.position(torch.arange(offset, offset + n, device=x.device))
        return x

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.readout is not None:
            return self.readout(x)
        return x @ self.embed.weight.T

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, N, vocab] (a model of vectors: outputs [B, N, output_dim])."""
        x = self._embed(inputs, 0)
        for block in self.blocks:
            x = block(x)
        return self._head(x)

    # --- decoding --------------------------------------------------------------------------

    def init_cache(self, batch: int) -> list[dict[str, Any]]:
        """An empty decode cache for ``batch`` sequences, one entry per layer."""
        weight = self.norm.weight
        return [block.init_cache(batch, weight.dtype, weight.device) for block in self.blocks]

    def step(self, inputs: torch.Tensor, cache: list[dict[str, Any]]):
        """Logits of ``t`` new tokens ``inputs`` [B, t] given ``cache``; returns (logits, cache).

        Stepping through a sequence in pieces equals :meth:`forward`.
        """
        x = self._embed(inputs, cache[0]["attn"]["position"])
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x, layer_cache = block.step(x, layer_cache)
            new_cache.append(layer_cache)
        return self._head(x), new_cache

    @torch.no_grad()
    def generate(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        greedy: bool = True,
        *,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``ids`` [B, N] by ``max_new_tokens`` tokens with the decode cache.

        The prompt goes through the cache in one step, then one token per step;
        ``greedy`` takes the most likely token, otherwise tokens are sampled
        from the softmax at ``temperature``. Returns [B, N + max_new_tokens].
        """
        if self.vocab is None:
            raise AttnInputError("generate: needs a model of tokens (vocab), this one has vectors")
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or max_new_tokens < 0
        ):
            raise AttnInputError(
                f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}"
            )
        cache = self.init_cache(ids.shape[0])
        logits, cache = self.step(ids, cache)
        out = [ids]
        for i in range(max_new_tokens):
            last = logits[:, -1]
            if greedy:
                token = last.argmax(-1, keepdim=True)
            else:
                probs = torch.softmax(last.float() / temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)
            out.append(token)
            if i + 1 < max_new_tokens:
                logits, cache = self.step(token, cache)
        return torch.cat(out, dim=1)

    def state_size(self, n: int) -> int:
        """Floats per sequence that decoding holds after ``n`` tokens, summed over layers
        (attention states or caches, plus the convolution windows)."""
        total = 0
        for block in self.blocks:
            total += block.attn.state_size(n)
            if block.conv is not None:
                total += (block.conv.kernel - 1) * block.attn.dim
        return total

    # --- files -----------------------------------------------------------------------------

    def save(self, path: str | Path, *, extra: dict[str, str] | None = None) -> None:
        """Write the weights as safetensors, with the constructor's arguments as JSON in the
        file's metadata (key ``"config"``) and ``extra`` string entries (a trainer's step and
        metric); no pickle."""
        from safetensors.torch import save_file

        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        metadata = {**(extra or {}), "format": FORMAT, "config": json.dumps(self.config)}
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> TinyLM:
        """A model written by :meth:`save`: built from the metadata, weights loaded strictly."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise AttnInputError(
                    f"path: expected a safetensors file written by TinyLM.save "
                    f"(format {FORMAT!r}), got format {metadata.get('format')!r} in {path}"
                )
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        model = cls(**json.loads(metadata["config"]))
        model.load_state_dict(tensors, strict=True)
        return model.to(device)
