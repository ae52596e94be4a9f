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

cached and ssh_startup runs alternate, and medians are reported. The last line printed is
one JSON object with those keys, `cached_vs_ssh_startup` (ratio) and details.

    python bench/bootstrap.py [--repeats 3] [--hosts 4] [--slots 2]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--slots", type=int, default=2, help="worker processes per host")
    args = parser.parse_args()
    if not 1 <= args.repeats <= 10 or not 1 <= args.hosts <= 16:
        parser.error("--repeats must be 1..10 and --hosts 1..16")
    import batuta.runtime.cluster  # noqa: F401 - imported before the clocks

    quiet_logs()
    folder = Path(tempfile.mkdtemp(prefix="batuta-bootstrap-"))
    load_start = os.getloadavg()[0]
    try:
        python = bare_python(folder)
        prepared = asyncio.run(prepare(python))
        print(f"prepared in {prepared['prepare_s']} s: wheelhouse {prepared['wheelhouse_mb']} MB", flush=True)
        with TestHosts(args.hosts) as hosts:
            text = bootstrap_text(hosts, args.slots, folder, python)
            cpu0 = busy_cpu_s()
            bare = asyncio.run(batuta_start(hosts, args.slots, text))
            bare_cpu = busy_cpu_s() - cpu0
            settle(hosts)
            print(f"bare to ready: {bare['ready_s']:.2f} s, {bare_cpu:.1f} CPU-s", flush=True)
            cached: list[dict[str, Any]] = []
            today: list[dict[str, Any]] = []
            for index in range(args.repeats):
                cached.append(asyncio.run(batuta_start(hosts, args.slots, text)))
                settle(hosts)
                today.append(asyncio.run(batuta_start(hosts, args.slots, cluster_text(hosts, args.slots))))
                settle(hosts)
                print(
                    f"run {index + 1}: cached {cached[-1]['ready_s']:.3f} s, ssh_startup {today[-1]['ready_s']:.3f} s",
                    flush=True,
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    cached_s = statistics.median(r["ready_s"] for r in cached)
    today_s = statistics.median(r["ready_s"] for r in today)
    result = {
        "hosts": args.hosts,
        "slots_per_host": args.slots,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "host_python": prepared["python"],
        "load_average_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
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
    print(json.dumps(result))


if __name__ == "__main__":
    main()
