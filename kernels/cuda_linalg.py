"""CUDA kernels for the dense linear-algebra kernels: tiled matmul and pairwise distances.

Both are the same computation shape, C[i, j] = reduce_k f(A[i, k], B[k, j]), so they share
one design, the register-tiled GEMM of the CUTLASS/"how to optimise an SGEMM" lineage:

- a block of `THREADS` = 256 threads owns a `BM` x `BN` = 128 x 128 tile of C and walks K in
  steps of `BK` = 8, staging an A tile and a B tile in shared memory;
- each thread owns a `TM` x `TN` = 8 x 8 micro-tile of C held in registers, so every value it
  reads from shared memory feeds 8 fused multiply-adds (a textbook 32 x 32 tile kernel, one
  output per thread, reads 2 shared values per FMA and reached 16% of cuBLAS on an H200);
- a thread's rows are two runs of 4 consecutive rows, 64 apart, and so are its columns: each
  run is one 16-byte shared load (``ld.shared.v4``), and a warp's loads touch 16 consecutive
  float4s of B and 2 of A, so 8 steps x 4 vector loads feed 512 FMAs per stage;
- the A tile is stored transposed (k-major), with 4 words of padding per row so that the
  transposing stores are free of bank conflicts and rows stay 16-byte aligned; global loads
  read whole 32-byte sectors (A: 8 threads per row) or 128-byte lines (B);
- the next stage's global loads are issued into registers before the current stage computes,
  so their latency hides behind the FMAs;
- the BK loop is unrolled by hand (eight calls of a force-inlined step with a literal k), so
  every shared address is a base register plus a constant; masks such as ``tid & 255`` tell
  the compiler indices are not negative, which removes numba's wrap-around index code.

Checked without a GPU by compiling to PTX for sm_90 and running ptxas (see
tests/test_kernels_cuda.py): the float32 kernels use 128 registers with no spills (two
256-thread blocks per SM), the float64 ones about 238 (one block).

Edges (sizes that are not multiples of the tile) are handled by zero-filling the shared tiles
and guarding the final store, so one kernel serves every shape; the guards sit outside the
inner loop. Accumulation is in the input dtype (float32 for float32, as cuBLAS SGEMM does).

Numba is imported by `_kernels()` on first use, never at module import (see cuda_support).
The kernel functions below are plain module-level Python functions that name ``cuda``; that
global is bound to ``numba.cuda`` just before they are compiled, which keeps them cacheable
on disk (``cache=True``) across worker restarts.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import Any

from .cuda_support import jit_kernels

cuda: Any = None  # numba.cuda, bound by _kernels() (cuda_support.jit_kernels) before any compile
ALIGN: int | None = None  # shared tiles' alignment: 16 on a GPU (vector loads), None in the simulator

BM = 128  # rows of C per block
BN = 128  # columns of C per block
BK = 8  # depth of one shared-memory stage
TM = 8  # rows of C per thread
TN = 8  # columns of C per thread
VEC = 4  # a thread's rows (and columns) come in two runs of VEC consecutive ones
THREADS_Y = BM // TM  # 16
THREADS_X = BN // TN  # 16
THREADS = THREADS_X * THREADS_Y  # 256
HALF_M = BM // 2  # where a thread's second run of rows starts
HALF_N = BN // 2
PAD = 4  # words of padding per shared row: conflict-free transposing stores, 16-byte rows
A_ROW = BM + PAD  # (shared shapes must be literal constants, not expressions)
B_ROW = BN + PAD
ROW_LOADS = BM * BK // THREADS  # global loads per thread for a BM x BK tile of rows
COL_LOADS = BK * BN // THREADS  # and for a BK x BN tile of columns
TID_MASK = THREADS - 1
NONNEG = (1 << 62) - 1
"""``i & NONNEG`` is ``i`` for any index an array can have, and tells the compiler that it is
not negative, which removes numba's negative-index wrap-around code from address arithmetic."""

assert BK == 8, "the kernels unroll the BK loop by hand: eight step calls"
assert BM == BN and THREADS_Y * VEC == HALF_M and THREADS_X * VEC == HALF_N and TM == TN == 2 * VEC
assert BM * BK % THREADS == 0 and BK * BN % THREADS == 0


