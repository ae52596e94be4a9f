"""Prometheus metrics, read back with Prometheus's own text parser and checked against a known workload.

The workload runs on a real local agent started with `BATUTA_FAKE_GPUS=2`, whose GPU
readings are deterministic, so GPU gauges and the integrated busy seconds can be checked
against the heartbeats the pool published.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from batuta import Backend, Pool, Task, TaskResult, TaskStatus
from batuta.observers.metrics import DURATION_BUCKETS, MAX_BUSY_GAP_S, MetricsExporter
from batuta.protocol.messages import GpuInfo, GpuSample, Heartbeat
from batuta.runtime import events as pe
from batuta.runtime.events import KERNELS_KEPT
from batuta.runtime.hosts import telemetry_event
from batuta.runtime.pool import PoolConfig, local_host

REPO = Path(__file__).resolve().parents[1]
NOOPS = 40
TELEMETRY_WANTED = 6
ALLOWED_LABELS = {"outcome", "kernel", "backend", "host", "slot", "state", "gpu", "name", "le"}


def parse(text: bytes) -> dict[str, list[Sample]]:
    """Samples by metric family name, via prometheus_client's parser (which validates the text)."""
    return {family.name: family.samples for family in text_string_to_metric_families(text.decode())}


def value(families: dict[str, list[Sample]], family: str, sample: str | None = None, **labels: str) -> float:
    """The one sample of `family` named `sample` (default: the family) whose labels include `labels`."""
    name = sample or family
    found = [s for s in families[family] if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0].value


@dataclass
class Workload:
    pool: Pool
    exporter: MetricsExporter
    results: list[TaskResult]
    telemetry: list[pe.HostTelemetry]


@pytest.fixture
async def workload() -> AsyncIterator[Workload]:
    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "BATUTA_FAKE_GPUS": "2",
    }
    host = local_host(2, gpus="none", kernel_modules=["tests.support.misbehaving_kernels"], env=env)
    pool = Pool([host], PoolConfig(heartbeat_interval=0.05))
    exporter = MetricsExporter(pool).attach()
    telemetry: list[pe.HostTelemetry] = []
    enough = asyncio.Event()

    def record(event: pe.PoolEvent) -> None:
        if isinstance(event, pe.HostTelemetry):
            telemetry.append(event)
            # heartbeats read in one batch share their time (seen on a loaded CI machine: no busy
            # time to integrate): enough when they span several distinct times
            if len(telemetry) >= TELEMETRY_WANTED and len({e.at for e in telemetry}) >= 3:
                enough.set()

    pool.subscribe(record)
    async with pool:
        futures = [await pool.submit(Task.kernel("noop", i)) for i in range(NOOPS)]
        futures += [await pool.submit(Task.kernel("test_raise", f"boom {i}")) for i in range(2)]
        futures.append(await pool.submit(Task.kernel("noop", 1, backend=Backend.CPU)))
        results = [await f for f in futures]
        await asyncio.wait_for(enough.wait(), 10)
        yield Workload(pool, exporter, results, telemetry)
    exporter.close()


async def test_task_counts_and_histograms_match_the_workload(workload: Workload) -> None:
    families = parse(workload.exporter.render())
    expected = Counter(
        (r.status.value, r.name, r.backend.value if r.backend else "none", r.host or "none") for r in workload.results
    )
    assert expected[("failed", "test_raise", "scalar", "local")] == 2
    got = {
        (s.labels["outcome"], s.labels["kernel"], s.labels["backend"], s.labels["host"]): s.value
        for s in families["batuta_tasks"]
        if s.name == "batuta_tasks_total"
    }
    assert got == dict(expected)

    # Duration: one observation per task that ran, by kernel and backend; buckets cumulative.
    for kernel, backend in {(r.name, r.backend.value) for r in workload.results if r.backend}:
        ran = [r for r in workload.results if r.name == kernel and r.backend and r.backend.value == backend]
        labels = {"kernel": kernel, "backend": backend}
        count = value(families, "batuta_task_duration_seconds", "batuta_task_duration_seconds_count", **labels)
        total = value(families, "batuta_task_duration_seconds", "batuta_task_duration_seconds_sum", **labels)
        assert count == len(ran) and total == pytest.approx(sum(r.duration for r in ran))
        buckets = [
            (float(s.labels["le"]), s.value)
            for s in families["batuta_task_duration_seconds"]
            if s.name.endswith("_bucket") and labels.items() <= s.labels.items()
        ]
        assert [le for le, _ in buckets] == [*DURATION_BUCKETS, math.inf]
        assert [c for _, c in buckets] == sorted(c for _, c in buckets) and buckets[-1][1] == len(ran)
        for le, c in buckets:
            assert c == sum(1 for r in ran if r.duration <= le)
    waits = sum(s.value for s in families["batuta_task_queue_wait_seconds"] if s.name.endswith("_count"))
    assert waits == len(workload.results)


