"""batuta: one compute pool for numba CPU/CUDA kernels over machines reachable by SSH.

The public names are imported lazily so that `python -m batuta agent` (started on every
host) does not pay for the coordinator's imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batuta._version import __version__

if TYPE_CHECKING:
    from batuta.core.objects import ObjectRef
    from batuta.core.task import Backend, Priority, Task, TaskBuilder, TaskResult, TaskStatus
    from batuta.errors import BatutaError, TaskFailedError
    from batuta.kernels import kernel
    from batuta.runtime.cluster import build_pool, load_cluster
    from batuta.runtime.pool import Pool, PoolBuilder, TaskFuture
    from batuta.runtime.remote import RemoteExecutor

_LAZY = {
    "Backend": "batuta.core.task",
    "ObjectRef": "batuta.core.objects",
    "Priority": "batuta.core.task",
    "Task": "batuta.core.task",
    "TaskBuilder": "batuta.core.task",
    "TaskResult": "batuta.core.task",
    "TaskStatus": "batuta.core.task",
    "BatutaError": "batuta.errors",
    "TaskFailedError": "batuta.errors",
    "Pool": "batuta.runtime.pool",
    "PoolBuilder": "batuta.runtime.pool",
    "TaskFuture": "batuta.runtime.pool",
    "RemoteExecutor": "batuta.runtime.remote",
    "build_pool": "batuta.runtime.cluster",
    "load_cluster": "batuta.runtime.cluster",
    "kernel": "batuta.kernels",
}

__all__ = [
    "Backend",
    "BatutaError",
    "ObjectRef",
    "Pool",
    "PoolBuilder",
    "Priority",
    "RemoteExecutor",
    "Task",
    "TaskBuilder",
    "TaskFailedError",
    "TaskFuture",
    "TaskResult",
    "TaskStatus",
    "__version__",
    "build_pool",
    "kernel",
    "load_cluster",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'batuta' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
