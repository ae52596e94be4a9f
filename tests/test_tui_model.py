"""The dashboard's view-model, histogram, alerts, log bridge and replay: no terminal, no loop.

The model is fed hand-written runtime events at fixed instants and asserted on what the
panels would read; rendering functions are checked as text with a plain palette.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace

import msgpack
import pytest
from batuta.tui import format as fmt
from batuta.tui import render, render_nodes
from batuta.tui.alerts import GPU_HOT_C, IMBALANCE_DEPTH, IMBALANCE_HOLD_S
from batuta.tui.histogram import ARRAY_FROM, LogHistogram, bucket_of
from batuta.tui.logbridge import LogBridge
from batuta.tui.model import HISTORY_S, INBOX_FOLD_AT, LATENCY_MERGE_KEYS, DashboardModel
from batuta.tui.render import Palette
from batuta.tui.replay import SyntheticCluster, replay
from rich.style import Style
from rich.text import Text

from batuta import Backend, TaskResult, TaskStatus
from batuta.runtime import events as pe
from batuta.runtime import serve_wire as wire
from batuta.runtime.views import SlotView, gpu_index_of

PLAIN = Palette.plain()


class Clock:
    """A settable clock for the model."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def result(task_id: int, status: TaskStatus = TaskStatus.SUCCEEDED, **changes: object) -> TaskResult:
    fields: dict[str, object] = {
        "task_id": task_id,
        "name": "spin",
        "status": status,
        "duration": 0.004,
        "queue_wait": 0.001,
        "host": "h1",
        "slot": "h1/0",
        "attempts": 1,
        "backend": Backend.CPU,
        "job": "demo",
    }
    fields.update(changes)
    return TaskResult(**fields)  # type: ignore[arg-type]


def lifecycle(task_id: int, at: float, status: TaskStatus = TaskStatus.SUCCEEDED, **changes: object) -> list[object]:
    job = str(changes.get("job", "demo"))
    return [
        pe.TaskQueued(task_id=task_id, name="spin", backend="cpu", at=at, job=job),
        pe.TaskStarted(task_id=task_id, name="spin", host="h1", slot="h1/0", attempt=1, at=at + 0.001, job=job),
        pe.TaskFinished(result=result(task_id, status, **changes), at=at + 0.005),
    ]


def host_up(name: str = "h1", at: float = 100.0, slots: int = 2) -> pe.HostUp:
    return pe.HostUp(
        host=name,
        slots=tuple(f"{name}/{i}" for i in range(slots)),
        gpus=(),
        cpu_count=4,
        batuta_version="test",
        python_version="3.11",
        at=at,
    )


def telemetry(name: str, at: float, gpus: tuple[pe.GpuReading, ...] = (), gpu_status: str = "") -> pe.HostTelemetry:
    return pe.HostTelemetry(
        host=name,
        cpu_percent=42.0,
        memory_used=8 * 2**30,
        memory_total=32 * 2**30,
        gpus=gpus,
        gpu_status=gpu_status,
        at=at,
    )


def gpu(index: int = 0, **changes: object) -> pe.GpuReading:
    fields: dict[str, object] = {
        "index": index,
        "name": "H100",
        "utilization": 50.0,
        "memory_used": 40 * 2**30,
        "memory_total": 80 * 2**30,
        "temperature": 60.0,
        "power": 300.0,
    }
    fields.update(changes)
    return pe.GpuReading(**fields)  # type: ignore[arg-type]


def style_at(line: Text, offset: int) -> Style | str:
    """The style of the span that covers character `offset` of `line`."""
    return next(span.style for span in reversed(line.spans) if span.start <= offset < span.end)


# -- counting ---------------------------------------------------------------------------------


def test_task_lifecycles_count_by_state_per_job_and_overall() -> None:
    model = DashboardModel(clock=Clock(101.0))
    model.apply(host_up())
    events = [
        *lifecycle(1, 100.0),
        *lifecycle(2, 100.1, TaskStatus.FAILED, error="boom"),
        *lifecycle(3, 100.2, TaskStatus.CANCELLED, job="other"),
        pe.TaskQueued(task_id=4, name="spin", backend="cpu", at=100.3, job="demo"),
        pe.TaskQueued(task_id=5, name="spin", backend="cpu", at=100.3, job="demo"),
        pe.TaskStarted(task_id=5, name="spin", host="h1", slot="h1/1", attempt=1, at=100.4, job="demo"),
    ]
    model.apply_many(events)
    demo = model.jobs["demo"]
    assert (demo.submitted, demo.queued, demo.running, demo.succeeded, demo.failed) == (4, 1, 1, 1, 1)
    assert model.jobs["other"].cancelled == 1
    assert (model.queued_count, model.running_count) == (1, 1)
    assert (model.totals.succeeded, model.totals.failed, model.totals.cancelled) == (1, 1, 1)
    assert model.busy_slots() == {"h1/1": 1}
    assert model.hosts["h1"].done == 2 and model.hosts["h1"].failed == 1  # cancelled never ran