async def test_pool_state_is_read_at_scrape_time(workload: Workload) -> None:
    pool = workload.pool
    families = parse(workload.exporter.render())
    stats = pool.stats()
    assert value(families, "batuta_tasks_submitted", "batuta_tasks_submitted_total") == len(workload.results)
    assert value(families, "batuta_steals", "batuta_steals_total") == stats.steals
    assert value(families, "batuta_task_retries", "batuta_task_retries_total") == 0
    assert value(families, "batuta_dropped_results", "batuta_dropped_results_total") == 0
    assert value(families, "batuta_queue_depth") == 0 and value(families, "batuta_tasks_in_flight") == 0
    assert value(families, "batuta_slots", state="up") == 2
    assert value(families, "batuta_slots", state="lost") == 0
    assert value(families, "batuta_host_up", host="local") == 1
    assert value(families, "batuta_host_state", host="local", state="up") == 1
    assert value(families, "batuta_host_state", host="local", state="lost") == 0
    assert {s.labels["slot"] for s in families["batuta_slot_queue_depth"]} == {"local/0", "local/1"}

    # Queue depth follows the pool: pause it, queue work, scrape, resume.
    pool.pause()
    futures = [await pool.submit(Task.kernel("noop", i)) for i in range(5)]
    families = parse(workload.exporter.render())
    assert value(families, "batuta_queue_depth") == pool.stats().queued == 5
    assert sum(s.value for s in families["batuta_slot_queue_depth"]) <= 5
    pool.resume()
    for future in futures:
        await future


async def test_gpu_metrics_come_from_the_latest_heartbeat_and_busy_time_integrates(workload: Workload) -> None:
    families = parse(workload.exporter.render())  # no await since the last event: the same view
    latest = workload.telemetry[-1]
    assert len(latest.gpus) == 2
    for gpu in latest.gpus:
        labels = {"host": "local", "gpu": str(gpu.index)}
        assert gpu.utilization is not None and gpu.temperature is not None and gpu.power is not None
        assert value(families, "batuta_gpu_utilization_ratio", **labels) == pytest.approx(gpu.utilization / 100)
        assert value(families, "batuta_gpu_memory_used_bytes", **labels) == gpu.memory_used
        assert value(families, "batuta_gpu_memory_total_bytes", **labels) == gpu.memory_total
        assert value(families, "batuta_gpu_temperature_celsius", **labels) == pytest.approx(gpu.temperature)
        assert value(families, "batuta_gpu_power_watts", **labels) == pytest.approx(gpu.power)
        assert value(families, "batuta_gpu_info", name=gpu.name, **labels) == 1
        expected_busy = 0.0
        previous_at: float | None = None
        for event in workload.telemetry:
            reading = next(g for g in event.gpus if g.index == gpu.index)
            if previous_at is not None and reading.utilization is not None:
                expected_busy += (event.at - previous_at) * reading.utilization / 100
            previous_at = event.at
        busy = value(families, "batuta_gpu_busy_seconds", "batuta_gpu_busy_seconds_total", **labels)
        assert expected_busy > 0 and busy == pytest.approx(expected_busy)
    cpu = value(families, "batuta_host_cpu_utilization_ratio", host="local")
    assert cpu == pytest.approx(latest.cpu_percent / 100)


async def test_no_label_is_unbounded(workload: Workload) -> None:
    text = workload.exporter.render()
    for samples in parse(text).values():
        for sample in samples:
            assert set(sample.labels) <= ALLOWED_LABELS, sample
    series = [s for s in parse(text)["batuta_tasks"] if s.name == "batuta_tasks_total"]
    assert len(series) == 3  # noop/scalar, noop/cpu, test_raise/scalar: not one per task


