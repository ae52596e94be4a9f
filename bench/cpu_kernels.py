"""CPU streaming kernels (numba, 2 threads) against NumPy and this machine's copy bandwidth.

For vadd, saxpy, sum and dot on 32M float32 elements, times the numba CPU variant and the
NumPy way of computing the same thing, and NumPy's copy (``np.copyto``) as the machine's
achievable bandwidth. Bandwidth counts bytes read plus bytes written (a + b into out: 12
bytes per element; a copy: 8).

Output arrays are allocated once, outside the timed region, for both sides: the first write
to freshly allocated memory page-faults (the kernel zero-fills every 4 KiB page), which would
time the allocator, not the kernel. The ``*_alloc_*`` keys time the registry's API call
(``kernels.run("vadd", "cpu", ...)``), which allocates its result, against NumPy's ``a + b``,
which also does. Each figure is the best of `--repeat` runs after a warm-up (which compiles);
the runs are interleaved (every case once per round) so that a noisy neighbour on a shared
machine slows all cases alike. The load average at the start is part of the output.

The last line printed is one JSON object; targets (issue 4): ``vadd_over_numpy >= 1.5`` and
``vadd_fraction_of_copy_bandwidth >= 0.8``.

    python bench/cpu_kernels.py [--n 33554432] [--threads 2] [--repeat 15] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout


def best_seconds(cases: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Best time of each case over `repeat` interleaved rounds, after one warm-up call each."""
    for fn in cases.values():
        fn()  # compiles, faults pages in
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeat):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=32 * 2**20, help="elements per array (float32)")
    parser.add_argument("--threads", type=int, default=2, help="numba threads (NUMBA_NUM_THREADS)")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.repeat = 100_003, 3
    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)  # before numba is imported

    import numpy as np
    from batuta.kernels import basic, stream

    from batuta import kernels

    n, repeat, gb = args.n, args.repeat, 1e-9
    rng = np.random.default_rng(0)
    a = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    out = np.empty_like(a)
    out.fill(0)  # fault its pages in now
    alpha = np.float32(1.7)
    bytes_3 = 3 * a.nbytes  # two arrays read, one written
    bytes_2 = 2 * a.nbytes

    def saxpy_numpy() -> None:
        np.multiply(alpha, a, out=out)
        np.add(out, b, out=out)

    load_before = os.getloadavg()[0]
    cases: dict[str, Callable[[], object]] = {
        "copy": lambda: np.copyto(out, a),
        "vadd_numpy": lambda: np.add(a, b, out=out),
        "vadd": lambda: basic._vadd_loop(a, b, out),
        "vadd_alloc_numpy": lambda: a + b,
        "vadd_alloc": lambda: kernels.run("vadd", "cpu", (a, b)),
        "saxpy_numpy": saxpy_numpy,
        "saxpy": lambda: basic._saxpy_loop(alpha, a, b, out),
        "sum_numpy": lambda: np.sum(a, dtype=np.float64),
        "sum_numpy_float32": lambda: np.sum(a),
        "sum": lambda: basic._sum_loop(a),
        "dot_numpy": lambda: np.dot(a, b),
        "dot": lambda: stream._dot_loop(a, b),
    }
    timings = best_seconds(cases, repeat)
    moved = {
        "copy": bytes_2,
        "vadd_numpy": bytes_3,
        "vadd": bytes_3,
        "vadd_alloc_numpy": bytes_3,
        "vadd_alloc": bytes_3,
        "saxpy_numpy": bytes_3,
        "saxpy": bytes_3,
        "sum_numpy": a.nbytes,
        "sum_numpy_float32": a.nbytes,
        "sum": a.nbytes,
        "dot_numpy": bytes_2,
        "dot": bytes_2,
    }
    gbps = {name: moved[name] / seconds * gb for name, seconds in timings.items()}
    for name in timings:
        print(f"{name:>18}: {timings[name] * 1e3:8.2f} ms  {gbps[name]:6.1f} GB/s", file=sys.stderr)

    import numba

    result = {
        "n": n,
        "dtype": "float32",
        "numba_threads": numba.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_at_start": round(load_before, 2),
        "copy_gbps": round(gbps["copy"], 2),
        **{f"{name}_gbps": round(gbps[name], 2) for name in timings if name != "copy"},
        "vadd_over_numpy": round(timings["vadd_numpy"] / timings["vadd"], 2),
        "vadd_fraction_of_copy_bandwidth": round(gbps["vadd"] / gbps["copy"], 2),
        "vadd_alloc_over_numpy": round(timings["vadd_alloc_numpy"] / timings["vadd_alloc"], 2),
        "saxpy_over_numpy": round(timings["saxpy_numpy"] / timings["saxpy"], 2),
        "sum_over_numpy": round(timings["sum_numpy"] / timings["sum"], 2),
        "sum_over_numpy_float32": round(timings["sum_numpy_float32"] / timings["sum"], 2),
        "dot_over_numpy": round(timings["dot_numpy"] / timings["dot"], 2),
        "notes": (
            "outputs preallocated for both sides (vadd_alloc_* include allocation); sum and dot "
            "accumulate in float64 (sum_numpy is np.sum(dtype=float64), the reference; "
            "dot_numpy is np.dot, BLAS sdot in float32)"
        ),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