def test_requeue_counts_a_retry_and_keeps_the_attempt_for_the_detail_view() -> None:
    model = DashboardModel(clock=Clock(101.0))
    model.apply_many(
        [
            pe.TaskQueued(task_id=7, name="spin", backend="cpu", at=100.0, job="demo"),
            pe.TaskStarted(task_id=7, name="spin", host="h1", slot="h1/0", attempt=1, at=100.1, job="demo"),
            pe.TaskRequeued(
                task_id=7, name="spin", slot="h1/0", attempts=1, reason="host h1 lost", at=100.2, job="demo"
            ),
            pe.TaskStarted(task_id=7, name="spin", host="h2", slot="h2/0", attempt=2, at=100.3, job="demo"),
            pe.TaskFinished(
                result=result(7, TaskStatus.LOST, host="h2", slot="h2/0", attempts=2, error="worker died"), at=100.4
            ),
        ]
    )
    assert model.jobs["demo"].requeued == 1 and model.totals.requeued == 1
    assert model.running_count == 0
    failed = model.failure(7)
    assert failed is not None
    assert [(a.attempt, a.slot) for a in failed.attempts] == [(1, "h1/0"), (2, "h2/0")]
    assert failed.attempts[0].outcome == "requeued: host h1 lost"


def test_stream_shows_running_tasks_before_they_finish() -> None:
    clock = Clock(101.0)
    model = DashboardModel(clock=clock)
    model.apply_many(lifecycle(1, 100.0))
    model.apply(pe.TaskStarted(task_id=2, name="mc_pi", host="h1", slot="h1/1", attempt=1, at=100.5, job="pi"))
    rows = model.stream(10)
    assert [(r.task_id, r.state) for r in rows] == [(2, "running"), (1, "succeeded")]
    text = [line.plain for line in render.stream_lines(rows, 101.0, PLAIN)]
    assert "running 500 ms" in text[0]
    assert "#1" in text[1] and "4.0 ms" in text[1]


def test_versions_move_only_for_sections_an_event_touches() -> None:
    model = DashboardModel(clock=Clock())
    before = (model.versions.hosts, model.versions.latency)
    model.apply(pe.TaskQueued(task_id=1, name="spin", backend="cpu", at=100.0, job=""))
    assert (model.versions.hosts, model.versions.latency) == before
    assert model.jobs["(no job)"].submitted == 1
    model.apply(telemetry("h1", 100.0))
    assert model.versions.hosts == before[0] + 1


# -- latency ----------------------------------------------------------------------------------


def test_histogram_percentiles_land_in_the_right_buckets() -> None:
    hist = LogHistogram()
    for _ in range(90):
        hist.add(0.001)
    for _ in range(9):
        hist.add(0.1)
    hist.add(5.0)
    p50, p95, p99 = (hist.percentile(q) for q in (50, 95, 99))
    assert p50 is not None and p95 is not None and p99 is not None
    assert bucket_of(p50) == bucket_of(0.001)
    assert bucket_of(p95) == bucket_of(0.1)
    assert bucket_of(p99) == bucket_of(0.1)
    assert hist.percentile(100) == pytest.approx(5.0)
    assert LogHistogram().percentile(50) is None
    merged = LogHistogram.merged([hist, hist])
    assert merged.total == 200 and merged.max_s == 5.0


def test_merged_histograms_equal_merging_them_one_by_one() -> None:
    parts = []
    for seed in range(40):
        part = LogHistogram()
        part.add_many([((seed * 7 + i) % 97 + 1) * 1e-4 for i in range(seed % 9 * 3)])  # some stay empty
        parts.append(part)
    one_by_one = LogHistogram()
    for part in parts:
        one_by_one.merge(part)
    merged = LogHistogram.merged(parts)
    assert merged.total == one_by_one.total > 0
    assert (merged.counts, merged.sums) == (one_by_one.counts, one_by_one.sums)
    assert (merged.sum_s, merged.max_s) == (one_by_one.sum_s, one_by_one.max_s)
    assert LogHistogram.merged([]).total == 0


def test_a_long_batch_counts_as_adding_its_values_one_by_one() -> None:
    """Batches of `ARRAY_FROM` values and more are counted with numpy; the buckets must agree."""
    values = [1e-6 * 1.37**i for i in range(120)] * 3 + [0.0, -1.0, 5e-7, 1e-6, 1e-3, 0.1, 1e4]
    assert len(values) >= ARRAY_FROM
    one_by_one, batched = LogHistogram(), LogHistogram()
    for value in values:
        one_by_one.add(value)
    batched.add_many(values)
    assert (batched.counts, batched.total, batched.max_s) == (one_by_one.counts, one_by_one.total, one_by_one.max_s)
    assert batched.sums == pytest.approx(one_by_one.sums) and batched.sum_s == pytest.approx(one_by_one.sum_s)
    assert [batched.percentile(q) for q in (50, 99)] == pytest.approx([one_by_one.percentile(q) for q in (50, 99)])


