"""Big values to and from SSH hosts: `pool.put` + `pool.get` against Dask's scatter and gather.

4 test hosts (network namespaces, each with a real OpenSSH sshd; see tests/support/hosts.py),
one worker process per host, the same hosts for both systems, one run:

- put: one float32 array of `--gib` GiB, put once and used by one task on every host (`sum`
  of it, pinned to each host by a tag), from the put call to the last sum's result. Dask:
  `client.scatter(array, workers=[w], direct=True)` to each worker, then one
  `submit(np.sum, future)` on each, from the first scatter call to the last result. Not
  `scatter(broadcast=True)`: that replicates from worker to worker, and these hosts, like
  batuta's, are reached by the coordinator but not by each other (the run hangs).
- get: the put value is dropped everywhere (Dask: its futures cancelled), then one task on
  the first host makes an array of `--gib` GiB from its length alone (`objects_make` in
  `bench/_objects_kernels.py`, `keep=True`: it stays there);
  `await pool.get(ref)` brings it back, timed alone. Dask: the same function submitted to one
  worker, then `client.gather(future)`, timed alone. The put copies are gone by then, so that
  the issue's 4 GiB fits a machine that holds the 4 copies but not 4 copies and a result
  (it was once the put array's `saxpy`, which needed them).

Throughputs count the array's bytes once per host for put (4 copies of it travel) and once for
get. `coordinator_peak_rss_mib` is this process's peak resident set during the put (VmHWM, its
high-water mark restarted just before with /proc/self/clear_refs, so that writing the source
file does not count; where that cannot be done, `ru_maxrss` over the whole batuta run),
minus nothing: the put array's pages, mapped as they are read, count in it while they stay
mapped (batuta unmaps each piece of a memory-mapped file once it has sent or hashed it:
transport/dropbehind.py). `coordinator_peak_anon_mib` leaves file pages out: the peak of the
process's anonymous resident memory (RssAnon, sampled every 5 ms during the put), i.e. what
batuta itself holds while it sends. `get_peak_over_value_mib` is what the get's peak adds
beyond the fetched value itself. The array is memory-mapped from a `.npy` file, so batuta
reads it chunk by chunk; the issue's target is a peak under 1 GiB while moving 4 GiB. The
default is 1 GiB; `--gib 4` is the issue's size (4 copies on the hosts during the put, about
17 GiB of memory at its peak; then one result and its fetched copy).

`--data-link on` (the default) sets `[ssh] data_link = "ssh"`: big values travel over
connections each agent dials back to the coordinator (transport/bulk.py), beside the SSH
channel; `off` keeps them on the channel; `both` runs batuta over the channel first too, and
reports its figures under "channel".

`--encryption` says which data links run: `tls` (`[ssh] data_link_encryption = "tls"`, the
default setting), `none` (plain TCP, both ends proving the token: transport/linkauth.py), or
`both` (this option's default: none first, so that it gains nothing from pages the other run
left mapped; then TLS). The top-level put_gbps/get_gbps are the "none" run's where there is
one: like for like with Dask, whose default comm (tcp://) is plain TCP too;
`tls_put_gbps`/`tls_get_gbps` are the TLS run's (its whole figures under "tls").
`encryption` says which run the top-level figures are.

`--dask-first` runs Dask before batuta instead of after. On a VM that hands freed memory back
to its host a few seconds after it is freed (ci-2core), fresh pages cost several times more
than pages freed a moment ago: the system that runs second finds the memory the first one
just freed, so the order favours one or the other; alternate it.

Targets (issue 15): put_gbps >= dask_scatter_gbps, get_gbps >= dask_gather_gbps,
coordinator_peak_rss_mib < 1024. The last line is one JSON object.

    python bench/objects.py [--gib 1] [--hosts 4] [--data-link on|off|both] [--encryption tls|none|both]
                            [--skip-dask]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _peers import check_dask  # noqa: E402

from bench._objects_kernels import values as object_values  # noqa: E402
from bench.ssh_startup import dask_specs, quiet_logs, route_to_scheduler, settle  # noqa: E402
from tests.support.hosts import TestHosts  # noqa: E402

RUN_TIMEOUT_S = 900.0
GIB = 1 << 30


def cluster_text(hosts: TestHosts, data_link: bool = False, encrypted: bool = True) -> str:
    """One slot per host, each host tagged with its own name so a task can be pinned to it."""
    parts = [
        "[defaults]",
        f'python = "{sys.executable}"',
        "slots = 1",
        'gpus = "none"',
        'user = "root"',
        f'identity_file = "{hosts.identity_file}"',
        'kernel_modules = ["bench._objects_kernels"]',
        f'env = {{ PYTHONPATH = "{ROOT}" }}',  # the hosts share this machine's files: bench imports there
        "",
    ]
    for h in hosts:
        parts += ["[[hosts]]", f'name = "{h.name}"', f'address = "{h.address}"', f"port = {h.port}"]
        parts += [f'tags = ["{h.name}"]', ""]
    parts += ["[ssh]", f'known_hosts = "{hosts.known_hosts}"', "config = false", "connect_timeout = 10"]
    parts += ['data_link = "ssh"', f'data_link_encryption = "{"tls" if encrypted else "none"}"'] if data_link else []
    parts += [""]
    return "\n".join(parts)


def _status_mib(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (`VmHWM`, `RssAnon`), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark (since the last `reset_peak_rss`)."""
    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Restart the high-water mark at the current resident set (Linux: clear_refs 5), so
    that a peak covers one phase, not the source file's writing before it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class AnonPeak:
    """The peak of this process's anonymous resident memory (RssAnon: its own buffers, not the
    pages of a mapped file, which VmHWM counts), sampled every `interval` seconds by a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.peak_mib = 0.0
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="anon-peak", daemon=True)

    @staticmethod
    def now_mib() -> float:
        anon = _status_mib("RssAnon")
        return anon if anon is not None else float("nan")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self.now_mib())
            self._stop.wait(self._interval)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self.now_mib())


async def batuta_run(hosts: TestHosts, path: Path, data_link: bool, encrypted: bool) -> dict[str, Any]:
    array = np.load(path, mmap_mode="r")  # a mapping of its own: none of its pages mapped yet
    from batuta import Task
    from batuta.runtime.cluster import build_pool, parse_cluster

    pool = build_pool(parse_cluster(cluster_text(hosts, data_link, encrypted), source="bench/objects.py"))
    names = [h.name for h in hosts]
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            await pool.start()
            links_up = await wait_for_links(pool, len(names)) if data_link else 0
            phases = reset_peak_rss()
            rss_before = peak_rss_mib()
            start = time.perf_counter()
            with AnonPeak() as anon:
                ref = pool.put(array)
                sums = [await pool.submit(Task.kernel("sum", ref, requires=(name,))) for name in names]
                results = [await f for f in sums]
            put_s = time.perf_counter() - start
            failed = [r for r in results if not r.is_success()]
            if failed:
                raise RuntimeError(f"a sum failed: {failed[0].describe_failure()}")
            put_peak = peak_rss_mib()
            pool.drop(ref)  # the hosts free their copies before the result is made
            made = await pool.submit(Task.kernel("objects_make", array.size, requires=(names[0],)), keep=True)
            kept = (await made).unwrap()
            if phases:
                reset_peak_rss()
            get_before = peak_rss_mib()
            start = time.perf_counter()
            back = await pool.get(kept)
            get_s = time.perf_counter() - start
            rss_peak = peak_rss_mib()
            get_over = rss_peak - get_before - back.nbytes / 2**20
            ok = _checked(back)
            del back
            pool.drop(kept)
    finally:
        await pool.close()
    if not ok:
        raise RuntimeError("batuta fetched a wrong array")
    nbytes = array.nbytes
    return {
        "put_gbps": nbytes * len(names) / put_s / 1e9,
        "get_gbps": nbytes / get_s / 1e9,
        "put_s": round(put_s, 3),
        "get_s": round(get_s, 3),
        "coordinator_peak_rss_mib": round(max(put_peak, rss_peak) if not phases else put_peak, 1),
        "rss_before_put_mib": round(rss_before, 1),
        "coordinator_peak_anon_mib": round(anon.peak_mib, 1),
        "peak_by_phase": phases,
        "get_peak_over_value_mib": round(get_over, 1) if phases else None,
        "data_link": data_link,
        "encryption": ("tls" if encrypted else "none") if data_link else None,
        "links_up": links_up,
    }


async def wait_for_links(pool: Any, count: int) -> int:
    """Until every host's data link has both directions up (they come up right after the
    handshake, so a put is not timed over the channel by accident); how many did."""
    sessions = list(pool._hosts.sessions.values())

    def up() -> int:
        return sum(1 for s in sessions if s.data_link is not None and s.data_link.directions == 2)

    async with asyncio.timeout(30):
        while up() < count:
            await asyncio.sleep(0.01)
    return up()


def _dask_make(n: int) -> np.ndarray:
    """`bench/_objects_kernels.make`, written out here: Dask sends this script's functions by
    value, and its workers cannot import `bench` (registering the module with cloudpickle to
    send it by value left the task pending for good on these hosts)."""
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, 1 << 24):
        stop = min(start + (1 << 24), n)
        out[start:stop] = (np.arange(start, stop, dtype=np.int64) % 65521).astype(np.float32) * np.float32(0.5)
    return out


def _checked(back: np.ndarray) -> bool:
    """A fetched result is `objects_make`'s: its length, and its first and last million."""
    n, head = back.size, min(back.size, 1 << 20)
    first = np.array_equal(back[:head], object_values(0, head))
    return bool(first and np.array_equal(back[n - head :], object_values(n - head, n)))


