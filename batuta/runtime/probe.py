"""Reach every host once, concurrently, and report what answered: `batuta cluster status`.

A probe launches each host's agent exactly as a pool would (same transport, same
handshake, same version check), records what the agent said in its Hello and how long it
took to be ready, then shuts it down. A host that cannot be reached is a finding with its
reason, never an exception.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from batuta.errors import AgentError, BatutaError, HostConfigError, HostUnusableError
from batuta.protocol import messages as m
from batuta.runtime.session import HostSession, HostSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class HostReport:
    name: str
    state: str = "up"  # or what kept it out: see `failed_state`
    ready_s: float | None = None  # from launch to the agent's Hello
    hello: m.Hello | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.state == "up"

    @property
    def cpu_slots(self) -> int:
        return sum(1 for s in self.hello.slots if "gpu" not in s.capabilities) if self.hello else 0

    @property
    def gpu_slots(self) -> int:
        return sum(1 for s in self.hello.slots if "gpu" in s.capabilities) if self.hello else 0


class _Listener:
    """Probes only need the handshake; later messages are ignored."""

    def host_ready(self, session: HostSession) -> None:
        pass

    def host_messages(self, session: HostSession, messages: list[m.Message]) -> None:
        pass

    def host_closed(self, session: HostSession, reason: str) -> None:
        pass

    def host_writable(self, session: HostSession) -> None:
        pass


def failed_state(exc: BaseException) -> str:
    """One word for why a host is not up, so that a changed host key or a refused login is not
    reported as a network fault ("unreachable") and sent to the wrong fix."""
    from batuta.transport.ssh_settings import HostKeyError, SSHAuthError, SSHKeyLockedError  # no asyncssh

    if isinstance(exc, SSHKeyLockedError):
        return "misconfigured"  # our key needs its passphrase here; the host refused nothing
    if isinstance(exc, (HostKeyError, SSHAuthError)):
        return "refused"  # it answered, and its key or our login was not accepted
    if isinstance(exc, HostConfigError):
        return "misconfigured"  # the cluster file's entry or the ssh settings
    if isinstance(exc, (HostUnusableError, AgentError)):
        return "unusable"  # reached, but batuta's agent cannot run there as configured
    return "unreachable"


async def probe_host(spec: HostSpec, *, timeout: float = 30.0) -> HostReport:
    session = HostSession(spec=spec, listener=_Listener(), heartbeat_interval=5.0, handshake_timeout=timeout)
    started = time.perf_counter()
    try:
        await session.start()
    except (BatutaError, OSError) as exc:
        await session.close(timeout=1.0)
        return HostReport(name=spec.name, state=failed_state(exc), error=" ".join(str(exc).split()))
    ready_s = time.perf_counter() - started
    hello = session.hello
    await session.close(timeout=2.0)
    return HostReport(name=spec.name, ready_s=ready_s, hello=hello)


async def probe_hosts(specs: Sequence[HostSpec], *, timeout: float = 30.0) -> list[HostReport]:
    """One report per host, in the order given; every host is probed at the same time."""
    return list(await asyncio.gather(*(probe_host(spec, timeout=timeout) for spec in specs)))
