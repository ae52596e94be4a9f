"""batuta's numerical kernels (installed as ``batuta.kernels``): a registry plus built-ins.

Run a kernel by name on a backend::

    from batuta import kernels
    kernels.run("vadd", "cpu", (a, b))      # numba, compiled (or loaded from cache) on first use
    kernels.reference("vadd", (a, b))       # the NumPy reference

This package is the bottom layer: it imports neither batuta nor numba at import time (numba
only when a CPU variant first runs, numba.cuda when a GPU variant does), and importing it
needs no CUDA. See `registry` for how kernels and their variants are defined, `basic`,
`stream` and `linalg` for the built-ins, `cuda_support` for the GPU side.
"""

from __future__ import annotations

from . import basic as basic  # registers the built-in kernels
from . import linalg as linalg  # matmul, pairwise_distances
from . import ml as ml  # K-means, linear regression, random forest and MLP kernels
from . import stream as stream  # dot, histogram
from .registry import (
    BACKENDS,
    COMPLEXITIES,
    FLOAT_DTYPES,
    KernelCallError,
    KernelDef,
    KernelDefinitionError,
    KernelInfo,
    KernelInputError,
    KernelModuleError,
    LazyJit,
    UnknownKernelError,
    UnsupportedBackendError,
    as_count,
    as_real,
    device_results_wanted,
    float_array,
    float_vectors,
    info,
    is_device_array,
    jit,
    kernel,
    load_module,
    lookup,
    names,
    prange,
    reference,
    run,
    same_dtype_and_shape,
    to_host,
    unregister,
)

__all__ = [
    "BACKENDS",
    "COMPLEXITIES",
    "FLOAT_DTYPES",
    "KernelCallError",
    "KernelDef",
    "KernelDefinitionError",
    "KernelInfo",
    "KernelInputError",
    "KernelModuleError",
    "LazyJit",
    "UnknownKernelError",
    "UnsupportedBackendError",
    "as_count",
    "as_real",
    "device_results_wanted",
    "float_array",
    "float_vectors",
    "info",
    "is_device_array",
    "jit",
    "kernel",
    "load_module",
    "lookup",
    "names",
    "prange",
    "reference",
    "run",
    "same_dtype_and_shape",
    "to_host",
    "unregister",
]