# -- device functions (force-inlined into the kernels) ------------------------------------


def _fetch_rows_py(src: Any, regs: Any, row0: int, k0: int, tid: int) -> None:
    """regs <- this thread's share of src[row0 : row0 + BM, k0 : k0 + BK], zero outside src.

    Eight consecutive threads read one row's eight values: whole 32-byte sectors.
    """
    rows = src.shape[0]
    depth = src.shape[1]
    if row0 + BM <= rows and k0 + BK <= depth:
        for p in range(ROW_LOADS):
            idx = tid + p * THREADS
            regs[p] = src[row0 + idx // BK, k0 + idx % BK]
    else:
        for p in range(ROW_LOADS):
            idx = tid + p * THREADS
            r = row0 + idx // BK
            k = k0 + idx % BK
            if r < rows and k < depth:
                regs[p] = src[r, k]
            else:
                regs[p] = 0.0


def _fetch_cols_py(src: Any, regs: Any, k0: int, col0: int, tid: int) -> None:
    """regs <- this thread's share of src[k0 : k0 + BK, col0 : col0 + BN], zero outside src."""
    depth = src.shape[0]
    cols = src.shape[1]
    if k0 + BK <= depth and col0 + BN <= cols:
        for p in range(COL_LOADS):
            idx = tid + p * THREADS
            regs[p] = src[k0 + idx // BN, col0 + idx % BN]
    else:
        for p in range(COL_LOADS):
            idx = tid + p * THREADS
            k = k0 + idx // BN
            c = col0 + idx % BN
            if k < depth and c < cols:
                regs[p] = src[k, c]
            else:
                regs[p] = 0.0


def _stage_rows_py(tile: Any, regs: Any, tid: int) -> None:
    """tile[kk, r] <- the fetched rows tile, transposed (k-major, as the inner loop reads it)."""
    for p in range(ROW_LOADS):
        idx = tid + p * THREADS
        tile[idx % BK, idx // BK] = regs[p]


def _stage_cols_py(tile: Any, regs: Any, tid: int) -> None:
    for p in range(COL_LOADS):
        idx = tid + p * THREADS
        tile[idx // BN, idx % BN] = regs[p]


def _load_frags_py(a_tile: Any, b_tile: Any, a_frag: Any, b_frag: Any, kk: int, a_base: int, b_base: int) -> None:
    """This thread's 8 row values and 8 column values of step kk: 4 runs of 4, vector loads."""
    for v in range(VEC):
        a_frag[v] = a_tile[kk, a_base + v]
        a_frag[VEC + v] = a_tile[kk, HALF_M + a_base + v]
        b_frag[v] = b_tile[kk, b_base + v]
        b_frag[VEC + v] = b_tile[kk, HALF_N + b_base + v]


def _gemm_step_py(
    a_tile: Any, b_tile: Any, acc: Any, a_frag: Any, b_frag: Any, kk: int, a_base: int, b_base: int
) -> None:
    """One k of the micro-tile update: acc += outer(a_tile[kk, rows], b_tile[kk, cols])."""
    load_frags(a_tile, b_tile, a_frag, b_frag, kk, a_base, b_base)
    for i in range(TM):
        for j in range(TN):
            acc[i, j] += a_frag[i] * b_frag[j]


def _sqdist_step_py(
    x_tile: Any, y_tile: Any, acc: Any, x_frag: Any, y_frag: Any, kk: int, a_base: int, b_base: int
) -> None:
    """One k of the distance micro-tile update: acc += (x_tile[kk, rows] - y_tile[kk, cols])^2."""
    load_frags(x_tile, y_tile, x_frag, y_frag, kk, a_base, b_base)
    for i in range(TM):
        for j in range(TN):
            diff = x_frag[i] - y_frag[j]
            acc[i, j] += diff * diff


# Bound by _kernels() to cuda.jit(device=True, forceinline=True) versions of the above.
fetch_rows: Any = None
fetch_cols: Any = None
stage_rows: Any = None
stage_cols: Any = None
load_frags: Any = None
gemm_step: Any = None
sqdist_step: Any = None


# -- kernels ------------------------------------------------------------------------------


def _gemm(a: Any, b: Any, c: Any) -> None:
    """c = a @ b for row-major a (m, k), b (k, n), c (m, n); one 128 x 128 tile of c per block.

    Per BK-deep stage: store the prefetched registers to shared memory, synchronise, start the
    global loads of the next stage (they complete while this one computes), run the eight
    unrolled steps (128 shared loads, 512 FMAs per thread), synchronise.
    """
    a_tile = cuda.shared.array((BK, A_ROW), a.dtype, ALIGN)  # a_tile[kk, r] = a[row0 + r, k0 + kk]
    b_tile = cuda.shared.array((BK, B_ROW), a.dtype, ALIGN)  # b_tile[kk, c] = b[k0 + kk, col0 + c]
    acc = cuda.local.array((TM, TN), a.dtype)
    a_frag = cuda.local.array(TM, a.dtype)
    b_frag = cuda.local.array(TN, a.dtype)
    a_next = cuda.local.array(ROW_LOADS, a.dtype)
    b_next = cuda.local.array(COL_LOADS, a.dtype)
    tid = cuda.threadIdx.x & TID_MASK
    a_base = (tid // THREADS_X) * VEC
    b_base = (tid % THREADS_X) * VEC
    row0 = (cuda.blockIdx.y & NONNEG) * BM
    col0 = (cuda.blockIdx.x & NONNEG) * BN
    for i in range(TM):
        for j in range(TN):
            acc[i, j] = 0.0
    stages = (a.shape[1] + BK - 1) // BK
    fetch_rows(a, a_next, row0, 0, tid)
    fetch_cols(b, b_next, 0, col0, tid)
    for stage in range(stages):
        stage_rows(a_tile, a_next, tid)
        stage_cols(b_tile, b_next, tid)
        cuda.syncthreads()
        if stage + 1 < stages:
            k0 = ((stage + 1) & NONNEG) * BK
            fetch_rows(a, a_next, row0, k0, tid)
            fetch_cols(b, b_next, k0, col0, tid)
        # BK = 8 steps unrolled by hand: with a literal kk every shared address is a base
        # register plus a constant, so this is shared loads and FMAs only.
        gemm_step(a_tile, b_tile, acc, a_frag, b_frag, 0, a_base, b_base)
        gemm_step(a_tile, b_tile, acc, a_frag, b_frag, 1, a_base, b_base)
        gemm_step(a_tile, b_tile, acc, a_frag, b_frag, 2, a_base, b_base)
        gemm_step(a_tile, b_tile, acc, a_frag, b_frag, 3, a_base, b_base)
        gemm_step(a_tile, b_tile, acc, a_frag, b_frag, 4, a_base, b_base)
        gemm_step(a_tile, b_tile, acc, a_frag, b_frag, 5, a_base, b_base)
        gemm_step(a_tile, b_tile, acc, a_frag, b_frag, 6, a_base, b_base)
        gemm_step(a_tile, b_tile, acc, a_frag, b_frag, 7, a_base, b_base)
        cuda.syncthreads()
    for i in range(TM):
        r = row0 + (i // VEC) * HALF_M + a_base + i % VEC
        if r < c.shape[0]:
            for j in range(TN):
                col = col0 + (j // VEC) * HALF_N + b_base + j % VEC
                if col < c.shape[1]:
                    c[r, col] = acc[i, j]


def _sqdist(x: Any, y: Any, d: Any) -> None:
    """d[i, j] = ||x[i] - y[j]|| for row-major x (n, f), y (m, f); one 128 x 128 tile per block.

    The GEMM above with y's rows in place of b's columns (both operands are fetched as rows),
    (x - y)^2 in place of x * y, and a square root at the store.
    """
    x_tile = cuda.shared.array((BK, A_ROW), x.dtype, ALIGN)
    y_tile = cuda.shared.array((BK, B_ROW), x.dtype, ALIGN)
    acc = cuda.local.array((TM, TN), x.dtype)
    x_frag = cuda.local.array(TM, x.dtype)
    y_frag = cuda.local.array(TN, x.dtype)
    x_next = cuda.local.array(ROW_LOADS, x.dtype)
    y_next = cuda.local.array(ROW_LOADS, x.dtype)
    tid = cuda.threadIdx.x & TID_MASK
    a_base = (tid // THREADS_X) * VEC
    b_base = (tid % THREADS_X) * VEC
    row0 = (cuda.blockIdx.y & NONNEG) * BM
    col0 = (cuda.blockIdx.x & NONNEG) * BN
    for i in range(TM):
        for j in range(TN):
            acc[i, j] = 0.0
    stages = (x.shape[1] + BK - 1) // BK
    fetch_rows(x, x_next, row0, 0, tid)
    fetch_rows(y, y_next, col0, 0, tid)
    for stage in range(stages):
        stage_rows(x_tile, x_next, tid)
        stage_rows(y_tile, y_next, tid)
        cuda.syncthreads()
        if stage + 1 < stages:
            k0 = ((stage + 1) & NONNEG) * BK
            fetch_rows(x, x_next, row0, k0, tid)
            fetch_rows(y, y_next, col0, k0, tid)
        sqdist_step(x_tile, y_tile, acc, x_frag, y_frag, 0, a_base, b_base)
        sqdist_step(x_tile, y_tile, acc, x_frag, y_frag, 1, a_base, b_base)
        sqdist_step(x_tile, y_tile, acc, x_frag, y_frag, 2, a_base, b_base)
        sqdist_step(x_tile, y_tile, acc, x_frag, y_frag, 3, a_base, b_base)
        sqdist_step(x_tile, y_tile, acc, x_frag, y_frag, 4, a_base, b_base)
        sqdist_step(x_tile, y_tile, acc, x_frag, y_frag, 5, a_base, b_base)
        sqdist_step(x_tile, y_tile, acc, x_frag, y_frag, 6, a_base, b_base)
        sqdist_step(x_tile, y_tile, acc, x_frag, y_frag, 7, a_base, b_base)
        cuda.syncthreads()
    for i in range(TM):
        r = row0 + (i // VEC) * HALF_M + a_base + i % VEC
        if r < d.shape[0]:
            for j in range(TN):
                col = col0 + (j // VEC) * HALF_N + b_base + j % VEC
                if col < d.shape[1]:
                    d[r, col] = math.sqrt(acc[i, j])


# -- launching ----------------------------------------------------------------------------


@functools.cache
def _kernels() -> SimpleNamespace:
    """The ``cuda.jit`` kernels of this module (numba compiles each on its first launch)."""
    # float32: at most 128 registers, so two 256-thread blocks fit an SM (the f32 kernels need
    # 127 and 130 unbounded, without spills either way). float64 needs about 240: one block.
    two_blocks = {"launch_bounds": (THREADS, 2)}
    return jit_kernels(
        globals(),
        {
            "gemm_float32": (_gemm, two_blocks),
            "gemm_float64": _gemm,
            "sqdist_float32": (_sqdist, two_blocks),
            "sqdist_float64": _sqdist,
        },
        {
            "fetch_rows": _fetch_rows_py,
            "fetch_cols": _fetch_cols_py,
            "stage_rows": _stage_rows_py,
            "stage_cols": _stage_cols_py,
            "load_frags": _load_frags_py,
            "gemm_step": _gemm_step_py,
            "sqdist_step": _sqdist_step_py,
        },
        {"ALIGN": 16},
    )


def _grid(rows: int, cols: int) -> tuple[int, int]:
    return math.ceil(cols / BN), math.ceil(rows / BM)


def matmul_device(a: Any, b: Any, c: Any) -> None:
    """Launch c = a @ b on C-contiguous device arrays of one float dtype (no synchronisation).

    Shapes are the caller's to check (a (m, k), b (k, n), c (m, n)); empty c launches nothing.
    """
    m, n = c.shape
    if m and n:
        kernel = getattr(_kernels(), f"gemm_{c.dtype.name}")
        kernel[_grid(m, n), THREADS](a, b, c)


def pairwise_device(x: Any, y: Any, d: Any) -> None:
    """Launch d[i, j] = ||x[i] - y[j]|| on C-contiguous device arrays (no synchronisation)."""
    n, m = d.shape
    if n and m:
        kernel = getattr(_kernels(), f"sqdist_{d.dtype.name}")
        kernel[_grid(n, m), THREADS](x, y, d)