async def dask_run(hosts: TestHosts, path: Path, scheduler_host: str) -> dict[str, Any]:
    array = np.load(path, mmap_mode="r")  # its own mapping: the pages Dask maps go with it
    from distributed import Client, SpecCluster

    workers, scheduler = dask_specs(hosts, 1, scheduler_host)
    cluster: Any = None
    client: Any = None
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            cluster = SpecCluster(workers=workers, scheduler=scheduler, asynchronous=True, name="SSHCluster")
            await cluster
            client = await Client(cluster, asynchronous=True)
            await client.wait_for_workers(len(hosts))
            addresses = sorted((await client.scheduler.identity())["workers"])
            start = time.perf_counter()
            copies = [await client.scatter(array, workers=[a], direct=True, hash=False) for a in addresses]
            pairs = zip(copies, addresses, strict=True)
            sums = [client.submit(np.sum, copy, workers=[a], pure=False) for copy, a in pairs]
            await client.gather(sums)
            scatter_s = time.perf_counter() - start
            await client.cancel([*copies, *sums])  # the workers free their copies, as batuta's drop
            del copies, sums
            made = client.submit(_dask_make, array.size, workers=[addresses[0]], pure=False)
            await made  # computed there, not yet moved
            start = time.perf_counter()
            back = await client.gather(made)
            gather_s = time.perf_counter() - start
            ok = _checked(back)
            del back
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                await cluster.close()
    if not ok:
        raise RuntimeError("Dask gathered a wrong array")
    nbytes = array.nbytes
    return {
        "dask_scatter_gbps": nbytes * len(hosts) / scatter_s / 1e9,
        "dask_gather_gbps": nbytes / gather_s / 1e9,
        "scatter_s": round(scatter_s, 3),
        "gather_s": round(gather_s, 3),
    }


