"""`RemoteExecutor`: the seed's coordinator for TLS worker daemons, on top of `Pool`.

    executor = await (
        RemoteExecutor.builder()
        .add_workers(["10.0.0.1:9443", "10.0.0.2:9443"])
        .tls(ca="certs/ca.pem", cert="certs/client.pem", key="certs/client.key")
        .build()
    )
    async with executor:
        result = await executor.execute(Task.kernel("vadd", a, b))

Each worker is a `HostSpec` whose `launch()` opens a fresh mutual-TLS connection to a
`batuta worker` daemon, so everything the pool does for SSH hosts holds here too:
heartbeats and liveness, requeueing a lost host's work, and reconnecting with backoff (the
pool's relaunch calls `launch()` again). A worker whose certificate fails verification, or
which refuses ours, is retired at once (`TransportError.retryable` is False). A busy worker
(it serves one coordinator at a time) or a full one (too many connections in their TLS
handshake) is retried by each launch with backoff for `busy_timeout` seconds (default 30)
before the launch fails with a message that says which it was.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from batuta.core.task import Task, TaskResult
from batuta.errors import UsageError
from batuta.runtime.builder import positive_seconds
from batuta.runtime.pool import Pool, PoolBuilder, TaskFuture
from batuta.runtime.session import HostSpec
from batuta.transport.base import ByteStream
from batuta.transport.tls import (
    DEFAULT_PORT,
    TLSSettings,
    client_context,
    connect_worker,
    format_address,
    split_address,
)


def tls_host(
    name: str,
    host: str,
    port: int,
    settings: TLSSettings,
    *,
    tags: frozenset[str] = frozenset(),
    check_versions: bool = True,
) -> HostSpec:
    """A `HostSpec` whose `launch()` connects to the worker daemon at `host:port` over TLS.

    The SSL context is built on the first launch and kept (certificates are read once);
    each launch and relaunch is a new connection, and so a new agent on the worker. A busy or
    full worker is retried for `settings.busy_timeout` seconds (`connect_worker`).
    """
    contexts: list[Any] = []

    async def launch() -> ByteStream:
        if not contexts:
            contexts.append(client_context(settings))
        return await connect_worker(host, port, settings, name=name, context=contexts[0])

    return HostSpec(name=name, launch=launch, tags=tags, check_versions=check_versions)


class RemoteExecutor:
    """Tasks over TLS workers. Build with `RemoteExecutor.builder()...build()` (a coroutine).

    `execute(task)` submits and waits (the seed's `executor.execute(task).await`); `submit`,
    `map` and everything else of the pool are on `executor.pool`.
    """

    def __init__(self, pool: Pool, workers: Sequence[str]) -> None:
        self.pool = pool
        self.workers = tuple(workers)

    @staticmethod
    def builder() -> RemoteExecutorBuilder:
        return RemoteExecutorBuilder()

    async def execute(self, task: Task) -> TaskResult:
        """Run `task` on some worker and return its result (failures are results too)."""
        return await self.pool.run(task)

    async def submit(self, task: Task) -> TaskFuture:
        return await self.pool.submit(task)

    async def map(self, kernel: str, items: Iterable[Any], **options: Any) -> list[Any]:
        return await self.pool.map(kernel, items, **options)

    async def close(self) -> None:
        """Shut every worker session down (the workers keep running, waiting for the next)."""
        await self.pool.close()

    async def __aenter__(self) -> RemoteExecutor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class RemoteExecutorBuilder:
    """Fluent construction: `.add_workers([...]).tls(ca=, cert=, key=)`, pool knobs, `build()`."""

    def __init__(self) -> None:
        self._workers: list[tuple[str, str, int]] = []  # (name, host, port)
        self._tls: TLSSettings | None = None
        self._pool = PoolBuilder().no_local()
        self._check_versions = True
        self._built = False

    def add_worker(self, address: str, *, name: str | None = None) -> RemoteExecutorBuilder:
        """One worker, `host:port` (port 9443 if left out; IPv6 as `[addr]:port`)."""
        if not isinstance(address, str):
            raise UsageError(
                f"add_worker({address!r}): give the worker's address as a str, e.g. '10.0.0.1:{DEFAULT_PORT}'"
            )
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise UsageError(f"add_worker({address!r}, name={name!r}): give a non-empty str, or leave name out")
        try:
            host, port = split_address(address, DEFAULT_PORT, default_host="")
        except ValueError as exc:
            raise UsageError(f"worker address {address!r}: {exc}") from None
        if not host:
            raise UsageError(f"worker address {address!r}: give the worker's host, e.g. 10.0.0.1:{DEFAULT_PORT}")
        label = name or format_address(host, port)
        if any(existing == label for existing, _, _ in self._workers):
            raise UsageError(f"worker {label} was added twice")
        self._workers.append((label, host, port))
        return self

    def add_workers(self, addresses: Iterable[str]) -> RemoteExecutorBuilder:
        """Several workers, each `host:port` (the seed's `.add_workers(&workers)`)."""
        if isinstance(addresses, str) or not isinstance(addresses, Iterable):
            raise UsageError("add_workers takes a list of 'host:port' strings; use add_worker for one")
        for address in addresses:
            self.add_worker(address)
        return self

    def tls(
        self,
        *,
        ca: str | Path,
        cert: str | Path,
        key: str | Path,
        server_name: str | None = None,
        connect_timeout: float = 10.0,
        hello_timeout: float = 30.0,
        busy_timeout: float = 30.0,
    ) -> RemoteExecutorBuilder:
        """The CA that signed the workers' certificates, and this coordinator's certificate and
        key (paths; `batuta certs init` makes all three). `server_name`: check the workers'
        certificates against this name instead of the dialled address. `busy_timeout`: how long
        to keep retrying a worker that is busy with another coordinator, or full (0: try once)."""
        for label, path in (("ca", ca), ("cert", cert), ("key", key)):
            if not isinstance(path, str | os.PathLike) or not os.fspath(path):
                raise UsageError(f"tls({label}={path!r}): give the path of a PEM file (from `batuta certs init DIR`)")
        if server_name is not None and (not isinstance(server_name, str) or not server_name.strip()):
            raise UsageError(f"tls(server_name={server_name!r}): give the name in the workers' certificates, or None")
        connect_timeout = positive_seconds("tls", connect_timeout, "connect_timeout")
        hello_timeout = positive_seconds("tls", hello_timeout, "hello_timeout")
        if (
            isinstance(busy_timeout, bool)
            or not isinstance(busy_timeout, int | float)
            or not 0 <= busy_timeout < math.inf
        ):
            raise UsageError(f"tls(busy_timeout={busy_timeout!r}): give a number of seconds >= 0 (0: try once)")
        self._tls = TLSSettings(
            ca=Path(ca).expanduser(),
            cert=Path(cert).expanduser(),
            key=Path(key).expanduser(),
            server_name=server_name,
            connect_timeout=connect_timeout,
            hello_timeout=hello_timeout,
            busy_timeout=float(busy_timeout),
        )
        return self

    def tls_settings(self, settings: TLSSettings) -> RemoteExecutorBuilder:
        if not isinstance(settings, TLSSettings):
            raise UsageError(f"tls_settings({settings!r}): give a TLSSettings, or call .tls(ca=..., cert=..., key=...)")
        self._tls = settings
        return self

    def check_versions(self, enabled: bool) -> RemoteExecutorBuilder:
        """Refuse workers whose batuta or Python minor version differs (default: on)."""
        if not isinstance(enabled, bool):  # check_versions("no") would be true
            raise UsageError(f"check_versions({enabled!r}): give True or False")
        self._check_versions = enabled
        return self

    def pool(self, configure: Any) -> RemoteExecutorBuilder:
        """Apply `configure(pool_builder)` for pool knobs (seed, liveness, relaunch, ...)."""
        if not callable(configure):
            raise UsageError(f"pool({configure!r}): give a function of the PoolBuilder, e.g. pool(lambda b: b.seed(7))")
        result = configure(self._pool)
        if isinstance(result, PoolBuilder):
            self._pool = result
        return self

    def seed(self, seed: int) -> RemoteExecutorBuilder:
        self._pool.seed(seed)
        return self

    def heartbeat_interval(self, seconds: float) -> RemoteExecutorBuilder:
        self._pool.heartbeat_interval(seconds)
        return self

    def liveness(self, *, suspect_after: float, lost_after: float) -> RemoteExecutorBuilder:
        self._pool.liveness(suspect_after=suspect_after, lost_after=lost_after)
        return self

    def relaunch(self, *, max_relaunches: int, backoff: float) -> RemoteExecutorBuilder:
        self._pool.relaunch(max_relaunches=max_relaunches, backoff=backoff)
        return self

    def host_specs(self) -> list[HostSpec]:
        """The workers as pool hosts (for building a `Pool` by hand)."""
        if not self._workers:
            raise UsageError("no workers: call add_workers(['host:9443', ...]) before build()")
        if self._tls is None:
            raise UsageError(
                "no TLS settings: call .tls(ca=..., cert=..., key=...) (files from `batuta certs init DIR`)"
            )
        return [
            tls_host(name, host, port, self._tls, check_versions=self._check_versions)
            for name, host, port in self._workers
        ]

    def build_pool(self) -> Pool:
        """The (not yet started) pool over the workers. A builder builds once."""
        if self._built:
            raise UsageError("this RemoteExecutor builder was already built; start a new one with builder()")
        specs = self.host_specs()
        self._built = True
        return self._pool.hosts(specs).build()

    async def build(self) -> RemoteExecutor:
        """Connect to every worker; returns once at least one is up (the rest keep retrying
        with backoff in the background). Raises the first worker's error if none is reachable."""
        pool = self.build_pool()
        await pool.start()
        return RemoteExecutor(pool, [name for name, _, _ in self._workers])
