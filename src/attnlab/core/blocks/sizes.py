"""The sizes the block-sparse paths cut their work into (see :mod:`attnlab.core.blocks`).

Read at call time (``sizes.GATHER_BYTES``), so that tests can shrink them to force
many small pieces on tiny inputs. The speed they give is recorded by
``attnlab bench speed`` in ``benchmarks/`` at the repository root.
"""

# score elements from which a chunk goes to the fused SDPA kernel: below it the
# kernel's parallel region costs more than the work
FUSED_MIN_ELEMENTS = 1 << 16
# elements of one gathered score chunk in the trainable path (bounds its memory)
CHUNK_ELEMENTS = 1 << 24
# bytes of gathered keys and values per piece (inference): below glibc's 32 MiB mmap
# threshold the allocator reuses them (larger ones are page-faulted afresh on every
# call), yet large enough that few SDPA calls are made
GATHER_BYTES = 1 << 23
# the band + gathered-blocks path (inference): bytes of band output per call, and of
# gathered further keys and values per piece (larger gathers mean fewer merges)
BAND_BYTES = 1 << 23
BAND_GATHER_BYTES = 1 << 24
# keys and values per piece of the gradient path: the backward returns key and value
# gradients as large per piece, and smaller pieces keep them in cache
GRAD_BYTES = 1 << 23