def test_latency_over_many_histograms_stays_current_as_batches_arrive() -> None:
    """Past `LATENCY_MERGE_KEYS` histograms the shown view is kept and added to, not re-merged:
    it must read the same as one merged afresh, and a filter change must rebuild it."""
    events: list[object] = []
    replay(events.append, SyntheticCluster(hosts=12, seed=2), 10.0, 14.0, 3000)
    kept, fresh = DashboardModel(clock=Clock(14.0)), DashboardModel(clock=Clock(14.0))
    half = len(events) // 2
    kept.apply_many(events[:half])
    queue, run = kept.latency()
    kept.apply_many(events[half:])
    fresh.apply_many(events)
    assert kept.latency() == (queue, run)  # the same view, brought up to date
    assert len(kept.latency_choices()["host"]) == 12 and len(kept._latency) > LATENCY_MERGE_KEYS
    fresh_queue, fresh_run = fresh.latency()
    assert (run.counts, queue.counts, run.total) == (fresh_run.counts, fresh_queue.counts, fresh_run.total)
    assert run.sum_s == pytest.approx(fresh_run.sum_s) and run.max_s == fresh_run.max_s
    kept.set_latency_filter("host", "node03")
    fresh.set_latency_filter("host", "node03")
    assert kept.latency()[1].counts == fresh.latency()[1].counts
    assert 0 < kept.latency()[1].total < run.total


def test_latency_filter_selects_by_kernel_backend_and_host() -> None:
    model = DashboardModel(clock=Clock(101.0))
    model.apply_many(lifecycle(1, 100.0, name="spin", duration=0.001))
    model.apply_many(lifecycle(2, 100.0, name="vadd", backend=Backend.GPU, host="h2", slot="h2/0", duration=0.5))
    assert model.latency()[1].total == 2
    assert model.latency_choices() == {"kernel": ["spin", "vadd"], "backend": ["cpu", "gpu"], "host": ["h1", "h2"]}
    assert model.cycle_latency_filter("kernel") == "spin"
    assert model.latency()[1].total == 1 and model.latency()[1].max_s == pytest.approx(0.001)
    model.set_latency_filter("kernel", None)
    model.set_latency_filter("backend", "gpu")
    assert model.latency()[1].max_s == pytest.approx(0.5)
    assert model.cycle_latency_filter("backend") is None  # gpu was the last value: back to all
    with pytest.raises(ValueError, match="unknown latency dimension"):
        model.cycle_latency_filter("colour")


def test_histogram_drawing_marks_the_percentiles() -> None:
    hist = LogHistogram()
    for value in [0.001] * 50 + [0.01] * 45 + [0.2] * 5:
        hist.add(value)
    lines = [line.plain for line in render.histogram_lines("run time", hist, PLAIN, 60, 3)]
    assert len(lines) == 3 + 3
    assert lines[0].startswith("run time") and "p50 1.0ms" in lines[0] and "p99 " in lines[0]
    assert lines[-2].count("▲") >= 2  # markers on the axis
    assert "1ms" in lines[-1] and "100ms" in lines[-1]


# -- hosts and GPUs ---------------------------------------------------------------------------


def test_gpu_history_keeps_sixty_seconds_and_shows_gaps() -> None:
    model = DashboardModel(clock=Clock())
    model.apply(host_up())
    for second in range(100, 170):
        if second in (150, 151):
            continue  # two missed heartbeats
        model.apply(telemetry("h1", float(second), gpus=(gpu(utilization=float(second - 100)),)))
    history = model.hosts["h1"].gpus[0].utilization_history(169.5)
    assert len(history) == HISTORY_S
    assert history[-1] == 69.0
    assert model.hosts["h1"].gpus[0].utilization_history(172.0)[-2:] == [None, None]  # silent since 169
    assert history[-(169 - 150) - 1] is None and history[-(169 - 151) - 1] is None
    assert history[0] == 10.0


def test_unknown_gpu_fields_show_as_unknown_without_hiding_the_rest() -> None:
    model = DashboardModel(clock=Clock(101.0))
    model.apply(host_up())
    model.apply(telemetry("h1", 100.5, gpus=(gpu(power=None, temperature=None),)))
    lines = [line.plain for line in render_nodes.node_lines(model, 101.0, PLAIN, 140)]
    gpu_line = lines[1]
    assert "? W" in gpu_line and "? °C" in gpu_line
    assert "50%" in gpu_line and "40.0/80.0 GiB" in gpu_line


def test_a_gpus_device_cache_shows_next_to_its_memory_dim_when_empty() -> None:
    model = DashboardModel(clock=Clock(101.0))
    model.apply(host_up())
    cached = gpu(0, cached_values=2, cached_bytes=int(1.2 * 2**30), cache_cap=40 * 2**30)
    model.apply(telemetry("h1", 100.5, gpus=(cached, gpu(1))))
    row = model.hosts["h1"].gpus[0]
    assert (row.cached_values, row.cached_bytes, row.cache_cap) == (2, int(1.2 * 2**30), 40 * 2**30)
    styled = Palette(**{name: Style(color=f"color({i})") for i, name in enumerate(Palette.names())})
    for width in (108, 118, 160):
        first, second = render_nodes.node_lines(model, 101.0, styled, width)[1:3]
        assert "40.0/80.0 GiB  cache  1.2G   60 °C   300 W" in first.plain
        assert "40.0/80.0 GiB  cache     0   60 °C" in second.plain
        assert len(first.plain) <= width  # the utilization history makes room for it
        assert style_at(first, first.plain.index("1.2G")) == styled.text
        assert style_at(second, second.plain.index("0   60 °C")) == styled.dim
    narrow = render_nodes.node_lines(model, 101.0, PLAIN, 107)[1].plain
    assert "cache" not in narrow and narrow.endswith("300 W")  # too narrow for every field: the cache goes first


