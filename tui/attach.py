"""The dashboard attached to a served coordinator (`batuta tui --attach`, `batuta tui --serve`).

The same `BatutaApp`, panels and `DashboardModel`; only the data source differs. Instead of
subscribing to an in-process pool, a worker reads the coordinator's stream
(batuta/runtime/serve_client.py): the snapshot of its bounded history is folded into a reset
model by `restore` (hosts, jobs, counters, throughput, latency histograms, failures, the
last task events, logs, slots), so every panel looks as if it had been open from the start,
and then the live events go through the model's inbox exactly as a local pool's do. A
viewer that fell behind is sent a fresh snapshot and restored again (the coordinator
counted the detail it skipped; the log panel says so).

Pause, cancel and drain are sent to the coordinator, which answers in a line shown as a
notification. Quitting or detaching (`x`) closes only this viewer: the job goes on.

Event times are the coordinator's loop clock (monotonic); the model's clock is this machine's
monotonic clock, plus, over SSH or TLS, the offset estimated at hello, so ages and rates read
right across machines.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from textual.binding import Binding, BindingType

from batuta.errors import BatutaError, ViewerProtocolError
from batuta.runtime import events as pe
from batuta.runtime import serve_wire as w
from batuta.runtime.serve_client import Connection, Target, connect

from .app import UNDRAIN, BatutaApp, FrameListener, PaletteCommand, drain_choices
from .histogram import BUCKET_COUNT, LogHistogram
from .model import NO_JOB, DashboardModel
from .rows import JobRow

if TYPE_CHECKING:
    from batuta.runtime.serve_client import SSHSettings

log = logging.getLogger("batuta.tui.attach")


# -- folding the wire into the model --------------------------------------------------------


def _histogram(wire: object, where: str) -> LogHistogram:
    spread, total, sum_s, max_s = w.want_list(wire, where, 4)
    histogram = LogHistogram()
    for i, entry in enumerate(w.want_list(spread, f"{where}.buckets")):
        index, count, bucket_sum = w.want_list(entry, f"{where}.buckets[{i}]", 3)
        if not 0 <= w.want_int(index, f"{where}.buckets[{i}].index") < BUCKET_COUNT:
            raise ViewerProtocolError(f"{where}.buckets[{i}].index: {index} is not a bucket")
        histogram.counts[index] = w.want_int(count, f"{where}.buckets[{i}].count")
        histogram.sums[index] = w.want_float(bucket_sum, f"{where}.buckets[{i}].sum")
    histogram.total = w.want_int(total, f"{where}.total")
    histogram.sum_s = w.want_float(sum_s, f"{where}.sum")
    histogram.max_s = w.want_float(max_s, f"{where}.max")
    return histogram


def _seconds(wire: object, where: str) -> list[tuple[int, int]]:
    pairs = []
    for i, pair in enumerate(w.want_list(wire, where)):
        second, count = w.want_list(pair, f"{where}[{i}]", 2)
        pairs.append((w.want_int(second, f"{where}[{i}].second"), w.want_int(count, f"{where}[{i}].count")))
    return pairs


def _items(snapshot: dict[str, Any], key: str, kinds: frozenset[type]) -> list[Any]:
    items = w.decode_items(snapshot.get(key, []), f"snapshot.{key}")
    for i, item in enumerate(items):
        if type(item) not in kinds:
            raise ViewerProtocolError(f"snapshot.{key}[{i}]: a {type(item).__name__} does not belong here")
    return items


_HOST_KINDS = frozenset({pe.HostUp, pe.HostStateChanged, pe.HostDown, pe.HostTelemetry})
_TASK_KINDS = frozenset({pe.TaskQueued, pe.TaskStarted, pe.TaskRequeued, pe.TaskFinished})


def restore(model: DashboardModel, wire: object) -> int:
    """Rebuild `model` from a coordinator's snapshot (validated whole before the model is
    touched); returns how many events the coordinator dropped for this viewer so far."""
    snapshot = w.want_map(wire, "snapshot")
    status = w.decode_item(snapshot.get("status"), "snapshot.status")
    paused = w.decode_item(snapshot.get("paused"), "snapshot.paused")
    if not isinstance(status, w.StatusChanged) or not isinstance(paused, w.PausedChanged):
        raise ViewerProtocolError("snapshot.status or snapshot.paused is of the wrong kind")
    hosts = _items(snapshot, "hosts", _HOST_KINDS)
    slot_states = _items(snapshot, "slot_states", frozenset({pe.SlotStateChanged}))
    jobs = _items(snapshot, "jobs", frozenset({w.JobChanged}))
    failures = _items(snapshot, "failures", frozenset({pe.TaskFinished}))
    running = _items(snapshot, "running", frozenset({pe.TaskStarted}))
    events = _items(snapshot, "events", _TASK_KINDS)
    logs = _items(snapshot, "logs", frozenset({w.LogNoted}))
    slots = None if snapshot.get("slots") is None else w.decode_item(snapshot["slots"], "snapshot.slots")
    if slots is not None and not isinstance(slots, w.SlotsPolled):
        raise ViewerProtocolError("snapshot.slots is of the wrong kind")
    totals = []
    for i, entry in enumerate(w.want_list(snapshot.get("job_totals", []), "snapshot.job_totals")):
        at = f"snapshot.job_totals[{i}]"
        name, *counts, started_at, meter = w.want_list(entry, at, 8)
        counters = [w.want_int(c, f"{at}.counts") for c in counts]
        totals.append((w.want_str(name, f"{at}.name"), counters, w.opt_float(started_at, at), _seconds(meter, at)))
    host_counts = []
    for i, entry in enumerate(w.want_list(snapshot.get("host_counts", []), "snapshot.host_counts")):
        host, done, failed = w.want_list(entry, f"snapshot.host_counts[{i}]", 3)
        host_counts.append((w.want_str(host, "host"), w.want_int(done, "done"), w.want_int(failed, "failed")))
    throughput = _seconds(snapshot.get("throughput", []), "snapshot.throughput")
    latency = []
    for i, entry in enumerate(w.want_list(snapshot.get("latency", []), "snapshot.latency")):
        at = f"snapshot.latency[{i}]"
        kernel, backend, host, queue, run = w.want_list(entry, at, 5)
        key = (w.want_str(kernel, at), w.want_str(backend, at), w.want_str(host, at))
        latency.append((key, _histogram(queue, f"{at}.queue"), _histogram(run, f"{at}.run")))
    dropped = w.want_int(snapshot.get("dropped", 0), "snapshot.dropped")

    model.reset()
    model.set_status(status.status, status.detail)
    model.set_paused(paused.paused)
    model.apply_many(hosts)
    for host, done, failed in host_counts:
        model.restore_host_counts(host, done, failed)
    for job in jobs:
        _job_changed(model, job)
    for name, (submitted, succeeded, failed, cancelled, requeued), started_at, meter in totals:
        row = model.jobs.get(name or NO_JOB) or JobRow(name=name or NO_JOB, state="running")
        row.submitted += submitted
        row.succeeded += succeeded
        row.failed += failed
        row.cancelled += cancelled
        row.requeued += requeued
        if started_at is not None and (row.started_at is None or started_at < row.started_at):
            row.started_at = started_at
        for second, count in meter:
            row.meter.add(second, count)
        model.restore_job(row)
    for second, count in throughput:
        model.throughput.add(second, count)
    for key, queue, run in latency:
        model.restore_latency(key, queue, run)
    for finished in failures:
        model.restore_failure(finished.result, finished.at)
    model.apply_many(running)
    model.apply_many(events)
    for line in logs:
        model.add_log(line.level, line.logger, line.message, line.created)
    if slots is not None:
        model.update_slots(slots.views)
    model.apply_many(slot_states)
    return dropped


def _job_changed(model: DashboardModel, change: w.JobChanged) -> None:
    row = model.jobs.get(change.name) or JobRow(name=change.name)
    row.origin = change.origin
    row.state = change.state
    row.message = change.message
    row.started_at = change.started_at if change.started_at is not None else row.started_at
    row.ended_at = change.ended_at
    model.restore_job(row)


def apply_items(model: DashboardModel, items: list[Any]) -> None:
    """Live items: pool events to the model's inbox (folded each frame), notes at once, in order."""
    inbox = model.inbox
    for item in items:
        if isinstance(item, w.LogNoted | w.JobChanged | w.StatusChanged | w.PausedChanged | w.SlotsPolled):
            model.drain()  # what came before the note is folded first
            if isinstance(item, w.LogNoted):
                model.add_log(item.level, item.logger, item.message, item.created)
            elif isinstance(item, w.JobChanged):
                _job_changed(model, item)
            elif isinstance(item, w.StatusChanged):
                model.set_status(item.status, item.detail)
            elif isinstance(item, w.PausedChanged):
                model.set_paused(item.paused)
            else:
                model.update_slots(item.views)
        else:
            inbox(item)


