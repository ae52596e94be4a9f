"""Lazy CUDA support for the kernel library: importing numba.cuda, launch shapes, device facts.

Nothing here imports numba at module import: this folder must import on hosts without CUDA
(and numba.cuda alone costs about a second). `cuda()` imports it on the first GPU call. The
kernel modules (`cuda_stream`, `cuda_linalg`) write their kernels as plain module-level
functions and wrap them with `jit_kernels` in a cached ``_kernels()``, so each is wrapped once
per process, compiled by numba once per signature on its first launch, and cached on disk.

The GPU variants registered in `basic`, `stream`, `linalg` and `ml` take, for each array
argument, a host NumPy array (as decoded from the wire; `on_device` uploads it) or a CUDA
device array (a GPU slot's resident value; used where it is, never copied to the host). They
launch on the default stream (the per-thread one where the process asks CUDA for that) and
never synchronise the whole device, so another thread can upload on its own stream
meanwhile. Array results stay on the device when the caller asked
``registry.run(..., device_results=True)``; otherwise `finish` copies them to the host, which
waits for this stream's work only. Reductions to a Python number copy their one value back
and so wait for their own launch. They run inside `gpu_errors(kernel)`, which turns any CUDA
failure (no driver, out of memory, an illegal address found at synchronisation) into a
`GpuKernelError` naming the kernel, so the agent reports it as that task's failure. After an
illegal address the CUDA context of the process is unusable: the slot process should be
restarted, which is the agent's business.

Under numba's simulator (``NUMBA_ENABLE_CUDASIM=1``) every CUDA thread is a Python thread, so
the grid of the streaming kernels shrinks to a few small blocks; the kernels themselves are
the same code, written with grid-stride loops so any grid gives the same answer.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from .registry import KernelCallError, device_results_wanted, is_device_array, to_host

__all__ = [
    "BLOCKS_PER_SM",
    "GPU_MIN_ELEMENTS",
    "STREAM_THREADS",
    "GpuDeviceInfo",
    "GpuKernelError",
    "GpuUnavailableError",
    "cuda",
    "device_view",
    "finish",
    "gpu_errors",
    "gpu_info",
    "jit_kernels",
    "lost_context",
    "on_device",
    "simulated",
    "sm_count",
    "stream_grid",
]

STREAM_THREADS = 256
"""Threads per block of the streaming kernels (and the size of their shared reduction buffers)."""

BLOCKS_PER_SM = 32
"""Grid-stride kernels launch SMs x 32 blocks at most: on an H200 that reached 4.49 TB/s for a
vector add, against 2.66 TB/s with one thread per element (DESIGN.md, facts)."""

SIM_BLOCKS = 2
SIM_THREADS = 32
"""The simulator's grid: two blocks of one warp each are enough to exercise the block and grid
strides and the cross-block combine, and cheap enough for CI."""

SIM_SM_COUNT = 2

_LOCK = threading.Lock()

GPU_MIN_ELEMENTS: dict[str, int] = {
    # Streaming kernels move every byte over PCIe (host inputs): about 25 GB/s of pageable
    # copies against 5-10 GB/s for one CPU slot's loop, plus ~50-100 us of fixed cost (launch,
    # allocations, the copy back), so the GPU wins from about a million elements, later for the
    # reductions, which read 4-8 B an element and return one number.
    "vadd": 1 << 20,
    "saxpy": 1 << 20,
    "sum": 1 << 22,
    "dot": 1 << 22,
    "histogram": 1 << 22,
    # Dense work: the GPU wins once the arithmetic outweighs the fixed cost. matmul at 256^2
    # (two operands of 65,536) is 33 MFLOP, ~0.3 ms for one core's BLAS against ~0.1 ms on the
    # card; pairwise distances of 128 x 128 points of 16 coordinates already take the CPU
    # ~0.3 ms; K-means does rows x k x d, the regression rows x d^2, the MLP rows x hidden x 6.
    "matmul": 1 << 17,
    "pairwise_distances": 1 << 12,
    "kmeans_partial": 1 << 14,
    "linreg_partial": 1 << 16,
    "mlp_grad": 1 << 14,
}
"""The ``auto`` backend's per-kernel GPU thresholds (``@kernel(gpu_min_elements=...)``),
reasoned, not yet measured: ``python scripts/gpu_variant_profile.py`` on a GPU host prints the
crossover of each kernel's GPU and CPU variants to put here."""


class GpuUnavailableError(RuntimeError):
    """numba-cuda is not installed, or no CUDA driver or device is usable on this host.

    Not a `KernelCallError`: the call itself was fine, and another host (with a GPU) can run it.
    """


class GpuKernelError(RuntimeError):
    """A CUDA call failed while running a kernel's GPU variant (message names the kernel)."""