def test_a_compact_host_line_sums_its_gpus_caches_where_there_is_room() -> None:
    model = DashboardModel(clock=Clock(101.0))
    model.apply(host_up())
    caches = (gpu(0, cached_bytes=3 * 2**30), gpu(1, cached_bytes=2**29), gpu(2))
    model.apply(telemetry("h1", 100.5, gpus=caches))
    wide = render_nodes.NodeRows(model, 101.0, PLAIN, 158, compact=True)[0].plain
    assert wide.endswith("GPU ▄▄▄  50%  cache 3.5G"), wide
    narrow = render_nodes.NodeRows(model, 101.0, PLAIN, 118, compact=True)[0].plain
    assert "GPU ▄▄▄  50%" in narrow and "cache" not in narrow  # every GPU's cell before the cache
    assert render_nodes.nodes_summary(model, PLAIN).plain.endswith(" · cache 3.5G")


@pytest.mark.parametrize(
    ("nbytes", "shown"),
    [(0, "0"), (512, "512B"), (1023, "1023B"), (1024, "1.0K"), (10 * 2**20, "10M"), (1023 * 2**20, "1.0G"),
     (int(1.25 * 2**30), "1.2G"), (80 * 2**30, "80G"), (5 * 2**40, "5.0T")],
)  # fmt: skip
def test_sizes_take_at_most_five_characters(nbytes: int, shown: str) -> None:
    assert fmt.size(nbytes) == shown


def test_a_host_without_gpus_says_so() -> None:
    model = DashboardModel(clock=Clock(101.0))
    model.apply(host_up())
    model.apply(telemetry("h1", 100.5, gpu_status="NVML not installed (pip install nvidia-ml-py)"))
    lines = [line.plain for line in render_nodes.node_lines(model, 101.0, PLAIN, 140)]
    assert "no GPU" in lines[1] and "NVML not installed" in lines[1]
    assert "● up" in lines[0] and "42%" in lines[0] and "0.5s" in lines[0]


NO_BATUTA = (
    "agent exited before saying hello: /opt/venvs/batuta/bin/python3: Error while finding module "
    "specification for 'batuta.agent' (ModuleNotFoundError: No module named 'batuta')"
)


@pytest.mark.parametrize("width", [60, 118])
def test_a_lost_hosts_reason_shows_whole_under_it_cause_included(width: int) -> None:
    model = DashboardModel(clock=Clock(101.0))
    model.apply(host_up())
    model.apply(pe.HostDown(host="h1", reason=NO_BATUTA, at=100.6))
    lines = render_nodes.node_lines(model, 101.0, PLAIN, width)
    assert "○ lost" in lines[0].plain and "hello" not in lines[0].plain
    under = [line.plain for line in lines[1:] if line.plain.startswith(("   └ ", "     "))]
    assert all(len(line) <= width for line in under), under  # wrapped: the panel crops nothing
    assert under[0].startswith("   └ agent exited before saying hello")
    assert " ".join(line[5:] for line in under) == NO_BATUTA


def test_a_suspected_hosts_silence_counts_on_under_it() -> None:
    """Its reason kept the 3.2 s it had when suspected while the HEARTBEAT column counted on."""
    model = DashboardModel(clock=Clock(101.0))
    model.apply(host_up())
    model.apply(telemetry("h1", 100.0))
    model.apply(pe.HostStateChanged(host="h1", state="suspected", reason="no heartbeat for 3.2s", at=103.2))
    later = [line.plain for line in render_nodes.node_lines(model, 105.7, PLAIN, 140)]
    assert later[1].strip() == "└ no heartbeat for 5.7s"


def test_a_reason_too_long_for_the_panel_loses_its_middle_not_its_cause() -> None:
    model = DashboardModel(clock=Clock(101.0))
    model.apply(host_up())
    reason = f"agent exited before saying hello: {'/very/deep' * 200}/python3: No module named 'batuta'"
    model.apply(pe.HostStateChanged(host="h1", state="retired", reason=reason, at=100.6))
    under = [line.plain for line in render_nodes.node_lines(model, 101.0, PLAIN, 80)[1:]]
    assert 1 < len(under) <= render_nodes.REASON_LINES
    assert under[0].startswith("   └ agent exited before saying hello")
    assert under[-1].endswith("No module named 'batuta'") and " … " in "".join(under)


# -- alerts -----------------------------------------------------------------------------------


