"""Real SSH test hosts: one Linux network namespace, one veth link and one OpenSSH ``sshd`` per host.

Multi-host tests (SSH transport, chaos, benchmarks) run against real OpenSSH servers, each in a
network namespace this module creates and removes itself. It needs root, ``ip`` (iproute2) and
``sshd`` (openssh-server); the namespaces share the file system, so ``sys.executable`` works
inside them.

Topology, per host ``i`` of a run (``k`` is a free /30 slot, ``n`` a per-process counter)::

    root namespace (tests, coordinator)               namespace bt<pid>-<n>
    ------------------------------------              ------------------------------
    veth bt<pid>-<n>  10.231.k.1/30  <====veth====>   eth0  10.231.k.2/30
      neighbour 10.231.k.2 fixed (no ARP)             lo    127.0.0.1 (up)
    route blackhole 10.231.k.0/30 metric 4095         sshd -D -e -f <run dir>/host<i>/sshd_config
      proto 231 (guard, see rule 1)                     listening on 10.231.k.2:22

    host<i>.address = 10.231.k.2   host<i>.root_address = 10.231.k.1   host<i>.port = 22

Per run, in a fresh temp dir ``batuta-hosts-<pid>-*``: one client ed25519 key (``identity_file``,
0600, also the only line of ``authorized_keys``), one ed25519 host key per host, ``known_hosts``
with every host's key (under its alias and its address) and ``ssh_config`` with a ``Host`` alias
per host (``host0``, ``host1``, ...: HostName, User root, Port, IdentityFile, UserKnownHostsFile,
``StrictHostKeyChecking yes``). Keys come from ``cryptography`` in process (microseconds each).

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

``cut_link()`` sets the *namespace* end of the veth down. The root end loses carrier but stays
up, so its /30 route stays and packets to the host are silently dropped (the neighbour entry is
fixed, so there is no ARP failure either): new connects time out and open connections stall, as
when a cable is pulled. Setting the root end down instead would remove the route and send the
packets to the default gateway (or, with the guard, fail at once with EINVAL) rather than time out.

Use from pytest (fixture in ``tests/support/conftest_hosts.py``, registered in tests/conftest.py)::

    async def test_x(ssh_hosts):
        hosts = ssh_hosts(3)                    # skips without root/ip/sshd; fails if CI=true
        conn = await asyncssh.connect(**hosts[0].asyncssh_options())

Use from a script (``bench/...``; put the repo root on ``sys.path`` first)::

    from tests.support.hosts import TestHosts
    with TestHosts(4) as hosts:
        subprocess.run(["ssh", "-F", str(hosts.ssh_config), "host0", "true"], check=True)

``python -m tests.support.hosts --count 4 --hold`` brings hosts up by hand and prints how to reach
them; ``python -m tests.support.hosts --sweep`` only removes what dead runs left behind.
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
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

__all__ = [
    "SUBNET",
    "HostsUnavailable",
    "TestHost",
    "TestHosts",
    "owned_resources",
    "sweep_stale",
    "unavailable_reason",
]

SUBNET = ipaddress.IPv4Network("10.231.0.0/16")
"""Our test range: host slot k is 10.231.k.0/30 (root end .1, namespace end .2)."""
SLOTS = 256
SSH_PORT = 22
SSH_USER = "root"
NS_IFACE = "eth0"
GUARD_PROTO = 231
GUARD_METRIC = 4095
NETNS_DIR = Path("/run/netns")  # where `ip netns add` bind-mounts namespaces (/var/run is /run)
TMP_PREFIX = "batuta-hosts-"
PRIVSEP_DIR = Path("/run/sshd")

READY_TIMEOUT_S = 10.0
POLL_S = 0.02
PROBE_TIMEOUT_S = 0.25
KILL_WAIT_S = 5.0
LOCK_TIMEOUT_S = 30.0
CMD_TIMEOUT_S = 30.0

_NAME_RE = re.compile(r"^bt(\d+)-(\d+)$")
_TMP_RE = re.compile(rf"^{TMP_PREFIX}(\d+)-")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class HostsUnavailable(RuntimeError):
    """This machine cannot run test hosts (not root, no ``ip``/``sshd``, no namespaces)."""


# --------------------------------------------------------------------------- tools and probes


def _tool(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    return shutil.which(name, path=path)


@functools.cache
def _ip_path() -> str:
    return _tool("ip") or "ip"


def _find_sshd() -> str | None:
    found = _tool("sshd")
    return os.path.abspath(found) if found else None  # sshd re-executes itself: absolute path


def _ip(
    *args: str, netns: str | None = None, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    argv = [_ip_path(), *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _ip_batch(lines: Sequence[str], *, netns: str | None = None, force: bool = False) -> None:
    """Run many ``ip`` commands in one process; with ``force`` keep going past errors (teardown)."""
    if lines:
        _ip(*(["-force"] if force else []), "-batch", "-", netns=netns, input="\n".join(lines) + "\n", check=not force)


@functools.cache
def unavailable_reason() -> str | None:
    """Why test hosts cannot run here, or None when they can (probes a namespace and veth once)."""
    if not sys.platform.startswith("linux"):
        return "test hosts need Linux network namespaces"
    if os.geteuid() != 0:
        return "test hosts need root (network namespaces, veth links, sshd)"
    if _tool("ip") is None:
        return "`ip` (iproute2) not found"
    if _find_sshd() is None:
        return "`sshd` (openssh-server) not found"
    try:
        import cryptography.hazmat.primitives.asymmetric.ed25519  # noqa: F401
    except ImportError as exc:
        return f"cryptography missing: {exc}"
    name = _next_name()
    try:
        _ip_batch([f"netns add {name}", f"link add {name} type veth peer name {NS_IFACE} netns {name}"])
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a network namespace and a veth link: {exc}"
    finally:
        _ip_batch([f"link del {name}", f"netns del {name}"], force=True)
    return None


# --------------------------------------------------------------------------- names and registry

_counter = itertools.count()
_registry_lock = threading.Lock()
_live_names: set[str] = set()  # namespace/veth names of this process's open runs
_live_runs: list[TestHosts] = []


def _next_name() -> str:
    name = f"bt{os.getpid()}-{next(_counter) % 100_000}"
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
        with _registry_lock:
            return name not in _live_names
    return not psutil.pid_exists(pid)


def _close_all_at_exit() -> None:
    with _registry_lock:
        runs = [r for r in _live_runs if r.owner_pid == os.getpid()]
    for run in reversed(runs):
        with contextlib.suppress(Exception):
            run.close()


atexit.register(_close_all_at_exit)


@contextlib.contextmanager
def _machine_lock(required: bool = True) -> Iterator[None]:
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


def _list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _root_links() -> list[str]:
    out = _ip("-o", "link", "show").stdout
    return [line.split(":", 2)[1].strip().split("@", 1)[0] for line in out.splitlines() if ":" in line]


def _root_ipv4_networks() -> list[ipaddress.IPv4Interface]:
    out = _ip("-4", "-o", "addr", "show").stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            found.append(ipaddress.IPv4Interface(fields[fields.index("inet") + 1]))
    return found


def _route_prefixes(*selector: str) -> list[tuple[str, ipaddress.IPv4Network]]:
    """(route line, destination) for IPv4 routes in the root namespace."""
    out = _ip("-4", "route", "show", *selector).stdout
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


def _used_slots() -> set[int]:
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


def _pids_in_netns(names: Iterable[str]) -> dict[str, list[int]]:
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


def _kill_and_wait(pids: Iterable[int], timeout: float = KILL_WAIT_S) -> list[psutil.Process]:
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
        "netns": [n for n in _list_netns() if _owner_pid(n) == pid],
        "links": [n for n in _root_links() if _owner_pid(n) == pid],
        "dirs": [str(p) for p in tmp.glob(f"{TMP_PREFIX}{pid}-*")],
    }


def _sweep_locked() -> list[str]:
    removed: list[str] = []
    stale_ns = [n for n in _list_netns() if _is_stale(n)]
    for name, pids in _pids_in_netns(stale_ns).items():
        if pids:
            _kill_and_wait(pids)
            removed.append(f"processes {sorted(pids)} in {name}")
    stale_links = [n for n in _root_links() if _is_stale(n)]
    _ip_batch([f"link del {n}" for n in stale_links] + [f"netns del {n}" for n in stale_ns], force=True)
    removed += [f"netns {n}" for n in stale_ns] + [f"link {n}" for n in stale_links]
    in_use = [iface.network for iface in _root_ipv4_networks() if iface.ip in SUBNET]
    orphan_guards = [
        net for _line, net in _route_prefixes("proto", str(GUARD_PROTO)) if _slots_of(net) and net not in in_use
    ]
    _ip_batch([f"route del blackhole {n} proto {GUARD_PROTO} metric {GUARD_METRIC}" for n in orphan_guards], force=True)
    removed += [f"guard route {n}" for n in orphan_guards]
    for path in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
        match = _TMP_RE.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not psutil.pid_exists(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"dir {path}")
    return removed


def sweep_stale() -> list[str]:
    """Remove what runs whose owner PID is dead left behind; returns what was removed."""
    with _machine_lock():
        return _sweep_locked()


# --------------------------------------------------------------------------- keys and files


def _ed25519(comment: str) -> tuple[bytes, str]:
    """(OpenSSH private key bytes, public key line) for a fresh ed25519 key."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption())
    public = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    return private, f"{public} {comment}"


