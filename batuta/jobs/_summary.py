"""What a job run did, counted from its tasks and hosts: totals, failures by cause, each host's
share and fate, throughput and latency percentiles.

Pure bookkeeping with no I/O and no event loop: the runner feeds it each task as it is queued,
each `TaskResult` as it ends and each host's changes, and asks for a `RunSummary` at the end.
The command line prints that summary as text or JSON; a TUI can show the same numbers.

Failures are grouped by cause (status and reason): a thousand tasks failing the same way are
one line, "1000 tasks failed: <reason>", and the reason is never cut. A host's fate says
whether it was up throughout, lost during the run (and maybe back), refused for good
("retired": a changed host key, a rejected login) or never reached; `--strict` fails a run
for any host that was not up throughout.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from batuta import TaskResult, TaskStatus
from batuta.jobs._samples import Samples
from batuta.jobs._text import printable

CAUSES_KEPT = 5  # distinct failure causes kept for the summary: the first few tell the story
STDERR_TAIL_LINES = 40  # of a failure group's first task's stderr, in --json (a traceback fits)
STDERR_TAIL_CHARS = 8192
PERCENTILES = (50, 95, 99)
HOST_PERCENTILES = (50, 95)
HOST_EXACT_LIMIT = 10_000  # a host's run times kept exactly; past that, within 0.5% (_samples.py)

FAILED_STATUSES = frozenset({TaskStatus.FAILED, TaskStatus.TIMED_OUT, TaskStatus.LOST, TaskStatus.UNSCHEDULABLE})
# Tasks that got a slot and ran to an end there: their times say something about the pool.
RAN_STATUSES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.TIMED_OUT})

HOST_UP = "up"
HOST_LOST = "lost"  # was up, then lost (and not back by the end)
HOST_RETIRED = "retired"  # refused for good: the pool will not try it again
HOST_UNREACHABLE = "unreachable"  # never came up during the run
HOST_STARTING = "starting"  # past start_wait, still starting: the run went on without it
HOST_UNFIT = "unfit"  # up, but failed tasks for a reason of its own (its memory, its disk, its slots)
# A host in one of these states at the end, or lost at any time, makes `--strict` fail.
HOST_FAILED_STATES = frozenset({HOST_LOST, HOST_RETIRED, HOST_UNREACHABLE, HOST_STARTING, HOST_UNFIT})
NEVER_UP_REASON = "never came up during the run; the log (batuta.runtime.pool) has its start errors"


def one_line(text: str) -> str:
    """`text` on one line: its first line, and its last too when there are more (a traceback's verdict)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 1:
        return f"{lines[0]} ... {lines[-1]}"
    return lines[0] if lines else ""


def failure_cause(result: TaskResult) -> str:
    """Why a task did not succeed, without which task it was: what identical failures share."""
    why = result.error or (f"exit code {result.exit_code}" if result.exit_code else result.status.value)
    return one_line(why)


def stderr_tail(result: TaskResult) -> str | None:
    """The end of what the task wrote to stderr, bounded: a kernel's traceback, a binary's last
    words (the one-line reason names where, not how it got there); None when it wrote none."""
    if not result.stderr.strip():
        return None
    lines = result.stderr_str().rstrip().splitlines()
    tail = "\n".join(lines[-STDERR_TAIL_LINES:])
    if len(tail) > STDERR_TAIL_CHARS:
        tail = tail[-STDERR_TAIL_CHARS:]
        tail = tail[tail.find("\n") + 1 :] if "\n" in tail else tail  # from a line's start
    left_out = len(lines) - tail.count("\n") - 1
    return f"[{left_out} earlier lines left out]\n{tail}" if left_out > 0 else tail


_VALUES = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?|'[^']*'|\"[^\"]*\"")  # numbers, quoted strings


def _kind_of(cause: str) -> str:
    """A cause with its values left out ("ValueError: boom on #"): one kernel raising one error
    about each task's own input is one cause, not one per input crowding the others out."""
    return _VALUES.sub("#", cause)


def _where(result: TaskResult) -> str:
    """ "task 3 (spin) on gpu1/0": the task of a failure group that stands for the rest."""
    slot = result.slot or ""
    if result.host and not slot.startswith(f"{result.host}/"):
        slot = f"{result.host}/{slot or '?'}"
    return f"task {result.task_id} ({result.name})" + (f" on {slot}" if slot else "")


def _tasks(count: int) -> str:
    return f"{count} task{'s' if count != 1 else ''}"