def test_alerts_for_lost_hosts_full_and_hot_gpus_and_failures() -> None:
    clock = Clock(101.0)
    model = DashboardModel(clock=clock)
    model.apply_many([host_up("h1"), host_up("h2")])
    model.apply(telemetry("h1", 100.5, gpus=(gpu(memory_used=76 * 2**30, temperature=GPU_HOT_C + 2),)))
    model.apply(pe.HostDown(host="h2", reason="connection reset", at=100.6))
    model.apply_many(lifecycle(9, 100.0, TaskStatus.FAILED, error="ValueError: nope"))
    model.tick(101.0)
    titles = [(a.severity, a.title) for a in model.alerts]
    assert titles[0][0] == "error" and titles[1][0] == "error"  # errors first
    assert ("error", "host h2 lost") in titles
    assert ("error", "1 task failed in the last minute") in titles
    assert ("warning", "h1 GPU 0 memory 95%") in titles
    assert ("warning", f"h1 GPU 0 hot: {GPU_HOT_C + 2:.0f} °C") in titles
    failing = next(a for a in model.alerts if a.key == "tasks-failing")
    assert failing.task_id == 9
    clock.now = 162.0  # the failure ages out of the one-minute window
    model.tick(162.0)
    assert not any(a.key == "tasks-failing" for a in model.alerts)
    # its relaunch failed: the panel read "all clear" while the node said unreachable
    model.apply(pe.HostStateChanged(host="h2", state="unreachable", reason="no SSH session within 5s", at=163.0))
    model.tick(163.0)
    assert ("error", "host h2 unreachable") in [(a.severity, a.title) for a in model.alerts]


def test_an_unfit_host_is_an_alert_with_its_reason_still_up_and_can_be_undrained() -> None:
    """A host failing tasks for a reason of its own (core/hostfit.py) showed no alert."""
    from tui.app import UNDRAIN, drain_choices

    model = DashboardModel(clock=Clock(101.0))
    model.apply_many([host_up("h1"), host_up("h2")])
    why = "host h2 could not hold put value 1 in memory: 8 bytes; run it on a host with more free memory"
    model.apply(pe.HostStateChanged(host="h2", state="unfit", reason=why, at=100.5))
    model.tick(101.0)
    [alert] = [a for a in model.alerts if a.title == "host h2 unfit"]
    assert (alert.severity, alert.detail) == ("error", why)
    assert model.hosts_up() == 2  # still up: it runs what it is given
    assert (f"{UNDRAIN}h2", "h2 (undrain: give it work again)") in drain_choices(model.hosts.values())


def slot(slot_id: str, depth: int, in_flight: int) -> SlotView:
    return SlotView(
        slot_id=slot_id,
        host_id=slot_id.split("/")[0],
        capabilities=frozenset({"cpu"}),
        state="up",
        deque_depth=depth,
        in_flight=in_flight,
        window_limit=4,
        steals_in=0,
        steals_out=0,
        completed=0,
        mean_run_s=None,
    )


def test_a_shared_host_shows_the_gpus_its_slots_run_on_and_each_gpu_slot_names_its_gpu() -> None:
    """`gpus = [0, 2]` on a host of four: GPUs 0 and 2 get rows, 1 and 3 one line saying no
    slot runs on them (it showed four rows), and the slots' KIND reads gpu:0 and gpu:2."""
    model = DashboardModel(clock=Clock(101.0))
    model.apply(host_up("h1", slots=3))
    hot = GPU_HOT_C + 5
    readings = (gpu(0), gpu(1, temperature=hot), gpu(2), gpu(3, memory_used=79 * 2**30))
    model.apply(telemetry("h1", 100.5, gpus=readings))
    before = [line.plain for line in render_nodes.node_lines(model, 101.0, PLAIN, 140)]
    assert sum("└ GPU" in line for line in before) == 4  # its slots not seen yet: every GPU
    views = [
        slot("h1/0", 0, 0),
        replace(slot("h1/1", 0, 0), capabilities=frozenset({"gpu", "gpu:0"})),
        replace(slot("h1/2", 0, 0), capabilities=frozenset({"gpu", "gpu:2", "fast"})),
    ]
    model.update_slots(views)
    model.tick(101.0)
    lines = [line.plain for line in render_nodes.node_lines(model, 101.0, PLAIN, 140)]
    assert [line.split()[2] for line in lines[1:3]] == ["0", "2"]  # "└ GPU 0 ...", "└ GPU 2 ..."
    assert lines[3] == "   └ GPU 1, 3  unused: no slot runs on them"
    assert len(lines) == 4
    assert "2 GPUs" in render_nodes.nodes_summary(model, PLAIN).plain
    compact = render_nodes.NodeRows(model, 101.0, PLAIN, 158, compact=True)[0].plain
    assert "GPU ▄▄  50%" in compact  # two cells, not four
    assert not model.alerts  # GPU 1 runs hot and GPU 3 is full: neither is batuta's
    kinds = [line.plain.split()[1] for line in render.slot_lines(model, PLAIN, 120)]
    assert kinds == ["cpu", "gpu:0", "gpu:2"]
    # an attached dashboard (`tui --attach`) gets the slots' capabilities over the viewer wire
    sent = msgpack.packb(wire.encode_item(wire.SlotsPolled(views=tuple(views))))
    attached = wire.decode_item(msgpack.unpackb(sent), "item")
    assert isinstance(attached, wire.SlotsPolled)
    assert [gpu_index_of(v.capabilities) for v in attached.views] == [None, 0, 2]
    model.update_slots(views[:1])  # no GPU slot: every GPU on the one line
    assert render_nodes.node_lines(model, 101.0, PLAIN, 140)[1].plain.startswith("   └ GPU 0, 1, 2, 3  unused")


