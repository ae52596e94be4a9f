"""Small host-in, host-out GPU calls made cheap: reused pinned staging buffers (mapped into
the device for the smallest calls, so no copy at all), one copy each way, a prepared launch
and one stream synchronisation.

A 4K-element vadd through numba the plain way (``to_device`` twice, ``device_array``, launch,
``copy_to_host``) spends its time in host-side bookkeeping and driver calls, not on the card:
three device allocations, two synchronous pageable copies in, numba's argument typing and
marshalling at every launch, a synchronous copy out. Here a call whose inputs and outputs fit
`STAGE_MAX_BYTES` goes through a `Stage`, kept per thread and per (kernel, shapes, dtypes):

- from the second call of its kind on (`STAGE_AFTER_CALLS`), one pinned host buffer and one
  device buffer hold all the inputs (packed at 256-byte offsets), another pair all the
  outputs; the inputs are copied into the pinned buffer with NumPy and sent with one
  asynchronous copy, the outputs come back with one;
- the kernel is launched through `launch_and_prepare`: the first call launches the ordinary
  way, later ones re-launch with the argument block numba built for these fixed buffers,
  skipping its typing and marshalling (where numba's internals are not as expected, or under
  the simulator, they launch the ordinary way);
- one synchronisation of this thread's default stream, then the outputs are copied out of
  the pinned buffer into fresh NumPy arrays (the buffer is reused by the next call).

Everything runs on the default stream (the per-thread one where the process asks for that),
never the legacy stream by name, and waits for that stream only. A `Stage` is reused only by
the thread that made it, after its previous call synchronised, so nothing overwrites a buffer
a copy or a kernel still reads. Calls with device arrays, or whose results stay on the device,
never come here: those buffers would be handed out. Stages belong to the device that was
current when they were made: a thread that moves to another device calls `forget_stages`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .cuda_support import cuda, device_view, simulated

__all__ = [
    "MAPPED_MAX_BYTES",
    "STAGE_AFTER_CALLS",
    "STAGE_ALIGN",
    "STAGE_ENTRIES",
    "STAGE_MAX_BYTES",
    "Stage",
    "forget_stages",
    "launch_and_prepare",
    "prepare",
    "stage_for",
]

STAGE_MAX_BYTES = 1 << 22
"""Calls moving more than this (inputs plus outputs) are not staged: their copies take long
enough that the bookkeeping does not matter, and pinned memory is a scarce resource."""

MAPPED_MAX_BYTES = 256 << 10
"""Calls moving at most this much (inputs plus outputs) use zero-copy stages: pinned buffers
mapped into the device's address space, which the kernel reads and writes in place over
PCIe. On the H200 host every copy call cost about 80 us however small (two pinned copies and
a stream wait: 167 us for 16 KiB) while a prepared launch cost 7 us; at this size the
kernel's own reads over the bus take microseconds."""

STAGE_ENTRIES = 16
"""Stages kept per thread (least recently used dropped): at most 16 x 2 x 4 MiB pinned."""

STAGE_AFTER_CALLS = 2
"""A kind of call gets a stage from its second call on: pinned memory costs about a millisecond
to allocate, so one-off sizes (a last, shorter chunk) take the plain path instead."""

STAGE_ALIGN = 256
"""Offsets of the packed arrays in the staging buffers: cudaMalloc's alignment, so a packed
array is as aligned as an allocated one (vector loads stay legal)."""

_LOCAL = threading.local()