def _write(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Write atomically (temp file + rename) with ``mode`` from the start."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _check_token(value: str, what: str) -> str:
    if not value or any(c in value for c in ' \t\n"\\#'):
        raise ValueError(f"{what} must be one sshd_config token without spaces, quotes or '#': {value!r}")
    return value


def _wait_banner(address: str, port: int, deadline: float, proc: subprocess.Popen[bytes] | None, what: str) -> None:
    """Poll a TCP connect to address:port until an SSH banner comes back (bounded)."""
    last: Exception | None = None
    for _ in range(int(max(0.0, deadline - time.monotonic()) / POLL_S) + 2):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: sshd exited with {proc.returncode} before it was ready")
        try:
            with socket.create_connection((address, port), timeout=PROBE_TIMEOUT_S) as sock:
                if sock.recv(8).startswith(b"SSH-"):
                    return
        except OSError as exc:
            last = exc
        if time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    raise TimeoutError(f"{what}: {address}:{port} not answering SSH ({last})")


# --------------------------------------------------------------------------- one host


class TestHost:
    """One SSH host: a namespace, its veth link and its sshd. Made by :class:`TestHosts`."""

    __test__ = False  # not a pytest test class

    def __init__(self, run: TestHosts, index: int, slot: int, name: str, host_dir: Path) -> None:
        base = int(SUBNET.network_address) + (slot << 8)
        self.run_hosts = run
        self.index = index
        self.slot = slot
        self.name = f"host{index}"
        """ssh_config alias (``ssh -F hosts.ssh_config host0``)."""
        self.netns = name
        self.veth = name
        """Root-side veth name; the namespace side is ``eth0``."""
        self.address = str(ipaddress.IPv4Address(base + 2))
        """The host's IPv4 address (namespace end of the veth); sshd listens here."""
        self.root_address = str(ipaddress.IPv4Address(base + 1))
        self.network = ipaddress.IPv4Network(f"{ipaddress.IPv4Address(base)}/30")
        self.port = SSH_PORT
        self.user = SSH_USER
        self.dir = host_dir
        self.host_key_file = host_dir / "ssh_host_ed25519_key"
        self.sshd_config_file = host_dir / "sshd_config"
        self.sshd_pid_file = host_dir / "sshd.pid"
        self.sshd_log = host_dir / "sshd.log"
        self.host_public_key = ""
        """``ssh-ed25519 AAAA... comment`` of the key sshd serves now."""
        self.root_mac = f"02:62:74:e7:{slot:02x}:01"
        self.ns_mac = f"02:62:74:e7:{slot:02x}:02"
        self._sshd: subprocess.Popen[bytes] | None = None
        self._link_up = True

    def __repr__(self) -> str:
        return f"TestHost({self.name} {self.address}:{self.port} netns={self.netns} sshd={self.sshd_pid})"

    # -- paths shared with the run, here for convenience
    @property
    def identity_file(self) -> Path:
        return self.run_hosts.identity_file

    @property
    def known_hosts(self) -> Path:
        return self.run_hosts.known_hosts

    @property
    def ssh_config(self) -> Path:
        return self.run_hosts.ssh_config

    @property
    def known_hosts_line(self) -> str:
        key_type, key_data = self.host_public_key.split()[:2]
        return f"{self.name},{self.address} {key_type} {key_data}"

    # -- sshd
    @property
    def sshd_pid(self) -> int | None:
        """PID of the listening sshd, or None when it is not running."""
        if self._sshd is None or self._sshd.poll() is not None:
            return None
        return self._sshd.pid

    def _write_host_key(self) -> None:
        private, public = _ed25519(f"{self.name}@{self.netns}")
        _write(self.host_key_file, private, 0o600)
        _write(self.host_key_file.with_suffix(".pub"), public + "\n")
        self.host_public_key = public

    def start_sshd(self, wait: bool = True) -> int:
        """Start sshd in the namespace (no-op if running); with ``wait``, until it answers. Returns its PID."""
        pid = self.sshd_pid
        if pid is not None:
            return pid
        self.sshd_pid_file.unlink(missing_ok=True)
        sshd = _find_sshd()
        if sshd is None:
            raise HostsUnavailable("sshd not found")
        with open(self.sshd_log, "ab") as log:
            self._sshd = subprocess.Popen(
                [_ip_path(), "netns", "exec", self.netns, sshd, "-D", "-e", "-f", str(self.sshd_config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a terminal's ^C goes to the tests, which then clean up
            )
        if wait:
            self.wait_ready()
        return self._sshd.pid

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait (bounded) until sshd answers on address:22 from the root namespace."""
        deadline = time.monotonic() + timeout
        proc = self._sshd
        # sshd writes its PID file only after binding: wait for it first (no stray connections),
        # then confirm the whole path (veth, routes, sshd) with one real connect.
        for _ in range(int(timeout / POLL_S) + 1):
            if self.sshd_pid_file.exists() or time.monotonic() > deadline:
                break
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(POLL_S)
        try:
            _wait_banner(self.address, self.port, deadline, proc, self.name)
        except (RuntimeError, TimeoutError) as exc:
            raise type(exc)(f"{exc}; sshd log {self.sshd_log}:\n{self._log_tail()}") from None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.sshd_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop_sshd(self, timeout: float = KILL_WAIT_S) -> None:
        """Stop the listening sshd by PID (SIGTERM, then SIGKILL). Open sessions live on, as on a
        real host where sshd is stopped; :meth:`processes` finds them."""
        proc = self._sshd
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self._sshd = None

    def _kill_sshd(self) -> None:
        proc, self._sshd = self._sshd, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(KILL_WAIT_S)

    def regenerate_host_key(self, restart: bool = True) -> str:
        """Give the host a new host key and restart sshd, so known_hosts no longer matches.
        Returns the new public key line; ``hosts.write_known_hosts()`` trusts it again."""
        self._write_host_key()
        if restart and self.sshd_pid is not None:
            self.stop_sshd()
            self.start_sshd()
        return self.host_public_key

    # -- link
    @property
    def link_up(self) -> bool:
        return self._link_up

    def cut_link(self) -> None:
        """Partition the host: packets to and from it vanish (connects time out, sessions stall).
        Sets the namespace end of the veth down; see the module docstring for why that end."""
        _ip("link", "set", NS_IFACE, "down", netns=self.netns)
        self._link_up = False

    def restore_link(self, wait: bool = True, timeout: float = READY_TIMEOUT_S) -> None:
        """Undo :meth:`cut_link`; with ``wait`` (and sshd running), until sshd answers again."""
        _ip("link", "set", NS_IFACE, "up", netns=self.netns)
        self._link_up = True
        if wait and self.sshd_pid is not None:
            self.wait_ready(timeout)

    # -- looking inside
    def run(
        self,
        cmd: str | Sequence[str],
        *,
        timeout: float = CMD_TIMEOUT_S,
        check: bool = False,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the namespace (``ip netns exec``; a string goes to ``sh -c``).
        Output is captured: a background command must redirect its stdio or this waits for it."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return subprocess.run(
            [_ip_path(), "netns", "exec", self.netns, *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def processes(self, include_sshd: bool = False) -> list[psutil.Process]:
        """Processes in this host's namespace: what SSH sessions started (agents, slots, shells,
        orphans they left). sshd itself (listener and per-session processes) only with
        ``include_sshd``."""
        procs = []
        for pid in sorted(_pids_in_netns([self.netns]).get(self.netns, [])):
            try:
                proc = psutil.Process(pid)
                if not include_sshd and (pid == self.sshd_pid or proc.name().startswith("sshd")):
                    continue
                procs.append(proc)
            except psutil.Error:
                continue
        return procs

    # -- clients
    def asyncssh_options(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for ``asyncssh.connect(**...)``: this host, the run's key and
        known_hosts, no agent, no ~/.ssh/config, a 10 s connect timeout."""
        options: dict[str, Any] = {
            "host": self.address,
            "port": self.port,
            "username": self.user,
            "known_hosts": str(self.known_hosts),
            "client_keys": [str(self.identity_file)],
            "agent_path": None,
            "config": [],
            "connect_timeout": 10,
        }
        options.update(overrides)
        return options

    def ssh_command(self, *argv: str) -> list[str]:
        """``ssh -F <ssh_config> hostN argv...`` (OpenSSH client)."""
        return ["ssh", "-F", str(self.ssh_config), self.name, *argv]


# --------------------------------------------------------------------------- a run of hosts


class TestHosts:
    """``count`` SSH hosts for one run; a context manager (``start()``/``close()`` work too)."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        count: int = 3,
        *,
        run_id: str | None = None,
        env: Mapping[str, str] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        """``env``: variables sshd sets in every session (``SetEnv``), on top of PATH (the tests'
        PATH with ``sys.executable``'s folder first). ``run_id`` labels the temp dir and logs."""
        if not 1 <= count <= 64:
            raise ValueError(f"count must be 1..64, got {count}")
        self.count = count
        self.owner_pid = os.getpid()
        self.run_id = run_id or f"{self.owner_pid}-{time.time_ns() % 10**9}"
        path = os.environ.get("PATH", os.defpath)
        exe_dir = os.path.dirname(sys.executable)
        if exe_dir and exe_dir not in path.split(os.pathsep):
            path = os.pathsep.join([exe_dir, path])
        self.env = {"PATH": path, **(env or {})}
        for key, value in self.env.items():
            if not _ENV_NAME_RE.match(key) or any(c in value for c in '"\\\n'):
                raise ValueError(f"env {key}={value!r}: not usable in sshd_config SetEnv")
        self.base_dir = base_dir
        self.ready_timeout = ready_timeout
        self.hosts: list[TestHost] = []
        self.dir = Path()
        self.timings: dict[str, float] = {}
        self._state = "new"
        self._close_lock = threading.Lock()

    # -- files
    @property
    def identity_file(self) -> Path:
        """The run's client private key (ed25519, 0600)."""
        return self.dir / "id_ed25519"

    @property
    def authorized_keys(self) -> Path:
        return self.dir / "authorized_keys"

    @property
    def known_hosts(self) -> Path:
        """known_hosts with every host's key, under its alias and its address."""
        return self.dir / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        """OpenSSH client config: a ``Host hostN`` alias per host."""
        return self.dir / "ssh_config"

    # -- sequence of hosts
    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self) -> Iterator[TestHost]:
        return iter(self.hosts)

    def __getitem__(self, key: int | str) -> TestHost:
        if isinstance(key, str):
            for host in self.hosts:
                if key in (host.name, host.netns, host.address):
                    return host
            raise KeyError(key)
        return self.hosts[key]

    def __repr__(self) -> str:
        return f"TestHosts({self._state}, run_id={self.run_id!r}, {self.hosts!r})"

    # -- lifecycle
    def __enter__(self) -> TestHosts:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> TestHosts:
        """Create namespaces, links, keys and sshds; wait until every sshd answers."""
        if self._state != "new":
            raise RuntimeError(f"TestHosts already {self._state}")
        reason = unavailable_reason()
        if reason is not None:
            raise HostsUnavailable(reason)
        t0 = time.perf_counter()
        self._state = "starting"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{self.owner_pid}-", dir=self.base_dir))
        with _registry_lock:
            _live_runs.append(self)
        try:
            _check_token(str(self.dir), "the run directory")
            self._start(t0)
        except BaseException:
            self.close()
            raise
        self._state = "up"
        return self

    def _start(self, t0: float) -> None:
        os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        with _machine_lock():
            self.timings["sweep_s"] = _timed(_sweep_locked)
            used = _used_slots()
            existing = set(_list_netns()) | set(_root_links())
            start = (self.owner_pid * 7 + next(_counter) * 31) % SLOTS
            slots = [s for s in ((start + i) % SLOTS for i in range(SLOTS)) if s not in used][: self.count]
            if len(slots) < self.count:
                raise RuntimeError(f"only {len(slots)} free /30 slots in {SUBNET} for {self.count} hosts")
            for index, slot in enumerate(slots):
                name = next(n for n in (_next_name() for _ in range(1000)) if n not in existing)
                host_dir = self.dir / f"host{index}"
                host_dir.mkdir()
                with _registry_lock:
                    _live_names.add(name)
                self.hosts.append(TestHost(self, index, slot, name, host_dir))
            _ip_batch([line for h in self.hosts for line in _root_setup(h)])
        t1 = time.perf_counter()
        ns_setup = [
            subprocess.Popen(
                [_ip_path(), "-n", h.netns, "-batch", "-"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for h in self.hosts
        ]
        self._write_files()
        for host, proc in zip(self.hosts, ns_setup, strict=True):
            _out, err = proc.communicate("\n".join(_ns_setup(host)) + "\n", timeout=CMD_TIMEOUT_S)
            if proc.returncode != 0:
                raise RuntimeError(f"setting up {host.netns} failed: {err.strip()}")
        t2 = time.perf_counter()
        for host in self.hosts:
            host.start_sshd(wait=False)
        for host in self.hosts:
            host.wait_ready(self.ready_timeout)
        t3 = time.perf_counter()
        self.timings.update(network_s=t1 - t0, keys_and_links_s=t2 - t1, sshd_s=t3 - t2, total_s=t3 - t0)

    def _write_files(self) -> None:
        private, public = _ed25519(f"batuta-test-client@{self.run_id}")
        _write(self.identity_file, private, 0o600)
        _write(self.identity_file.with_suffix(".pub"), public + "\n")
        _write(self.authorized_keys, public + "\n", 0o600)
        for host in self.hosts:
            host._write_host_key()
            _write(host.sshd_config_file, self._sshd_config(host))
        self.write_known_hosts()
        _write(self.ssh_config, "".join(self._ssh_config_stanza(h) for h in self.hosts))

    def write_known_hosts(self) -> None:
        """(Re)write known_hosts with every host's current key (after ``regenerate_host_key``
        this trusts the new key)."""
        _write(self.known_hosts, "".join(h.known_hosts_line + "\n" for h in self.hosts))

    def _sshd_config(self, host: TestHost) -> str:
        setenv = " ".join(f'"{k}={v}"' for k, v in self.env.items())
        return f"""\
# batuta test host {host.name} ({host.netns}), run {self.run_id}; written by tests/support/hosts.py
ListenAddress {host.address}
Port {host.port}
AddressFamily inet
HostKey {host.host_key_file}
PidFile {host.sshd_pid_file}
AuthorizedKeysFile {self.authorized_keys}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
# PAM on: without it OpenSSH refuses even key logins for an account whose password is
# locked ('!' in /etc/shadow), which is how many fresh images ship root.
UsePAM yes
StrictModes no
AllowAgentForwarding no
X11Forwarding no
PermitUserEnvironment no
PrintMotd no
PrintLastLog no
UseDNS no
LoginGraceTime 30
MaxStartups 256
MaxSessions 64
LogLevel INFO
Subsystem sftp internal-sftp
# No AcceptEnv: clients cannot set variables. SetEnv gives sessions the tests' PATH.
SetEnv {setenv}
"""

    def _ssh_config_stanza(self, host: TestHost) -> str:
        return f"""\
Host {host.name}
    HostName {host.address}
    User {host.user}
    Port {host.port}
    IdentityFile {self.identity_file}
    IdentitiesOnly yes
    UserKnownHostsFile {self.known_hosts}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    UpdateHostKeys no
    ForwardAgent no
    BatchMode yes
    ConnectTimeout 5
    LogLevel ERROR

"""

    def close(self) -> None:
        """Kill by PID, delete by name, remove files. Idempotent; only the creating process acts."""
        with self._close_lock:
            if self._state in ("new", "closed") or os.getpid() != self.owner_pid:
                return
            self._state = "closing"
        problems: list[str] = []
        names = [h.netns for h in self.hosts]

        def kill() -> None:  # by PID: the sshds we started, then everything in our namespaces
            for host in self.hosts:
                host._kill_sshd()
            pids = [pid for found in _pids_in_netns(names).values() for pid in found]
            problems.extend(f"process {p.pid} survived SIGKILL" for p in _kill_and_wait(pids))

        def delete() -> None:  # by name: guard routes first (a slot may be reused once its link is gone)
            teardown = [
                f"route del blackhole {h.network} proto {GUARD_PROTO} metric {GUARD_METRIC}" for h in self.hosts
            ]
            teardown += [f"link del {h.veth}" for h in self.hosts] + [f"netns del {n}" for n in names]
            with _machine_lock(required=False):
                _ip_batch(teardown, force=True)
            problems.extend(f"netns {n} not deleted" for n in sorted(set(_list_netns()) & set(names)))
            problems.extend(f"link {n} not deleted" for n in sorted(set(_root_links()) & set(names)))

        def remove_files() -> None:
            if self.dir != Path() and self.dir.is_dir():
                shutil.rmtree(self.dir)

        for step in (kill, delete, remove_files):
            try:
                step()
            except Exception as exc:  # every step runs whatever failed before it
                problems.append(f"{step.__name__}: {exc!r}")
        with _registry_lock:
            _live_names.difference_update(names)
            if self in _live_runs:
                _live_runs.remove(self)
        self._state = "closed"
        if problems:
            warnings.warn(f"test hosts {self.run_id}: cleanup incomplete: {'; '.join(problems)}", stacklevel=2)


def _root_setup(h: TestHost) -> list[str]:
    return [
        f"netns add {h.netns}",
        f"link add {h.veth} address {h.root_mac} type veth peer name {NS_IFACE} address {h.ns_mac} netns {h.netns}",
        f"addr add {h.root_address}/30 dev {h.veth}",
        f"link set {h.veth} up",
        f"neigh replace {h.address} lladdr {h.ns_mac} dev {h.veth} nud permanent",
        f"route add blackhole {h.network} proto {GUARD_PROTO} metric {GUARD_METRIC}",
    ]


def _ns_setup(h: TestHost) -> list[str]:
    return [
        "link set lo up",
        f"addr add {h.address}/30 dev {NS_IFACE}",
        f"link set {NS_IFACE} up",
    ]


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --------------------------------------------------------------------------- by hand


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.support.hosts", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--hold", action="store_true", help="keep the hosts up until Enter or ^C")
    parser.add_argument("--sweep", action="store_true", help="only remove what dead runs left behind")
    args = parser.parse_args(argv)
    if args.sweep:
        for line in sweep_stale():
            print("removed", line)
        return 0
    with TestHosts(args.count) as hosts:
        print(
            f"up in {hosts.timings['total_s'] * 1000:.0f} ms: "
            + ", ".join(f"{k}={v * 1000:.1f}ms" for k, v in hosts.timings.items())
        )
        for host in hosts:
            print(f"  {host.name}: {host.address}:{host.port} netns={host.netns} sshd pid {host.sshd_pid}")
        print(f"  ssh -F {hosts.ssh_config} host0")
        if args.hold:
            with contextlib.suppress(KeyboardInterrupt, EOFError):
                input("Enter (or ^C) to tear down... ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