def test_gpu_index_of_reads_back_the_capability_of_one_gpu_only() -> None:
    assert gpu_index_of(frozenset({"gpu", "gpu:3"})) == 3
    assert gpu_index_of(frozenset({"cpu", "gpu:3"})) is None  # a CPU slot of a host tagged so
    assert gpu_index_of(frozenset({"gpu", "gpu:0", "gpu:3"})) is None  # which one: not known
    assert gpu_index_of(frozenset({"gpu", "gpu:fast"})) is None


def test_imbalance_alert_needs_to_hold_before_it_shows() -> None:
    model = DashboardModel(clock=Clock())
    model.update_slots([slot("h1/0", IMBALANCE_DEPTH + 4, 4), slot("h2/0", 0, 0)])
    model.tick(100.0)
    assert model.alerts == []  # seen once: could be a moment before a steal
    model.tick(100.0 + IMBALANCE_HOLD_S)
    assert [a.key for a in model.alerts] == ["imbalance:cpu"]
    assert "h1/0 holds 12 queued" in model.alerts[0].title
    model.update_slots([slot("h1/0", 2, 4), slot("h2/0", 2, 4)])
    model.tick(100.0 + IMBALANCE_HOLD_S + 1)
    assert model.alerts == []


# -- jobs, rates, logs ------------------------------------------------------------------------


def test_job_rate_and_eta() -> None:
    clock = Clock(100.0)
    model = DashboardModel(clock=clock)
    model.job_started("demo", "built-in")
    for index in range(100):
        model.apply(pe.TaskQueued(task_id=index, name="spin", backend="cpu", at=100.0, job="demo"))
    for index in range(50):
        at = 100.0 + index * 0.1  # 10 a second for 5 s
        model.apply(pe.TaskFinished(result=result(index), at=at))
    job = model.jobs["demo"]
    assert job.rate(105.0) == pytest.approx(10.0, rel=0.15)
    eta = job.eta(105.0)
    assert eta is not None and eta == pytest.approx(5.0, rel=0.2)
    model.job_ended("demo", "done", "ok")
    lines = [line.plain for line in render.job_lines(model, 105.0, PLAIN, 100)]
    assert "demo" in lines[0] and "done" in lines[0] and "50%" in lines[0]


def test_a_cancelled_job_shows_what_ran_not_a_full_bar() -> None:
    """Its cancelled tasks counted as finished: a job cancelled before any task ran read 100%."""
    model = DashboardModel(clock=Clock(100.0))
    model.job_started("forest", "built-in")
    for index in range(16):
        model.apply(pe.TaskQueued(task_id=index, name="tree_fit", backend="cpu", at=100.0, job="forest"))
    for index in range(4):
        model.apply(pe.TaskFinished(result=result(index, job="forest"), at=101.0))
    for index in range(4, 16):
        model.apply(pe.TaskFinished(result=result(index, TaskStatus.CANCELLED, job="forest"), at=102.0))
    model.job_ended("forest", "cancelled", "")
    [line] = [line.plain for line in render.job_lines(model, 103.0, PLAIN, 160)]
    assert " 25%" in line and "100%" not in line and "12 cancelled, never run" in line


def test_log_bridge_forwards_batuta_records_and_stays_bounded() -> None:
    model = DashboardModel(clock=Clock())
    bridge = LogBridge(model)
    logger = logging.getLogger("batuta.runtime.pool")
    bridge.attach()
    try:
        logger.info("host %s relaunched", "h1")
        logger.debug("not shown at INFO")
        logging.getLogger("elsewhere").warning("not ours")
        for index in range(model.logs.maxlen or 0):
            logger.warning("flood %d", index)
    finally:
        bridge.detach()
    logger.warning("after detach")
    assert len(model.logs) == model.logs.maxlen
    assert model.logs[-1].message == f"flood {(model.logs.maxlen or 0) - 1}"
    assert all("not" not in line.message and "after" not in line.message for line in model.logs)
    assert logging.getLogger("batuta").propagate is True


# -- replay and layering ----------------------------------------------------------------------


def test_replay_is_deterministic() -> None:
    def run() -> list[str]:
        seen: list[str] = []
        replay(lambda e: seen.append(repr(e)), SyntheticCluster(hosts=3, seed=5), 10.0, 14.0, 300)
        return seen

    first = run()
    assert first == run()
    assert sum("TaskFinished" in e for e in first) > 300
    assert any("gpu_status='no NVIDIA driver'" in e for e in first) is False  # 3 hosts: none is the 8th
    assert any("power=None" in e for e in first)


