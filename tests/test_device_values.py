"""The GPU slot's device cache on its own: LRU under a cap, values that live only on the
device copied back before they are evicted, the cap's forms. Device arrays are stood in for
by a small class with the CUDA array interface, so this runs anywhere, fast."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from batuta.kernels.registry import is_device_array

from batuta.agent.device_values import DeviceValues, default_cap
from batuta.agent.objects import parse_gpu_cache
from batuta.errors import UsageError


class FakeDevice:
    """A device array: a private copy, with the interface and `copy_to_host`."""

    def __init__(self, host: np.ndarray) -> None:
        self.data = host.copy()
        self.shape = host.shape
        self.dtype = host.dtype
        self.nbytes = host.nbytes

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"data": (self.data.ctypes.data, False), "shape": self.shape}

    def copy_to_host(self) -> np.ndarray:
        return self.data.copy()


def cache(objects: dict[int, object], cap: int) -> DeviceValues:
    return DeviceValues(objects, upload=FakeDevice, to_host=lambda d: d.copy_to_host(), read_cap=lambda: cap)


def arr(value: float, n: int = 100) -> np.ndarray:
    return np.full(n, value)  # 800 bytes


def test_a_value_is_uploaded_once_and_the_same_copy_served_after() -> None:
    objects: dict[int, object] = {1: arr(1.0)}
    values = cache(objects, 10_000)
    first = values.for_gpu(1)
    assert is_device_array(first) and values.for_gpu(1) is first
    assert values.uploads == 1 and values.nbytes == 800 and len(values) == 1 and values.changed
    assert objects[1] is not first  # the host array stays the value


def test_least_recently_used_goes_first_and_host_backed_copies_are_just_freed() -> None:
    objects: dict[int, object] = {1: arr(1.0), 2: arr(2.0), 3: arr(3.0)}
    values = cache(objects, 1_700)  # room for two
    values.for_gpu(1)
    values.for_gpu(2)
    values.for_gpu(1)  # 2 is now the least recent
    values.for_gpu(3)
    assert 2 not in values and 1 in values and 3 in values
    assert values.nbytes == 1_600 and values.copies_back == 0
    assert isinstance(objects[2], np.ndarray)


def test_a_device_only_value_is_copied_back_before_eviction_and_for_cpu_tasks() -> None:
    objects: dict[int, object] = {1: arr(1.0)}
    values = cache(objects, 1_000)  # room for one
    result = FakeDevice(arr(7.0))
    values.hold(5, result)
    assert objects[5] is result and 5 in values
    host = values.for_host(5)  # a CPU task: copied back once, the device copy stays cached
    assert isinstance(host, np.ndarray) and host[0] == 7.0 and values.copies_back == 1
    assert values.for_gpu(5) is result and values.for_host(5) is host and values.copies_back == 1
    values.hold(6, FakeDevice(arr(8.0)))  # evicts 5, host-backed now: just freed
    assert 5 not in values and 6 in values and values.copies_back == 1
    values.for_gpu(1)  # evicts 6, which lives only on the device: copied back first
    assert 6 not in values and 1 in values
    assert isinstance(objects[6], np.ndarray) and objects[6][0] == 8.0
    assert values.copies_back == 2


def test_values_over_the_cap_are_not_cached() -> None:
    objects: dict[int, object] = {1: arr(1.0), 2: arr(2.0, 1_000)}
    values = cache(objects, 1_000)
    values.for_gpu(1)
    big = values.for_gpu(2)
    assert is_device_array(big) and 2 not in values and 1 in values  # nothing evicted for it
    values.hold(3, FakeDevice(arr(3.0, 1_000)))
    assert isinstance(objects[3], np.ndarray) and 3 not in values
    assert values.for_gpu(1) is not None and values.uploads == 2


def test_non_arrays_pass_through_and_drop_and_clear_free_the_card() -> None:
    objects: dict[int, object] = {1: (1, 2), 2: arr(2.0), 3: np.array(["a"], dtype=object)}
    values = cache(objects, 10_000)
    assert values.for_gpu(1) == (1, 2) and values.for_gpu(3) is objects[3]
    values.for_gpu(2)
    values.hold(4, FakeDevice(arr(4.0)))
    values.drop(2)
    assert 2 not in values and values.nbytes == 800
    values.clear()
    assert len(values) == 0 and values.nbytes == 0 and isinstance(objects[4], np.ndarray)


def test_a_zero_cap_caches_nothing() -> None:
    objects: dict[int, object] = {1: arr(1.0)}
    values = cache(objects, 0)
    assert values.for_gpu(1) is not values.for_gpu(1) and values.uploads == 2 and len(values) == 0


@pytest.mark.parametrize(
    ("text", "expected"), [("50%", 500), ("0", 0), ("2K", 2048), ("1.5M", 1_572_864), ("100%", 1000)]
)
def test_the_cap_is_bytes_or_a_share_of_free_memory(text: str, expected: int) -> None:
    assert parse_gpu_cache(text, 1000) == expected


@pytest.mark.parametrize("text", ["lots", "-1G", "150%", ""])
def test_a_bad_cap_names_the_variable_and_the_forms(text: str) -> None:
    with pytest.raises(UsageError, match=r"BATUTA_GPU_CACHE=.*expected bytes \(like 8G or 512M"):
        parse_gpu_cache(text, 1000)


def test_the_default_cap_is_half_the_free_memory_or_a_fixed_size_under_the_simulator() -> None:
    env: dict[str, Any] = {}
    assert default_cap(8 << 30, simulated=False, environ=env) == 4 << 30
    assert default_cap(0, simulated=True, environ=env) == 1 << 30
    assert default_cap(8 << 30, simulated=False, environ={"BATUTA_GPU_CACHE": "25%"}) == 2 << 30


def test_an_upload_that_fails_for_room_frees_the_cache_and_tries_once_more() -> None:
    objects: dict[int, object] = {1: arr(1.0), 2: arr(2.0)}
    calls: list[int] = []

    def upload(host: np.ndarray) -> FakeDevice:
        calls.append(len(values))
        if len(calls) == 2:
            raise MemoryError("CUDA_ERROR_OUT_OF_MEMORY")
        return FakeDevice(host)

    values = DeviceValues(objects, upload=upload, to_host=lambda d: d.copy_to_host(), read_cap=lambda: 10_000)
    values.hold(3, FakeDevice(arr(3.0)))
    values.for_gpu(1)
    assert values.for_gpu(2) is not None and calls == [1, 2, 0]  # the retry came after clearing
    assert 2 in values and 1 not in values and isinstance(objects[3], np.ndarray)


def test_a_prefetched_value_is_the_copy_the_task_gets_and_counts_once() -> None:
    objects: dict[int, object] = {1: arr(1.0), 2: arr(2.0), 3: (1, 2)}
    values = cache(objects, 10_000)
    values.prefetch([1, 3, 9])  # a non-array and an unknown id are skipped
    device = values.for_gpu(1)
    assert is_device_array(device) and values.uploads == 1 and 1 in values
    assert values.for_gpu(1) is device
    values.prefetch([1])  # already there: nothing to do
    assert values.uploads == 1


def test_a_failed_prefetch_is_retried_in_the_task_and_a_dropped_one_is_forgotten() -> None:
    objects: dict[int, object] = {1: arr(1.0), 2: arr(2.0)}
    calls: list[float] = []

    def upload(host: np.ndarray) -> FakeDevice:
        calls.append(float(host[0]))
        if len(calls) == 1:
            raise RuntimeError("CUDA_ERROR_LAUNCH_FAILED")
        return FakeDevice(host)

    values = DeviceValues(objects, upload=upload, to_host=lambda d: d.copy_to_host(), read_cap=lambda: 10_000)
    values.prefetch([1])
    assert is_device_array(values.for_gpu(1)) and calls == [1.0, 1.0] and values.uploads == 1
    values.prefetch([2])
    values.drop(2)
    assert 2 not in values and values.for_gpu(2) is not None and values.uploads == 2


class FakeCuda:
    """numba.cuda's `pinned` and `to_device`, recording what was locked."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.locked: list[int] = []

    def pinned(self, host: np.ndarray) -> Any:
        import contextlib

        if self.refuse:
            raise RuntimeError("CUDA_ERROR_NOT_PERMITTED")
        self.locked.append(host.nbytes)
        return contextlib.nullcontext()

    def to_device(self, host: np.ndarray) -> FakeDevice:
        return FakeDevice(host)


