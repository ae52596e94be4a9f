"""One test host, `TestHost`: a namespace's sshd, its link, and what runs inside it.

`tests.support.hosts.TestHosts` makes these, one per host of a run, after it has set up the
namespaces (`tests.support.netns`) and written the keys and configs (`tests.support.sshd`).
It is separate from the run because it is what a test handles: start and stop sshd, change
the host key, cut the link, run commands inside, and connect.

``cut_link()`` sets the *namespace* end of the veth down. The root end loses carrier but stays
up, so its /30 route stays and packets to the host are silently dropped (the neighbour entry is
fixed, so there is no ARP failure either): new connects time out and open connections stall, as
when a cable is pulled. Setting the root end down instead would remove the route and send the
packets to the default gateway (or, with the guard, fail at once with EINVAL) rather than time out.
"""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from tests.support.netns import (
    CMD_TIMEOUT_S,
    KILL_WAIT_S,
    NS_IFACE,
    POLL_S,
    READY_TIMEOUT_S,
    SUBNET,
    HostsUnavailable,
    find_sshd,
    ip_path,
    pids_in_netns,
    run_ip,
)
from tests.support.sshd import SSH_PORT, SSH_USER, ed25519, wait_banner, write_file

if TYPE_CHECKING:
    from tests.support.hosts import TestHosts

__all__ = ["TestHost"]


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
        private, public = ed25519(f"{self.name}@{self.netns}")
        write_file(self.host_key_file, private, 0o600)
        write_file(self.host_key_file.with_suffix(".pub"), public + "\n")
        self.host_public_key = public

    def start_sshd(self, wait: bool = True) -> int:
        """Start sshd in the namespace (no-op if running); with ``wait``, until it answers. Returns its PID."""
        pid = self.sshd_pid
        if pid is not None:
            return pid
        self.sshd_pid_file.unlink(missing_ok=True)
        sshd = find_sshd()
        if sshd is None:
            raise HostsUnavailable("sshd not found")
        with open(self.sshd_log, "ab") as log:
            self._sshd = subprocess.Popen(
                [ip_path(), "netns", "exec", self.netns, sshd, "-D", "-e", "-f", str(self.sshd_config_file)],
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
            wait_banner(self.address, self.port, deadline, proc, self.name)
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
        run_ip("link", "set", NS_IFACE, "down", netns=self.netns)
        self._link_up = False

    def restore_link(self, wait: bool = True, timeout: float = READY_TIMEOUT_S) -> None:
        """Undo :meth:`cut_link`; with ``wait`` (and sshd running), until sshd answers again."""
        run_ip("link", "set", NS_IFACE, "up", netns=self.netns)
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
            [ip_path(), "netns", "exec", self.netns, *argv],
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
        for pid in sorted(pids_in_netns([self.netns]).get(self.netns, [])):
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
