"""Input checks shared by the ML kernels in `ml`: rows, parameters and class labels.

Every ML kernel's validator (plain and ``*_synth``) checks its arrays the same way: finite
float32/float64 rows, small float parameters of an exact shape widened to writable float64,
and integer labels in range. They live here, apart from the kernels, so that `ml` holds the
kernels themselves and each check is written once. A bad argument raises a one-line
`KernelInputError` naming the kernel, the argument and the fix.

A GPU variant may get CUDA device arrays (a GPU slot's resident values). Their dtype, shape
and contiguity are checked as a host array's are, from their interface and without a copy;
their values are not (finiteness, label range): reading them would copy them to the host,
which is what keeping them on the device avoids. A device array is never converted either:
a parameter must already be float64 and labels int64 there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np

from .registry import KernelInputError, float_array, is_device_array

__all__ = [
    "MAX_CLASSES",
    "check_data",
    "check_finite",
    "check_gram",
    "check_kmeans",
    "check_labels",
    "check_param",
    "largest",
    "writable_float64",
]

MAX_CLASSES = 4096
"""Labels must be in [0, MAX_CLASSES): the tree kernels keep a count per class."""


def check_finite(kernel: str, arg: str, array: np.ndarray) -> None:
    """Refuse NaN and inf: they have no place in a distance, a split or a loss.

    A device array is not read (see the module docstring)."""
    if array.size and not is_device_array(array) and not np.isfinite(array).all():
        raise KernelInputError(
            f"kernel {kernel!r}: argument {arg!r} contains NaN or inf; drop or impute those rows first"
        )


def check_data(kernel: str, arg: str, value: object) -> np.ndarray:
    """A finite, C-contiguous float32/float64 matrix of rows (n, d) with d >= 1."""
    x = float_array(kernel, arg, value, ndim=2)
    if x.shape[1] == 0:
        raise KernelInputError(f"kernel {kernel!r}: argument {arg!r} has no columns; pass at least one feature")
    check_finite(kernel, arg, x)
    return x


def writable_float64(array: np.ndarray, kernel: str = "", arg: str = "") -> np.ndarray:
    """`array` as a writable float64 array, copied only when it is not one already.

    Arrays decoded from the wire are read-only views, and numba compiles a separate machine
    code for read-only arguments: widening parameters (small) to writable float64 keeps one
    compiled signature per kernel, so a slot warmed on local arrays needs no compile later.
    A device array must be float64 already (`arg` names it in the error).
    """
    if is_device_array(array):
        if array.dtype != np.float64:
            raise KernelInputError(
                f"kernel {kernel!r}: argument {arg!r} is a {array.dtype} device array; pass a float64 one "
                "(device arrays are never converted silently: convert it on the device first)"
            )
        return array
    if array.dtype == np.float64 and array.flags.writeable:
        return array
    return np.array(array, dtype=np.float64)


def check_param(kernel: str, arg: str, value: object, shape: tuple[int, ...]) -> np.ndarray:
    """A finite float array of exactly `shape`, as writable float64 (parameters are small)."""
    array = float_array(kernel, arg, value, ndim=len(shape))
    if array.shape != shape:
        raise KernelInputError(f"kernel {kernel!r}: argument {arg!r} has shape {array.shape}; expected {shape}")
    check_finite(kernel, arg, array)
    return writable_float64(array, kernel, arg)


def check_labels(kernel: str, arg: str, value: object, n: int, n_classes: int | None = None) -> np.ndarray:
    """Integer class labels, one per row, in [0, n_classes) (default MAX_CLASSES), as int64.

    A device array must be a C-contiguous 1-D int64 one; its range is not checked."""
    if is_device_array(value):
        device: Any = value
        if np.dtype(device.dtype) != np.int64 or device.ndim != 1 or not device.is_c_contiguous():
            raise KernelInputError(
                f"kernel {kernel!r}: argument {arg!r} is a {device.ndim}-D {device.dtype} device array; pass a "
                "C-contiguous 1-D int64 one (device arrays are never converted silently)"
            )
        if device.shape[0] != n:
            raise KernelInputError(f"kernel {kernel!r}: argument {arg!r} has {device.shape[0]} labels for {n} rows")
        return cast(np.ndarray, device)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu" or value.ndim != 1:
        what = f"a {value.ndim}-D {value.dtype} array" if isinstance(value, np.ndarray) else type(value).__name__
        raise KernelInputError(
            f"kernel {kernel!r}: argument {arg!r} must be a 1-D integer array of class labels, not {what}; "
            f"pass {arg}.astype(np.int64)"
        )
    if value.shape[0] != n:
        raise KernelInputError(f"kernel {kernel!r}: argument {arg!r} has {value.shape[0]} labels for {n} rows")
    limit = MAX_CLASSES if n_classes is None else n_classes
    if n and (int(value.min()) < 0 or int(value.max()) >= limit):
        raise KernelInputError(
            f"kernel {kernel!r}: argument {arg!r} has labels outside [0, {limit}) "
            f"(min {int(value.min())}, max {int(value.max())}); number the classes 0, 1, ..."
        )
    if value.dtype == np.int64 and value.flags.writeable and value.flags.c_contiguous:
        return value
    return np.array(value, dtype=np.int64)  # writable int64: one compiled signature (see writable_float64)


def check_gram(kernel: str, result: tuple[Any, Any], fix: Callable[[], str]) -> tuple[Any, Any]:
    """`result`, (X^T X, X^T y), unless it overflowed float64. The inputs are finite (checked),
    so a non-finite entry is an overflow, and the variants would give different ones (inf
    summed in one order, inf - inf = NaN in another): refused in one line saying `fix()`
    (called only then: it may read the data). A device result is not read (see the module
    docstring)."""
    gram, xty = result
    if is_device_array(gram) or (np.isfinite(gram).all() and np.isfinite(xty).all()):
        return result
    raise KernelInputError(f"kernel {kernel!r}: X^T X or X^T y overflows float64 (beyond 1.8e308); {fix()}")


def check_kmeans(kernel: str, result: tuple[Any, Any, Any], fix: Callable[[], str]) -> tuple[Any, Any, Any]:
    """`result`, (sums, counts, inertia), unless it overflowed. The inputs are finite (checked),
    so a non-finite inertia or sum is an overflow: rows made beyond float32 (a `_synth`
    recipe), or squared distances beyond float64, which every variant would return as inf
    or NaN. The inertia is a host float in every variant: it is read always, device sums
    never (see the module docstring)."""
    sums, _counts, inertia = result
    if np.isfinite(inertia) and (is_device_array(sums) or np.isfinite(sums).all()):
        return result
    raise KernelInputError(
        f"kernel {kernel!r}: the sums or the inertia overflow (rows beyond float32's 3.4e38, or squared distances "
        f"beyond float64's 1.8e308); {fix()}"
    )


def largest(array: Any) -> str:
    """The largest magnitude in `array` for a message ('?' for a device array: not read)."""
    if is_device_array(array):
        return "?"
    return f"{float(np.abs(array).max()) if array.size else 0.0:.3g}"