def test_large_uploads_are_page_locked_first_and_a_refusal_falls_back() -> None:
    from batuta.agent.device_values import PIN_ABOVE, upload

    cuda = FakeCuda()
    big = np.zeros(PIN_ABOVE // 8, dtype=np.float64)
    assert upload(cuda, arr(1.0)).data[0] == 1.0 and cuda.locked == []
    assert upload(cuda, big).nbytes == PIN_ABOVE and cuda.locked == [PIN_ABOVE]
    assert upload(cuda, big[::2]).nbytes == PIN_ABOVE // 2 and cuda.locked == [PIN_ABOVE]  # strided: as it is
    refusing = FakeCuda(refuse=True)
    assert upload(refusing, big).nbytes == PIN_ABOVE and refusing.locked == []


def test_an_input_still_to_be_made_by_the_task_ahead_is_not_prefetched_and_its_kept_result_is_served() -> None:
    objects: dict[int, object] = {1: arr(1.0)}
    values = cache(objects, 10_000)
    values.prefetch([1, 7])  # 7: kept by the running task, fed ahead to the next (core/feedahead.py)
    assert 7 not in values and values.for_gpu(1) is not None and values.uploads == 1
    made = FakeDevice(arr(7.0))
    values.hold(7, made)  # the task ahead kept its result on the device
    assert values.for_gpu(7) is made and values.uploads == 1  # that very array, no upload
