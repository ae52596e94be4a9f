"""Generate the README's screenshots of `batuta tui` from seeded runs.

    python scripts/screenshots.py --out screenshots/            # fake GPUs (any machine)
    python scripts/screenshots.py --out screenshots/ --gpu-real # real NVML GPUs, e.g. on an H200

Each screenshot is an SVG written by Textual's `save_screenshot`, plus a PNG when a
converter is available (the `cairosvg` module, or the `rsvg-convert` or `cairosvg`
command). The PNG is drawn from a copy of the SVG whose font is switched to an installed
monospace font, because converters do not load the web font Textual's SVG names.

Screens, at 160x50 unless noted:
  dashboard          a local pool (seed 0) running the built-in pi and demo workloads and a
                     small ingest job in which a few tasks fail; fake GPUs unless --gpu-real
  dashboard-120x40   the same run at the smallest supported size
  task-detail        the detail view of one of the ingest job's failed tasks
  command-palette    ctrl+p, listing the workloads and actions
  help               the help screen
  cluster-64-hosts   64 simulated hosts (batuta.tui.replay, seed 0): what a big cluster looks like
  cluster-256-hosts  256 simulated hosts, 1,120 GPUs: the compact nodes panel
With --gpu-real, the live screens are named `*-gpu-real` and a GPU workload (Monte Carlo pi on
the GPU slots) runs beside the demo so the utilisation history has something to show.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batuta.tui.app import BatutaApp
from batuta.tui.model import DashboardModel
from batuta.tui.replay import SyntheticCluster, replay
from batuta.tui.screens import HelpScreen, TaskDetailScreen

from batuta import Backend, Pool, Task

FAKE_GPUS_ENV = "BATUTA_FAKE_GPUS"
BIG = (160, 50)
SMALL = (120, 40)
PNG_FONT = "DejaVu Sans Mono"

INGEST_JOB = """\
'''A small ingest job for the screenshots: 60 shell steps, a few of which fail with stderr.'''
from batuta import Task


async def main(pool):
    steps = []
    for shard in range(60):
        if shard % 12 == 3:
            script = f"echo 'shard-{shard:03d}.parquet: checksum mismatch (expected 9f3c, got 11a0)' >&2; exit 2"
        else:
            script = f"sleep 0.{2 + shard % 5}"
        steps.append(await pool.submit(Task.binary("/bin/sh", "-c", script, label="ingest")))
    failed = sum(1 for step in [await s for s in steps] if not step.is_success())
    return f"{60 - failed} shards ingested, {failed} failed"
