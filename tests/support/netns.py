"""Network plumbing for the test hosts: namespaces, veth links, guard routes, and cleanup.

What `tests.support.hosts` builds its hosts on: the address plan and names of a run's
namespaces, the ``ip`` calls that create and delete them, the machine-wide lock, finding and
killing the processes inside a namespace, and the sweep that removes what dead runs left
behind. It is separate from the sshd side (`tests.support.sshd`) and the public API
(`tests.support.hosts`) because it is the part that changes the machine's network state, so
the rules that keep that safe live here, with the code that follows them.

Safety rules:

1. **Only our addresses.** Hosts live in 10.231.0.0/16 (one /30 per host, a slot nobody else on
   the machine uses, picked under a machine-wide lock so parallel runs never collide) and on
   loopback. The namespaces get no default route, so nothing inside them reaches anything but
   their own /30. Each /30 also gets a low-priority blackhole route in the root namespace: if
   the link route ever disappears (someone sets the root end down, or
   ``ignore_routes_with_linkdown`` is on), packets for the host are dropped here instead of
   falling through to the default gateway.
2. **Bounded loops.** Every wait (sshd ready, link back, processes gone, the lock) polls the event
   itself with a deadline and an attempt cap; nothing sleeps to synchronise.
3. **Cleanup by PID and name, always.** sshd is started by ``Popen`` (``ip netns exec`` execs it,
   so the PID is sshd's) and killed by that PID; then every process whose network namespace is
   one of ours (found via ``/proc/<pid>/ns/net``, like ``ip netns pids``) is killed with SIGKILL
   and waited for; then the guard routes, veths and namespaces are deleted by name and the temp
   dir removed. This runs in ``close()``/``__exit__`` (also when the body raised, also after a
   half-finished start), in the pytest fixture's finaliser and from ``atexit``. Names carry the
   owner's PID (``bt<pid>-<n>``, at most 15 characters as veth names must be), so every start
   first sweeps what runs whose owner died (SIGKILL, power cut) left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from tests.support.host import TestHost
    from tests.support.hosts import TestHosts

SUBNET = ipaddress.IPv4Network("10.231.0.0/16")
"""Our test range: host slot k is 10.231.k.0/30 (root end .1, namespace end .2)."""
SLOTS = 256
NS_IFACE = "eth0"
GUARD_PROTO = 231
GUARD_METRIC = 4095
NETNS_DIR = Path("/run/netns")  # where `ip netns add` bind-mounts namespaces (/var/run is /run)
TMP_PREFIX = "batuta-hosts-"

READY_TIMEOUT_S = 10.0
POLL_S = 0.02
KILL_WAIT_S = 5.0
LOCK_TIMEOUT_S = 30.0
CMD_TIMEOUT_S = 30.0

_NAME_RE = re.compile(r"^bt(\d+)-(\d+)$")
_TMP_RE = re.compile(rf"^{TMP_PREFIX}(\d+)-")


class HostsUnavailable(RuntimeError):
    """This machine cannot run test hosts (not root, no ``ip``/``sshd``, no namespaces)."""


# --------------------------------------------------------------------------- tools and probes


def _tool(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    return shutil.which(name, path=path)


@functools.cache
def ip_path() -> str:
    return _tool("ip") or "ip"


def find_sshd() -> str | None:
    found = _tool("sshd")
    return os.path.abspath(found) if found else None  # sshd re-executes itself: absolute path


def run_ip(
    *args: str, netns: str | None = None, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    argv = [ip_path(), *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def run_ip_batch(lines: Sequence[str], *, netns: str | None = None, force: bool = False) -> None:
    """Run many ``ip`` commands in one process; with ``force`` keep going past errors (teardown)."""
    if lines:
        run_ip(
            *(["-force"] if force else []), "-batch", "-", netns=netns, input="\n".join(lines) + "\n", check=not force
        )


@functools.cache
def unavailable_reason() -> str | None:
    """Why test hosts cannot run here, or None when they can (probes a namespace and veth once)."""
    if not sys.platform.startswith("linux"):
        return "test hosts need Linux network namespaces"
    if os.geteuid() != 0:
        return "test hosts need root (network namespaces, veth links, sshd)"
    if _tool("ip") is None:
        return "`ip` (iproute2) not found"
    if find_sshd() is None:
        return "`sshd` (openssh-server) not found"
    try:
        import cryptography.hazmat.primitives.asymmetric.ed25519  # noqa: F401
    except ImportError as exc:
        return f"cryptography missing: {exc}"
    name = next_name()
    try:
        run_ip_batch([f"netns add {name}", f"link add {name} type veth peer name {NS_IFACE} netns {name}"])
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a network namespace and a veth link: {exc}"
    finally:
        run_ip_batch([f"link del {name}", f"netns del {name}"], force=True)
    return None


# --------------------------------------------------------------------------- names and registry

name_counter = itertools.count()
registry_lock = threading.Lock()
live_names: set[str] = set()  # namespace/veth names of this process's open runs
live_runs: list[TestHosts] = []


def next_name() -> str:
    name = f"bt{os.getpid()}-{next(name_counter) % 100_000}"
    assert len(name) <= 15, name  # IFNAMSIZ - 1: the root-side veth carries this name
    return name


def _owner_pid(name: str) -> int | None:
    match = _NAME_RE.match(name)
    return int(match.group(1)) if match else None


def _is_stale(name: str) -> bool:
    """Ours (bt<pid>-<n>) and left behind: the owner is dead, or it is us and no open run has it."""
    pid = _owner_pid(name)
    if pid is None:
        return False
    if pid == os.getpid():
        with registry_lock:
            return name not in live_names
    return not psutil.pid_exists(pid)


def _close_all_at_exit() -> None:
    with registry_lock:
        runs = [r for r in live_runs if r.owner_pid == os.getpid()]
    for run in reversed(runs):
        with contextlib.suppress(Exception):
            run.close()


atexit.register(_close_all_at_exit)


@contextlib.contextmanager
def machine_lock(required: bool = True) -> Iterator[None]:
    """Machine-wide lock around slot allocation, sweeping and teardown (flock: dies with us)."""
    directory = next((d for d in ("/run/lock", "/run") if os.path.isdir(d)), tempfile.gettempdir())
    fd = os.open(os.path.join(directory, "batuta-test-hosts.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        locked = False
        for _ in range(int(LOCK_TIMEOUT_S / POLL_S) + 1):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(POLL_S)
        if not locked and required:
            raise TimeoutError(f"test-host lock busy for {LOCK_TIMEOUT_S:.0f} s")
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- inspection


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def root_links() -> list[str]:
    out = run_ip("-o", "link", "show").stdout
    return [line.split(":", 2)[1].strip().split("@", 1)[0] for line in out.splitlines() if ":" in line]


def _root_ipv4_networks() -> list[ipaddress.IPv4Interface]:
    out = run_ip("-4", "-o", "addr", "show").stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            found.append(ipaddress.IPv4Interface(fields[fields.index("inet") + 1]))
    return found


def _route_prefixes(*selector: str) -> list[tuple[str, ipaddress.IPv4Network]]:
    """(route line, destination) for IPv4 routes in the root namespace."""
    out = run_ip("-4", "route", "show", *selector).stdout
    routes = []
    for line in out.splitlines():
        for token in line.split()[:2]:
            with contextlib.suppress(ValueError):
                routes.append((line, ipaddress.IPv4Network(token, strict=False)))
                break
    return routes


def _slots_of(net: ipaddress.IPv4Network) -> range:
    """The host slots (third octet) a network inside SUBNET touches; empty if it is not inside."""
    if not net.subnet_of(SUBNET):
        return range(0)
    first = int(net.network_address) >> 8 & 0xFF
    last = int(net.broadcast_address) >> 8 & 0xFF
    return range(first, last + 1)


def used_slots() -> set[int]:
    used: set[int] = set()
    for iface in _root_ipv4_networks():
        if iface.ip in SUBNET:
            used.add(int(iface.ip) >> 8 & 0xFF)
    for _line, net in _route_prefixes("table", "all"):
        used.update(_slots_of(net))
    return used


def _netns_ids(names: Iterable[str]) -> dict[tuple[int, int], str]:
    own = os.stat("/proc/self/ns/net")
    ids = {}
    for name in names:
        try:
            st = os.stat(NETNS_DIR / name)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            continue  # never treat our own namespace as a test host's: we'd kill everything
        ids[(st.st_dev, st.st_ino)] = name
    return ids


def pids_in_netns(names: Iterable[str]) -> dict[str, list[int]]:
    """PIDs per namespace name, by comparing /proc/<pid>/ns/net (what `ip netns pids` does)."""
    ids = _netns_ids(names)
    found: dict[str, list[int]] = {name: [] for name in ids.values()}
    if not ids:
        return found
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue
        name = ids.get((st.st_dev, st.st_ino))
        if name is not None and int(entry.name) not in (os.getpid(), 1):
            found[name].append(int(entry.name))
    return found


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE  # a zombie has left its namespace already
    except psutil.Error:
        return False


def kill_and_wait(pids: Iterable[int], timeout: float = KILL_WAIT_S) -> list[psutil.Process]:
    """SIGKILL every PID and wait (bounded) until each is gone or a zombie; returns survivors.

    Orphans are reaped by PID 1 whenever it gets to it, so a zombie counts as gone."""
    procs = []
    for pid in set(pids):
        try:
            proc = psutil.Process(pid)
            proc.send_signal(signal.SIGKILL)
            procs.append(proc)
        except psutil.Error:
            continue
    deadline = time.monotonic() + timeout
    step = 0.001
    for _ in range(int(timeout / 0.001) + 1):
        procs = [p for p in procs if _alive(p)]
        if not procs or time.monotonic() > deadline:
            break
        time.sleep(step)
        step = min(step * 2, POLL_S)
    return procs


def owned_resources(pid: int | None = None) -> dict[str, list[str]]:
    """Namespaces, root-side veths and temp dirs named after ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    tmp = Path(tempfile.gettempdir())
    return {
        "netns": [n for n in list_netns() if _owner_pid(n) == pid],
        "links": [n for n in root_links() if _owner_pid(n) == pid],
        "dirs": [str(p) for p in tmp.glob(f"{TMP_PREFIX}{pid}-*")],
    }


