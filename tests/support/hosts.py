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

Per run, in a fresh temp dir: a client key, a host key per host, ``known_hosts`` and
``ssh_config`` (see `tests.support.sshd`). The safety rules (only our addresses, bounded loops,
cleanup by PID and name, always) are spelled out in `tests.support.netns`, which keeps them;
why `TestHost.cut_link` downs the namespace end of the link is in `tests.support.host`.

The harness is split by subject, each module a few hundred lines: `tests.support.netns`
creates, inspects and removes namespaces, links and routes; `tests.support.sshd` writes the
keys and OpenSSH configs; `tests.support.host` is one host (`TestHost`); this module is the
public API, a run of hosts (`TestHosts`), and keeps every name tests and benchmarks import.

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

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

# Imports `as` themselves re-export the harness's settings, importable from here as before the split.
from tests.support.host import TestHost
from tests.support.netns import (
    CMD_TIMEOUT_S,
    GUARD_METRIC,
    GUARD_PROTO,
    READY_TIMEOUT_S,
    SLOTS,
    SUBNET,
    TMP_PREFIX,
    HostsUnavailable,
    ip_path,
    kill_and_wait,
    list_netns,
    live_names,
    live_runs,
    machine_lock,
    name_counter,
    netns_setup_lines,
    next_name,
    owned_resources,
    pids_in_netns,
    registry_lock,
    root_links,
    root_setup_lines,
    run_ip_batch,
    sweep_locked,
    sweep_stale,
    unavailable_reason,
    used_slots,
)
from tests.support.netns import KILL_WAIT_S as KILL_WAIT_S
from tests.support.netns import LOCK_TIMEOUT_S as LOCK_TIMEOUT_S
from tests.support.netns import NETNS_DIR as NETNS_DIR
from tests.support.netns import NS_IFACE as NS_IFACE
from tests.support.netns import POLL_S as POLL_S
from tests.support.sshd import PRIVSEP_DIR, check_token, ed25519, ssh_config_stanza, sshd_config, write_file
from tests.support.sshd import PROBE_TIMEOUT_S as PROBE_TIMEOUT_S
from tests.support.sshd import SSH_PORT as SSH_PORT
from tests.support.sshd import SSH_USER as SSH_USER

__all__ = [
    "SUBNET",
    "HostsUnavailable",
    "TestHost",
    "TestHosts",
    "owned_resources",
    "sweep_stale",
    "unavailable_reason",
]

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
        with registry_lock:
            live_runs.append(self)
        try:
            check_token(str(self.dir), "the run directory")
            self._start(t0)
        except BaseException:
            self.close()
            raise
        self._state = "up"
        return self

    def _start(self, t0: float) -> None:
        os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        with machine_lock():
            self.timings["sweep_s"] = _timed(sweep_locked)
            used = used_slots()
            existing = set(list_netns()) | set(root_links())
            start = (self.owner_pid * 7 + next(name_counter) * 31) % SLOTS
            slots = [s for s in ((start + i) % SLOTS for i in range(SLOTS)) if s not in used][: self.count]
            if len(slots) < self.count:
                raise RuntimeError(f"only {len(slots)} free /30 slots in {SUBNET} for {self.count} hosts")
            for index, slot in enumerate(slots):
                name = next(n for n in (next_name() for _ in range(1000)) if n not in existing)
                host_dir = self.dir / f"host{index}"
                host_dir.mkdir()
                with registry_lock:
                    live_names.add(name)
                self.hosts.append(TestHost(self, index, slot, name, host_dir))
            run_ip_batch([line for h in self.hosts for line in root_setup_lines(h)])
        t1 = time.perf_counter()
        ns_setup = [
            subprocess.Popen(
                [ip_path(), "-n", h.netns, "-batch", "-"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for h in self.hosts
        ]
        self._write_files()
        for host, proc in zip(self.hosts, ns_setup, strict=True):
            _out, err = proc.communicate("\n".join(netns_setup_lines(host)) + "\n", timeout=CMD_TIMEOUT_S)
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
        private, public = ed25519(f"batuta-test-client@{self.run_id}")
        write_file(self.identity_file, private, 0o600)
        write_file(self.identity_file.with_suffix(".pub"), public + "\n")
        write_file(self.authorized_keys, public + "\n", 0o600)
        for host in self.hosts:
            host._write_host_key()
            write_file(host.sshd_config_file, sshd_config(self, host))
        self.write_known_hosts()
        write_file(self.ssh_config, "".join(ssh_config_stanza(self, h) for h in self.hosts))

    def write_known_hosts(self) -> None:
        """(Re)write known_hosts with every host's current key (after ``regenerate_host_key``
        this trusts the new key)."""
        write_file(self.known_hosts, "".join(h.known_hosts_line + "\n" for h in self.hosts))

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
            pids = [pid for found in pids_in_netns(names).values() for pid in found]
            problems.extend(f"process {p.pid} survived SIGKILL" for p in kill_and_wait(pids))

        def delete() -> None:  # by name: guard routes first (a slot may be reused once its link is gone)
            teardown = [
                f"route del blackhole {h.network} proto {GUARD_PROTO} metric {GUARD_METRIC}" for h in self.hosts
            ]
            teardown += [f"link del {h.veth}" for h in self.hosts] + [f"netns del {n}" for n in names]
            with machine_lock(required=False):
                run_ip_batch(teardown, force=True)
            problems.extend(f"netns {n} not deleted" for n in sorted(set(list_netns()) & set(names)))
            problems.extend(f"link {n} not deleted" for n in sorted(set(root_links()) & set(names)))

        def remove_files() -> None:
            if self.dir != Path() and self.dir.is_dir():
                shutil.rmtree(self.dir)

        for step in (kill, delete, remove_files):
            try:
                step()
            except Exception as exc:  # every step runs whatever failed before it
                problems.append(f"{step.__name__}: {exc!r}")
        with registry_lock:
            live_names.difference_update(names)
            if self in live_runs:
                live_runs.remove(self)
        self._state = "closed"
        if problems:
            warnings.warn(f"test hosts {self.run_id}: cleanup incomplete: {'; '.join(problems)}", stacklevel=2)


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