async def test_served_over_http_on_loopback_from_another_thread(workload: Workload) -> None:
    host, port = workload.exporter.serve(0)
    assert host == "127.0.0.1" and port > 0
    url = f"http://{host}:{port}/metrics"

    def fetch() -> bytes:
        with urllib.request.urlopen(url, timeout=10) as response:
            return bytes(response.read())

    body = await asyncio.to_thread(fetch)  # the scrape thread asks this (free) loop for a snapshot
    families = parse(body)
    assert value(families, "batuta_host_up", host="local") == 1
    assert value(families, "batuta_tasks_submitted", "batuta_tasks_submitted_total") == len(workload.results)
    with pytest.raises(RuntimeError, match="already serving"):
        workload.exporter.serve(0)
    workload.exporter.close()
    with socket.socket() as again:  # the port is released
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
    with pytest.raises(OSError):
        await asyncio.to_thread(fetch)


# -- units: synthetic events on a pool that never starts -----------------------------------


def finished(name: str, *, duration: float = 0.001, status: TaskStatus = TaskStatus.SUCCEEDED) -> pe.TaskFinished:
    result = TaskResult(
        task_id=1,
        name=name,
        status=status,
        duration=duration,
        queue_wait=0.0,
        host="h",
        slot="h/0",
        attempts=1,
        backend=Backend.CPU,
    )
    return pe.TaskFinished(result=result, at=0.0)


def idle_pool() -> Pool:
    return Pool([local_host(1, gpus="none")], PoolConfig())


def test_kernel_labels_are_capped() -> None:
    exporter = MetricsExporter(idle_pool())
    for i in range(KERNELS_KEPT + 50):
        exporter.on_event(finished(f"chunk-{i}"))
    families = parse(exporter.render())
    kernels = Counter(s.labels["kernel"] for s in families["batuta_tasks"] if s.name == "batuta_tasks_total")
    assert len(kernels) == KERNELS_KEPT + 1
    total = sum(
        s.value for s in families["batuta_tasks"] if s.name == "batuta_tasks_total" and s.labels["kernel"] == "other"
    )
    assert total == 50


def test_buckets_span_sub_millisecond_to_an_hour() -> None:
    exporter = MetricsExporter(idle_pool())
    for seconds in (0.00005, 0.0003, 2.0, 3000.0, 7200.0):
        exporter.on_event(finished("k", duration=seconds))
    exporter.on_event(finished("k", duration=0.0, status=TaskStatus.CANCELLED))  # never ran: not observed
    families = parse(exporter.render())
    buckets = {
        float(s.labels["le"]): s.value for s in families["batuta_task_duration_seconds"] if s.name.endswith("_bucket")
    }
    assert buckets[0.0001] == 1 and buckets[0.0005] == 2 and buckets[2.5] == 3 and buckets[3600.0] == 4
    assert buckets[math.inf] == 5


def gpu_event(at: float, utilization: float | None, temperature: float | None = 50.0) -> pe.HostTelemetry:
    reading = pe.GpuReading(
        index=0,
        name="G",
        utilization=utilization,
        memory_used=None,
        memory_total=1000,
        temperature=temperature,
        power=None,
    )
    return pe.HostTelemetry(
        host="h", cpu_percent=10.0, memory_used=1, memory_total=2, gpus=(reading,), gpu_status="", at=at
    )


