"""GPU kernels (numba-cuda) against the card's own references: device copy and cuBLAS.

On device-resident data (host<->device copies, which the registered GPU variants include,
are not timed), on one GPU:

- vadd at 64M and 256M float32 elements against a device-to-device copy of the same array,
  both as bandwidth counting bytes read plus written (vadd 12 B per element, copy 8 B). The
  copy comes from CuPy (``cp.copyto``) if it imports, else PyTorch (``Tensor.copy_``), else
  numba's driver memcpy; the output names which. saxpy, sum and dot are timed alongside.
- FP32 matmul at 8192^2 against cuBLAS through CuPy ``cp.matmul`` (``CUPY_TF32=0``: true FP32,
  no tensor cores), else PyTorch with TF32 off; its result is checked against cuBLAS's.
  pairwise_distances (8192 x 8192 points of 64 coordinates) is timed for information.

GPU times come from CUDA events around `--iters` back-to-back launches, after a warm-up that
compiles. The last line printed is one JSON object with ``device``, ``vadd_fraction_of_copy``
(at 256M) and ``matmul_fraction_of_cublas``; targets (issue 4): >= 0.85 and >= 0.5.

    python bench/gpu_kernels.py              # on a GPU host
    python bench/gpu_kernels.py --smoke      # tiny sizes, runs under NUMBA_ENABLE_CUDASIM=1 too
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
os.environ.setdefault("CUPY_TF32", "0")  # cuBLAS in true FP32, before CuPy is imported

import numpy as np


def gpu_seconds(cuda: Any, fn: Callable[[], object], iters: int, simulated: bool) -> float:
    """Seconds per call of `fn` (which only launches work), after one warm-up call."""
    fn()
    cuda.synchronize()
    if simulated:  # the simulator's events record no time; it runs synchronously anyway
        start_s = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start_s) / iters
    start, end = cuda.event(), cuda.event()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def copy_reference(cuda: Any, d_src: Any, d_dst: Any) -> tuple[str, Callable[[], object], Callable[[], None]]:
    """(name, copy launcher, synchronise) for a device-to-device copy of d_src into d_dst."""
    try:
        import cupy as cp

        src, dst = cp.asarray(d_src), cp.asarray(d_dst)  # zero-copy views of numba's arrays
        return "cupy", lambda: cp.copyto(dst, src), cp.cuda.Device().synchronize
    except Exception:
        pass
    try:
        import torch

        src = torch.as_tensor(d_src, device="cuda")
        dst = torch.as_tensor(d_dst, device="cuda")
        return "torch", lambda: dst.copy_(src), torch.cuda.synchronize
    except Exception:
        pass
    return "numba", lambda: d_dst.copy_to_device(d_src), cuda.synchronize


def cublas_matmul(d_a: Any, d_b: Any, d_c: Any) -> tuple[str, Callable[[], object]] | None:
    """(name, launcher) of the vendor FP32 GEMM on the same arrays, or None without one."""
    try:
        import cupy as cp

        a, b, c = cp.asarray(d_a), cp.asarray(d_b), cp.asarray(d_c)
        return "cupy (cuBLAS)", lambda: cp.matmul(a, b, out=c)
    except Exception:
        pass
    try:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        a, b, c = (torch.as_tensor(x, device="cuda") for x in (d_a, d_b, d_c))
        return "torch (cuBLAS)", lambda: torch.matmul(a, b, out=c)
    except Exception:
        return None


def bench_streams(cuda: Any, n: int, iters: int, simulated: bool) -> tuple[str, dict[str, float]]:
    """(copy reference name, TB/s of copy, vadd, saxpy, sum, dot and vadd's fraction of copy)."""
    from batuta.kernels import cuda_stream

    rng = np.random.default_rng(n)
    d_a = cuda.to_device(rng.standard_normal(n).astype(np.float32))
    d_b = cuda.to_device(rng.standard_normal(n).astype(np.float32))
    d_out = cuda.device_array(n, np.float32)
    copy_name, copy_fn, _ = copy_reference(cuda, d_a, d_out)
    buffers = cuda_stream.reduction_buffers(n)
    cases: dict[str, tuple[Callable[[], object], int]] = {
        "copy": (copy_fn, 8),
        "vadd": (lambda: cuda_stream.vadd_device(d_a, d_b, d_out), 12),
        "saxpy": (lambda: cuda_stream.saxpy_device(1.7, d_a, d_b, d_out), 12),
        "sum": (lambda: cuda_stream.sum_device(d_a, buffers), 4),
        "dot": (lambda: cuda_stream.dot_device(d_a, d_b, buffers), 8),
    }
    tbps = {
        name: n * per_element / gpu_seconds(cuda, fn, iters, simulated) / 1e12
        for name, (fn, per_element) in cases.items()
    }
    cuda_stream.vadd_device(d_a, d_b, d_out)
    assert np.array_equal(d_out.copy_to_host(), d_a.copy_to_host() + d_b.copy_to_host()), "vadd is wrong"
    figures = {f"{name}_tbps": round(value, 3) for name, value in tbps.items()}
    figures["vadd_fraction_of_copy"] = round(tbps["vadd"] / tbps["copy"], 3)
    return copy_name, figures


def bench_matmul(cuda: Any, n: int, iters: int, simulated: bool) -> dict[str, Any]:
    """Our FP32 GEMM against the vendor's on the same n x n operands."""
    from batuta.kernels import cuda_linalg

    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    d_a, d_b = cuda.to_device(a), cuda.to_device(b)
    d_c, d_ref = cuda.device_array((n, n), np.float32), cuda.device_array((n, n), np.float32)
    flops = 2.0 * n**3
    ours = flops / gpu_seconds(cuda, lambda: cuda_linalg.matmul_device(d_a, d_b, d_c), iters, simulated)
    found: dict[str, Any] = {"matmul_n": n, "matmul_tflops": round(ours / 1e12, 2)}
    vendor = None if simulated else cublas_matmul(d_a, d_b, d_ref)
    if vendor is None:
        expected = a.astype(np.float64) @ b.astype(np.float64)
        assert np.allclose(d_c.copy_to_host(), expected, rtol=1e-3, atol=1e-3 * n), "matmul is wrong"
        return {**found, "cublas": None, "cublas_tflops": None, "matmul_fraction_of_cublas": None}
    vendor_name, vendor_fn = vendor
    theirs = flops / gpu_seconds(cuda, vendor_fn, iters, simulated)
    ours_c, ref_c = d_c.copy_to_host(), d_ref.copy_to_host()
    scale = float(np.max(np.abs(ref_c)))
    return {
        **found,
        "cublas": vendor_name,
        "cublas_tflops": round(theirs / 1e12, 2),
        "matmul_fraction_of_cublas": round(ours / theirs, 3),
        "matmul_max_diff_vs_cublas_relative_to_max": float(np.max(np.abs(ours_c - ref_c))) / scale,
    }


def bench_pairwise(cuda: Any, n: int, d: int, iters: int, simulated: bool) -> dict[str, Any]:
    from batuta.kernels import cuda_linalg

    x = cuda.to_device(np.random.default_rng(d).standard_normal((n, d)).astype(np.float32))
    out = cuda.device_array((n, n), np.float32)
    seconds = gpu_seconds(cuda, lambda: cuda_linalg.pairwise_device(x, x, out), iters, simulated)
    return {"pairwise_shape": [n, n, d], "pairwise_tflops": round(3.0 * n * n * d / seconds / 1e12, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; also runs under the simulator")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--matmul-n", type=int, default=8192)
    args = parser.parse_args()

    from batuta.kernels import cuda_support

    info = cuda_support.gpu_info()
    if info is None:
        sys.exit("no usable CUDA device (set NUMBA_ENABLE_CUDASIM=1 with --smoke to try it without one)")
    cuda = cuda_support.cuda()
    simulated = info.simulated
    sizes = [1000, 4097] if args.smoke else [64 * 2**20, 256 * 2**20]
    iters = 1 if args.smoke else args.iters
    slow_iters = 1 if args.smoke else max(2, args.iters // 4)
    cc = f"{info.compute_capability[0]}.{info.compute_capability[1]}"
    device = f"{info.device_name} (compute capability {cc}, {info.capacity} SMs, {info.memory_total / 2**30:.0f} GiB)"
    print(f"device: {device}", file=sys.stderr)
    result: dict[str, Any] = {"device": device, "simulated": simulated, "smoke": args.smoke}

    streams: dict[str, dict[str, float]] = {}
    for n in sizes:
        copy_name, figures = bench_streams(cuda, n, iters, simulated)
        label = f"{n // 2**20}M" if n >= 2**20 else str(n)
        streams[label] = figures
        print(f"{label} float32: {figures}", file=sys.stderr)
    result["copy_reference"] = copy_name
    result["stream"] = streams
    result["vadd_fraction_of_copy"] = streams[label]["vadd_fraction_of_copy"]  # the largest size

    result.update(bench_matmul(cuda, 40 if args.smoke else args.matmul_n, slow_iters, simulated))
    print(f"matmul: {result['matmul_tflops']} TFLOP/s, cuBLAS {result['cublas_tflops']}", file=sys.stderr)
    result.update(bench_pairwise(cuda, *((40, 9) if args.smoke else (8192, 64)), slow_iters, simulated))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