@functools.cache
def cuda() -> Any:
    """The ``numba.cuda`` module, imported on first use; GpuUnavailableError if it cannot work."""
    try:
        from numba import cuda as numba_cuda
    except ImportError as exc:
        raise GpuUnavailableError(
            f"numba-cuda is not importable ({exc}); install numba-cuda on this host, or run "
            "the kernel on the 'cpu' backend"
        ) from exc
    if simulated():
        # The simulator runs uint64 arithmetic that wraps by design (xoroshiro128+) on NumPy
        # scalars, which warn on every wrap: the host's log filled with them.
        warnings.filterwarnings("ignore", "overflow encountered in scalar", RuntimeWarning)
    else:
        _refuse_fake_gpus(numba_cuda)
    return numba_cuda


def _refuse_fake_gpus(numba_cuda: Any) -> None:
    """The agent's fake GPUs (`BATUTA_FAKE_GPUS`) with numba's simulator off and no CUDA
    device here: every use failed, each its own way (no driver to install, a slot "failed to
    run the task", ...), none naming the setting that was missing. Where a real device is
    there, the fake GPUs' slots run on it, as they always did."""
    fake = os.environ.get("BATUTA_FAKE_GPUS", "").strip()
    if fake in ("", "0") or numba_cuda.is_available():
        return
    raise GpuUnavailableError(
        f"fake GPUs (BATUTA_FAKE_GPUS={fake}) run kernels only under numba's CUDA simulator: set "
        "NUMBA_ENABLE_CUDASIM=1 beside it in the host's env, or unset BATUTA_FAKE_GPUS"
    )


@functools.cache
def simulated() -> bool:
    """True when numba.cuda is numba's CUDA simulator (fixed once numba.cuda is imported)."""
    try:
        from numba.cuda.core import config
    except ImportError:  # older numba-cuda kept the flag in numba's own config
        try:
            from numba.core import config
        except ImportError:
            return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
    return bool(getattr(config, "ENABLE_CUDASIM", False))


def jit_kernels(
    module_globals: MutableMapping[str, Any],
    kernels: dict[str, Callable[..., Any] | tuple[Callable[..., Any], dict[str, Any]]],
    device_functions: dict[str, Callable[..., Any]] | None = None,
    gpu_constants: dict[str, Any] | None = None,
) -> SimpleNamespace:
    """Wrap a kernel module's plain Python kernels with ``cuda.jit``; call once per module.

    Kernel modules keep their CUDA code as module-level functions that use a global ``cuda``
    (so nothing imports numba at module import, and numba can cache the machine code on disk).
    This binds ``cuda`` in `module_globals`, binds each device function under its global name
    to a force-inlined ``cuda.jit(device=True)`` version (the kernels call them by that name),
    and returns the kernels wrapped with ``cuda.jit`` under their keys. A kernel may come as
    ``(function, options)``: extra ``cuda.jit`` options such as ``launch_bounds``, used on a
    real GPU only (the simulator rejects them). Numba compiles each kernel for each argument
    signature on its first launch and keeps it for the process (and on disk, where it can).
    `gpu_constants` are module globals to set only on a real GPU (such as shared-array
    alignments, which the simulator also rejects); under the simulator they keep their defaults.
    """
    numba_cuda = cuda()
    module_globals["cuda"] = numba_cuda
    sim = simulated()
    if not sim:
        module_globals.update(gpu_constants or {})
    for name, fn in (device_functions or {}).items():
        fn.__globals__["cuda"] = numba_cuda  # one from a shared module (`cuda_device`) reads its own
        module_globals[name] = numba_cuda.jit(device=True, **({} if sim else {"forceinline": True}))(fn)
    wrapped: dict[str, Any] = {}
    for name, spec in kernels.items():
        fn, extra = spec if isinstance(spec, tuple) else (spec, {})
        wrapped[name] = _jit(numba_cuda, fn, {} if sim else {"cache": True, **extra})
    return SimpleNamespace(**wrapped)


def _jit(numba_cuda: Any, fn: Callable[..., Any], options: dict[str, Any]) -> Any:
    try:
        return numba_cuda.jit(**options)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available": no disk cache
        return numba_cuda.jit(**{k: v for k, v in options.items() if k != "cache"})(fn)


_AVAILABLE: list[bool] = []  # [True] once a device was found usable: it stays so for the process


def _require_device() -> Any:
    numba_cuda = cuda()
    if _AVAILABLE or simulated():  # checked once: is_available() costs microseconds per GPU call
        return numba_cuda
    if numba_cuda.is_available():
        _AVAILABLE.append(True)
    else:
        reason = ""
        with contextlib.suppress(Exception):
            reason = " ".join(str(numba_cuda.cuda_error()).split())
            reason = f" ({reason})" if reason and reason != "None" else ""
        raise GpuUnavailableError(f"no usable CUDA device on this host{reason}; run the kernel on the 'cpu' backend")
    return numba_cuda


@functools.cache
def sm_count() -> int:
    """Streaming multiprocessors of the current device (a small fixed number under the simulator)."""
    numba_cuda = _require_device()
    if simulated():
        return SIM_SM_COUNT
    return int(numba_cuda.get_current_device().MULTIPROCESSOR_COUNT)


