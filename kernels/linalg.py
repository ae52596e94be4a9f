"""Dense linear algebra: matmul (cubic) and pairwise Euclidean distances (quadratic).

Inputs are 2-D, C-contiguous float32 or float64 arrays of one dtype (see
`registry.float_array`); results have that dtype. The GPU variants take host or device
arrays and launch the register-tiled kernels of `cuda_linalg` (see `cuda_support` for where
their results go).

The CPU matmul is NumPy's BLAS call, not a numba loop, because BLAS is far faster: on this
project's 2-core development host (AVX-512, OpenBLAS 0.3.31), NumPy reached 280-335 GFLOP/s in
float32 and 145-170 in float64 for 512-2048 square products, against 30-44 and 13-27 GFLOP/s
for a parallel numba i-k-j loop (and worse for a naive cache-blocked one). Note that BLAS
starts its own threads, one per core by default, whatever numba's thread count is.
"""

from __future__ import annotations

import numpy as np

from . import cuda_linalg
from .cuda_support import GPU_MIN_ELEMENTS, finish, gpu_errors, on_device
from .registry import KernelInputError, float_array, jit, kernel, prange


def _float_matrices(kernel: str, **arrays: object) -> tuple[np.ndarray, ...]:
    """Each array checked as 2-D float, C-contiguous, and all of the first one's dtype."""
    checked = {name: float_array(kernel, name, value, ndim=2) for name, value in arrays.items()}
    (first_name, first), *rest = checked.items()
    for name, array in rest:
        if array.dtype != first.dtype:
            raise KernelInputError(
                f"kernel {kernel!r}: argument {name!r} is {array.dtype} but {first_name!r} is "
                f"{first.dtype}; cast one, e.g. {name}.astype(np.{first.dtype})"
            )
    return tuple(checked.values())


# -- matmul -------------------------------------------------------------------------------


@kernel(
    "matmul",
    description="Matrix product a @ b of 2-D float arrays (m, k) and (k, n).",
    complexity="cubic",
    pure=True,
    gpu_min_elements=GPU_MIN_ELEMENTS["matmul"],
)
def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b in the inputs' dtype (float32 products accumulate in float32, as SGEMM does).

    Backends sum in different orders (BLAS blocks K its own way; the GPU kernel in steps of 8),
    so they agree within the usual GEMM bound, about ``k * eps * (|a| @ |b|)`` per element.
    """
    return np.matmul(a, b)


@matmul.validator
def _check_matmul(a: object, b: object) -> tuple[np.ndarray, ...]:
    am, bm = _float_matrices("matmul", a=a, b=b)
    if am.shape[1] != bm.shape[0]:
        raise KernelInputError(
            f"kernel 'matmul': argument 'b' has {bm.shape[0]} rows but 'a' has {am.shape[1]} "
            f"columns (shapes {am.shape} and {bm.shape}); pass b with shape ({am.shape[1]}, n)"
        )
    return (am, bm)


@matmul.cpu
def _matmul_cpu(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.matmul(a, b)  # BLAS: see the module docstring for why not a numba loop


@matmul.gpu
def _matmul_gpu(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with gpu_errors("matmul") as cuda:
        out = cuda.device_array((a.shape[0], b.shape[1]), a.dtype)
        cuda_linalg.matmul_device(on_device(cuda, a), on_device(cuda, b), out)
        return finish(out)


# -- pairwise distances -------------------------------------------------------------------

_REFERENCE_BLOCK_BYTES = 1 << 25  # the reference's broadcast temporary: 32 MiB at most


@kernel(
    "pairwise_distances",
    description="Euclidean distances between the rows of x (n, d) and of y (m, d): an (n, m) array.",
    complexity="quadratic",
    pure=True,
    gpu_min_elements=GPU_MIN_ELEMENTS["pairwise_distances"],
)
def pairwise_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``d[i, j] = sqrt(sum_k (x[i, k] - y[j, k])**2)``, in the inputs' dtype.

    Computed from differences, not from ``|x|^2 + |y|^2 - 2 x.y``, which cancels badly for
    near points. The reference and the CPU variant accumulate in float64, the GPU in the
    input dtype; they agree within about ``d * eps`` relative to each distance (plus
    ``sqrt(d * eps) * max|x, y|`` absolute near zero, where the square root magnifies).
    float32 on the GPU only: distances whose squares leave float32's range (over about
    1.8e19, under about 1e-19) come out inf or 0 there; pass float64 for such data.
    """
    out = np.empty((x.shape[0], y.shape[0]), x.dtype)
    # In float64 whatever the inputs, as the CPU variant: float32 squares overflowed to inf
    # from distances of 1.8e19 (4.8e19 fits float32), and AUTO picks this one for small inputs.
    rows = max(1, _REFERENCE_BLOCK_BYTES // max(1, y.size * 8))
    for start in range(0, x.shape[0], rows):
        diff = np.subtract(x[start : start + rows, None, :], y[None, :, :], dtype=np.float64)
        np.sqrt(np.einsum("ijk,ijk->ij", diff, diff), out=out[start : start + rows])
    return out


@pairwise_distances.validator
def _check_pairwise(x: object, y: object) -> tuple[np.ndarray, ...]:
    xm, ym = _float_matrices("pairwise_distances", x=x, y=y)
    if xm.shape[1] != ym.shape[1]:
        raise KernelInputError(
            f"kernel 'pairwise_distances': argument 'y' has {ym.shape[1]} columns but 'x' has "
            f"{xm.shape[1]}; pass points with the same number of coordinates"
        )
    return (xm, ym)


@jit(parallel=True, cache=True, fastmath={"reassoc"})
def _pairwise_loop(x: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:
    features = x.shape[1]
    for i in prange(x.shape[0]):
        for j in range(y.shape[0]):
            acc = 0.0
            for k in range(features):
                diff = np.float64(x[i, k]) - np.float64(y[j, k])
                acc += diff * diff
            out[i, j] = np.sqrt(acc)


@pairwise_distances.cpu
def _pairwise_cpu(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.empty((x.shape[0], y.shape[0]), x.dtype)
    if out.size:
        _pairwise_loop(x, y, out)
    return out


@pairwise_distances.gpu
def _pairwise_gpu(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with gpu_errors("pairwise_distances") as cuda:
        out = cuda.device_array((x.shape[0], y.shape[0]), x.dtype)
        cuda_linalg.pairwise_device(on_device(cuda, x), on_device(cuda, y), out)
        return finish(out)
