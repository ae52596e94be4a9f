"""Alert rules: pure functions of the view-model's state at an instant.

Each rule looks at what the model already holds (host states, the latest GPU readings,
recent failures, the polled slot views) and returns candidate alerts; the model keeps
when each one was first seen and shows it once it has held for its `hold_s`, so a
condition that flickers for one poll (a deque that stealing evens out a moment later)
never reaches the screen. Thresholds are module constants so that tests and docs name them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from . import format as fmt

if TYPE_CHECKING:
    from .model import DashboardModel

GPU_MEMORY_ALERT_FRACTION = 0.90  # GPU memory above this is an alert
GPU_HOT_C = 85.0  # GPU temperature at or above this is an alert
IMBALANCE_DEPTH = 8  # a deque this deep while a slot of the same kind idles...
IMBALANCE_HOLD_S = 2.0  # ...for this long is an imbalance

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert line. `task_id`, when set, links to that task's detail view."""

    key: str  # stable identity across evaluations ("host-lost:gpu1")
    severity: str  # ERROR or WARNING
    title: str
    detail: str = ""
    hold_s: float = 0.0
    since: float | None = None
    task_id: int | None = None

    def with_since(self, since: float) -> Alert:
        return replace(self, since=since)


def evaluate_alerts(model: DashboardModel, now: float) -> list[Alert]:
    """Every alert whose condition holds now, errors first."""
    alerts = [*_host_alerts(model), *_failure_alerts(model), *_job_alerts(model), *_imbalance_alerts(model)]
    alerts.sort(key=lambda a: (a.severity != ERROR, a.key))
    return alerts


def _host_alerts(model: DashboardModel) -> list[Alert]:
    alerts = []
    # names as the nodes panel cuts them: a long one, cut with the rest of the line, took the reason off it
    names = fmt.short_names(tuple(model.hosts), fmt.HOST_CELLS)
    for host in model.hosts.values():
        name = names.get(host.name, host.name)
        # "unreachable": a relaunch (or the first start) failed; the panel said "all clear" then;
        # "unfit": up, but failing tasks for a reason of its own (core/hostfit.py)
        if host.state in ("lost", "retired", "unreachable", "unfit"):
            alerts.append(Alert(f"host-{host.state}:{host.name}", ERROR, f"host {name} {host.state}", host.reason))
            continue
        if host.state == "suspected":
            alerts.append(Alert(f"host-suspected:{host.name}", WARNING, f"host {name} suspected", host.reason))
        for gpu in host.used_gpus():  # a GPU no slot runs on is someone else's to watch
            where = f"{name} GPU {gpu.index}"
            fraction = gpu.memory_fraction
            if fraction is not None and fraction > GPU_MEMORY_ALERT_FRACTION:
                alerts.append(
                    Alert(
                        f"gpu-memory:{host.name}:{gpu.index}",
                        WARNING,
                        f"{where} memory {fraction:.0%}",
                        f"above {GPU_MEMORY_ALERT_FRACTION:.0%} of {gpu.memory_total / 2**30:.0f} GiB"
                        if gpu.memory_total
                        else "",
                    )
                )
            if gpu.temperature is not None and gpu.temperature >= GPU_HOT_C:
                alerts.append(
                    Alert(
                        f"gpu-hot:{host.name}:{gpu.index}",
                        WARNING,
                        f"{where} hot: {gpu.temperature:.0f} °C",
                        f"at or above {GPU_HOT_C:.0f} °C",
                    )
                )
    return alerts


def _failure_alerts(model: DashboardModel) -> list[Alert]:
    ids = model.recent_failure_ids
    if not ids:
        return []
    last = model.failure(ids[-1])
    detail = last.result.describe_failure() if last is not None else ""
    count = len(ids)
    return [
        Alert(
            "tasks-failing",
            ERROR,
            f"{count} task{'s' if count != 1 else ''} failed in the last minute",
            detail,
            task_id=ids[-1] if last is not None else None,
        )
    ]


def _job_alerts(model: DashboardModel) -> list[Alert]:
    """A job that ended failed, or with tasks of its failed, for as long as the jobs panel lists it:
    "tasks failing" covers only the last minute, and the panel read "all clear" beside FAILED 10."""
    alerts = []
    for job in model.jobs.values():
        if job.state == "running" or (job.state != "failed" and not job.failed):
            continue
        last = model.last_failure_of(job.name) if job.failed else None
        if job.state == "failed":
            severity, title, detail = ERROR, f"job {job.name} failed", job.message
        else:
            severity, title = WARNING, f"job {job.name} {job.state}: {job.failed:,} of {job.submitted:,} tasks failed"
            detail = last.result.describe_failure() if last is not None else ""
        task_id = last.result.task_id if last is not None else None
        alerts.append(Alert(f"job:{job.name}", severity, title, detail, task_id=task_id))
    return alerts


def _imbalance_alerts(model: DashboardModel) -> list[Alert]:
    alerts = []
    for kind in ("cpu", "gpu"):
        group = [s for s in model.slots.values() if s.kind == kind and s.state == "up"]
        if len(group) < 2:
            continue
        busiest = max(group, key=lambda s: s.deque_depth)
        idle = [s for s in group if s.deque_depth == 0 and s.in_flight == 0]
        if busiest.deque_depth >= IMBALANCE_DEPTH and idle:
            alerts.append(
                Alert(
                    f"imbalance:{kind}",
                    WARNING,
                    f"imbalance: {busiest.slot_id} holds {busiest.deque_depth} queued",
                    f"while {len(idle)} {kind} slot{'s' if len(idle) != 1 else ''} idle ({idle[0].slot_id})",
                    hold_s=IMBALANCE_HOLD_S,
                )
            )
    return alerts
