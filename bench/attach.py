"""Attaching dashboards to a served coordinator: time to first frame, coordinator cost, viewer lag.

Three parts, one run each; the last line printed is one JSON object.

1. attach_to_first_frame_ms. A child process serves a stand-in pool whose bus has carried a
   seeded synthetic cluster's events (batuta.tui.replay: 16 hosts, `--history-tasks` tasks,
   10,000 by default, with telemetry): the coordinator's bounded history holds all of it,
   compacted. This process then opens `AttachedApp` headless (160x50) on its socket,
   `--attaches` times: from creating the app to the end of the first frame drawn after the
   snapshot was restored (the app's frame listener). The median is reported (and the max).
2. coordinator_throughput_ratio. A real local pool (2 CPU slots) under a `CoordinatorServer`
   in this process runs `--tasks` noop tasks with no viewer, then with three viewer processes
   attached (each a headless `AttachedApp`, drawing); `--repeat` rounds alternate; the ratio is
   median(three) / median(none).
3. viewer_lag_p99_ms. In those viewers, for every 10th finished task: from its event's `at`
   (the coordinator's loop clock) to the moment the viewer decoded it into its model's inbox
   (this machine's monotonic clock plus the offset measured at hello). What the screen then
   shows follows at the app's frame pace, as for a local pool.

Targets (issue 18): first frame < 500 ms, ratio >= 0.95, lag p99 < 200 ms.

    python bench/attach.py [--history-tasks 10000] [--tasks 20000] [--repeat 3] [--attaches 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from batuta.tui import attach as attach_module
from batuta.tui.attach import AttachedApp
from batuta.tui.replay import SyntheticCluster, replay

from batuta import Pool, Task
from batuta.runtime.events import EventBus, Subscriber, TaskFinished
from batuta.runtime.serve import CoordinatorServer
from batuta.runtime.serve_client import Target
from batuta.runtime.views import HostView, SlotView

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.tui_load import percentile  # noqa: E402

SIZE = (160, 50)
SAMPLE_EVERY = 10


# -- the coordinator with history (a child process) ----------------------------------------------


class ReplayPool:
    """What `CoordinatorServer` needs of a pool, with events from a synthetic cluster."""

    def __init__(self, cluster: SyntheticCluster) -> None:
        self.bus = EventBus()
        self.cluster = cluster
        self.paused = False

    def subscribe(self, callback: Subscriber) -> Any:
        return self.bus.subscribe(callback)

    def publish(self, event: object) -> None:
        self.bus.publish(event)  # type: ignore[arg-type]  # the replay makes pool events only

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def drain(self, host: str, *, undo: bool = False) -> None:
        raise ValueError("a replay has no hosts to drain")

    def slots(self) -> list[SlotView]:
        return self.cluster.slot_views(asyncio.get_running_loop().time())

    def hosts(self) -> list[HostView]:
        return []  # the replay's hosts are known from its events alone


async def coordinator_main(path: Path, history_tasks: int) -> None:
    cluster = SyntheticCluster(hosts=16, seed=7)
    pool = ReplayPool(cluster)
    server = CoordinatorServer(pool, name="bench", job="replay", path=path, cluster_label="16 simulated hosts")
    await server.start()
    now = asyncio.get_running_loop().time()
    seconds = 20.0
    replay(
        pool.publish, cluster, now - seconds, now, history_tasks * 3.1 / seconds
    )  # a little over: the rate is jittered
    server.set_state("running")
    server.flush()
    print(f"ready {server.history.finished}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes it
    await server.close()


# -- a viewer process -------------------------------------------------------------------------------


async def viewer_main(path: Path, out: Path, nice: int) -> None:
    """A headless attached dashboard that records the lag of every 10th finished task."""
    os.nice(nice)
    lags: list[float] = []
    app = AttachedApp(Target(path=path))
    plain = attach_module.apply_items

    def timed(model: Any, items: list[Any]) -> None:
        now = time.monotonic() + app._offset
        for item in items[::SAMPLE_EVERY]:
            if type(item) is TaskFinished:
                lags.append(now - item.at)
        plain(model, items)

    attach_module.apply_items = timed
    async with app.run_test(size=SIZE) as pilot:
        while not app.snapshots:
            await pilot.pause(0.02)
        print("attached", flush=True)
        while not app.ended:
            await pilot.pause(0.05)
    out.write_text(json.dumps(lags))


# -- the parts --------------------------------------------------------------------------------------


async def first_frames(folder: Path, history_tasks: int, attaches: int) -> dict[str, Any]:
    path = folder / "history.sock"
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--role",
            "coordinator",
            "--socket",
            str(path),
            "--history-tasks",
            str(history_tasks),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        ready = child.stdout.readline().split()
        assert ready and ready[0] == "ready", ready
        timings: list[float] = []
        for _ in range(attaches):
            first: list[float] = []
            holder: list[AttachedApp] = []

            def on_frame(
                began: float, done: float, first: list[float] = first, holder: list[AttachedApp] = holder
            ) -> None:
                if holder and holder[0].snapshots and not first:
                    first.append(done)

            started = time.perf_counter()
            app = AttachedApp(Target(path=path), frame_listener=on_frame)
            holder.append(app)
            async with app.run_test(size=SIZE) as pilot:
                while not first:
                    await pilot.pause(0.005)
                timings.append((first[0] - started) * 1000)
                assert app.model.totals.succeeded > 0.9 * history_tasks  # the history is on screen
        return {
            "attach_to_first_frame_ms": statistics.median(timings),
            "attach_to_first_frame_max_ms": max(timings),
            "history_tasks": int(ready[1]),
        }
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(timeout=60)


async def noop_rate(pool: Pool, tasks: int) -> float:
    start = time.perf_counter()
    futures = [await pool.submit(Task.kernel("noop", i)) for i in range(tasks)]
    for future in futures:
        await future
    return tasks / (time.perf_counter() - start)


async def paced(pool: Pool, tasks: int, rate: float) -> float:
    """Submit `tasks` noops at about `rate` a second (a batch every 10 ms), as a steady job would."""
    start = time.perf_counter()
    futures = []
    batch = max(1, int(rate / 100))
    for first in range(0, tasks, batch):
        futures += [await pool.submit(Task.kernel("noop", i)) for i in range(first, min(first + batch, tasks))]
        await asyncio.sleep(max(0.0, start + (first + batch) / rate - time.perf_counter()))
    for future in futures:
        await future
    return tasks / (time.perf_counter() - start)


async def served_rate(
    folder: Path, tasks: int, viewers: int, run: int, lags: list[float], *, nice: int, rate: float | None = None
) -> float:
    """Tasks a second of a served local pool with `viewers` viewer processes attached."""
    path = folder / f"run{run}.sock"
    async with Pool.local(2, gpu_workers="none") as pool:
        server = CoordinatorServer(pool, name=f"run{run}", job="noop", path=path)
        await server.start()
        children = []
        try:
            await noop_rate(pool, 2000)  # warm-up: slots forked, windows grown
            for index in range(viewers):
                out = folder / f"lags{run}-{index}.json"
                child = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--role",
                    "viewer",
                    "--socket",
                    str(path),
                    "--out",
                    str(out),
                    "--nice",
                    str(nice),
                    stdout=asyncio.subprocess.PIPE,
                )
                children.append((child, out))
            for child, _out in children:
                assert child.stdout is not None
                line = await asyncio.wait_for(child.stdout.readline(), 60)
                assert line == b"attached\n", line
            achieved = await (noop_rate(pool, tasks) if rate is None else paced(pool, tasks, rate))
        finally:
            await server.close()
            for child, out in children:
                await asyncio.wait_for(child.wait(), 60)
                if out.exists():
                    lags += json.loads(out.read_text())
    return achieved


async def coordinator_cost(folder: Path, tasks: int, repeat: int, viewer_nice: int) -> dict[str, Any]:
    alone: list[float] = []
    watched: list[float] = []
    flat_out_lags: list[float] = []
    for run in range(repeat):
        alone.append(await served_rate(folder, tasks, 0, 2 * run, flat_out_lags, nice=viewer_nice))
        watched.append(await served_rate(folder, tasks, 3, 2 * run + 1, flat_out_lags, nice=viewer_nice))
    return {
        "alone_tasks_per_s": statistics.median(alone),
        "three_viewers_tasks_per_s": statistics.median(watched),
        "coordinator_throughput_ratio": statistics.median(watched) / statistics.median(alone),
        "flat_out_lag_p99_ms": percentile(flat_out_lags, 99) * 1000,
    }


async def viewer_lag(folder: Path, tasks: int, rate: float) -> dict[str, Any]:
    lags: list[float] = []
    achieved = await served_rate(folder, tasks, 3, 1000, lags, nice=0, rate=rate)
    return {
        "viewer_lag_p50_ms": percentile(lags, 50) * 1000,
        "viewer_lag_p99_ms": percentile(lags, 99) * 1000,
        "lag_samples": len(lags),
        "paced_tasks_per_s": achieved,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--role", choices=("bench", "coordinator", "viewer"), default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--socket", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--history-tasks", type=int, default=10_000, help="tasks in the coordinator's history")
    parser.add_argument("--attaches", type=int, default=5, help="attaches timed (median reported)")
    parser.add_argument("--tasks", type=int, default=20_000, help="noop tasks per throughput run")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of (no viewer, three viewers)")
    parser.add_argument("--viewer-nice", type=int, default=19, help="niceness of the viewers in the ratio runs")
    parser.add_argument("--lag-rate", type=float, default=2000.0, help="tasks a second while the lag is measured")
    parser.add_argument("--lag-tasks", type=int, default=10_000, help="tasks while the lag is measured")
    parser.add_argument("--nice", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "coordinator":
        asyncio.run(coordinator_main(args.socket, args.history_tasks))
        return
    if args.role == "viewer":
        asyncio.run(viewer_main(args.socket, args.out, args.nice))
        return
    with tempfile.TemporaryDirectory(prefix="ba") as folder:
        frames = asyncio.run(first_frames(Path(folder), args.history_tasks, args.attaches))
        print(
            f"first frame: {frames['attach_to_first_frame_ms']:.0f} ms "
            f"(max {frames['attach_to_first_frame_max_ms']:.0f}) with {frames['history_tasks']:,} tasks of history",
            file=sys.stderr,
        )
        cost = asyncio.run(coordinator_cost(Path(folder), args.tasks, args.repeat, args.viewer_nice))
        lag = asyncio.run(viewer_lag(Path(folder), args.lag_tasks, args.lag_rate))
    summary = {
        "attach_to_first_frame_ms": round(frames["attach_to_first_frame_ms"], 1),
        "coordinator_throughput_ratio": round(cost["coordinator_throughput_ratio"], 3),
        "viewer_lag_p99_ms": round(lag["viewer_lag_p99_ms"], 1),
        "attach_to_first_frame_max_ms": round(frames["attach_to_first_frame_max_ms"], 1),
        "history_tasks": frames["history_tasks"],
        "viewer_lag_p50_ms": round(lag["viewer_lag_p50_ms"], 1),
        "lag_samples": lag["lag_samples"],
        "lag_tasks_per_s": round(lag["paced_tasks_per_s"], 1),
        "flat_out_lag_p99_ms": round(cost["flat_out_lag_p99_ms"], 1),
        "viewer_nice": args.viewer_nice,
        "alone_tasks_per_s": round(cost["alone_tasks_per_s"], 1),
        "three_viewers_tasks_per_s": round(cost["three_viewers_tasks_per_s"], 1),
        "tasks": args.tasks,
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
