"""Backend selection: the seed's table, as a pure function with its reason.

    | workload size | complexity     | backend                         |
    | < 1K elements | any            | scalar (no overhead)            |
    | 1K - 100K     | low / medium   | CPU (numba, SIMD)               |
    | > 100K        | high (O(n^2)+) | GPU                             |
    | > 10M         | any            | distributed (split into tasks)  |

"Distributed" is not a per-task backend: a task runs on one slot; splitting big inputs into
tasks is `Pool.map_chunked`'s job. The thresholds live in `BackendThresholds` so a cluster
file can change them.

A kernel may know better than its complexity class where its GPU variant starts to win (a
launch and the copies cost tens of microseconds; a streaming kernel moves its bytes over PCIe
no faster than a CPU reads them): ``@kernel(..., gpu_min_elements=N)`` in the registry. Where
it says so and a GPU slot exists, ``auto`` picks the GPU from N elements and the CPU below;
a kernel without a GPU variant never goes to a GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from batuta.core.task import Backend, BinaryCall, KernelCall, requires_gpu_slot


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendThresholds:
    scalar_below: int = 1_000
    gpu_above: int = 100_000


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendChoice:
    backend: Backend
    reason: str


def element_count(args: tuple[Any, ...]) -> int:
    """Total elements over the array arguments (anything with `.size`); scalars count 0."""
    total = 0
    for arg in args:
        size = getattr(arg, "size", None)
        if isinstance(size, int):
            total += size
    return total


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuRule:
    """What the registry says about a kernel's GPU variant, for ``auto``."""

    has_gpu: bool
    min_elements: int | None
    """From how many elements the GPU variant wins; None: the complexity rule decides."""
    complexity: str = "linear"


_UNKNOWN_RULE = GpuRule(has_gpu=True, min_elements=None)
_RULES: dict[str, GpuRule] = {}


def gpu_rule(name: str) -> GpuRule:
    """The registry's `GpuRule` for kernel `name` (cached once known). A kernel unknown here
    (a module only the hosts load) gets the complexity rule, as before."""
    rule = _RULES.get(name)
    if rule is not None:
        return rule
    from batuta.kernels import registry

    kernel_info = registry.known(name)  # never imports: a "module:kernel" is the hosts' to load
    if kernel_info is None:  # unknown here: not cached, the module may be loaded later
        return _UNKNOWN_RULE
    rule = GpuRule(
        has_gpu="gpu" in kernel_info.backends,
        min_elements=kernel_info.gpu_min_elements,
        complexity=kernel_info.complexity,
    )
    _RULES[name] = rule
    return rule


_ORDER = {"linear": "O(n)", "quadratic": "O(n^2)", "cubic": "O(n^3)"}


def select_backend(
    call: KernelCall | BinaryCall,
    requested: Backend,
    *,
    gpu_available: bool,
    quadratic: bool = False,
    thresholds: BackendThresholds | None = None,
    rule: GpuRule | None = None,
    requires: frozenset[str] = frozenset(),
) -> BackendChoice:
    """Resolve `requested` (AUTO included) to a concrete backend, with the reason why.

    `rule` is what the kernel's registration says about its GPU variant (looked up by name
    in the registry when not given); `quadratic` is the complexity rule's input for kernels
    that give no `gpu_min_elements`. A task that `requires` a GPU slot ("gpu", "gpu:1") runs
    its GPU variant: AUTO picked by size, and asked a CPU slot of GPU 1 (which none offers);
    a binary that requires one runs on it (as a CPU binary it asked for "cpu" and "gpu:1").
    """
    thresholds = thresholds or _DEFAULT_THRESHOLDS
    if isinstance(call, BinaryCall):
        if requires and requires_gpu_slot(requires):  # a CUDA program: its GPU's slot, no CPU slot's
            return _choice(Backend.GPU, "a binary that requires a GPU slot runs on it")
        return _choice(Backend.CPU, "binaries run on CPU slots")
    if requested is not Backend.AUTO:
        return _choice(requested, f"{requested.value} requested")
    if requires and requires_gpu_slot(requires):
        rule = rule or gpu_rule(call.name)
        if rule.has_gpu:
            return _choice(Backend.GPU, "it requires a GPU slot: its GPU variant")
    n = element_count(call.args)
    if n < thresholds.scalar_below:
        return _choice(Backend.SCALAR, f"under {thresholds.scalar_below} elements: scalar (no overhead)")
    rule = rule or gpu_rule(call.name)
    if not rule.has_gpu:
        return _choice(Backend.CPU, f"{thresholds.scalar_below} elements or more and no GPU variant: numba CPU")
    if rule.min_elements is not None:
        order = _ORDER.get(rule.complexity, rule.complexity)
        if n < rule.min_elements:
            return _choice(
                Backend.CPU, f"under {rule.min_elements} elements, where its GPU variant starts to win: numba CPU"
            )
        if gpu_available:
            return _choice(Backend.GPU, f"{rule.min_elements} elements or more ({order}): its GPU variant wins: GPU")
        return _choice(Backend.CPU, f"{rule.min_elements} elements or more ({order}), but no GPU slot: numba CPU")
    if quadratic and n > thresholds.gpu_above and gpu_available:
        return _choice(Backend.GPU, f"over {thresholds.gpu_above} elements and O(n^2) or worse: GPU")
    if quadratic and n > thresholds.gpu_above:
        return _choice(Backend.CPU, f"over {thresholds.gpu_above} elements and O(n^2), but no GPU slot: numba CPU")
    return _choice(Backend.CPU, f"{thresholds.scalar_below} elements or more: numba CPU")


_DEFAULT_THRESHOLDS = BackendThresholds()


@functools.lru_cache(maxsize=64)
def _choice(backend: Backend, reason: str) -> BackendChoice:
    """Interned: the same few decisions are shared by every task that gets them."""
    return BackendChoice(backend=backend, reason=reason)
