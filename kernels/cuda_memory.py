"""A pooled device allocator for numba-cuda: CUDA's stream-ordered allocator behind numba's EMM.

Why. numba allocates every device array with ``cuMemAlloc`` and frees it with ``cuMemFree``,
which maps fresh pages on each allocation and synchronises the whole device on each free. A
chain of GPU tasks on a 1 GiB value allocates a 1 GiB result per stage: on the H200 the
ten ``cuMemAlloc`` calls of a ten-stage chain cost more than the stages' kernels, while
CuPy, with its memory pool, pays them once. This module gives numba the same kind of pool,
using CUDA's own: ``cuMemAllocAsync`` from the device's default memory pool, with the pool's
release threshold raised so that freed memory stays reserved for the next allocation
instead of going back to the driver at every synchronisation.

Streams. An allocation is made on the calling thread's per-thread default stream: that is
where numba launches a GPU slot's kernels and its uploader thread's copies
(``CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM``), and a buffer handed from the uploader to
the main thread is handed over after its upload was waited for, which also orders its
allocation. A free is made on the legacy default stream, which waits for every earlier
operation of every blocking stream: the memory returns to the pool only once every kernel
and copy issued before the free has finished, whatever thread or stream last used it, and
the host never waits for it (numba's ``cuMemFree`` blocks the host until the device is idle).

Out of memory. Freed memory held in the pool counts as used for ``cuMemGetInfo``; when an
allocation fails for lack of memory, the pool is synchronised and trimmed back to the
driver and the allocation is tried once more, as numba does with its pending frees.
`get_memory_info` adds the pool's reserved but unused bytes to the driver's free figure, so
a GPU slot sizing its cache from it sees the same free memory with the pool as without.

Where CUDA has no memory pools (a driver or a virtualised device without them), the manager
falls back to numba's own allocation, unchanged.

Use. A GPU slot's agent sets ``NUMBA_CUDA_MEMORY_MANAGER=batuta.kernels.cuda_memory`` unless the
user set it (for example to RMM); numba reads it when it creates the CUDA context and uses
this module's ``_numba_memory_manager``. Importing this module imports numba-cuda's driver
module, so only numba does it, never the kernel library on its own. numba's simulator has no
driver and ignores the setting.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from numba.cuda.cudadrv import driver as _driver
from numba.cuda.cudadrv.driver import (
    AutoFreePointer,
    CudaAPIError,
    MemoryInfo,
    NumbaCUDAMemoryManager,
    binding,
)

__all__ = ["MEMORY_MANAGER_MODULE", "PooledMemoryManager", "pool_stats"]

log = logging.getLogger("batuta.kernels.cuda_memory")

MEMORY_MANAGER_MODULE = "batuta.kernels.cuda_memory"
"""What ``NUMBA_CUDA_MEMORY_MANAGER`` names to select this manager."""

_KEEP_EVERYTHING = (1 << 64) - 1  # the pool's release threshold: never give freed memory back on its own

_STATS_LOCK = threading.Lock()
_STATS = {"allocations": 0, "frees": 0, "trims": 0, "fallback": 0}


def pool_stats() -> dict[str, int]:
    """Counts since the process started: pooled allocations and frees, out-of-memory trims,
    and whether the manager fell back to numba's allocation (1) for want of memory pools."""
    with _STATS_LOCK:
        return dict(_STATS)


def _count(key: str, value: int = 1) -> None:
    with _STATS_LOCK:
        _STATS[key] += value


def _oom(exc: CudaAPIError) -> bool:
    return bool(exc.code == binding.CUresult.CUDA_ERROR_OUT_OF_MEMORY)


def _pool_free_finalizer(allocations: Any, key: int, ptr: Any, size: int) -> Callable[[], None]:
    """The free of one pooled allocation, run when numba drops its last reference to it."""

    def free() -> None:
        allocations.pop(key, None)
        try:
            _driver.driver.cuMemFreeAsync(ptr, binding.CU_STREAM_LEGACY)
        except Exception:  # the context is gone (interpreter exit): its memory went with it
            log.debug("freeing %d pooled bytes failed", size, exc_info=True)
            return
        _count("frees")

    return free


class PooledMemoryManager(NumbaCUDAMemoryManager):
    """numba's EMM plugin over the device's default CUDA memory pool (see the module text).

    Host allocations (pinned and mapped memory, IPC handles) stay numba's own.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool: Any = None

    def initialize(self) -> None:
        super().initialize()
        device = self.context.device.id
        try:
            supported = _driver.driver.cuDeviceGetAttribute(
                binding.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED, device
            )
            if not supported:
                raise CudaAPIError(binding.CUresult.CUDA_ERROR_NOT_SUPPORTED, "no memory pools")
            pool = _driver.driver.cuDeviceGetDefaultMemPool(device)
            _driver.driver.cuMemPoolSetAttribute(
                pool,
                binding.CUmemPool_attribute.CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                binding.cuuint64_t(_KEEP_EVERYTHING),
            )
        except CudaAPIError as exc:
            log.info("device %d has no usable CUDA memory pool (%s): numba's allocator is used", device, exc)
            _count("fallback")
            self._pool = None
            return
        self._pool = pool

    def memalloc(self, size: int) -> Any:
        if self._pool is None:
            return super().memalloc(size)
        try:
            ptr = _driver.driver.cuMemAllocAsync(size, binding.CU_STREAM_PER_THREAD)
        except CudaAPIError as exc:
            if not _oom(exc):
                raise
            self.trim()  # freed memory the pool still holds, given back; then once more
            ptr = _driver.driver.cuMemAllocAsync(size, binding.CU_STREAM_PER_THREAD)
        _count("allocations")
        ctx = weakref.proxy(self.context)
        key = int(ptr)
        memory = AutoFreePointer(ctx, ptr, size, finalizer=_pool_free_finalizer(self.allocations, key, ptr, size))
        # numba hands out weak proxies of the pointer (`own()`): the manager holds the one strong
        # reference until the last proxy is gone and the finalizer takes it out
        self.allocations[key] = memory
        return memory.own()

    def trim(self) -> None:
        """Give the pool's unused memory back to the driver (after every pending free is done)."""
        if self._pool is None:
            return
        _driver.driver.cuCtxSynchronize()
        _driver.driver.cuMemPoolTrimTo(self._pool, 0)
        _count("trims")

    def _pool_bytes(self, attribute: Any) -> int:
        return int(_driver.driver.cuMemPoolGetAttribute(self._pool, attribute))

    def get_memory_info(self) -> MemoryInfo:
        free, total = _driver.driver.cuMemGetInfo()
        if self._pool is not None:
            attrs = binding.CUmemPool_attribute
            idle = self._pool_bytes(attrs.CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT) - self._pool_bytes(
                attrs.CU_MEMPOOL_ATTR_USED_MEM_CURRENT
            )
            free += max(0, idle)
        return MemoryInfo(free=free, total=total)

    def reset(self) -> None:
        super().reset()
        self.trim()

    @contextlib.contextmanager
    def defer_cleanup(self) -> Iterator[None]:
        # Pooled frees are stream-ordered, so there is nothing to defer for device memory;
        # numba's host-memory cleanup is deferred as it asks.
        with super().defer_cleanup():
            yield


_numba_memory_manager = PooledMemoryManager
