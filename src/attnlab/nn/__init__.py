"""Trainable layers and a tiny model built on attnlab's mechanisms.

- :class:`Attention`: projections, rotary embedding, GQA/MQA, self and cross
  attention, a decode cache, any registered mechanism or a per-head mix.
- :class:`TinyLM`: a small pre-norm decoder with a mechanism per layer,
  ``generate()`` through the decode cache, safetensors save/load.
"""

from .attention import Attention, HeadGroup, head_groups
from .model import TinyLM
from .rotary import Rotary

__all__ = ["Attention", "HeadGroup", "Rotary", "TinyLM", "head_groups"]