def test_busy_seconds_skip_unknowns_and_gaps_and_unknown_gauges_are_absent() -> None:
    exporter = MetricsExporter(idle_pool())
    events = [
        gpu_event(0.0, 50.0),  # first reading: no interval yet
        gpu_event(1.0, 50.0),  # +0.5
        gpu_event(3.0, 100.0),  # +2.0
        gpu_event(4.0, None, temperature=None),  # unknown: +0, gauges absent
        gpu_event(5.0, 20.0),  # +0.2
        gpu_event(5.0 + MAX_BUSY_GAP_S + 1, 100.0),  # after a long silence: +0
        gpu_event(6.0 + MAX_BUSY_GAP_S + 1, 10.0),  # +0.1
    ]
    for event in events[:4]:
        exporter.on_event(event)
    families = parse(exporter.render())
    assert families["batuta_gpu_utilization_ratio"] == [] and families["batuta_gpu_temperature_celsius"] == []
    assert families["batuta_gpu_power_watts"] == []
    assert value(families, "batuta_gpu_memory_total_bytes", gpu="0") == 1000
    for event in events[4:]:
        exporter.on_event(event)
    families = parse(exporter.render())
    busy = value(families, "batuta_gpu_busy_seconds", "batuta_gpu_busy_seconds_total", host="h", gpu="0")
    assert busy == pytest.approx(0.5 + 2.0 + 0.2 + 0.1)
    exporter.on_event(pe.HostDown(host="h", reason="gone", at=100.0))
    families = parse(exporter.render())
    assert families["batuta_gpu_utilization_ratio"] == [] and families["batuta_host_cpu_utilization_ratio"] == []
    assert value(families, "batuta_gpu_busy_seconds", "batuta_gpu_busy_seconds_total", gpu="0") == pytest.approx(2.8)


def test_gpu_device_caches_are_gauges_from_the_heartbeat_on() -> None:
    """An agent's heartbeat, through the runtime's telemetry event, into the cache gauges."""
    hello = SimpleNamespace(gpus=(GpuInfo(index=0, name="H200"), GpuInfo(index=1, name="H200")))
    session = cast(Any, SimpleNamespace(name="gpu-1", hello=hello))
    beat = Heartbeat(
        seq=1,
        cpu_percent=10.0,
        memory_used=1,
        memory_total=2,
        gpus=(
            GpuSample(index=0, utilization=80.0, cached_values=3, cached_bytes=(5 << 30) + 7, cache_cap=100 << 30),
            GpuSample(index=1),  # no GPU slot keeps anything there
        ),
    )
    event = telemetry_event(session, beat, 1.0)
    assert [(g.cached_values, g.cached_bytes, g.cache_cap) for g in event.gpus] == [
        (3, (5 << 30) + 7, 100 << 30),
        (0, 0, 0),
    ]
    exporter = MetricsExporter(idle_pool())
    exporter.on_event(event)
    families = parse(exporter.render())
    assert value(families, "batuta_gpu_cached_bytes", host="gpu-1", gpu="0") == (5 << 30) + 7
    assert value(families, "batuta_gpu_cached_values", host="gpu-1", gpu="0") == 3
    assert value(families, "batuta_gpu_cached_bytes", host="gpu-1", gpu="1") == 0  # known: nothing kept
    assert value(families, "batuta_gpu_cached_values", host="gpu-1", gpu="1") == 0
    exporter.on_event(pe.HostDown(host="gpu-1", reason="gone", at=2.0))
    families = parse(exporter.render())
    assert families["batuta_gpu_cached_bytes"] == [] and families["batuta_gpu_cached_values"] == []


def test_each_exporter_has_its_own_registry() -> None:
    one, two = MetricsExporter(idle_pool()), MetricsExporter(idle_pool())
    one.on_event(finished("k"))
    assert b'batuta_tasks_total{backend="cpu",host="h",kernel="k",outcome="succeeded"} 1.0' in one.render()
    assert b"batuta_tasks_total{" not in two.render()


def test_no_created_series_and_the_users_own_metrics_keep_theirs() -> None:
    """Every counter and histogram had a `<name>_created` series beside it (noise on a
    dashboard); prometheus_client's switch for them is process-wide, the user's metrics too."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client import Counter as PromCounter

    mine = CollectorRegistry()  # a user's registry that batuta's metrics are added to
    theirs = PromCounter("user_jobs", "the user's own counter", registry=mine)
    theirs.inc()
    for exporter in (MetricsExporter(idle_pool()), MetricsExporter(idle_pool(), registry=mine)):
        exporter.on_event(finished("k"))
        text = exporter.render()
        assert b"batuta_tasks_total{" in text and b"batuta_task_duration_seconds_count{" in text
        assert b"_created" not in text.replace(b"user_jobs_created", b""), text
        only = generate_latest(exporter.registry.restricted_registry(["batuta_tasks_total"]))  # ?name[]= of a scrape
        assert b"batuta_tasks_total{" in only and b"_created" not in only
    assert b"user_jobs_created " in generate_latest(mine)  # the user's own counter as prometheus_client makes it


# -- batuta run --metrics-port ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


SCRAPING_JOB = """
import asyncio
import io
import urllib.request