@dataclass(frozen=True, slots=True, kw_only=True)
class FailureGroup:
    """Tasks that ended the same way for the same reason, and the first of them."""

    status: str
    reason: str  # the first's
    count: int
    first: str  # "task 3 (spin) on gpu1/0"
    varied: bool = False  # the others' reasons differ from it in their values only
    stderr_tail: str | None = None  # the first's stderr, its end (`stderr_tail`): --json only

    def line(self) -> str:
        alike = "; the others alike, with other values" if self.varied else ""
        return f"{_tasks(self.count)} {self.status.replace('_', ' ')}: {self.reason} (first: {self.first}{alike})"

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "count": self.count,
            "first": self.first,
            "varied": self.varied,
            "stderr_tail": self.stderr_tail,
        }


def _host_samples() -> Samples:
    # fewer kept exactly than the run's: a cluster of hundreds of hosts has one each
    return Samples(HOST_EXACT_LIMIT)


@dataclass(slots=True)
class _Host:
    state: str = HOST_UNREACHABLE
    reason: str = ""
    was_up: bool = False
    losses: int = 0
    tasks: int = 0
    failed: int = 0
    run_times: Samples = field(default_factory=_host_samples)
    code: str = ""  # digest of the user's code its tasks ran with
    lost_because: str = ""  # its last loss's cause, said again once it is back up