def test_view_model_and_drawing_code_import_no_textual() -> None:
    code = (
        "import sys\n"
        "import batuta.tui.model, batuta.tui.render, batuta.tui.alerts, batuta.tui.histogram\n"
        "import batuta.tui.replay, batuta.tui.logbridge, batuta.tui.format, batuta.tui.pace\n"
        "assert not [m for m in sys.modules if m == 'textual' or m.startswith('textual.')], 'textual imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_queued_events_fold_the_same_as_applied_ones() -> None:
    events: list[object] = []
    replay(events.append, SyntheticCluster(hosts=2, seed=3), 10.0, 13.0, 900)
    direct, queued = DashboardModel(clock=Clock(13.0)), DashboardModel(clock=Clock(13.0))
    direct.apply_many(events)
    for index, event in enumerate(events):
        queued.inbox(event)
        if index % 100 == 0:
            assert queued.drain() > 0
    queued.drain()
    assert queued.drain() == 0
    assert (queued.totals.succeeded, queued.totals.failed) == (direct.totals.succeeded, direct.totals.failed)
    assert [r.task_id for r in queued.stream(20)] == [r.task_id for r in direct.stream(20)]
    assert queued.latency()[1].counts == direct.latency()[1].counts
    assert list(queued.failures) == list(direct.failures)


def test_the_inbox_folds_events_in_batches_as_they_arrive_and_drain_counts_them() -> None:
    """Events must not wait for a frame to be folded (held that long, thousands of them cost
    the collector more than the folding does); `drain` still counts every one for the pace."""
    events: list[object] = []
    replay(events.append, SyntheticCluster(hosts=2, seed=3), 10.0, 11.0, 600)
    tasks = [e for e in events if isinstance(e, pe.TaskQueued | pe.TaskStarted | pe.TaskFinished)]
    model = DashboardModel(clock=Clock(11.0))
    for event in tasks[: INBOX_FOLD_AT - 1]:
        model.inbox(event)
    assert model.totals.submitted == 0  # less than a batch: queued
    model.inbox(tasks[INBOX_FOLD_AT - 1])
    assert model.totals.submitted == sum(isinstance(e, pe.TaskQueued) for e in tasks[:INBOX_FOLD_AT]) > 0
    for event in tasks[INBOX_FOLD_AT : INBOX_FOLD_AT + 5]:
        model.inbox(event)
    assert model.drain() == INBOX_FOLD_AT + 5
    assert model.drain() == 0


def test_synthetic_slot_views_depend_only_on_the_instant_and_the_slots() -> None:
    def cluster() -> SyntheticCluster:
        made = SyntheticCluster(hosts=4, seed=1)
        made.task_events(10.0, 11.0, 1000)
        return made

    first = cluster()
    views = first.slot_views(11.0)
    assert views == first.slot_views(11.0) == cluster().slot_views(11.0)
    assert any(v.in_flight for v in views) and any(not v.in_flight for v in views)
    assert views != first.slot_views(11.5)


def test_tasks_waiting_on_upstream_tasks_show_as_waiting_in_their_job() -> None:
    model = DashboardModel(clock=Clock(101.0))
    model.apply(host_up())
    model.apply_many(
        [
            pe.TaskQueued(task_id=1, name="make", backend="cpu", at=100.0, job="pipe"),
            pe.TaskQueued(task_id=2, name="step", backend="cpu", at=100.0, job="pipe", waiting_on=(1,)),
            pe.TaskQueued(task_id=3, name="step", backend="cpu", at=100.0, job="pipe", waiting_on=(2,)),
        ]
    )
    pipe = model.jobs["pipe"]
    assert (pipe.submitted, pipe.waiting, pipe.queued) == (3, 2, 1)
    assert "2 waiting on upstream" in render._job_line(pipe, 101.0, PLAIN, render.JOB_COLUMNS).plain
    model.apply_many(
        [
            pe.TaskStarted(task_id=2, name="step", host="h1", slot="h1/0", attempt=1, at=100.5, job="pipe"),
            pe.TaskFinished(result=result(3, TaskStatus.FAILED, job="pipe", error="upstream task 2 failed"), at=100.6),
        ]
    )
    assert (pipe.waiting, pipe.running, pipe.failed) == (0, 1, 1)
    assert "waiting" not in render._job_line(pipe, 101.0, PLAIN, render.JOB_COLUMNS).plain


def test_a_host_with_objects_shows_their_bytes_and_what_spilled() -> None:
    model = DashboardModel(clock=Clock(101.0))
    model.apply(host_up())
    reading = telemetry("h1", 100.5, gpu_status="none")
    model.apply(
        pe.HostTelemetry(
            **{
                **{f: getattr(reading, f) for f in reading.__dataclass_fields__},
                "objects": 3,
                "object_bytes": 3 * 2**30,
                "spilled_bytes": 2**30,
            }
        )
    )
    row = model.hosts["h1"]
    assert (row.objects, row.object_bytes, row.spilled_bytes) == (3, 3 * 2**30, 2**30)
    line = render_nodes.node_lines(model, 101.0, PLAIN, 200)[0].plain
    assert "3 obj 3.0 GiB, 1.0 GiB spilled" in line


def test_an_empty_latency_panel_says_whether_the_filter_or_the_run_is_why() -> None:
    model = DashboardModel(clock=lambda: 0.0)
    assert render.latency_empty(model) == "no finished tasks yet"
    model.latency_filter.kernel = "spin"
    model.latency_filter.backend = "cpu"
    assert render.latency_empty(model) == "no finished tasks match kernel spin · backend cpu (k b o change it)"


def test_one_host_is_one_host_in_the_summary_line() -> None:
    model = DashboardModel(clock=lambda: 0.0)
    up = pe.HostUp(host="h", slots=("h/0",), gpus=(), cpu_count=1, batuta_version="1", python_version="3", at=0.0)
    model.apply(up)
    assert render_nodes.nodes_summary(model, PLAIN).plain.startswith(" 1 host: ")


def test_the_summary_line_keeps_its_counts_on_an_80_column_terminal() -> None:
    """At 80 columns the line was cut at "failed": the count of failed tasks never showed."""
    model = DashboardModel(clock=lambda: 0.0)
    model.cluster_label = "/home/someone/clusters/lab-gpu-nodes.toml"
    model.set_status("running")
    up = pe.HostUp(host="h1", slots=("h1/1",), gpus=(), cpu_count=1, batuta_version="1", python_version="3", at=0.0)
    model.apply_many([up, *lifecycle(1, 100.0), *lifecycle(2, 100.1, TaskStatus.FAILED, error="boom")])
    wide = render.summary_line(model, 0.0, PLAIN, "0.27.0", 160).plain
    assert "batuta 0.27.0" in wide and "lab-gpu-nodes.toml" in wide and "▶ scheduling" in wide
    shown = render.summary_line(model, 0.0, PLAIN, "0.27.0", 80).plain[:80]  # the terminal cuts the rest
    assert "│ done 1 │ failed 1 │ running 0" in shown
    assert "/home/someone/clust…" in shown  # the label is cut, not the counts


def test_a_stream_row_does_not_say_its_state_twice() -> None:
    from batuta.tui.rows import StreamRow

    cancelled = StreamRow(7, "spin", "demo", "local/0", "cancelled", 0.0, detail="cancelled")
    failed = StreamRow(8, "boom", "demo", "local/0", "failed", 0.0, detail="ValueError: no")
    lines = [line.plain for line in render.stream_lines([cancelled, failed], 1.0, PLAIN)]
    assert lines[0].rstrip().endswith("cancelled") and "cancelled: cancelled" not in lines[0]
    assert lines[1].rstrip().endswith("failed: ValueError: no")


def test_the_throughput_peak_is_never_below_the_rate_shown_beside_it() -> None:
    """A burst in the second still filling read '339/s  peak 57/s'."""
    clock = Clock(100.0)
    model = DashboardModel(clock=clock)
    for index in range(50):  # 50 in the first second
        model.apply(pe.TaskFinished(result=result(index), at=100.0 + index * 0.01))
    for index in range(50, 400):  # then a burst, its second not over yet
        model.apply(pe.TaskFinished(result=result(index), at=101.0 + (index - 50) * 0.0005))
    line = render.throughput_line(model, 101.2, PLAIN, 120).plain
    rate = float(line.split("/s")[0].split()[-1].replace(",", ""))
    peak = float(line.split("peak ")[1].split("/s")[0].replace(",", ""))
    assert rate > 50 and peak >= rate, line


def test_an_80_column_jobs_panel_keeps_the_failed_count_and_the_state() -> None:
    """At 80x24 the header stopped at 'DONE  F': the failed count and the job's state were cut."""
    model = DashboardModel(clock=Clock(100.0))
    model.job_started("demo", "built-in")
    for index in range(10):
        model.apply(pe.TaskQueued(task_id=index, name="spin", backend="cpu", at=100.0, job="demo"))
    for index in range(10):
        status = TaskStatus.FAILED if index < 3 else TaskStatus.SUCCEEDED
        model.apply(pe.TaskFinished(result=result(index, status, job="demo"), at=101.0))
    model.job_ended("demo", "failed", "")
    header = render.job_header(PLAIN, 46).plain
    [line] = [line.plain for line in render.job_lines(model, 102.0, PLAIN, 46)]
    assert header.split() == ["JOB", "PROGRESS", "DONE", "FAIL", "RATE"]
    assert line.split()[:5] == ["demo", "━━━━━━", "100%", "7", "3"] and line.split()[5] == "failed", line


def test_a_host_that_is_gone_shows_no_old_readings_as_current() -> None:
    """An unreachable host's row kept its last CPU, memory and GPU figures (88%, 476 W)."""
    model = DashboardModel(clock=Clock(101.0))
    model.apply(host_up("h1"))
    model.apply(telemetry("h1", 100.5, gpus=(gpu(utilization=88.0),)))
    live = [line.plain for line in render_nodes.node_lines(model, 101.0, PLAIN, 140)]
    assert "88%" in " ".join(live)
    model.apply(pe.HostStateChanged(host="h1", state="unreachable", reason="no SSH session within 5s", at=101.0))
    gone = [line.plain for line in render_nodes.node_lines(model, 102.0, PLAIN, 140)]
    assert "88%" not in " ".join(gone) and "%" not in gone[0], gone
    assert any("GPU 0" in line and "no readings while the host is unreachable" in line for line in gone), gone
