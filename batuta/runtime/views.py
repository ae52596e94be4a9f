"""What the runtime publishes to the layers above it: snapshots of the pool, and the task model.

The dashboard, the metrics exporter and the CLI read the pool through these names only, so
none of them redeclares a view or reaches into the scheduler core for one. `SlotView` is
made by the scheduler (it owns the slots) and published here unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from batuta.core.scheduler import SlotView
from batuta.core.task import Backend, Priority, Task, TaskResult, TaskStatus, gpu_index_of

__all__ = [
    "Backend",
    "HostView",
    "PoolStats",
    "Priority",
    "SlotView",
    "Task",
    "TaskResult",
    "TaskStatus",
    "gpu_index_of",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolStats:
    submitted: int
    succeeded: int
    failed: int  # every status but SUCCEEDED and CANCELLED
    queued: int
    # tasks on a slot, cancelled ones included until their slot has given them up (a running
    # kernel is stopped, not abandoned: the slot stays busy until then)
    in_flight: int
    steals: int
    steal_backs: int
    retries: int  # started attempts run again
    dropped_results: int
    restored: int = 0  # answered from the result store without running
    waiting: int = 0  # for upstream tasks or kept values (see core/deps.py)
    relayed_bytes: int = 0  # kept values moved to another host through the coordinator
    fetched_bytes: int = 0  # kept values fetched with pool.get
    fed_ahead: int = 0  # tasks sent behind the tasks making their kept inputs (core/feedahead.py)
    requeues: int = 0  # every return to the queue: the retries, and tasks whose host went before they started
    cancelled: int = 0  # by fut.cancel(), a job's cancel, a failed map (fail fast) or the pool's close


@dataclass(frozen=True, slots=True, kw_only=True)
class HostView:
    name: str
    state: str
    description: str
    slots: int
    gpus: tuple[str, ...]
    cpu_count: int
    last_heard_s: float
