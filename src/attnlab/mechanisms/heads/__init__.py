"""Layer-level head-structure mechanisms (family ``heads``): they own their projections and
are called on hidden states x [B, N, dim], not on projected q, k, v (see :mod:`.base`)."""

from . import gqa, mla, moh, sqa, talking

__all__ = ["gqa", "mla", "moh", "sqa", "talking"]
