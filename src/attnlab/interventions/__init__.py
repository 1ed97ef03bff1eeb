"""Training-free edits of a model's attention, each a context manager that restores on exit.

>>> from attnlab.interventions import mask_heads, zerotune
>>> with mask_heads(model, {3: [0, 5]}), zerotune(model, gamma=0.8):
...     out = model(**inputs)
"""

from .act import SinkCalibration, calibrate_sinks
from .base import Edit, Heads, applied
from .heads import HeadScale, mask_heads, scale_heads
from .identity import IdentityBlend, identity_attention
from .zerotuning import ZeroTuning, zerotune

__all__ = [
    "Edit",
    "HeadScale",
    "Heads",
    "IdentityBlend",
    "SinkCalibration",
    "ZeroTuning",
    "applied",
    "calibrate_sinks",
    "identity_attention",
    "mask_heads",
    "scale_heads",
    "zerotune",
]
