"""What a task asks of the scheduler, as the pool derives it when the task is submitted: the
capabilities its slot needs, and whether its kernel is O(n^2) or worse (the seed's GPU rule).
Both are cached: most tasks share a handful of kernels and capability sets."""

from __future__ import annotations

import functools

from batuta.core.task import CAP_CPU, CAP_GPU, Backend


@functools.lru_cache(maxsize=1024)
def superlinear(kernel_name: str) -> bool:
    """Whether the registry marks the kernel O(n^2) or worse (the seed's GPU rule)."""
    from batuta.kernels import registry

    found = registry.known(kernel_name)  # never imports: a "module:kernel" is the hosts' to load
    return found is not None and found.complexity in ("quadratic", "cubic")  # unknown: no GPU by guess


@functools.lru_cache(maxsize=256)
def requirements(backend: Backend, tags: frozenset[str]) -> frozenset[str]:
    """The capabilities a task needs; interned, since most tasks share a handful of sets."""
    return frozenset({CAP_GPU if backend is Backend.GPU else CAP_CPU, *tags})
