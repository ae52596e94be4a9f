"""A GPU slot's device copies of its objects: uploaded once, kept on the card, LRU under a cap.

Why: a GPU task that names a put value (or a result kept by an earlier task) used to get the
host array and copy it to the card on every run; twenty `sum` tasks over one array paid
twenty uploads and lost 8x to CuPy uploading once. A GPU slot is one process pinned to one
GPU (`CUDA_VISIBLE_DEVICES`), so a cache per slot process is a cache per GPU, and several
GPUs of a host each hold their own copies.

What lives where (the slot's `objects` dict is the truth; this class only adds device copies):

- a put value, or a kept CPU result: a host array in `objects`; its device copy here is a
  cache entry, dropped freely under pressure (the host array stays).
- a kept GPU result: the device array itself is the value (`objects[id]` is it; no host
  copy exists). Evicting it copies it back to host first (`objects[id]` becomes the host
  array), so nothing is lost; so does a CPU task or a `Fetch` that needs it, once.

The cap is a share of the card's memory that was free when the slot first used it (or bytes):
`BATUTA_GPU_CACHE` = "50%" (the default) or "8G"; "0" turns caching off (every GPU task
uploads its refs again, as before). A value larger than the cap is uploaded for its task
only. Under the CUDA simulator, where memory is the host's, the default cap is 1 GiB.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from batuta.agent.objects import GPU_CACHE_ENV, parse_gpu_cache
from batuta.kernels.registry import is_device_array

DEFAULT_SHARE = 0.5  # of the card's free memory when the slot first uses it
SIMULATOR_CAP = 1 << 30


def device_nbytes(value: Any) -> int:
    """Bytes of a device array (numba's have `nbytes`; others: size times itemsize)."""
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    return int(np.prod(value.shape, dtype=np.int64)) * np.dtype(value.dtype).itemsize


def uploadable(value: object) -> bool:
    """Host values worth a device copy: numeric NumPy arrays (not object arrays, not scalars)."""
    return isinstance(value, np.ndarray) and not value.dtype.hasobject and value.ndim > 0


PIN_ABOVE = 16 << 20
"""Arrays of this many bytes or more are page-locked for their upload: on the H200 host a
1 GiB upload took 0.149 s from pageable memory and 0.066 s registered first (0.090 s from
the agent's shared memory), registration included; small ones are not worth the call."""


def upload(numba_cuda: Any, host: np.ndarray) -> Any:
    """`host` copied to a new device array, from page-locked memory when it is large. A
    mapping the driver cannot lock (some shared or read-only ones) is copied as it is."""
    if host.nbytes >= PIN_ABOVE and host.flags.c_contiguous:
        try:
            with numba_cuda.pinned(host):
                return numba_cuda.to_device(host)
        except Exception:  # the driver refused to lock it: the pageable copy below still works
            pass
    return numba_cuda.to_device(host)


def default_cap(free_bytes: int, simulated: bool, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    free = SIMULATOR_CAP * 2 if simulated and not free_bytes else free_bytes
    if env.get(GPU_CACHE_ENV):
        return parse_gpu_cache(env[GPU_CACHE_ENV], free)
    return SIMULATOR_CAP if simulated else int(free * DEFAULT_SHARE)


class DeviceValues:
    """Device copies of a slot's objects on its GPU, least recently used first out.

    `objects` is the slot's own dict (object id -> value); `upload(host)` and `to_host(dev)`
    do the copies (numba's `cuda.to_device` and `copy_to_host` in a slot; tests pass their
    own). The cap is read on first use, when CUDA is up (`cap` then calls `read_cap`).
    """

    def __init__(
        self,
        objects: MutableMapping[int, object],
        *,
        upload: Callable[[np.ndarray], Any],
        to_host: Callable[[Any], np.ndarray],
        read_cap: Callable[[], int],
    ) -> None:
        self._objects = objects
        self._upload = upload
        self._to_host = to_host
        self._read_cap = read_cap
        self._cap: int | None = None
        self._entries: OrderedDict[int, Any] = OrderedDict()  # id -> device array, least recent first
        self._sizes: dict[int, int] = {}
        self._pending: dict[int, Future[Any]] = {}  # id -> an upload running in the background
        self._uploader: ThreadPoolExecutor | None = None
        self.nbytes = 0
        self.uploads = 0  # host-to-device copies made (a test and a benchmark read them)
        self.copies_back = 0  # device-to-host copies made
        self.changed = False  # since the slot last reported (`GpuCache`)

    @property
    def cap(self) -> int:
        if self._cap is None:
            self._cap = max(0, self._read_cap())
        return self._cap

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, object_id: int) -> bool:
        return object_id in self._entries

    # -- what tasks ask for ---------------------------------------------------------------

    def for_gpu(self, object_id: int) -> object:
        """The value of `object_id` for a GPU variant: its device copy (made now if missing),
        or the host value itself when it is not an array worth caching."""
        device = self._entries.get(object_id)
        if device is not None:
            self._entries.move_to_end(object_id)
            return device
        pending = self._pending.pop(object_id, None)
        if pending is not None:
            try:
                device = pending.result()
            except Exception:  # it failed in the background: try again here, where errors are reported
                device = None
            if device is not None:
                self.uploads += 1
                self._add(object_id, device)
                return device
        value = self._objects[object_id]
        if is_device_array(value):  # only the case if a caller bypassed `hold`: adopt it
            self._add(object_id, value)
            return value
        if not uploadable(value):
            return value
        assert isinstance(value, np.ndarray)
        if value.nbytes > self.cap:
            return self._copy_in(value)  # for this task only: it would evict everything else
        self._make_room(value.nbytes)
        device = self._copy_in(value)
        self._add(object_id, device)
        return device

    def for_host(self, object_id: int) -> object:
        """The value of `object_id` for a CPU task, a `Fetch` or a spill: a host value. A value
        that lives only on the device is copied back once; its device copy stays cached."""
        value = self._objects[object_id]
        if is_device_array(value):
            value = self._to_host(value)
            self.copies_back += 1
            self._objects[object_id] = value
        return value

    def hold(self, object_id: int, device: Any) -> None:
        """A kept GPU result: `device` becomes the value of `object_id` (no host copy). Past
        the cap it is copied back to host at once."""
        nbytes = device_nbytes(device)
        if nbytes > self.cap:
            self._objects[object_id] = self._to_host(device)
            self.copies_back += 1
            return
        self._make_room(nbytes)
        self._objects[object_id] = device
        self._add(object_id, device)

    def prefetch(self, object_ids: Iterable[int]) -> None:
        """Start uploading these values, those not on the card yet, on a background thread: the
        slot calls it for its next task while the current one runs, so the copies overlap the
        kernel (GPU slots run with per-thread default streams, so the uploader's copies do not
        wait for the main thread's kernels). `for_gpu` then waits for the copy, if need be."""
        for object_id in object_ids:
            if object_id in self._entries or object_id in self._pending:
                continue
            value = self._objects.get(object_id)
            if not uploadable(value):
                continue
            assert isinstance(value, np.ndarray)
            if value.nbytes > self.cap:
                continue
            self._make_room(value.nbytes + self._pending_bytes())
            if self._uploader is None:
                self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batuta-upload")
            self._pending[object_id] = self._uploader.submit(self._upload, value)

    def _pending_bytes(self) -> int:
        return sum(value.nbytes for i in self._pending if isinstance(value := self._objects.get(i), np.ndarray))

    def drop(self, object_id: int) -> None:
        """Forget the device copy of `object_id` (the slot forgets the value itself)."""
        self._pending.pop(object_id, None)  # an upload under way is left to finish and be freed
        if self._entries.pop(object_id, None) is not None:
            self.nbytes -= self._sizes.pop(object_id)
            self.changed = True

    def clear(self) -> None:
        """Free every device copy, copying device-only values back first (after an
        out-of-memory error, say, to give a kernel the whole card)."""
        for object_id in list(self._entries):
            self._evict(object_id)

    # -- bookkeeping ----------------------------------------------------------------------

    def _copy_in(self, value: np.ndarray) -> Any:
        try:
            device = self._upload(value)
        except Exception:
            if not self._entries:
                raise
            # Most likely the card is full (kernels' own buffers count too): give back every
            # copy held here, device-only values to the host first, and try once more.
            self.clear()
            device = self._upload(value)
        self.uploads += 1
        return device

    def _add(self, object_id: int, device: Any) -> None:
        nbytes = device_nbytes(device)
        self._entries[object_id] = device
        self._sizes[object_id] = nbytes
        self.nbytes += nbytes
        self.changed = True

    def _make_room(self, nbytes: int) -> None:
        while self._entries and self.nbytes + nbytes > self.cap:
            self._evict(next(iter(self._entries)))

    def _evict(self, object_id: int) -> None:
        device = self._entries[object_id]
        if self._objects.get(object_id) is device:  # its only copy: keep it, on the host
            self._objects[object_id] = self._to_host(device)
            self.copies_back += 1
        self.drop(object_id)
