"""Bare hosts to a ready pool: `bootstrap = true` on 4 namespace hosts whose Python has nothing.

4 test hosts (network namespaces with real sshd; tests/support/hosts.py), each with its own
cache folder (XDG_CACHE_HOME through the cluster file's `env`) and a PATH whose `python3`
has no batuta (/usr/bin/python3, or a fresh venv without it). The namespaces cannot reach
the package index, so each host gets its environment from the coordinator's wheelhouse,
pushed over SFTP. The wheelhouse, batuta's wheel and pip's are built on this machine before
any clock starts (they are cached; building them needs the package index here).

- bare_to_ready_s: cluster file with `bootstrap = true` -> `build_pool` -> `start()` (which
  installs on every host, in parallel) -> a task finished on each of the 2 slots per host.
- cached_ready_s: the same again, now that every host is installed (each launch checks the
  host's environment, then starts the agent on the same SSH connection).
- ssh_startup_ready_s: today's figure from bench/ssh_startup.py in the same run: the agent
  started with an explicit `python` (the coordinator's own interpreter, shared file system).

cached and ssh_startup runs alternate, and medians are reported.

Then the user's code (batuta/runtime/code.py), shipped into a running pool with `Pool.ship`.
Per repeat, one pool on the same hosts started the ssh_startup way, without the package, each
host with a new empty cache folder; once every slot is up and has run a task (the agents'
start-up is over, and not counted), then SHIP_QUIET_S later:

- ship_module_ms: `await pool.ship([package])`, from the call to its return. The package is
  generated: SHIP_MODULES plain-Python modules, 200 KB in all, its `__init__` importing every
  module, one of them registering a `@kernel` (`sb_probe`); every file names the repeat's
  version, so no host has its bytecode either. `ship` returns when every host has answered
  `CodeStored` for the new digest: the pool collected the files and sent them, and each agent
  wrote them under its cache, checked against the digest, and runs that digest from then on.
  Right after that answer, before it reads anything else (a task for the new code is handled
  after), the agent imports the package (compiling its 200 KB: 80-100 ms of CPU), answers
  `CodeLoaded`, and replaces its idle slots by forks of itself that have it. That import is
  not in the figure; it is in the next two, from the same ship call:
  - ship_imported_ms: until the last host's `CodeLoaded` (what ship_module_ms measured before
    `CodeStored`, when `ship` waited for it);
  - ship_then_task_on_every_host_ms: tasks of `sb_probe`, submitted as soon as `ship` returns,
    run until every host has returned the new version under the new digest (checked: the new
    code ran, not an old copy). This is the time to results the user waits.
- reship_after_edit_ms: the same, in the same pool, after one module of the package was
  edited (a new digest: the whole bundle travels again, there is no delta; the hosts reuse the
  bytecode of the files that did not change, see batuta/agent/code.py).

Medians over the repeats. `--ship-only` skips the bare install and the cached/ssh_startup
comparison (their keys are then absent), to iterate on the shipping figures. The last line
printed is one JSON object with every key, `cached_vs_ssh_startup` (ratio) and details.

    python bench/bootstrap.py [--repeats 3] [--hosts 4] [--slots 2] [--ship-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.ssh_startup import (  # noqa: E402
    batuta_phases,
    batuta_start,
    busy_cpu_s,
    cluster_text,
    quiet_logs,
    settle,
)
from tests.support.hosts import TestHosts  # noqa: E402


def bare_python(folder: Path) -> Path:
    """A Python 3.11+ that cannot import batuta from a plain SSH session."""
    candidates = [Path("/usr/bin/python3"), Path(sys.executable)]
    for python in candidates:
        if not python.exists():
            continue
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        check = subprocess.run(
            [str(python), "-c", "import sys; assert sys.version_info >= (3, 11); import batuta"],
            capture_output=True,
            text=True,
            cwd="/",
            env=env,
            timeout=60,
        )
        if "AssertionError" in check.stderr:
            continue
        if check.returncode != 0:
            return python
        venv = folder / "bare"
        subprocess.run([str(python), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        return venv / "bin" / "python3"
    raise SystemExit("no Python 3.11+ to stand for a bare host's python3")


def bootstrap_text(hosts: TestHosts, slots: int, folder: Path, python: Path) -> str:
    """The cluster file: every host bootstraps, each with its own cache and a bare python3."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "python3").exists():
        (bin_dir / "python3").symlink_to(python)
    parts = [
        "[defaults]",
        "bootstrap = true",
        f"slots = {slots}",
        'gpus = "none"',
        'user = "root"',
        f'identity_file = "{hosts.identity_file}"',
        "",
    ]
    for h in hosts:
        cache = folder / f"{h.name}-cache"
        parts += [
            "[[hosts]]",
            f'name = "{h.name}"',
            f'address = "{h.address}"',
            f"port = {h.port}",
            f'env = {{ XDG_CACHE_HOME = "{cache}", PATH = "{bin_dir}:/usr/bin:/bin" }}',
            "",
        ]
    parts += ["[ssh]", f'known_hosts = "{hosts.known_hosts}"', "config = false", "connect_timeout = 10", ""]
    return "\n".join(parts)


