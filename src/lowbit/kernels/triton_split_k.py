"""The split-K epilogue shared by the matmul kernels (`triton_kernels._dot_kernel`,
`triton_gemv._gemv_fast_kernel`, `triton_dot4._dot4_kernel`).

With SPLIT_K > 1 the programs of one output tile each hold a partial sum over a slice of K. Each
writes it to an fp32 workspace [SPLIT_K, M, N]; the program that arrives last on the tile (an
acq_rel atomic counter per tile) adds all the partials and resets the counter to 0, so the next
launch, or CUDA-graph replay, finds it zeroed. One launch, no second reduction kernel.

Loaded per mode through `triton_modes.kernel_module`, like the kernels that call it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def split_k_total(ws_ptr, cnt_ptr, part, offs, mask, pid_k, tile, MN, SPLIT_K: tl.constexpr):
    """Store this program's partial `part` (workspace offsets `offs` within one [M, N] slice), then
    return (last, total): whether this program arrived last on `tile`, and, if so, the sum of all
    SPLIT_K partials (zeros otherwise). The caller writes the output only when `last`.

    Example (inside a kernel):
        last, acc = split_k_total(ws_ptr, cnt_ptr, acc, woffs, omask, pid_k, tile, M * N, SPLIT_K)
        if last:
            tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=omask)
    """
    tl.store(ws_ptr + pid_k.to(tl.int64) * MN + offs, part, mask=mask)
    tl.debug_barrier()  # every thread's partial is stored before the release below
    seen = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
    last = seen == SPLIT_K - 1
    total = part * 0.0
    if last:
        for sk in range(SPLIT_K):
            total += tl.load(ws_ptr + sk * MN + offs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + tile, 0)
    return last, total
