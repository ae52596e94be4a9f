"""``Backend.AUTO`` against the registry's per-kernel GPU thresholds (`gpu_min_elements`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from batuta.kernels import KernelDefinitionError, cuda_support

from batuta import kernels
from batuta.core.backend import GpuRule, gpu_rule, select_backend
from batuta.core.task import Backend, KernelCall


def choose(name: str, *args: object, gpu: bool = True, quadratic: bool = False) -> tuple[Backend, str]:
    choice = select_backend(KernelCall(name=name, args=args), Backend.AUTO, gpu_available=gpu, quadratic=quadratic)
    return choice.backend, choice.reason


def test_a_streaming_kernel_goes_to_the_gpu_only_from_its_threshold() -> None:
    limit = cuda_support.GPU_MIN_ELEMENTS["vadd"]
    below = np.zeros(limit // 2 - 1, np.float32)  # two arguments: limit - 2 elements
    at = np.zeros(limit // 2, np.float32)
    backend, reason = choose("vadd", below, below)
    assert backend is Backend.CPU and f"under {limit} elements" in reason
    backend, reason = choose("vadd", at, at)
    assert backend is Backend.GPU and f"{limit} elements or more (O(n))" in reason
    backend, reason = choose("vadd", at, at, gpu=False)
    assert backend is Backend.CPU and "no GPU slot" in reason


def test_dense_kernels_go_to_the_gpu_sooner_than_the_old_complexity_rule() -> None:
    x = np.zeros((64, 40), np.float32)  # 2 x 2,560 elements: under the cluster's gpu_above
    backend, reason = choose("pairwise_distances", x, x, quadratic=True)
    assert backend is Backend.GPU and "O(n^2)" in reason


def test_small_inputs_stay_scalar_whatever_the_kernel_says() -> None:
    assert choose("pairwise_distances", np.zeros((2, 2)), np.zeros((2, 2)))[0] is Backend.SCALAR


@pytest.fixture
def cpu_only_quadratic() -> Iterator[str]:
    @kernels.kernel("test_auto_cpu_only", complexity="quadratic")
    def _reference(x: np.ndarray) -> np.ndarray:
        return x

    yield "test_auto_cpu_only"
    kernels.unregister("test_auto_cpu_only")


def test_a_kernel_without_a_gpu_variant_never_goes_to_a_gpu(cpu_only_quadratic: str) -> None:
    big = np.zeros(10**6)
    backend, reason = choose(cpu_only_quadratic, big, quadratic=True)
    assert backend is Backend.CPU and "no GPU variant" in reason


def test_without_a_threshold_the_complexity_rule_decides() -> None:
    big = np.zeros(200_000)

    def rule(min_elements: int | None) -> Backend:
        call = KernelCall(name="whatever", args=(big,))
        found = GpuRule(has_gpu=True, min_elements=min_elements, complexity="quadratic")
        return select_backend(call, Backend.AUTO, gpu_available=True, quadratic=True, rule=found).backend

    assert rule(None) is Backend.GPU  # over gpu_above and O(n^2)
    assert rule(300_000) is Backend.CPU  # the kernel knows better
    assert choose("not_registered_here", big, quadratic=True)[0] is Backend.GPU  # unknown: as before
    assert choose("not_registered_here", big)[0] is Backend.CPU


def test_the_registry_carries_the_threshold_and_checks_it() -> None:
    assert kernels.info("kmeans_partial").gpu_min_elements == cuda_support.GPU_MIN_ELEMENTS["kmeans_partial"]
    assert kernels.info("tree_fit").gpu_min_elements is None
    assert gpu_rule("matmul") == GpuRule(
        has_gpu=True, min_elements=cuda_support.GPU_MIN_ELEMENTS["matmul"], complexity="cubic"
    )
    for bad in (-1, 1.5, "10"):
        with pytest.raises(KernelDefinitionError, match="gpu_min_elements must be an int >= 0 or None"):
            kernels.kernel("test_auto_bad", gpu_min_elements=bad)(lambda x: x)


def test_an_explicit_backend_is_never_second_guessed() -> None:
    tiny = np.zeros(3)
    choice = select_backend(KernelCall(name="vadd", args=(tiny, tiny)), Backend.GPU, gpu_available=True)
    assert choice.backend is Backend.GPU


def test_a_task_that_requires_a_gpu_slot_runs_its_gpu_variant() -> None:
    """`requires=["gpu:1"]` under AUTO picked scalar for a small array and asked a CPU slot of
    GPU 1, which no slot offers: unschedulable, where the README says it picks GPU 1's slot."""
    tiny = np.arange(10.0)
    for tags in (frozenset({"gpu:1"}), frozenset({"gpu"})):
        choice = select_backend(KernelCall(name="sum", args=(tiny,)), Backend.AUTO, gpu_available=True, requires=tags)
        assert choice.backend is Backend.GPU and choice.reason == "it requires a GPU slot: its GPU variant"
    cpu_only = GpuRule(has_gpu=False, min_elements=None)  # nothing to run there: AUTO's pick as before
    spin = KernelCall(name="spin", args=(0.1,))
    choice = select_backend(spin, Backend.AUTO, gpu_available=True, rule=cpu_only, requires=frozenset({"gpu"}))
    assert choice.backend is Backend.SCALAR
    summed = KernelCall(name="sum", args=(tiny,))
    tagged = select_backend(summed, Backend.AUTO, gpu_available=True, requires=frozenset({"avx512"}))
    assert tagged.backend is Backend.SCALAR  # other tags change nothing