from batuta import Task


async def main(pool):
    await pool.run(Task.kernel("noop", 1))

    def scrape():
        with urllib.request.urlopen("http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return response.read().decode()

    text = await asyncio.to_thread(scrape)  # the job scrapes its own coordinator, mid-run
    return [line for line in text.splitlines() if line.startswith(("batuta_tasks_total", "batuta_host_up"))]
"""


def test_batuta_run_serves_metrics_while_the_job_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from batuta.cli import main

    port = free_port()
    job = tmp_path / "scrape.py"
    job.write_text(SCRAPING_JOB.format(port=port))
    assert main(["run", str(job), "--json", "-q", "--metrics-port", str(port)]) == 0
    lines = json.loads(capsys.readouterr().out)["result"]
    assert 'batuta_tasks_total{backend="scalar",host="local",kernel="noop",outcome="succeeded"} 1.0' in lines
    assert 'batuta_host_up{host="local"} 1.0' in lines
    with socket.socket() as again:  # served only while the job ran
        assert again.connect_ex(("127.0.0.1", port)) != 0


def test_batuta_run_names_a_busy_metrics_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from batuta.cli import main

    job = tmp_path / "never.py"
    job.write_text("async def main(pool):\n    raise AssertionError('must not run')\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["run", str(job), "--metrics-port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot serve metrics on 127.0.0.1:{port}" in err and "--metrics-port" in err
    assert main(["run", str(job), "--metrics-port", "70000"]) == 2
    assert "not a TCP port" in capsys.readouterr().err


def test_batuta_run_says_which_port_it_picked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--metrics-port 0 picks a free port, and stderr names it (stdout stays the JSON)."""
    from batuta.cli import main

    job = tmp_path / "scrape_announced.py"
    job.write_text("import asyncio, re, sys, urllib.request\n\nasync def main(pool):\n    return 'ok'\n")
    for quiet in ([], ["--quiet"]):  # --quiet too: the port picked is said nowhere else
        assert main(["run", str(job), "--json", "--metrics-port", "0", *quiet]) == 0
        captured = capsys.readouterr()
        match = re.search(r"batuta: serving metrics at http://127\.0\.0\.1:(\d+)/metrics", captured.err)
        assert match is not None and int(match.group(1)) > 0, captured.err
        assert json.loads(captured.out)["result"] == "ok"  # stdout stays JSON only
    assert main(["run", str(job), "--metrics-bind", "0.0.0.0"]) == 2
    assert "--metrics-bind 0.0.0.0 needs --metrics-port PORT" in capsys.readouterr().err


# -- after the job: --metrics-linger, --metrics-textfile ---------------------------------------

SHORT_JOB = """
from batuta import Task


async def main(pool):
    for i in range(20):
        await pool.run(Task.kernel("noop", i))
    for _ in range(2):
        await pool.submit(Task.kernel("spin", 60.0))  # still running when the job returns
    return "done"
"""
SHORT_JOB_FINAL = {  # what a scrape must read once the job is over (the close cancels the spins)
    ("noop", "succeeded"): 20.0,
    ("spin", "cancelled"): 2.0,
    ("submitted", "any"): 22.0,
}


def final_task_counts(families: dict[str, list[Sample]]) -> dict[tuple[str, str], float]:
    """Task counts by (kernel, outcome), and the pool's submitted count (read from the pool at scrape time)."""
    counts = {
        (s.labels["kernel"], s.labels["outcome"]): s.value
        for s in families["batuta_tasks"]
        if s.name == "batuta_tasks_total"
    }
    counts["submitted", "any"] = value(families, "batuta_tasks_submitted", "batuta_tasks_submitted_total")
    return counts


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_metrics_linger_serves_the_final_counts_after_the_job_until_ctrl_c(tmp_path: Path, stop: int) -> None:
    """A job shorter than a scrape interval: its last counts are still there to scrape after it
    ended. Ctrl-C or SIGTERM (a batch system's stop; it killed the command with 143) ends that."""
    job = tmp_path / "short.py"
    job.write_text(SHORT_JOB)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "batuta", "run", str(job), "--json", "-q"]
    argv += ["--metrics-port", str(port), "--metrics-linger", "600"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        assert proc.stdout is not None
        summary = json.loads(proc.stdout.readline())  # printed once the job and its pool are over
        assert summary["ok"] and summary["result"] == "done"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            families = parse(response.read())
        assert final_task_counts(families) == SHORT_JOB_FINAL
        proc.send_signal(stop)  # ends the linger early, and the run still succeeded
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with socket.socket() as again:
        assert again.connect_ex(("127.0.0.1", port)) != 0


def test_metrics_textfile_gets_the_final_counts_in_one_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from batuta.cli import main

    job = tmp_path / "short.py"
    job.write_text(SHORT_JOB)
    folder = tmp_path / "textfile"
    folder.mkdir()
    target = folder / "batuta.prom"
    target.write_text("an older run's numbers\n")
    renames: list[tuple[Path, str]] = []
    real_replace = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) == target:  # what the collector would read at the instant of the rename
            renames.append((Path(src), Path(src).read_text()))
            assert target.read_text() == "an older run's numbers\n"  # untouched until then
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert main(["run", str(job), "--json", "-q", "--metrics-textfile", str(target)]) == 0  # no --metrics-port
    assert json.loads(capsys.readouterr().out)["ok"]
    assert len(renames) == 1 and renames[0][0].parent == folder and renames[0][1] == target.read_text()
    final = parse(target.read_bytes())
    assert final_task_counts(final) == SHORT_JOB_FINAL
    # the host as it was when the job ended, not "closed" (down, to an alert) after every job
    assert value(final, "batuta_host_up", host="local") == 1
    assert value(final, "batuta_host_state", host="local", state="up") == 1
    assert value(final, "batuta_host_state", host="local", state="closed") == 0
    assert sorted(p.name for p in folder.iterdir()) == ["batuta.prom"]  # no temporary file left