def _dask(hosts: TestHosts, path: Path) -> dict[str, Any]:
    theirs = asyncio.run(dask_run(hosts, path, route_to_scheduler(hosts)))
    scatter, gather = theirs["dask_scatter_gbps"], theirs["dask_gather_gbps"]
    print(f"Dask: scatter {scatter:.2f} GB/s, gather {gather:.2f} GB/s", flush=True)
    return theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the array, GiB (the issue's: 4)")
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--skip-dask", action="store_true")
    parser.add_argument("--dask-first", action="store_true", help="run Dask before batuta (see above)")
    parser.add_argument("--data-link", choices=("on", "off", "both"), default="on", help="[ssh] data_link (see above)")
    parser.add_argument(
        "--encryption", choices=("tls", "none", "both"), default="both", help="[ssh] data_link_encryption (see above)"
    )
    args = parser.parse_args()
    check_dask(parser, args.skip_dask)
    if not 0 < args.gib <= 64:
        parser.error("--gib must be in (0, 64]")
    import batuta.runtime.cluster  # noqa: F401

    quiet_logs()
    count = int(args.gib * GIB) // 4
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="batuta-objects-") as tmp:
        path = Path(tmp) / "array.npy"
        source = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count,))
        step = 1 << 24
        rng = np.random.default_rng(0)
        for i in range(0, count, step):  # written in slices: the file, not this process, holds it
            source[i : i + step] = rng.random(min(step, count - i), dtype=np.float32)
        source.flush()
        del source
        encryptions = {"tls": [True], "none": [False], "both": [False, True]}[args.encryption]
        runs = [(True, encrypted) for encrypted in encryptions] if args.data_link != "off" else []
        runs = ([(False, True)] if args.data_link != "on" else []) + runs
        with TestHosts(args.hosts) as hosts:
            theirs: dict[str, Any] = {}
            if args.dask_first and not args.skip_dask:
                theirs = _dask(hosts, path)
            measured: dict[str, dict[str, Any]] = {}  # "channel", "tls", "none"
            for run, (link, encrypted) in enumerate(runs):
                if run or theirs:
                    settle(hosts)  # the previous run's agents gone
                ours = asyncio.run(batuta_run(hosts, path, link, encrypted))
                kind = ("tls" if encrypted else "none") if link else "channel"
                measured[kind] = ours
                print(
                    f"batuta ({f'data link, {kind}' if link else 'SSH channel'}): put {ours['put_gbps']:.2f} GB/s, "
                    f"get {ours['get_gbps']:.2f} GB/s, coordinator peak RSS {ours['coordinator_peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
            if not args.skip_dask and not args.dask_first:
                settle(hosts)
                theirs = _dask(hosts, path)
    top = next(kind for kind in ("none", "tls", "channel") if kind in measured)
    ours, tls = measured[top], measured.get("tls", {})
    summary = {
        "put_gbps": round(ours["put_gbps"], 3),
        "dask_scatter_gbps": round(theirs["dask_scatter_gbps"], 3) if theirs else None,
        "get_gbps": round(ours["get_gbps"], 3),
        "dask_gather_gbps": round(theirs["dask_gather_gbps"], 3) if theirs else None,
        "tls_put_gbps": round(tls["put_gbps"], 3) if tls else None,
        "tls_get_gbps": round(tls["get_gbps"], 3) if tls else None,
        "coordinator_peak_rss_mib": ours["coordinator_peak_rss_mib"],
        "coordinator_peak_anon_mib": ours["coordinator_peak_anon_mib"],
        "gib": args.gib,
        "hosts": args.hosts,
        "data_link": args.data_link != "off",
        "encryption": top if top != "channel" else None,
        "batuta": ours,
        "tls": tls,
        "channel": measured.get("channel", {}),
        "dask": theirs,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_at_start": round(load_start, 2),
        "dask_first": args.dask_first,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
