"""CUDA device functions that several kernel modules share.

Written as plain Python over a module-level ``cuda``, as the kernels are (`cuda_support`):
a kernel module names one in `jit_kernels`' device functions, which binds this module's
``cuda`` and force-inlines a compiled version into that module's kernels under the name given.
"""

from __future__ import annotations

from typing import Any

__all__ = ["block_sum_py"]

cuda: Any = None  # numba.cuda, bound by `jit_kernels` before a kernel using these compiles


def block_sum_py(buf: Any, value: Any) -> Any:
    """Sum of `value` over the block's threads (blockDim.x a power of two <= buf.size).

    Every thread gets the total. Call once per kernel: the buffer is not reusable without
    another barrier.
    """
    t = cuda.threadIdx.x
    buf[t] = value
    cuda.syncthreads()
    width = cuda.blockDim.x // 2
    while width > 0:
        if t < width:
            buf[t] += buf[t + width]
        cuda.syncthreads()
        width //= 2
    return buf[0]