def test_bad_linger_or_textfile_is_a_one_line_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from batuta.cli import main

    job = tmp_path / "never.py"
    job.write_text("async def main(pool):\n    raise AssertionError('must not run')\n")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    cases = {
        ("--metrics-port", "0", "--metrics-linger", "-1"): "--metrics-linger -1.0 is not a number of seconds >= 0",
        ("--metrics-port", "0", "--metrics-linger", "inf"): "--metrics-linger inf is not a number of seconds >= 0",
        ("--metrics-port", "0", "--metrics-linger", "1e12"): "--metrics-linger 1e+12 is more than a week (604800 s)",
        ("--metrics-port", "0", "--metrics-linger", "soon"): "--metrics-linger: invalid float value: 'soon'",
        ("--metrics-linger", "5"): "--metrics-linger 5 needs --metrics-port PORT",
        ("--metrics-textfile", str(tmp_path / "missing" / "b.prom")): "No such file or directory",
        ("--metrics-textfile", str(not_a_folder / "b.prom")): "Not a directory",
        ("--metrics-textfile", str(tmp_path)): "it is a folder",
    }
    for options, expected in cases.items():
        assert main(["run", str(job), *options]) == 2, options
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1 and err.startswith("batuta: error: "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "never.py"]  # no probe left behind


def test_on_a_terminal_the_linger_says_so_once_then_stops_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    from batuta.jobs._run import linger_metrics

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    exporter = MetricsExporter(idle_pool())
    address = exporter.serve(0)
    exporter.freeze()
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    linger_metrics(exporter, 0.0, say=True)
    url = f"http://127.0.0.1:{address[1]}/metrics"
    assert terminal.getvalue() == f"batuta: serving the final metrics at {url} for 0 s; Ctrl-C ends it\n"
    assert exporter.address is None
    with socket.socket() as again:
        assert again.connect_ex(address) != 0


def test_host_object_store_gauges_follow_the_heartbeats() -> None:
    exporter = MetricsExporter(idle_pool())
    exporter.on_event(
        pe.HostTelemetry(
            host="h",
            cpu_percent=10.0,
            memory_used=1,
            memory_total=2,
            gpus=(),
            gpu_status="",
            at=1.0,
            objects=3,
            object_bytes=300,
            spilled_bytes=120,
        )
    )
    families = parse(exporter.render())
    assert value(families, "batuta_host_objects", host="h") == 3
    assert value(families, "batuta_host_object_bytes", host="h") == 300
    assert value(families, "batuta_host_object_spilled_bytes", host="h") == 120