"""


async def gpu_load(pool: Pool, seconds: float = 40.0) -> str:
    """Keep the GPU slots busy (only with --gpu-real): Monte Carlo pi on the GPU.

    Compute-bound on purpose: its arguments are two integers, so the card works instead of
    waiting on copies (a vadd of shipped arrays spends its time on the wire, not the GPU).
    """
    deadline = time.monotonic() + seconds
    done = 0
    with pool.job("gpu-pi"):
        while time.monotonic() < deadline:
            batch = [
                await pool.submit(Task.kernel("mc_pi", 20_000_000_000, seed, backend=Backend.GPU))
                for seed in range(done, done + 2)
            ]
            for future in batch:
                await future
            done += len(batch)
    return f"{done} GPU Monte Carlo pi tasks"


def gpu_busy(model: DashboardModel) -> bool:
    return any((gpu.utilization or 0) > 20 for host in model.hosts.values() for gpu in host.gpus.values())


async def until(pilot: Any, predicate: Callable[[], object], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the screen did not reach the state to photograph")
        await pilot.pause(0.1)


def save(app: BatutaApp, out: Path, name: str, made: list[Path]) -> None:
    svg = out / f"{name}.svg"
    app.save_screenshot(filename=svg.name, path=str(out))
    made.append(svg)
    png = svg_to_png(svg)
    if png is not None:
        made.append(png)


def svg_to_png(svg: Path) -> Path | None:
    """Convert with whatever is installed; None (and the SVG alone) when nothing is."""
    png = svg.with_suffix(".png")
    text = svg.read_text(encoding="utf-8")
    text = re.sub(r'font-family: "?Fira Code"?(, monospace)?;', f'font-family: "{PNG_FONT}", monospace;', text)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / svg.name
        source.write_text(text, encoding="utf-8")
        if importlib.util.find_spec("cairosvg") is not None:
            import cairosvg

            cairosvg.svg2png(url=str(source), write_to=str(png))
            return png
        for command in (["rsvg-convert", "-o", str(png), str(source)], ["cairosvg", str(source), "-o", str(png)]):
            if shutil.which(command[0]) is not None:
                subprocess.run(command, check=True)
                return png
    return None


async def live_screens(out: Path, gpu_real: bool, seed: int, made: list[Path]) -> None:
    """The dashboard on a real local pool at both sizes, then the detail, palette and help screens."""
    with tempfile.TemporaryDirectory(prefix="batuta-screenshots-") as tmp:
        ingest = Path(tmp) / "jobs" / "ingest.py"  # the log panel shows this path
        ingest.parent.mkdir()
        ingest.write_text(INGEST_JOB, encoding="utf-8")
        for size in (BIG, SMALL):
            await live_run(out, size, ingest, gpu_real, seed, made)


async def live_run(out: Path, size: tuple[int, int], ingest: Path, gpu_real: bool, seed: int, made: list[Path]) -> None:
    suffix = "-gpu-real" if gpu_real else ""
    pool = Pool.builder().seed(seed).build()
    app = BatutaApp(pool, cluster_label="local (embedded)")
    async with app.run_test(size=size) as pilot:
        model = app.model
        await until(pilot, lambda: model.status == "running" and model.hosts_up() > 0)
        app.start_job("pi")
        await pilot.pause(3.0)  # some telemetry history and a finished job first
        app.start_job(str(ingest))  # slow steps: still running when the picture is taken
        app.start_job("demo")
        if gpu_real:
            app.run_worker(gpu_load(pool), group="jobs", exit_on_error=False)
        await until(pilot, lambda: len(model.failures) >= 2 and model.totals.succeeded >= 150)
        if gpu_real:  # the picture is of a card at work: wait for NVML to see it busy
            await until(pilot, lambda: gpu_busy(model))
        await pilot.pause(0.6)
        save(app, out, ("dashboard" if size == BIG else "dashboard-120x40") + suffix, made)
        if size == BIG:
            app.push_screen(TaskDetailScreen(next(reversed(model.failures.values()))))
            await pilot.pause(0.5)
            save(app, out, "task-detail" + suffix, made)
            app.pop_screen()
            await pilot.press("ctrl+p")
            await pilot.pause(0.8)
            save(app, out, "command-palette" + suffix, made)
            await pilot.press("escape")
            app.push_screen(HelpScreen())
            await pilot.pause(0.5)
            save(app, out, "help" + suffix, made)
            app.pop_screen()
        for label in app.running_jobs():
            app.cancel_job(label)
        await pilot.pause(0.3)


async def cluster_screen(out: Path, seed: int, made: list[Path], hosts: int = 64, gpus_per_host: int = 2) -> None:
    """`hosts` simulated hosts from the seeded replay: a minute of telemetry and tasks."""
    start = 10_000.0
    model = DashboardModel(clock=lambda: start + 60, cluster_label=f"cluster.toml ({hosts} hosts, simulated)")
    cluster = SyntheticCluster(hosts=hosts, gpus_per_host=gpus_per_host, seed=seed)
    replay(model.apply, cluster, start, start + 60, 3000)
    model.update_slots(cluster.slot_views(start + 60))
    model.set_status("running")
    for name in ("kmeans", "demo", "pi"):
        model.job_started(name, "built-in")
    model.job_ended("pi", "done", "pi ~ 3.141593 (off by 3.4e-06)")
    model.add_log(30, "batuta.runtime.pool", "host node17 lost: no heartbeat for 8.2s (lost after 8s)", time.time())
    model.add_log(20, "batuta.runtime.pool", "host node17 relaunched (attempt 1)", time.time())
    model.tick(start + 60)
    app = BatutaApp(model=model, cluster_label=model.cluster_label, attach_logging=False)
    async with app.run_test(size=BIG) as pilot:
        await pilot.pause(0.5)
        app.sync_now()
        await pilot.pause(0.3)
        save(app, out, f"cluster-{hosts}-hosts", made)


async def main_async(args: argparse.Namespace) -> list[Path]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.gpu_real:
        os.environ.pop(FAKE_GPUS_ENV, None)  # the agent reads NVML
    else:
        os.environ[FAKE_GPUS_ENV] = str(args.fake_gpus)
    made: list[Path] = []
    await live_screens(out, args.gpu_real, args.seed, made)
    if not args.gpu_real:
        await cluster_screen(out, args.seed, made)
        await cluster_screen(out, args.seed, made, hosts=256, gpus_per_host=5)
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", default="screenshots", help="folder for the SVG and PNG files (default: screenshots)")
    parser.add_argument("--gpu-real", action="store_true", help="use this machine's real GPUs through NVML")
    parser.add_argument("--fake-gpus", type=int, default=2, help="fake GPUs per agent without --gpu-real (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    made = asyncio.run(main_async(args))
    for path in made:
        print(path)
    if not any(p.suffix == ".png" for p in made):
        print("no SVG-to-PNG converter found (pip install cairosvg, or apt-get install librsvg2-bin): SVG only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
