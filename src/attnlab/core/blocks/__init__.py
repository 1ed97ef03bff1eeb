"""Block-sparse attention: one layout, two paths, one answer.

A :class:`BlockLayout` (:mod:`.layout`) says, for every query block of ``block``
queries, which key blocks it attends (``kv_indices``, padded slots flagged by
``kv_valid``), which of those are fully visible (``kv_full``), and a token rule
``mask_mod`` for the pairs inside partially visible blocks. ``mask_mod(b, h, q_idx,
kv_idx)`` follows the FlexAttention convention (Dong et al., "Flex Attention: A
Programming Model for Generating Optimized Attention Kernels", arXiv:2412.05496):
it returns True where query ``q_idx`` may attend key ``kv_idx``, and it is written
with broadcasting tensor operations only, so that the same function serves both
paths.

- :func:`torch_block_attention` (:mod:`.trainable`): plain PyTorch, trainable.
  Each query block gathers its key and value blocks (sliding bands of
  consecutive blocks, :mod:`.bands`, are read in place through strided views)
  and attends them with the fused ``scaled_dot_product_attention``, the token
  mask as an additive bias; small chunks use explicit matmuls. With gradients
  on CPU (no user mask, equal key and value widths) one autograd function
  (:mod:`.autograd`) computes it piece by piece with the fused flash kernel's
  forward and backward. It never builds an N x N tensor: scores exist only for
  the gathered blocks.
- :func:`flex_block_attention` (:mod:`.flex`): ``flex_attention`` compiled by
  ``torch.compile`` with a ``BlockMask`` built from the same layout (cached on
  the layout; below ``FLEX_COMPILE_MIN_PAIRS`` it runs uncompiled). Inference
  only on CPU, where FlexAttention has no backward.
- :func:`block_sparse_attention` (:mod:`.paths`) picks the path (``"auto"``, see
  :func:`choose_path`): the trainable one when gradients flow, the dtype has
  no flex kernel, the shape is small, or on CPU where it is the faster one;
  flex on GPUs for large shapes.

:class:`StaticBlockSparse` (:mod:`.static`) turns a fixed mask (window,
neighborhood, fixed block patterns, ...) into a registered mechanism with both
paths (``Config.backend``), a layout cache, ``density`` and KV-cache decoding.
The piece sizes the paths cut their work into are in :mod:`.sizes`.
"""

from .bands import BandSplit, band_runs, band_split, sliding_start
from .flex import (
    FLEX_COMPILE_MIN_PAIRS,
    FLEX_DTYPES,
    flex_block_attention,
    flex_block_mask,
    flex_unsupported,
)
from .layout import BlockLayout, MaskMod, Run, ranges_to_candidates
from .paths import (
    BACKENDS,
    FLEX_FAST_DEVICES,
    FLEX_MIN_PAIRS,
    block_sparse_attention,
    check_backend,
    choose_path,
    prefers_flex,
)
from .pieces import sliding_view
from .static import LayoutCache, StaticBlockSparse
from .trainable import torch_block_attention

__all__ = [
    "BACKENDS",
    "FLEX_COMPILE_MIN_PAIRS",
    "FLEX_DTYPES",
    "FLEX_FAST_DEVICES",
    "FLEX_MIN_PAIRS",
    "BandSplit",
    "BlockLayout",
    "LayoutCache",
    "MaskMod",
    "Run",
    "StaticBlockSparse",
    "band_runs",
    "band_split",
    "block_sparse_attention",
    "check_backend",
    "choose_path",
    "flex_block_attention",
    "flex_block_mask",
    "flex_unsupported",
    "prefers_flex",
    "ranges_to_candidates",
    "sliding_start",
    "sliding_view",
    "torch_block_attention",
]