# -- the app ----------------------------------------------------------------------------------


class AttachedApp(BatutaApp):
    """`BatutaApp` fed by a served coordinator; see the module docstring."""

    # merged with the app's, in its places: detach shown beside quit; the keys that start jobs
    # still answer (a view runs none) but take no room in the footer
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("x", "detach", "Detach"),
        Binding("d", "start_job('demo')", "Demo", show=False),
        Binding("r", "pick_job", "Run job", show=False),
    ]

    def __init__(
        self,
        target: Target,
        *,
        certs: Path | None = None,
        ssh: SSHSettings | None = None,
        refresh_hz: float = 12.0,
        frame_listener: FrameListener | None = None,
    ) -> None:
        """Watch the coordinator at `target`; `frame_listener` as for `BatutaApp` (bench/attach.py)."""
        self._offset = 0.0
        super().__init__(
            None,
            model=DashboardModel(clock=self._clock, cluster_label=target.label),
            attach_logging=False,
            refresh_hz=refresh_hz,
            frame_listener=frame_listener,
        )
        self.target = target
        self.certs = certs
        self.ssh = ssh
        self.connection: Connection | None = None
        self.info: dict[str, Any] = {}
        self.snapshots = 0  # how many snapshots were restored (1 + the resyncs)
        self.dropped = 0  # events the coordinator merged away for this viewer
        self.ended = ""  # why the stream ended, once it did

    def _clock(self) -> float:
        return time.monotonic() + self._offset

    def on_mount(self) -> None:
        super().on_mount()
        self.model.set_status("starting", f"attaching to {self.target.label}…")
        self.run_worker(self._follow(), name="attach", group="attach", exit_on_error=False)

    async def on_unmount(self) -> None:
        if self.connection is not None:
            await self.connection.close()
        await super().on_unmount()

    async def _follow(self) -> None:
        """Connect, attach, and fold what the coordinator sends until it ends or we leave."""
        model = self.model
        try:
            self.connection = connection = await connect(self.target, certs=self.certs, ssh=self.ssh)
            sent = time.monotonic()
            await connection.send(["attach", w.VERSION])
            while True:
                message = await connection.receive()
                if message is None:
                    self._ended("the coordinator went away")
                    return
                tag = message[0]
                if tag == "events":
                    apply_items(model, w.decode_items(message[1] if len(message) == 2 else None, "events"))
                elif tag == "snapshot" and len(message) == 2:
                    dropped = restore(model, message[1])
                    self.snapshots += 1
                    if dropped > self.dropped:
                        model.add_log(
                            logging.WARNING,
                            "batuta.tui.attach",
                            f"this view fell behind: {dropped - self.dropped:,} events merged into a fresh snapshot",
                        )
                    self.dropped = dropped
                    self.sync_now()
                elif tag == "hello" and len(message) == 3:
                    self.info = w.want_map(message[2], "hello.info")
                    now = w.want_float(self.info.get("now"), "hello.now")
                    # a local socket shares this machine's monotonic clock; across machines, the
                    # hello's time stood halfway through the round trip (within half of it)
                    self._offset = 0.0 if self.target.path is not None else now - (sent + time.monotonic()) / 2
                    label = w.want_str(self.info.get("label", ""), "hello.label")
                    model.cluster_label = f"{self.info.get('name', '?')} · {label}"
                    self.title = f"batuta · {self.info.get('name', '?')}"
                elif tag == "reply" and len(message) == 4:
                    ok, text = w.want_bool(message[2], "reply.ok"), w.want_str(message[3], "reply.text")
                    self.toast(text, severity="information" if ok else "error", timeout=6)
                elif tag == "bye" and len(message) == 2:
                    self._ended(w.want_str(message[1], "bye.reason"))
                    return
                else:
                    raise ViewerProtocolError(f"unexpected message {tag!r} from the coordinator")
        except (BatutaError, OSError) as exc:  # ServeError, and a certificate that cannot be used
            self._ended(str(exc), failed=True)

    def _ended(self, why: str, *, failed: bool = False) -> None:
        self.ended = why
        self.model.drain()
        self.model.set_status("failed" if failed else "closed", why)
        self.toast(why, title=f"{self.target.label}", severity="error" if failed else "warning", timeout=30)
        self.sync_now()

    async def _send(self, action: str, argument: str = "") -> None:
        if self.connection is None or self.ended:
            self.toast("not attached to a coordinator", severity="warning")
            return
        try:
            await self.connection.control(action, argument)
        except (ConnectionError, OSError) as exc:
            self.toast(f"cannot reach the coordinator: {exc}", severity="error")

    # -- what the keys do here --------------------------------------------------------------

    def start_job(self, spec: str) -> None:
        self.toast(
            "an attached view runs no jobs of its own; start one with 'batuta run JOB --serve'", severity="warning"
        )

    def running_jobs(self) -> list[str]:
        return [job.name for job in self.model.live_jobs()]

    def cancel_job(self, label: str) -> None:
        self.run_worker(self._send("cancel_job", label), group="control")

    def action_toggle_pause(self) -> None:
        self.run_worker(self._send("resume" if self.model.paused else "pause"), group="control")

    def action_drain_host(self) -> None:
        from .screens import PickerScreen

        choices = drain_choices(self.model.hosts.values())
        if not choices:
            self.toast("no host to drain", severity="warning")
            return
        self.push_screen(
            PickerScreen("Drain which host? (it gets no new work)", choices),
            lambda host: self.drain_host(host) if host else None,
        )

    def drain_host(self, host: str) -> None:
        """Drain `host` on the coordinator, or undrain it (a picker value starting with `UNDRAIN`)."""
        if host.startswith(UNDRAIN):
            self.run_worker(self._send("undrain_host", host.removeprefix(UNDRAIN)), group="control")
        else:
            self.run_worker(self._send("drain_host", host), group="control")

    def action_stop_coordinator(self) -> None:
        self.run_worker(self._send("stop"), group="control")

    def action_detach(self) -> None:
        """Leave; the coordinator and its job go on (`batuta tui --attach` comes back)."""
        self.exit()

    def palette_commands(self) -> list[PaletteCommand]:
        commands = [
            c
            for c in super().palette_commands()
            if not c.title.startswith(("Start workload", "Run a job file", "Pause scheduling", "Resume scheduling"))
        ]
        paused = self.model.paused
        commands.insert(
            0,
            PaletteCommand(
                "Resume scheduling" if paused else "Pause scheduling",
                "queued tasks wait while paused; running ones finish",
                self.action_toggle_pause,
            ),
        )
        commands.append(PaletteCommand("Detach", "leave this view; the job goes on", self.action_detach))
        commands.append(
            PaletteCommand("Stop the coordinator", "cancel its tasks, release its hosts", self.action_stop_coordinator)
        )
        return commands
