"""A kernel for bench/blas_threads.py, loaded into the agents with `kernel_modules`."""

from __future__ import annotations

import numpy as np
from batuta.kernels import kernel


@kernel("bench_gemm", description="`reps` float64 n x n products of seeded matrices made on the worker.")
def bench_gemm(n: int, reps: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    b = rng.standard_normal((n, n))
    total = 0.0
    for _ in range(reps):
        total += float(np.matmul(a, b)[0, 0])
    return total


bench_gemm.cpu(bench_gemm.reference)