def stream_grid(n: int) -> tuple[int, int]:
    """(blocks, threads per block) for a grid-stride loop over `n` items.

    As many blocks as the items need, at most SMs x `BLOCKS_PER_SM`; at least one, so that
    reductions always write their (zero) partial sums. Under the simulator: a tiny grid.
    """
    if simulated():
        return max(1, min(SIM_BLOCKS, math.ceil(n / SIM_THREADS))), SIM_THREADS
    blocks = min(sm_count() * BLOCKS_PER_SM, math.ceil(n / STREAM_THREADS))
    return max(1, blocks), STREAM_THREADS


@contextlib.contextmanager
def gpu_errors(kernel: str) -> Iterator[Any]:
    """Run a GPU variant's body: yields ``numba.cuda``; CUDA failures become GpuKernelError.

    Input errors (`KernelCallError`) and `GpuUnavailableError` pass through unchanged.
    """
    numba_cuda = _require_device()
    try:
        yield numba_cuda
    except (KernelCallError, GpuUnavailableError, GpuKernelError):
        raise
    except Exception as exc:
        message = " ".join(str(exc).split()) or "no message"
        raise GpuKernelError(f"kernel {kernel!r} on GPU failed: {type(exc).__name__}: {message}") from exc


# CUresult codes after which the process's CUDA context is unusable ("sticky" errors: every
# later call fails the same way until the process exits).
_STICKY = {
    700: "CUDA_ERROR_ILLEGAL_ADDRESS",
    702: "CUDA_ERROR_LAUNCH_TIMEOUT",
    710: "CUDA_ERROR_ASSERT",
    714: "CUDA_ERROR_HARDWARE_STACK_ERROR",
    715: "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    716: "CUDA_ERROR_MISALIGNED_ADDRESS",
    717: "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    718: "CUDA_ERROR_INVALID_PC",
    719: "CUDA_ERROR_LAUNCH_FAILED",
}


def lost_context(exc: BaseException) -> str:
    """The sticky CUDA error (`CUDA_ERROR_ILLEGAL_ADDRESS`...) in `exc` or what caused it, after
    which this process's CUDA context is unusable, or "" for any other error. A slot that went
    on after one failed every later task on that GPU the same way."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        code = getattr(current, "code", None)
        with contextlib.suppress(TypeError, ValueError):
            if code is not None and int(code) in _STICKY:
                return _STICKY[int(code)]
        text = str(current)
        for name in _STICKY.values():
            if name in text:
                return name
        current = current.__cause__ or current.__context__
    return ""


def on_device(numba_cuda: Any, value: Any) -> Any:
    """`value` on the device: a device array as it is, a host array uploaded (a new array).

    The upload is ``cuda.to_device`` on the default stream; the source is pageable memory,
    so it has been read when this returns and the caller may reuse it.
    """
    return value if is_device_array(value) else numba_cuda.to_device(value)


def device_view(view: Any, of: Any) -> Any:
    """`view` (a slice, reshape or dtype view of device array `of`) as a device array: numba's
    are already; the simulator's fake arrays give NumPy views, wrapped again here."""
    return view if is_device_array(view) else type(of)(view)


def finish(result: Any) -> Any:
    """A GPU variant's result as its caller wants it: as it is when device results are wanted
    (see `registry.device_results_wanted`), else with its device arrays copied to the host.

    Called inside `gpu_errors`, so that a failure found while copying back (an illegal address
    reported at the copy) names the kernel.
    """
    return result if device_results_wanted() else to_host(result)


# -- device facts -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuDeviceInfo:
    """The current CUDA device, as the seed's ``GpuExecutor`` reports it (name, capacity)."""

    device_name: str
    compute_capability: tuple[int, int]
    capacity: int
    """Compute units: streaming multiprocessors."""
    memory_total: int
    """Bytes of device memory (0 under the simulator, which has no fixed amount)."""
    simulated: bool = False


_INFO: list[GpuDeviceInfo | None] = []


def gpu_info() -> GpuDeviceInfo | None:
    """Name, compute capability, SM count and memory of the current device; None without one.

    Imports numba.cuda on the first call (never at module import) and caches the answer for
    the process. Under the simulator it describes the simulated device.
    """
    with _LOCK:
        if not _INFO:
            _INFO.append(_probe())
        return _INFO[0]


def _probe() -> GpuDeviceInfo | None:
    try:
        numba_cuda = _require_device()
    except GpuUnavailableError:
        return None
    if simulated():
        device = numba_cuda.get_current_device()
        return GpuDeviceInfo(
            device_name="numba CUDA simulator",
            compute_capability=tuple(device.compute_capability),
            capacity=SIM_SM_COUNT,
            memory_total=0,
            simulated=True,
        )
    try:
        device = numba_cuda.get_current_device()
        name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
        total = int(numba_cuda.current_context().get_memory_info().total)
        return GpuDeviceInfo(
            device_name=name,
            compute_capability=(int(device.compute_capability[0]), int(device.compute_capability[1])),
            capacity=int(device.MULTIPROCESSOR_COUNT),
            memory_total=total,
        )
    except Exception:  # a driver that lists a device but cannot open it: no usable GPU
        return None
