"""Start-up over SSH: batuta versus Dask's SSH deployment on the same namespace hosts, one run.

From nothing to every worker slot ready: 4 test hosts (network namespaces, each with a real
OpenSSH sshd; see tests/support/hosts.py), 2 single-threaded worker processes per host,
8 in all. The hosts are up before any clock starts; both systems then start cold (no agent,
worker or scheduler process exists) and are stopped, and their processes gone, before the
next start. Runs alternate batuta, Dask, batuta, Dask ... and medians are reported.

- batuta: cluster-file text -> `parse_cluster` -> `build_pool` -> `start()` -> rounds of
  8 short `spin` tasks until a task has finished on each of the 8 slots (`result.slot`).
- Dask: the pieces `SSHCluster` is made of (`SpecCluster` with
  `distributed.deploy.ssh.Worker`, `n_workers=2`, `nthreads=1`, the default Nanny,
  `remote_python=sys.executable`) with the scheduler in this process, where batuta's
  coordinator is -> `Client` -> `wait_for_workers(8)` -> `client.run(noop)` on every worker.
  `SSHCluster(hosts=[...])` itself would start the scheduler over SSH on the first host;
  these namespaces reach only the root namespace, not each other, so that layout cannot
  work here, and a local scheduler also spares Dask one SSH login and one interpreter
  start. To let every namespace reach the scheduler, each gets a /32 route to the first
  host's root-side address (inside namespaces this run created; gone with them).

Both sides pay the same per-session costs of these hosts (sshd, the login shell and its
~/.bashrc, an interpreter start); the box has 2 cores for everything, so start-up here is
mostly CPU-bound and `*_cpu_s` (machine-wide busy CPU seconds while the clock ran) is
reported next to wall time. The last line printed is one JSON object:

    batuta_ready_s, dask_ready_s, ratio (dask / batuta), plus per-run and per-phase details

Targets: batuta_ready_s < 1.0 and ratio >= 3.

    python bench/ssh_startup.py [--repeats 3] [--hosts 4] [--slots 2] [--skip-dask]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _peers import check_dask  # noqa: E402

from tests.support.hosts import TestHost, TestHosts  # noqa: E402

START_TIMEOUT_S = 60.0  # one system's whole start-up, per run
READY_ROUNDS = 200  # rounds of probe tasks before batuta's start-up counts as failed
PROBE_SPIN_S = 0.005
SETTLE_TIMEOUT_S = 15.0  # for the previous run's remote processes to exit
POLL_S = 0.02


def noop(x: Any = None) -> Any:
    return x


# -- measuring helpers ----------------------------------------------------------------------


def busy_cpu_s() -> float:
    """Machine-wide CPU seconds spent busy so far (all cores, all processes; /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def settle(hosts: TestHosts) -> dict[str, Any]:
    """Wait (bounded) until no process but sshd is left in any host's namespace; what is still
    there after SETTLE_TIMEOUT_S was started by this run's previous system: killed by PID."""
    start = time.perf_counter()
    deadline = start + SETTLE_TIMEOUT_S
    left: list[Any] = []
    for _ in range(int(SETTLE_TIMEOUT_S / POLL_S) + 1):
        left = [p for h in hosts for p in h.processes() if _running(p)]
        if not left or time.perf_counter() > deadline:
            break
        time.sleep(POLL_S)
    for proc in left:
        with contextlib.suppress(Exception):
            proc.kill()
    return {"settle_s": round(time.perf_counter() - start, 3), "killed": len(left)}


def _running(proc: Any) -> bool:
    try:
        return proc.status() != "zombie"
    except Exception:
        return False


def import_time(statement: str) -> float:
    """Seconds a fresh interpreter takes to run `statement` (the coordinator's imports)."""
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return float(out.stdout.strip())


# -- batuta ---------------------------------------------------------------------------------


def cluster_text(hosts: TestHosts, slots: int) -> str:
    """The cluster file a user would write for these hosts."""
    parts = [
        "[defaults]",
        f'python = "{sys.executable}"',
        f"slots = {slots}",
        'gpus = "none"',
        'user = "root"',
        f'identity_file = "{hosts.identity_file}"',
        "",
    ]
    for h in hosts:
        parts += ["[[hosts]]", f'name = "{h.name}"', f'address = "{h.address}"', f"port = {h.port}", ""]
    parts += ["[ssh]", f'known_hosts = "{hosts.known_hosts}"', "config = false", "connect_timeout = 10", ""]
    return "\n".join(parts)


async def batuta_start(hosts: TestHosts, slots: int, text: str | None = None) -> dict[str, Any]:
    """Cold start of a pool over `hosts` (the cluster file `text`, default `cluster_text`)
    until a task has finished on every slot; timings."""
    from batuta import Task
    from batuta.runtime import events as pe
    from batuta.runtime.cluster import host_specs, parse_cluster
    from batuta.runtime.pool import Pool
    from batuta.runtime.session import HostSpec

    expected = len(hosts) * slots
    phases: dict[str, dict[str, float]] = {h.name: {} for h in hosts}
    cpu0 = busy_cpu_s()
    t0 = time.perf_counter()

    def since() -> float:
        return round(time.perf_counter() - t0, 4)

    cluster = parse_cluster(text or cluster_text(hosts, slots), source="bench/ssh_startup.py")

    def timed(spec: HostSpec) -> HostSpec:  # the same launch, with a clock on it
        async def launch() -> Any:
            stream = await spec.launch()
            phases[spec.name]["channel_open_s"] = since()
            return stream

        return HostSpec(
            name=spec.name,
            launch=launch,
            expected_capabilities=spec.expected_capabilities,
            check_versions=spec.check_versions,
        )

    pool = Pool([timed(s) for s in host_specs(cluster)], cluster.pool)

    def on_event(event: Any) -> None:
        if isinstance(event, pe.HostUp):
            phases[event.host]["hello_s"] = since()

    pool.subscribe(on_event)
    first_done: dict[str, float] = {}
    rounds = 0
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            await pool.start()
            started_s = since()
            for rounds in range(1, READY_ROUNDS + 1):  # noqa: B007 - rounds is reported
                futures = [await pool.submit(Task.kernel("spin", PROBE_SPIN_S)) for _ in range(expected)]
                for future in futures:
                    result = await future
                    if not result.is_success():
                        raise RuntimeError(f"probe task failed: {result.describe_failure()}")
                    first_done.setdefault(str(result.slot), since())
                if len(first_done) >= expected:
                    break
            ready_s = time.perf_counter() - t0
            cpu_s = busy_cpu_s() - cpu0
            if len(first_done) < expected:
                raise RuntimeError(f"only {len(first_done)} of {expected} slots ran a task in {rounds} rounds")
    finally:
        close0 = time.perf_counter()
        await pool.close()
        close_s = time.perf_counter() - close0
    return {
        "ready_s": ready_s,
        "cpu_s": cpu_s,
        "pool_started_s": started_s,
        "probe_rounds": rounds,
        "slots": len(first_done),
        "close_s": round(close_s, 3),
        "hosts": phases,
        "first_task_done_s": dict(sorted(first_done.items())),
    }


# -- Dask -----------------------------------------------------------------------------------


def route_to_scheduler(hosts: TestHosts) -> str:
    """Give every namespace a route to the first host's root-side address; return it."""
    target = hosts[0].root_address
    for h in list(hosts)[1:]:
        h.run(["ip", "route", "replace", f"{target}/32", "via", h.root_address], check=True)
    return target


def dask_connect_options(h: TestHost) -> dict[str, Any]:
    options = h.asyncssh_options()
    options.pop("host")  # Dask passes the address itself
    return options


def dask_specs(hosts: TestHosts, slots: int, scheduler_host: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """SSHCluster's own building blocks: `slots` single-thread Nanny workers per host."""
    from distributed import Scheduler
    from distributed.deploy.ssh import Worker as SSHWorker

    workers = {
        h.name: {
            "cls": SSHWorker,
            "options": {
                "address": h.address,
                "connect_options": dask_connect_options(h),
                "kwargs": {"nthreads": 1, "n_workers": slots},
                "worker_class": "distributed.Nanny",
                "remote_python": sys.executable,
            },
        }
        for h in hosts
    }
    scheduler = {"cls": Scheduler, "options": {"host": scheduler_host, "port": 0, "dashboard": False}}
    return workers, scheduler


async def dask_start(hosts: TestHosts, slots: int, scheduler_host: str) -> dict[str, Any]:
    from distributed import Client, SpecCluster

    expected = len(hosts) * slots
    workers, scheduler = dask_specs(hosts, slots, scheduler_host)
    cpu0 = busy_cpu_s()
    t0 = time.perf_counter()
    cluster: Any = None
    client: Any = None
    marks: dict[str, float] = {}
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            cluster = SpecCluster(workers=workers, scheduler=scheduler, asynchronous=True, name="SSHCluster")
            await cluster
            marks["cluster_up_s"] = time.perf_counter() - t0
            client = await Client(cluster, asynchronous=True)
            marks["client_s"] = time.perf_counter() - t0
            await client.wait_for_workers(expected)
            marks["workers_s"] = time.perf_counter() - t0
            answers = await client.run(noop, 1)
            ready_s = time.perf_counter() - t0
            cpu_s = busy_cpu_s() - cpu0
            if len(answers) < expected or any(v != 1 for v in answers.values()):
                raise RuntimeError(f"client.run answered on {len(answers)} of {expected} workers")
    finally:
        close0 = time.perf_counter()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                await cluster.close()
        close_s = time.perf_counter() - close0
    return {
        "ready_s": ready_s,
        "cpu_s": cpu_s,
        **{k: round(v, 4) for k, v in marks.items()},
        "workers": len(answers),
        "close_s": round(close_s, 3),
    }


# -- the run --------------------------------------------------------------------------------


def quiet_logs() -> None:
    logging.basicConfig(level=logging.WARNING)
    for name in ("distributed", "asyncssh", "batuta"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--slots", type=int, default=2, help="worker processes per host")
    parser.add_argument("--warmup", type=int, default=1, help="untimed starts of each system first")
    parser.add_argument("--skip-dask", action="store_true")
    args = parser.parse_args()
    check_dask(parser, args.skip_dask)
    if not 1 <= args.repeats <= 20 or not 0 <= args.warmup <= 5:
        parser.error("--repeats must be 1..20 and --warmup 0..5")
    imports = {"batuta_coordinator_import_s": round(import_time("import batuta.runtime.cluster"), 3)}
    if not args.skip_dask:
        imports["dask_coordinator_import_s"] = round(
            import_time("import distributed, distributed.deploy.ssh, asyncssh"), 3
        )
    import batuta.runtime.cluster  # noqa: F401 - imported before the clocks, as Dask is

    if not args.skip_dask:
        import distributed.deploy.ssh  # noqa: F401
    quiet_logs()  # after the imports: distributed sets its loggers up when imported

    runs: dict[str, list[dict[str, Any]]] = {"batuta": [], "dask": []}
    settles: list[dict[str, Any]] = []
    load_start = os.getloadavg()[0]  # other work on this machine skews every number here
    with TestHosts(args.hosts) as hosts:
        scheduler_host = None if args.skip_dask else route_to_scheduler(hosts)
        systems = ["batuta"] + ([] if args.skip_dask else ["dask"])
        for index in range(args.warmup + args.repeats):
            for system in systems:
                if system == "batuta":
                    got = asyncio.run(batuta_start(hosts, args.slots))
                else:
                    assert scheduler_host is not None
                    got = asyncio.run(dask_start(hosts, args.slots, scheduler_host))
                settles.append(settle(hosts))
                timed = index >= args.warmup
                label = "" if timed else " (warm-up, not counted)"
                print(
                    f"{system:6s} run {index + 1}: ready in {got['ready_s']:.3f} s, {got['cpu_s']:.2f} CPU-s{label}",
                    flush=True,
                )
                if timed:
                    runs[system].append(got)

    batuta_ready = [r["ready_s"] for r in runs["batuta"]]
    result: dict[str, Any] = {
        "hosts": args.hosts,
        "slots_per_host": args.slots,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],  # before, after: others' load
        "batuta_ready_s": round(statistics.median(batuta_ready), 4),
        "dask_ready_s": None,
        "ratio": None,
        "batuta_ready": summary(batuta_ready),
        "batuta_cpu_s": summary([r["cpu_s"] for r in runs["batuta"]]),
        "batuta_pool_started_s": summary([r["pool_started_s"] for r in runs["batuta"]]),
        "batuta_phases_median_s": batuta_phases(runs["batuta"]),
        "batuta_runs": [_round_run(r) for r in runs["batuta"]],
        **imports,
        "settle": settles,
    }
    if runs["dask"]:
        dask_ready = [r["ready_s"] for r in runs["dask"]]
        result["dask_ready_s"] = round(statistics.median(dask_ready), 4)
        result["ratio"] = round(statistics.median(dask_ready) / statistics.median(batuta_ready), 3)
        result["dask_ready"] = summary(dask_ready)
        result["dask_cpu_s"] = summary([r["cpu_s"] for r in runs["dask"]])
        result["dask_runs"] = [_round_run(r) for r in runs["dask"]]
        result["dask_setup"] = (
            "SpecCluster + distributed.deploy.ssh.Worker (Nanny, n_workers, nthreads=1), local scheduler"
        )
    print(json.dumps(result))


def batuta_phases(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over runs of: every SSH channel open (agent command started), the first and
    the last agent's Hello, and every slot having finished a task."""

    def median_of(pick: Any) -> float:
        return round(statistics.median(pick(r) for r in runs), 4)

    return {
        "all_channels_open": median_of(lambda r: max(h["channel_open_s"] for h in r["hosts"].values())),
        "first_hello": median_of(lambda r: min(h["hello_s"] for h in r["hosts"].values())),
        "last_hello": median_of(lambda r: max(h["hello_s"] for h in r["hosts"].values())),
        "ready": median_of(lambda r: r["ready_s"]),
    }


def _round_run(run: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in run.items()}


if __name__ == "__main__":
    main()
