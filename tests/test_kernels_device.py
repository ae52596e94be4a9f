"""Device arrays through the kernel registry, without numba: `run`'s ``device_results``,
`to_host`, `is_device_array` and the validators, on a stand-in device array class.

The real device arrays (numba's, on a GPU or the simulator) go through the same code in
tests/test_kernels_cuda.py; these tests pin the registry's side of the contract: what is a
device array, when results are copied to the host, and that nothing imports numba for it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pytest
from batuta.kernels import KernelInputError, registry

from batuta import kernels


class FakeDeviceArray:
    """Enough of a CUDA device array for the registry: an interface, dtype/shape, copy_to_host."""

    __cuda_array_interface__: ClassVar[dict[str, Any]] = {}  # only its presence matters here

    def __init__(self, host: np.ndarray, *, contiguous: bool = True) -> None:
        self.host = host
        self.dtype = host.dtype
        self.shape = host.shape
        self.ndim = host.ndim
        self.size = host.size
        self.contiguous = contiguous
        self.copies = 0
        self.stream: Any = 0  # numba's: 0, or the stream the array is bound to

    def is_c_contiguous(self) -> bool:
        return self.contiguous

    def copy_to_host(self) -> np.ndarray:
        self.copies += 1
        return self.host.copy()


class Pair(NamedTuple):
    left: Any
    right: Any


@pytest.fixture
def device_kernel() -> Iterator[str]:
    """A kernel whose GPU variant returns what it is given wrapped as device arrays."""
    seen: dict[str, bool] = {}

    @kernels.kernel("test_device_echo")
    def echo(a: np.ndarray) -> tuple[np.ndarray, float]:
        return a, 1.0

    @echo.validator
    def _(a: object) -> tuple[np.ndarray]:
        return (kernels.float_array("test_device_echo", "a", a),)

    @echo.gpu
    def _(a: Any) -> tuple[Any, float]:
        seen["wanted"] = kernels.device_results_wanted()
        device = a if kernels.is_device_array(a) else FakeDeviceArray(a)
        return device, 1.0

    yield "test_device_echo"
    kernels.unregister("test_device_echo")


def test_what_counts_as_a_device_array() -> None:
    assert kernels.is_device_array(FakeDeviceArray(np.ones(2)))
    for value in (np.ones(2), np.ones(2).view(np.recarray), 1.0, [1.0], None, memoryview(b"x")):
        assert not kernels.is_device_array(value)


def test_to_host_copies_device_arrays_inside_tuples_and_lists_and_keeps_the_rest() -> None:
    host = np.arange(3.0)
    device = FakeDeviceArray(host)
    assert kernels.to_host(host) is host
    result = kernels.to_host((device, [device, 2], 3.0, "label"))
    assert isinstance(result, tuple) and isinstance(result[1], list)
    np.testing.assert_array_equal(result[0], host)
    np.testing.assert_array_equal(result[1][0], host)
    assert result[1][1] == 2 and result[2:] == (3.0, "label")
    assert device.copies == 2
    pair = kernels.to_host(Pair(device, 5))
    assert type(pair) is Pair and isinstance(pair.left, np.ndarray) and pair.right == 5
    untouched = (host, 1)
    assert kernels.to_host(untouched) is untouched  # nothing to copy: the same object back


def test_to_host_waits_for_the_stream_an_array_is_bound_to() -> None:
    class Stream:
        synchronized = 0

        def synchronize(self) -> None:
            self.synchronized += 1

    device = FakeDeviceArray(np.ones(2))
    device.stream = Stream()
    kernels.to_host(device)
    assert device.stream.synchronized == 1


def test_gpu_results_are_host_arrays_unless_device_results_are_asked_for(device_kernel: str) -> None:
    host = np.ones(4, np.float32)
    result, scalar = kernels.run(device_kernel, "gpu", (host,))
    assert type(result) is np.ndarray and scalar == 1.0
    kept, _ = kernels.run(device_kernel, "gpu", (host,), device_results=True)
    assert isinstance(kept, FakeDeviceArray) and kept.copies == 0
    assert not kernels.device_results_wanted()
    # KernelDef.call and calling the kernel keep the public behaviour: host arrays.
    assert type(kernels.lookup(device_kernel).call("gpu", (host,))[0]) is np.ndarray


def test_the_variant_is_told_whether_device_results_are_wanted(device_kernel: str) -> None:
    wanted: list[bool] = []
    kdef = kernels.lookup(device_kernel)
    original = kdef.variant("gpu")
    assert original is not None

    def told(a: Any) -> Any:
        wanted.append(kernels.device_results_wanted())
        return original(a)

    kdef._runners["gpu"] = told
    kernels.run(device_kernel, "gpu", (np.ones(2),))
    kernels.run(device_kernel, "gpu", (np.ones(2),), device_results=True)
    assert wanted == [False, True]


def test_device_inputs_are_passed_through_and_never_copied(device_kernel: str) -> None:
    device = FakeDeviceArray(np.ones(4, np.float32))
    kept, _ = kernels.run(device_kernel, "gpu", (device,), device_results=True)
    assert kept is device and device.copies == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (FakeDeviceArray(np.ones(4, np.int32)), "argument 'a' is a int32 device array; pass a float32 or float64 one"),
        (
            FakeDeviceArray(np.ones((2, 2))),
            "argument 'a' is a 2-D device array (shape (2, 2)); pass 1-D, e.g. a.ravel() (on the device)",
        ),
        (FakeDeviceArray(np.ones(4), contiguous=False), "argument 'a' is a strided device array view"),
    ],
)
def test_validators_check_device_arrays_without_copying_them(
    device_kernel: str, value: FakeDeviceArray, expected: str
) -> None:
    with pytest.raises(KernelInputError) as caught:
        kernels.run(device_kernel, "gpu", (value,))
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert value.copies == 0


def test_device_arrays_in_same_dtype_and_shape_checks() -> None:
    a = FakeDeviceArray(np.ones(4, np.float32))
    with pytest.raises(KernelInputError, match="argument 'b' has shape"):
        kernels.float_vectors("k", a=a, b=FakeDeviceArray(np.ones(5, np.float32)))
    with pytest.raises(KernelInputError, match="argument 'b' is float64 but 'a' is float32"):
        kernels.float_vectors("k", a=a, b=FakeDeviceArray(np.ones(4)))


def test_cpu_and_scalar_results_are_not_walked() -> None:
    # to_host runs for the "gpu" backend only: the CPU hot path (noop) gains nothing.
    marker = (FakeDeviceArray(np.ones(1)),)
    assert kernels.run("noop", "cpu", (marker,)) is marker


def test_the_device_helpers_import_no_numba() -> None:
    probe = textwrap.dedent(
        """
        import sys
        import numpy as np
        from batuta import kernels
        kernels.to_host((np.ones(2), 1.0))
        kernels.is_device_array(np.ones(2))
        kernels.run("vadd", "cpu", (np.ones(2), np.ones(2)))
        assert "numba.cuda" not in sys.modules
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_registry_exports_the_device_helpers() -> None:
    for name in ("to_host", "is_device_array", "device_results_wanted"):
        assert getattr(kernels, name) is getattr(registry, name)
