"""Real pretrained models: loading, swapping a mechanism in, streaming capture.

>>> from attnlab.models import load, use, capture
>>> model, tok = load("smollm2")
>>> with use(model, "softmax"):
...     logits = model(**tok("Hello", return_tensors="pt")).logits
"""

from .capture import CaptureResult, Results, capture, load_qk, save_qk
from .loading import EMBEDDED, cache_dir, load, resolve
from .swap import attnlab_attention, hooked, register_all, register_attention, use

__all__ = [
    "EMBEDDED",
    "CaptureResult",
    "Results",
    "attnlab_attention",
    "cache_dir",
    "capture",
    "hooked",
    "load",
    "load_qk",
    "register_all",
    "register_attention",
    "resolve",
    "save_qk",
    "use",
]
