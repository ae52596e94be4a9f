"""Backend selection: the seed's table, as a pure function with its reason.

    | workload size | complexity     | backend                         |
    | < 1K elements | any            | scalar (no overhead)            |
    | 1K - 100K     | low / medium   | CPU (numba, SIMD)               |
    | > 100K        | high (O(n^2)+) | GPU                             |
    | > 10M         | any            | distributed (split into tasks)  |

"Distributed" is not a per-task backend: a task runs on one slot; splitting big inputs into
tasks is `Pool.map_chunked`'s job. The thresholds live in `BackendThresholds` so a cluster
file can change them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from batuta.core.task import Backend, BinaryCall, KernelCall


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


def select_backend(
    call: KernelCall | BinaryCall,
    requested: Backend,
    *,
    gpu_available: bool,
    quadratic: bool = False,
    thresholds: BackendThresholds | None = None,
) -> BackendChoice:
    """Resolve `requested` (AUTO included) to a concrete backend, with the reason why."""
    thresholds = thresholds or _DEFAULT_THRESHOLDS
    if isinstance(call, BinaryCall):
        return _choice(Backend.CPU, "binaries run on CPU slots")
    if requested is not Backend.AUTO:
        return _choice(requested, f"{requested.value} requested")
    n = element_count(call.args)
    if n < thresholds.scalar_below:
        return _choice(Backend.SCALAR, f"under {thresholds.scalar_below} elements: scalar (no overhead)")
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