def sweep_locked() -> list[str]:
    removed: list[str] = []
    stale_ns = [n for n in list_netns() if _is_stale(n)]
    for name, pids in pids_in_netns(stale_ns).items():
        if pids:
            kill_and_wait(pids)
            removed.append(f"processes {sorted(pids)} in {name}")
    stale_links = [n for n in root_links() if _is_stale(n)]
    run_ip_batch([f"link del {n}" for n in stale_links] + [f"netns del {n}" for n in stale_ns], force=True)
    removed += [f"netns {n}" for n in stale_ns] + [f"link {n}" for n in stale_links]
    in_use = [iface.network for iface in _root_ipv4_networks() if iface.ip in SUBNET]
    orphan_guards = [
        net for _line, net in _route_prefixes("proto", str(GUARD_PROTO)) if _slots_of(net) and net not in in_use
    ]
    run_ip_batch(
        [f"route del blackhole {n} proto {GUARD_PROTO} metric {GUARD_METRIC}" for n in orphan_guards], force=True
    )
    removed += [f"guard route {n}" for n in orphan_guards]
    for path in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
        match = _TMP_RE.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not psutil.pid_exists(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"dir {path}")
    return removed


def sweep_stale() -> list[str]:
    """Remove what runs whose owner PID is dead left behind; returns what was removed."""
    with machine_lock():
        return sweep_locked()


def root_setup_lines(h: TestHost) -> list[str]:
    return [
        f"netns add {h.netns}",
        f"link add {h.veth} address {h.root_mac} type veth peer name {NS_IFACE} address {h.ns_mac} netns {h.netns}",
        f"addr add {h.root_address}/30 dev {h.veth}",
        f"link set {h.veth} up",
        f"neigh replace {h.address} lladdr {h.ns_mac} dev {h.veth} nud permanent",
        f"route add blackhole {h.network} proto {GUARD_PROTO} metric {GUARD_METRIC}",
    ]


def netns_setup_lines(h: TestHost) -> list[str]:
    return [
        "link set lo up",
        f"addr add {h.address}/30 dev {NS_IFACE}",
        f"link set {NS_IFACE} up",
    ]
