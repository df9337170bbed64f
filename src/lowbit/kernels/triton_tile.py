"""Index helpers shared by the matmul kernels (`triton_kernels`, `triton_gemv`, `triton_dot4`).

Loaded per mode through `triton_modes.kernel_module`, like the kernels that call them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def clamped_range(pid, BLOCK: tl.constexpr, limit):
    """(idx, mask, idx_c) for the BLOCK indices of program `pid` along one axis: idx = pid * BLOCK + 0..BLOCK-1,
    mask = idx < limit, and idx_c = idx where valid, else 0 (safe to address with, loads stay
    in bounds; results at masked positions are never stored).

    Example (inside a kernel):
        rows, rmask, rows_c = clamped_range(tl.program_id(0), BLOCK_N, N)
    """
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < limit
    return idx, mask, tl.where(mask, idx, 0)


@triton.jit
def split_blocks(pid_k, blocks_per_split, KB, BB: tl.constexpr):
    """[blk_lo, blk_hi): the scale blocks of BB bytes (of KB bytes per row) that split `pid_k` of K covers."""
    blk_lo = pid_k * blocks_per_split
    return blk_lo, tl.minimum(blk_lo + blocks_per_split, (KB + BB - 1) // BB)