def _packed(specs: Sequence[tuple[tuple[int, ...], np.dtype[Any]]]) -> tuple[list[int], int]:
    offsets = []
    total = 0
    for shape, dtype in specs:
        offsets.append(total)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        total += -(-max(nbytes, 1) // STAGE_ALIGN) * STAGE_ALIGN
    return offsets, total


class Stage:
    """Pinned and device buffers for one kind of call, with views of each argument in them."""

    def __init__(
        self,
        inputs: Sequence[tuple[tuple[int, ...], np.dtype[Any]]],
        outputs: Sequence[tuple[tuple[int, ...], np.dtype[Any]]],
    ) -> None:
        numba_cuda = cuda()
        in_offsets, in_bytes = _packed(inputs)
        out_offsets, out_bytes = _packed(outputs)
        mapped = None
        if not simulated() and in_bytes + out_bytes <= MAPPED_MAX_BYTES:
            mapped = _mapped_buffers(numba_cuda, in_bytes, out_bytes)
        self.mapped = mapped is not None
        if mapped is not None:  # the kernel reads and writes the pinned buffers in place
            self.pinned_in, self.device_in, self.pinned_out, self.device_out = mapped
        else:
            self.pinned_in = numba_cuda.pinned_array(in_bytes, np.uint8)
            self.pinned_out = numba_cuda.pinned_array(out_bytes, np.uint8)
            self.device_in = numba_cuda.device_array(in_bytes, np.uint8)
            self.device_out = numba_cuda.device_array(out_bytes, np.uint8)
        self.host_inputs = [_host_view(self.pinned_in, o, s, d) for o, (s, d) in zip(in_offsets, inputs, strict=True)]
        self.host_outputs = [
            _host_view(self.pinned_out, o, s, d) for o, (s, d) in zip(out_offsets, outputs, strict=True)
        ]
        self.device_inputs = [
            _device_view(self.device_in, o, s, d) for o, (s, d) in zip(in_offsets, inputs, strict=True)
        ]
        self.device_outputs = [
            _device_view(self.device_out, o, s, d) for o, (s, d) in zip(out_offsets, outputs, strict=True)
        ]
        self.stream = numba_cuda.default_stream()
        self.memo: dict[str, Any] = {}
        """For the caller: prepared launches, reduction buffers, anything tied to these buffers."""
        self.copy_in: Callable[[], object] = functools.partial(
            self.device_in.copy_to_device, self.pinned_in, stream=self.stream
        )
        self.copy_out: Callable[[], object] = functools.partial(
            self.device_out.copy_to_host, self.pinned_out, stream=self.stream
        )
        if self.mapped:
            self.copy_in = self.copy_out = _no_copy
        elif not simulated():
            with contextlib.suppress(Exception):  # numba's internals differ: keep its public copies
                self.copy_in, self.copy_out = self._driver_copies(in_bytes, out_bytes)

    def _driver_copies(self, in_bytes: int, out_bytes: int) -> tuple[Callable[[], object], Callable[[], object]]:
        """The two asynchronous copies as driver calls on fixed pointers: numba's
        ``copy_to_device`` checks and wraps its arguments anew on every call."""
        from numba.cuda.cudadrv import driver as cuda_driver

        stream = 0  # the default stream, as self.stream is: per-thread where the process asks for it
        device_in, device_out = cuda_driver.device_pointer(self.device_in), cuda_driver.device_pointer(self.device_out)
        host_in = cuda_driver.host_pointer(self.pinned_in, readonly=True)
        host_out = cuda_driver.host_pointer(self.pinned_out)
        api = cuda_driver.driver
        return (
            functools.partial(api.cuMemcpyHtoDAsync, device_in, host_in, in_bytes, stream),
            functools.partial(api.cuMemcpyDtoHAsync, host_out, device_out, out_bytes, stream),
        )

    def run(self, inputs: Sequence[np.ndarray], launch: Callable[[Stage], None]) -> list[np.ndarray]:
        """Copy `inputs` in, call `launch(self)` to launch on the device views, copy the outputs
        back, wait for this stream, and return the outputs as fresh host arrays."""
        for view, value in zip(self.host_inputs, inputs, strict=True):
            np.copyto(view, value)
        self.copy_in()
        launch(self)
        self.copy_out()
        self.stream.synchronize()
        return [view.copy() for view in self.host_outputs]


def _no_copy() -> None:
    """A mapped stage's copies: the device reads and writes its host buffers itself."""


def _mapped_buffers(numba_cuda: Any, in_bytes: int, out_bytes: int) -> tuple[Any, ...] | None:
    """(host in, device in, host out, device out) over two pinned buffers mapped into the
    device's address space, or None where the driver will not map them."""
    try:
        from numba.cuda.cudadrv.devicearray import DeviceNDArray

        buffers: list[Any] = []
        for nbytes in (in_bytes, out_bytes):
            mapped = numba_cuda.mapped_array(nbytes, np.uint8)
            host = np.ndarray.view(mapped, np.ndarray)  # its base keeps the mapping alive
            device = DeviceNDArray((nbytes,), (1,), np.dtype(np.uint8), gpu_data=mapped.gpu_data)
            buffers += [host, device]
        return tuple(buffers)
    except Exception:  # no mapped memory here (or numba's internals differ): copy instead
        return None


def _host_view(buffer: np.ndarray, offset: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return buffer[offset : offset + nbytes].view(dtype).reshape(shape)


def _device_view(buffer: Any, offset: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return device_view(buffer[offset : offset + nbytes].view(dtype).reshape(shape), buffer)


def stage_for(
    key: tuple[Any, ...],
    inputs: Sequence[np.ndarray],
    outputs: Sequence[tuple[tuple[int, ...], np.dtype[Any]]],
) -> Stage | None:
    """This thread's `Stage` for `key` (made on first use), or None when the call is too big
    or has an empty array (nothing to gain; zero-length device views are not allowed)."""
    stages: OrderedDict[tuple[Any, ...], Stage] | None = getattr(_LOCAL, "stages", None)
    if stages is None:
        stages = _LOCAL.stages = OrderedDict()
    stage = stages.get(key)
    if stage is not None:
        stages.move_to_end(key)
        return stage
    seen: OrderedDict[tuple[Any, ...], int] = getattr(_LOCAL, "seen", None) or OrderedDict()
    _LOCAL.seen = seen
    calls = seen.pop(key, 0) + 1
    if calls < STAGE_AFTER_CALLS:
        seen[key] = calls
        while len(seen) > 4 * STAGE_ENTRIES:
            seen.popitem(last=False)
        return None
    specs = [(tuple(a.shape), np.dtype(a.dtype)) for a in inputs]
    sizes = [int(np.prod(s, dtype=np.int64)) * d.itemsize for s, d in [*specs, *outputs]]
    if sum(sizes) > STAGE_MAX_BYTES or 0 in sizes:
        return None
    stage = Stage(specs, outputs)
    stages[key] = stage
    while len(stages) > STAGE_ENTRIES:
        stages.popitem(last=False)
    return stage


def forget_stages() -> None:
    """Drop this thread's stages (tests; a slot giving its memory back)."""
    _LOCAL.stages = OrderedDict()
    _LOCAL.seen = OrderedDict()


# -- prepared launches --------------------------------------------------------------------


def launch_and_prepare(kernel: Any, grid: Any, block: Any, args: tuple[Any, ...]) -> Callable[[], None]:
    """Launch ``kernel[grid, block](*args)`` now, and return a callable that launches it again
    on the same arguments, as cheaply as numba allows (see `prepare`), holding the arguments.

    The arguments must stay unchanged (device arrays: their buffers; the contents may change).
    Where the launch cannot be prepared it launches the ordinary way again (configuring anew
    each time: the simulator's ``kernel[grid, block]`` reconfigures the kernel object itself).
    """
    kernel[grid, block](*args)

    def plain() -> None:
        kernel[grid, block](*args)

    prepared = prepare(kernel, grid, block, args)
    return plain if prepared is None else _Holding(prepared, args)


class _Holding:
    """A prepared launch that keeps the buffers its argument block points into alive."""

    __slots__ = ("held", "launch")

    def __init__(self, launch: Callable[[], None], held: tuple[Any, ...]) -> None:
        self.launch = launch
        self.held = held

    def __call__(self) -> None:
        self.launch()


def prepare(kernel: Any, grid: Any, block: Any, args: tuple[Any, ...]) -> Callable[[], None] | None:
    """A callable that launches ``kernel[grid, block](*args)`` again with the argument block
    numba built for these arguments, straight to the driver: no typing, no marshalling. None
    where that cannot be done (numba's internals differ from what this expects).

    The kernel must have been launched once with arguments of these types (it is compiled).
    The callable holds the arguments' addresses, not the arguments: the caller keeps the
    buffers alive, or calls it only while memory of the same layout is at those addresses
    (so a cache keyed by device pointers need not pin the arrays). Under the simulator it
    launches the ordinary way, holding the arguments.
    """
    if simulated():

        def plain() -> None:
            kernel[grid, block](*args)

        return plain
    try:
        return _prepared(kernel[grid, block], args)
    except Exception:  # numba internals changed: the ordinary launch still works
        return None


def _prepared(configured: Any, args: tuple[Any, ...]) -> Callable[[], None]:
    from cuda.core import LaunchConfig, launch
    from numba.cuda._compat import CUDA_CORE_GE_1_0

    dispatcher = configured.dispatcher
    argtypes = tuple(dispatcher.typeof_pyval(arg) for arg in args)
    kernel = dispatcher.overloads[argtypes]
    kernel_args: list[Any] = []
    writebacks: list[Any] = []
    for argtype, arg in zip(kernel.argument_types, args, strict=True):
        kernel._prepare_args(argtype, arg, configured.stream, writebacks, kernel_args)
    if writebacks or getattr(kernel, "debug", False) or getattr(kernel, "cooperative", False):
        raise ValueError("not a plain launch")  # host arrays copied back, or debug checks: keep numba's path
    cooperative = {"is_cooperative" if CUDA_CORE_GE_1_0 else "cooperative_launch": False}
    config = LaunchConfig(
        grid=configured.griddim, block=configured.blockdim, shmem_size=configured.sharedmem, **cooperative
    )
    handle = kernel._codelibrary.get_cufunc().kernel
    stream = configured.stream

    def relaunch() -> None:
        launch(stream, config, handle, *kernel_args)

    return relaunch