async def prepare(python: Path) -> dict[str, Any]:
    """Build (or find cached) what the hosts will need, before the clocks."""
    from batuta.runtime import wheels

    t0 = time.perf_counter()
    release = wheels.current_release()
    await wheels.batuta_wheel(release)
    wheels.pip_wheel()
    facts = subprocess.run(
        [
            str(python),
            "-c",
            "import os, platform, sys; print('%d.%d' % sys.version_info[:2], "
            "os.confstr('CS_GNU_LIBC_VERSION').split()[1], platform.machine())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    house = await wheels.wheelhouse(release, facts[0], facts[1], facts[2])
    size = sum(p.stat().st_size for p in wheels.wheel_files(house))
    return {"prepare_s": round(time.perf_counter() - t0, 2), "wheelhouse_mb": round(size / 1e6, 1), "python": facts[0]}


# -- the user's code ----------------------------------------------------------------------

SHIP_MODULES = 5  # sb_pkg/__init__.py, kernels.py (the @kernel), version.py, and filler modules
SHIP_BYTES = 200_000  # the package, all files together
SHIP_KERNEL = "sb_probe"
SHIP_TIMEOUT_S = 120.0
SHIP_ROUNDS = 20  # rounds of tasks until each host has run one


def write_package(folder: Path, version: str) -> Path:
    """The package to ship: SHIP_BYTES of plain Python in SHIP_MODULES modules; `kernels.py`
    registers SHIP_KERNEL, which returns `version.VERSION` (so a task shows which code ran)."""
    package = folder / "sb_pkg"
    package.mkdir(parents=True, exist_ok=True)
    fixed = {
        "__init__.py": "",  # importing the package imports every module (written below)
        "version.py": f"VERSION = {version!r}\n",
        "kernels.py": (
            "from batuta.kernels import kernel\n\nfrom sb_pkg import version\n\n\n"
            f"@kernel({SHIP_KERNEL!r}, description='the shipped package version and x')\n"
            f"def {SHIP_KERNEL}(x):\n    return f'{{version.VERSION}}:{{x}}'\n\n\n"
            f"{SHIP_KERNEL}.cpu({SHIP_KERNEL}.reference)\n"
        ),
    }
    fillers = [f"helpers_{i}.py" for i in range(SHIP_MODULES - len(fixed))]
    room = SHIP_BYTES - sum(len(text) for text in fixed.values())
    for name in fillers:  # plain functions, the bulk of a real package
        lines: list[str] = [f'"""Filler module {name} of version {version}: plain Python functions."""\n']
        size = len(lines[0])
        n = 0
        while size < room // len(fillers):
            body = f"    return [v * scale + {n} for v in values if v > {n % 7}]\n"
            line = f"\n\ndef step_{n}(values, scale={n}):\n{body}"
            lines.append(line)
            size += len(line)
            n += 1
        fixed[name] = "".join(lines)
    modules = ", ".join(name.removesuffix(".py") for name in sorted(fixed) if name != "__init__.py")
    fixed["__init__.py"] = f"from sb_pkg import {modules}  # noqa: F401 - a package imports its modules\n"
    for name, text in fixed.items():
        (package / name).write_text(text)
    return package


def ship_text(hosts: TestHosts, slots: int, folder: Path, index: int) -> str:
    """ssh_startup's cluster file, each host with its own cache folder, a new one per repeat."""
    out: list[str] = []
    host = iter(hosts)
    for line in cluster_text(hosts, slots).split("\n"):
        out.append(line)
        if line.startswith("port = "):
            cache = folder / f"{next(host).name}-ship-cache-{index}"
            out.append(f'env = {{ XDG_CACHE_HOME = "{cache}" }}')
    return "\n".join(out)


async def ship_into_pool(hosts: TestHosts, slots: int, text: str, package: Path, version: str) -> dict[str, Any]:
    """One pool, started without the package: ship it, then edit one module and ship again
    (see the module docstring for what is timed)."""
    from batuta import Task
    from batuta.protocol import messages as m
    from batuta.runtime.cluster import host_specs, parse_cluster
    from batuta.runtime.pool import Pool
    from batuta.runtime.session import HostSession

    stored: dict[str, float] = {}
    loaded: dict[str, float] = {}

    class ShipTimedPool(Pool):
        def host_messages(self, session: HostSession, messages: list[m.Message]) -> None:
            for message in messages:
                if isinstance(message, m.CodeStored):
                    stored[session.name] = time.perf_counter()
                elif isinstance(message, m.CodeLoaded):
                    loaded[session.name] = time.perf_counter()
            super().host_messages(session, messages)

    async def ship(pool: Pool, want: str) -> dict[str, Any]:
        stored.clear()
        loaded.clear()
        t0 = time.perf_counter()
        shipped = await pool.ship([package])
        shipped_s = time.perf_counter() - t0
        if sorted(shipped.hosts) != sorted(h.name for h in hosts):
            raise SystemExit(f"shipping failed: {shipped}")
        ran_on: set[str] = set()
        rounds = 0
        for _ in range(SHIP_ROUNDS):  # until every host has run a task of the new code
            rounds += 1
            tasks = [pool.run(Task.kernel(SHIP_KERNEL, i)) for i in range(4 * len(hosts))]
            for i, r in enumerate(await asyncio.gather(*tasks)):
                if r.value != f"{want}:{i}" or r.code != shipped.digest:  # the new code ran, not an old copy
                    raise SystemExit(f"{SHIP_KERNEL} on {r.host}: {r.status.value} {r.value!r} {r.error}")
                ran_on.add(r.host or "")
            if ran_on >= {h.name for h in hosts}:
                break
        else:
            raise SystemExit(f"{SHIP_KERNEL} ran only on {sorted(ran_on)}")
        task_on_every_host_s = time.perf_counter() - t0
        if await shipped.import_errors() or sorted(loaded) != sorted(h.name for h in hosts):
            raise SystemExit(f"importing failed: {await shipped.import_errors()}, CodeLoaded from {sorted(loaded)}")
        return {
            "ship_ms": shipped_s * 1000,
            "imported_ms": (max(loaded.values()) - t0) * 1000,
            "task_on_every_host_ms": task_on_every_host_s * 1000,
            "task_rounds": rounds,
            "code_stored_ms": {name: round((at - t0) * 1000, 1) for name, at in sorted(stored.items())},
            "code_loaded_ms": {name: round((at - t0) * 1000, 1) for name, at in sorted(loaded.items())},
        }

    cluster = parse_cluster(text, source="bench/bootstrap.py")
    pool = ShipTimedPool(host_specs(cluster), cluster.pool)
    async with asyncio.timeout(SHIP_TIMEOUT_S):
        async with pool:
            for _ in range(SHIP_ROUNDS):  # every slot up and the agents' start-up done
                await asyncio.gather(*(pool.run(Task.kernel("noop", i)) for i in range(4 * len(hosts))))
                if pool.slot_count == len(hosts) * slots:
                    break
            await asyncio.sleep(SHIP_QUIET_S)
            first = await ship(pool, version)
            edited_version = version[:-1] + "b"
            (package / "version.py").write_text(f"VERSION = {edited_version!r}\n")  # the edit: one file
            await asyncio.sleep(SHIP_QUIET_S)
            edited = await ship(pool, edited_version)
    first["bundle_bytes"] = sum(f.stat().st_size for f in package.iterdir() if f.is_file())
    return {"first": first, "edited": edited}


SHIP_QUIET_S = 0.5  # after the pool is up and between the ships: the agents' start-up and slot forks are over


def measure_shipping(hosts: TestHosts, slots: int, folder: Path, repeats: int) -> dict[str, Any]:
    """ship_module_ms and reship_after_edit_ms, medians over `repeats` (module docstring)."""
    first: list[dict[str, Any]] = []
    edited: list[dict[str, Any]] = []
    for index in range(repeats):
        text = ship_text(hosts, slots, folder, index)
        version = f"{os.getpid()}-{index}-a"  # in every file: a digest, and bytecode, no host has seen
        package = write_package(folder / f"ship-{index}", version)
        run = asyncio.run(ship_into_pool(hosts, slots, text, package, version))
        first.append(run["first"])
        edited.append(run["edited"])
        settle(hosts)
        print(
            f"ship {index + 1}: first {first[-1]['ship_ms']:.1f} ms (imported {first[-1]['imported_ms']:.1f}, "
            f"then task {first[-1]['task_on_every_host_ms']:.1f}), after an edit {edited[-1]['ship_ms']:.1f} ms "
            f"(imported {edited[-1]['imported_ms']:.1f}, then task {edited[-1]['task_on_every_host_ms']:.1f})",
            flush=True,
        )
    return {
        "ship_module_ms": round(statistics.median(r["ship_ms"] for r in first), 1),
        "reship_after_edit_ms": round(statistics.median(r["ship_ms"] for r in edited), 1),
        "ship_bundle_bytes": first[0]["bundle_bytes"],
        "ship_module_runs_ms": [round(r["ship_ms"], 1) for r in first],
        "reship_after_edit_runs_ms": [round(r["ship_ms"], 1) for r in edited],
        "ship_imported_ms": round(statistics.median(r["imported_ms"] for r in first), 1),
        "reship_imported_ms": round(statistics.median(r["imported_ms"] for r in edited), 1),
        "ship_then_task_on_every_host_ms": round(statistics.median(r["task_on_every_host_ms"] for r in first), 1),
        "reship_then_task_on_every_host_ms": round(statistics.median(r["task_on_every_host_ms"] for r in edited), 1),
        "ship_task_rounds": [r["task_rounds"] for r in first + edited],
        "ship_code_stored_ms": [r["code_stored_ms"] for r in first + edited],
        "ship_code_loaded_ms": [r["code_loaded_ms"] for r in first + edited],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--slots", type=int, default=2, help="worker processes per host")
    parser.add_argument(
        "--ship-only", action="store_true", help="only the shipping figures: no bare install, no cached/ssh_startup"
    )
    args = parser.parse_args()
    if not 1 <= args.repeats <= 10 or not 1 <= args.hosts <= 16:
        parser.error("--repeats must be 1..10 and --hosts 1..16")
    import batuta.runtime.cluster  # noqa: F401 - imported before the clocks

    quiet_logs()
    folder = Path(tempfile.mkdtemp(prefix="batuta-bootstrap-"))
    load_start = os.getloadavg()[0]
    result: dict[str, Any] = {
        "hosts": args.hosts,
        "slots_per_host": args.slots,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    try:
        if not args.ship_only:
            python = bare_python(folder)
            prepared = asyncio.run(prepare(python))
            print(f"prepared in {prepared['prepare_s']} s: wheelhouse {prepared['wheelhouse_mb']} MB", flush=True)
        with TestHosts(args.hosts) as hosts:
            if not args.ship_only:
                result.update(measure_install(hosts, args.slots, folder, python, args.repeats, prepared))
            result.update(measure_shipping(hosts, args.slots, folder, args.repeats))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["load_average_1m"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result))


def measure_install(
    hosts: TestHosts, slots: int, folder: Path, python: Path, repeats: int, prepared: dict[str, Any]
) -> dict[str, Any]:
    """bare_to_ready_s, then cached_ready_s alternated with ssh_startup_ready_s (module docstring)."""
    text = bootstrap_text(hosts, slots, folder, python)
    cpu0 = busy_cpu_s()
    bare = asyncio.run(batuta_start(hosts, slots, text))
    bare_cpu = busy_cpu_s() - cpu0
    settle(hosts)
    print(f"bare to ready: {bare['ready_s']:.2f} s, {bare_cpu:.1f} CPU-s", flush=True)
    cached: list[dict[str, Any]] = []
    today: list[dict[str, Any]] = []
    for index in range(repeats):
        cached.append(asyncio.run(batuta_start(hosts, slots, text)))
        settle(hosts)
        today.append(asyncio.run(batuta_start(hosts, slots, cluster_text(hosts, slots))))
        settle(hosts)
        print(
            f"run {index + 1}: cached {cached[-1]['ready_s']:.3f} s, ssh_startup {today[-1]['ready_s']:.3f} s",
            flush=True,
        )
    cached_s = statistics.median(r["ready_s"] for r in cached)
    today_s = statistics.median(r["ready_s"] for r in today)
    return {
        "host_python": prepared["python"],
        "wheelhouse_mb": prepared["wheelhouse_mb"],
        "bare_to_ready_s": round(bare["ready_s"], 3),
        "bare_to_ready_cpu_s": round(bare_cpu, 2),
        "cached_ready_s": round(cached_s, 4),
        "ssh_startup_ready_s": round(today_s, 4),
        "cached_vs_ssh_startup": round(cached_s / today_s, 3),
        "cached_phases_median_s": batuta_phases(cached),
        "ssh_startup_phases_median_s": batuta_phases(today),
        "cached_runs_s": [round(r["ready_s"], 4) for r in cached],
        "ssh_startup_runs_s": [round(r["ready_s"], 4) for r in today],
    }


if __name__ == "__main__":
    main()
