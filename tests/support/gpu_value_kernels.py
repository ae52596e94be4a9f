"""Kernels that show where their arguments live, for the device-resident value tests.

Loaded into agents with --kernel-module. Their GPU variants use numba.cuda directly (the
simulator in CI, a real card on a GPU host) and never copy a device argument to the host,
so a test can tell a cached device copy (same device pointer task after task) from a fresh
upload (a new pointer), and a result kept on the device from one copied back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from batuta.kernels import kernel


def _on_device(x: Any) -> bool:
    return hasattr(x, "copy_to_host")  # numba's device arrays and the simulator's


def _pointer(x: Any) -> int:
    if hasattr(x, "__cuda_array_interface__"):
        return int(x.__cuda_array_interface__["data"][0])
    return int(x._ary.ctypes.data)  # the simulator's FakeCUDAArray holds a NumPy array


@kernel("test_where", description="Where x lives: ('device', pointer) or ('host', pointer).")
def test_where(x: Any) -> tuple[str, int]:
    return ("host", int(x.ctypes.data))


test_where.cpu(test_where.reference)


@test_where.gpu
def _where_gpu(x: Any) -> tuple[str, int]:
    if _on_device(x):
        return ("device", _pointer(x))
    return ("host", int(x.ctypes.data))


@kernel("test_scale", description="x * k, on the device when x is there (a device array out).")
def test_scale(x: np.ndarray, k: float) -> np.ndarray:
    return np.asarray(x) * k


test_scale.cpu(test_scale.reference)

cuda: Any = None  # numba.cuda, bound on first use (the simulator swaps it while a kernel runs)
_SCALE: list[Any] = []


def _scale_kernel(src: Any, factor: float, out: Any) -> None:
    i = cuda.grid(1)
    if i < out.size:
        out[i] = src[i] * factor


@test_scale.gpu
def _scale_gpu(x: Any, k: float) -> Any:
    global cuda
    from numba import cuda as numba_cuda

    if not _SCALE:
        cuda = numba_cuda
        _SCALE.append(numba_cuda.jit(_scale_kernel))
    device = x if _on_device(x) else numba_cuda.to_device(np.ascontiguousarray(x))
    out = numba_cuda.device_array(device.shape, dtype=device.dtype)
    threads = 32
    _SCALE[0][(out.size + threads - 1) // threads, threads](device, k, out)
    return out


@kernel("test_total", description="The sum of x (float), on host or device.")
def test_total(x: Any) -> float:
    return float(np.asarray(x).sum())


test_total.cpu(test_total.reference)


@test_total.gpu
def _total_gpu(x: Any) -> float:
    host = x.copy_to_host() if hasattr(x, "copy_to_host") else np.asarray(x)
    return float(host.sum())


@kernel("test_grab", description="Allocate `nbytes` on the device (GPU), give it back; (pid, free memory before).")
def test_grab(nbytes: int) -> tuple[int, int]:
    return (0, 0)


test_grab.cpu(test_grab.reference)


@test_grab.gpu
def _grab_gpu(nbytes: int) -> tuple[int, int]:
    """With nbytes 0, only the slot's pid and free memory (numba's figure, its pool included)."""
    import os

    from numba import cuda as numba_cuda

    free = int(numba_cuda.current_context().get_memory_info().free)
    if nbytes:
        block = numba_cuda.device_array(nbytes, dtype=np.uint8)
        del block
    return (os.getpid(), free)


@kernel("test_pid", description="The process that runs it (a slot's): tells a restarted slot apart.")
def test_pid() -> int:
    import os

    return os.getpid()


test_pid.cpu(test_pid.reference)
test_pid.gpu(test_pid.reference)


class FakeStickyError(RuntimeError):
    """What numba-cuda raises after an illegal address (CudaAPIError, code 700), where the
    simulator cannot make one."""

    def __init__(self) -> None:
        super().__init__("[700] Call to cuCtxSynchronize results in CUDA_ERROR_ILLEGAL_ADDRESS")
        self.code = 700


_FAULT: list[Any] = []


@kernel("test_fault", description="A GPU variant that leaves its CUDA context unusable (an illegal address).")
def test_fault(n: int) -> int:
    return n


test_fault.cpu(test_fault.reference)


@test_fault.gpu
def _fault_gpu(n: int) -> int:
    global cuda
    from batuta.kernels.cuda_support import cuda as load_cuda
    from batuta.kernels.cuda_support import gpu_errors, simulated

    if simulated():
        raise FakeStickyError()
    cuda = load_cuda()
    if not _FAULT:

        def far_write(out: Any, where: int) -> None:
            out[where] = 1.0  # far past the array's end: the card reports an illegal address

        _FAULT.append(cuda.jit(far_write))
    with gpu_errors("test_fault") as numba_cuda:
        out = numba_cuda.device_array(1, np.float64)
        _FAULT[0][1, 1](out, 1 << 40)
        numba_cuda.synchronize()
    return n
