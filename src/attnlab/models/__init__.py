"""Real pretrained models: loading, swapping a mechanism in, streaming capture.

>>> from attnlab.models import load, use, capture
>>> model, tok = load("smollm2")
>>> with use(model, "softmax"):
...     logits = model(**tok("Hello", return_tensors="pt")).logits

The hook knows what reads and edits attention only through the protocols of
:mod:`attnlab.models.probes` (:class:`AttentionProbe`, :class:`AttentionEdit`),
so this layer imports nothing from the analyses or interventions above it.
"""

from .capture import capture
from .loading import EMBEDDED, cache_dir, load, resolve
from .probes import AttentionEdit, AttentionProbe, CaptureInfo
from .qk_io import load_qk, save_qk
from .registration import register_with_transformers
from .results import CaptureResult, Results
from .swap import attnlab_attention, edited, hooked, register_all, register_attention, use

__all__ = [
    "EMBEDDED",
    "AttentionEdit",
    "AttentionProbe",
    "CaptureInfo",
    "CaptureResult",
    "Results",
    "attnlab_attention",
    "cache_dir",
    "capture",
    "edited",
    "hooked",
    "load",
    "load_qk",
    "register_all",
    "register_attention",
    "register_with_transformers",
    "resolve",
    "save_qk",
    "use",
]