class IdRanges:
    """A set of task ids kept as ranges: the pool numbers tasks 1, 2, 3... and they end
    roughly in that order, so a run's ids are a few ranges (about one per task in flight),
    not an entry each. As two sets of ints they were most of what a long `batuta run` held:
    with the float lists beside them, about 180 bytes a task (4,000,000 tasks: 700 MB)."""

    __slots__ = ("_count", "_ends", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []  # sorted; range k is starts[k] <= id < ends[k]
        self._ends: list[int] = []
        self._count = 0

    def add(self, task_id: int) -> bool:
        """Add `task_id`; False when it was there already."""
        k = bisect.bisect_right(self._starts, task_id) - 1
        if k >= 0 and task_id < self._ends[k]:
            return False
        joins_left = k >= 0 and self._ends[k] == task_id
        joins_right = k + 1 < len(self._starts) and self._starts[k + 1] == task_id + 1
        if joins_left and joins_right:
            self._ends[k] = self._ends[k + 1]
            del self._starts[k + 1], self._ends[k + 1]
        elif joins_left:
            self._ends[k] = task_id + 1
        elif joins_right:
            self._starts[k + 1] = task_id
        else:
            self._starts.insert(k + 1, task_id)
            self._ends.insert(k + 1, task_id + 1)
        self._count += 1
        return True

    def __contains__(self, task_id: int) -> bool:
        k = bisect.bisect_right(self._starts, task_id) - 1
        return k >= 0 and task_id < self._ends[k]

    def __len__(self) -> int:
        return self._count

    @property
    def ranges(self) -> int:
        return len(self._starts)


@dataclass(slots=True)
class RunTracker:
    """Counts a run's tasks and follows its hosts; each task id is counted once, however often
    it is requeued."""

    queued_ids: IdRanges = field(default_factory=IdRanges)
    finished_ids: IdRanges = field(default_factory=IdRanges)
    statuses: Counter[TaskStatus] = field(default_factory=Counter)
    latencies: Samples = field(default_factory=Samples)  # queue wait + run time, seconds
    run_times: Samples = field(default_factory=Samples)
    # (status, kernel, cause without its values) -> [count, first, first's cause, varied, first's stderr tail]
    causes: dict[tuple[str, str, str], list[Any]] = field(default_factory=dict)
    restored: int = 0  # answered from the journal (--resume), not run: no latency sample
    hosts: dict[str, _Host] = field(default_factory=dict)

    def task_queued(self, task_id: int) -> None:
        self.queued_ids.add(task_id)

    def task_finished(self, result: TaskResult) -> None:
        if not self.finished_ids.add(result.task_id):
            return
        self.queued_ids.add(result.task_id)
        self.statuses[result.status] += 1
        if result.restored:
            self.restored += 1
        elif result.status in RAN_STATUSES:
            self.latencies.append(result.queue_wait + result.duration)
            self.run_times.append(result.duration)
        if result.host and not result.restored and result.status is not TaskStatus.CANCELLED:
            host = self._host(result.host)
            host.tasks += 1
            if result.status in FAILED_STATUSES:
                host.failed += 1
            if result.status in RAN_STATUSES:
                host.run_times.append(result.duration)
            host.code = result.code or host.code
        if result.status in FAILED_STATUSES:
            cause = failure_cause(result)
            key = (result.status.value, result.name, _kind_of(cause))
            group = self.causes.get(key)
            if group is not None:
                group[0] += 1
                group[3] = group[3] or cause != group[2]
            elif len(self.causes) < CAUSES_KEPT:
                self.causes[key] = [1, _where(result), cause, False, stderr_tail(result)]

    # -- hosts: fed from the pool's HostUp, HostDown and HostStateChanged events --------------

    def host_up(self, name: str) -> None:
        self.host_state_changed(name, HOST_UP, "")

    def host_down(self, name: str, reason: str) -> None:
        """The host's agent went away: lost if it had been up, else it failed to come up."""
        host = self._host(name)
        if host.was_up:
            host.losses += 1
            host.state = HOST_LOST
            host.lost_because = reason
        else:
            host.state = HOST_UNREACHABLE
        host.reason = reason

    def host_state_changed(self, name: str, state: str, reason: str) -> None:
        host = self._host(name)
        if state == HOST_UP:
            host.state, host.was_up = HOST_UP, True
            if not host.losses:  # a late start or a passing suspicion is no longer news
                host.reason = ""
            elif host.lost_because:  # back up: why it was lost, not its last failed relaunch
                host.reason = host.lost_because
        elif state == HOST_RETIRED or host.state != HOST_RETIRED:
            host.state, host.reason = state, reason

    def hosts_known(self, names: Iterable[str]) -> None:
        """Every host of the pool: those never heard of still appear, as never reached."""
        for name in names:
            host = self._host(name)
            if not host.was_up and host.state == HOST_STARTING:  # at the end: it never came up, did nothing
                host.reason = f"still starting when the run ended ({host.reason})"
            if not host.was_up and host.state == HOST_UNREACHABLE and not host.reason:
                host.reason = NEVER_UP_REASON

    def _host(self, name: str) -> _Host:
        host = self.hosts.get(name)
        if host is None:
            host = self.hosts[name] = _Host()
        return host

    # -- totals ------------------------------------------------------------------------------

    @property
    def submitted(self) -> int:
        return len(self.queued_ids)

    @property
    def finished(self) -> int:
        return len(self.finished_ids)

    @property
    def succeeded(self) -> int:
        return self.statuses[TaskStatus.SUCCEEDED]

    @property
    def failed(self) -> int:
        return sum(self.statuses[status] for status in FAILED_STATUSES)

    @property
    def cancelled(self) -> int:
        return self.statuses[TaskStatus.CANCELLED]

    def summary(
        self, *, job: str, wall_s: float, result: Any, error: str | None, interrupted: bool = False
    ) -> RunSummary:
        """Freeze the counts into a summary of the run of `job` that took `wall_s` seconds."""
        return RunSummary(
            job=job,
            tasks=self.submitted,
            succeeded=self.succeeded,
            failed=self.failed,
            cancelled=self.cancelled,
            restored=self.restored,
            unfinished=self.submitted - self.finished,
            wall_s=wall_s,
            latency_s=self.latencies.percentiles(PERCENTILES),
            run_time_s=self.run_times.percentiles(PERCENTILES),
            failure_groups=[
                FailureGroup(status=status, reason=reason, count=count, first=first, varied=varied, stderr_tail=tail)
                for (status, _, _), (count, first, reason, varied, tail) in self.causes.items()
            ],
            hosts=[
                HostSummary(
                    host=name,
                    state=h.state,
                    reason=h.reason,
                    losses=h.losses,
                    tasks=h.tasks,
                    failed=h.failed,
                    run_time_s=h.run_times.percentiles(HOST_PERCENTILES),
                    code=h.code,
                )
                for name, h in self.hosts.items()
            ],
            result=result,
            error=error,
            interrupted=interrupted,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class HostSummary:
    """One host over the run: how it ended, why, and the tasks that ended there."""

    host: str
    state: str  # up, lost, retired, unreachable, unfit (or suspected, draining, drained)
    reason: str  # why it is not up, or why it was lost; "" when it was up throughout
    losses: int  # times it was lost while up
    tasks: int  # tasks that ended there (run, failed there or lost with it)
    failed: int
    run_time_s: dict[str, float]  # p50 and p95 of the run times there
    code: str = ""  # digest of the user's code its tasks ran with ("" when none was shipped)

    @property
    def failed_host(self) -> bool:
        """Refused, unreachable or lost at some point: what `--strict` fails a run for."""
        return self.state in HOST_FAILED_STATES or self.losses > 0

    def fate(self) -> str:
        """ "retired: host key changed ...", "lost twice, back up: ..." or "" for a healthy host."""
        if not self.failed_host and not self.reason:
            return ""
        state = self.state
        if self.losses and state not in (HOST_LOST, HOST_RETIRED):
            times = "once" if self.losses == 1 else f"{self.losses} times"
            state = f"lost {times}, back {state}"
        return f"{state}: {self.reason}" if self.reason else state

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "state": self.state,
            "reason": self.reason or None,
            "losses": self.losses,
            "tasks": self.tasks,
            "failed": self.failed,
            "run_time_s": _json_floats(self.run_time_s),
            "code": self.code or None,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSummary:
    """The end of a run: what `batuta run` prints, as text or as one JSON object."""

    job: str
    tasks: int
    succeeded: int
    failed: int
    cancelled: int
    unfinished: int  # submitted but not ended when main returned (or was interrupted) and the pool closed
    restored: int = 0  # of `succeeded`: taken from the journal, not run again
    wall_s: float
    latency_s: dict[str, float]
    run_time_s: dict[str, float]
    failure_groups: list[FailureGroup] = field(default_factory=list)
    hosts: list[HostSummary] = field(default_factory=list)
    result: Any = None  # what the job's main returned
    error: str | None = None  # one line when the job's main raised
    interrupted: bool = False  # Ctrl-C (SIGINT) stopped the job; unfinished tasks were cancelled

    @property
    def ok(self) -> bool:
        return self.error is None and self.failed == 0 and not self.interrupted

    @property
    def failed_hosts(self) -> list[HostSummary]:
        """Hosts refused, never reached, or lost during the run (`--strict` exits 1 for any)."""
        return [h for h in self.hosts if h.failed_host]

    @property
    def failures(self) -> list[str]:
        """One line per failure cause, with how many tasks it took."""
        return [group.line() for group in self.failure_groups]

    @property
    def tasks_per_s(self) -> float:
        ended = self.tasks - self.unfinished
        return ended / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: seconds as floats, NaN (no samples) as null."""
        return {
            "job": self.job,
            "ok": self.ok,
            "interrupted": self.interrupted,
            "tasks": self.tasks,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "restored": self.restored,
            "unfinished": self.unfinished,
            "wall_s": round(self.wall_s, 6),
            "tasks_per_s": round(self.tasks_per_s, 3),
            "latency_s": _json_floats(self.latency_s),
            "run_time_s": _json_floats(self.run_time_s),
            "failures": [group.to_json() for group in self.failure_groups],
            "failures_not_shown": self.failed - sum(group.count for group in self.failure_groups),
            "hosts": [host.to_json() for host in self.hosts],
            "hosts_failed": [host.host for host in self.failed_hosts],
            "result": _json_value(self.result),
            "error": self.error,
        }

    def text_lines(self) -> list[str]:
        """The summary for a terminal: totals, latency, one line per host and per failure cause."""
        counts = f"{self.tasks} task{'' if self.tasks == 1 else 's'}: {self.succeeded} succeeded, {self.failed} failed"
        if self.restored:
            counts += f" ({self.restored} restored from the journal)"
        if self.cancelled:
            counts += f", {self.cancelled} cancelled"
        if self.unfinished:
            counts += f", {self.unfinished} {'cancelled by the interrupt' if self.interrupted else 'unfinished'}"
        lines = [
            f"{counts} in {self.wall_s:.2f} s ({self.tasks_per_s:,.1f} tasks/s)",
            f"latency (queue + run)  {_ms_row(self.latency_s)}",
            f"run time               {_ms_row(self.run_time_s)}",
        ]
        lines += self.host_lines()
        lines += self.failure_lines()
        return lines

    def host_lines(self) -> list[str]:
        """A small table: tasks, failures and run time per host, then how each troubled host fared."""
        if not self.hosts:
            return []
        width = max(4, *(len(h.host) for h in self.hosts))
        lines = [f"{'host':<{width}}  {'tasks':>6}  {'failed':>6}  {'run p50':>10}  {'run p95':>10}"]
        for h in self.hosts:
            p50, p95 = (_ms(h.run_time_s[k]) for k in ("p50", "p95"))
            row = f"{h.host:<{width}}  {h.tasks:>6}  {h.failed:>6}  {p50:>10}  {p95:>10}"
            fate = h.fate()
            lines.append(f"{row}  {fate}" if fate else row)
        return lines

    def failure_lines(self) -> list[str]:
        """ "12 tasks failed: <reason> (first: ...)", one per cause, then a count of the rest."""
        lines = list(self.failures)
        rest = self.failed - sum(group.count for group in self.failure_groups)
        if rest > 0:
            lines.append(f"... and {_tasks(rest)} more failed for other reasons (--log-file FILE keeps every failure)")
        return lines


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:,.1f} ms"


def _ms_row(values: dict[str, float]) -> str:
    return "  ".join(f"{name} {_ms(seconds)}" for name, seconds in values.items())


def _json_floats(values: dict[str, float]) -> dict[str, float | None]:
    return {k: None if math.isnan(v) else round(v, 6) for k, v in values.items()}


def _json_value(value: Any) -> Any:
    """The job's return value as JSON: itself if it encodes, `.tolist()` for arrays, else repr."""
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        pass
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        try:
            converted = tolist()
            json.dumps(converted, allow_nan=False)
            return converted
        except (TypeError, ValueError):
            pass
    return printable(value)  # repr's fallback: the user's __repr__ may raise too
