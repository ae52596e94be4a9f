"""Who gets into a TLS worker, and when: idle-connection floods, busy workers, back-to-back coordinators.

A worker guards its handshake slots (per source address and in all, idle connections shed
after `client_hello_timeout`), rate-limits its refusal log, frees its one coordinator slot
as soon as the coordinator has gone, and coordinators retry a busy or full worker with
backoff for `busy_timeout`. Real TLS over loopback, real agent processes. Every wait is
bounded; nothing sleeps to let something happen (polls wait for a counter, with a deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable

import pytest

from batuta.agent.daemon import MAX_HANDSHAKING, WorkerDaemon
from batuta.core.task import Task
from batuta.runtime.cluster import parse_cluster
from batuta.transport.refusals import RefusalLog
from batuta.transport.tls import TLSBusyError, TLSFullError
from tests.test_tls import WAIT_S, Pki, _cluster_text, executor_for, pki, worker_options

__all__ = ["pki"]  # the module-scoped certificates fixture, shared with test_tls.py

DAEMON_LOG = "batuta.agent.daemon"


async def _until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Wait for `condition()` (a counter the daemon keeps), polling, for at most `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def _idle_connections(port: int, count: int, source: str) -> list[socket.socket]:
    """`count` TCP connections to the worker from `source` that never say a word."""
    loop = asyncio.get_running_loop()
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((source, 0))
        await loop.sock_connect(sock, ("127.0.0.1", port))
        sockets.append(sock)
    return sockets


@pytest.fixture
async def idle_sockets() -> AsyncIterator[list[socket.socket]]:
    """A place for the test's idle connections; all closed when the test ends."""
    held: list[socket.socket] = []
    yield held
    for sock in held:
        sock.close()


def _refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == DAEMON_LOG and "refused" in r.getMessage()]


# -- idle connections ---------------------------------------------------------------------


async def test_idle_connections_from_one_address_leave_slots_for_others(
    pki: Pki, idle_sockets: list[socket.socket]
) -> None:
    """64 idle connections from 127.0.0.2 (the whole handshake limit) take only that address's
    share: a coordinator on 127.0.0.1 gets in on its first try, while they are still held."""
    options = worker_options(pki, client_hello_timeout=3600.0)  # the idle ones stay for the whole test
    async with WorkerDaemon(options) as daemon:
        _, port = daemon.address
        per_source = options.max_handshakes_per_source
        idle_sockets += await _idle_connections(port, MAX_HANDSHAKING, "127.0.0.2")
        await _until(lambda: daemon.stats.refused_full == MAX_HANDSHAKING - per_source, "the flood's refusals")
        async with await executor_for(pki, port, busy_timeout=0) as executor:
            assert (await executor.execute(Task.kernel("noop", 1))).value == 1
        assert daemon.stats.sessions == 1


async def test_idle_connections_from_the_coordinators_own_address_only_delay_it(
    pki: Pki, idle_sockets: list[socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    """The same flood from the coordinator's own address: the worker drops the idle ones after
    `client_hello_timeout` and the coordinator, retrying with backoff, gets in. The worker's log
    holds a handful of refusal lines and one line counting the rest, not one per connection."""
    caplog.set_level(logging.INFO, logger=DAEMON_LOG)
    options = worker_options(pki, client_hello_timeout=0.5, refusal_log_interval=3600.0)
    async with WorkerDaemon(options) as daemon:
        _, port = daemon.address
        idle_sockets += await _idle_connections(port, MAX_HANDSHAKING, "127.0.0.1")
        flood_refused = MAX_HANDSHAKING - options.max_handshakes_per_source
        await _until(lambda: daemon.stats.refused_full >= flood_refused, "the flood's refusals")
        async with await executor_for(pki, port) as executor:  # busy_timeout: the default, 30 s
            assert (await executor.execute(Task.kernel("noop", 2))).value == 2
        refused = daemon.stats.refused_tls
    assert refused >= MAX_HANDSHAKING  # every idle connection was refused or dropped
    lines = _refusal_lines(caplog)
    assert len(lines) == options.refusal_log_burst + 1, lines
    unlogged = refused - options.refusal_log_burst
    assert re.fullmatch(rf"{unlogged} more refused from 127\.0\.0\.1 in the last \d+s", lines[-1]), lines[-1]


async def test_a_coordinator_that_cannot_get_into_a_full_worker_says_so(
    pki: Pki, idle_sockets: list[socket.socket]
) -> None:
    options = worker_options(pki, client_hello_timeout=3600.0, max_handshakes_per_source=1)
    async with WorkerDaemon(options) as daemon:
        _, port = daemon.address
        idle_sockets += await _idle_connections(port, 1, "127.0.0.1")  # holds 127.0.0.1's one slot
        await _until(lambda: daemon.handshakes_in_progress == 1, "the idle connection's handshake slot")
        with pytest.raises(TLSFullError) as full:
            await executor_for(pki, port, busy_timeout=0.3)
        assert daemon.stats.refused_full >= 2  # it did retry
    message = str(full.value)
    assert "\n" not in message and full.value.retryable
    assert f"host 127.0.0.1:{port}: the worker was full" in message
    assert "tries in" in message and "raise busy_timeout in [tls]" in message


def test_refusal_log_keeps_a_few_lines_per_address_and_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="test.refusals")
    refusals = RefusalLog(logging.getLogger("test.refusals"), burst=2, interval=3600.0, max_sources=2)
    for i in range(10):
        refusals.refused("10.0.0.1", "refused 10.0.0.1:%d: nope", i)
    refusals.refused("10.0.0.2", "refused 10.0.0.2:1: nope")
    for i in range(3):  # past max_sources: counted together
        refusals.refused(f"10.0.1.{i}", "refused 10.0.1.%d:1: nope", i)
    refusals.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["refused 10.0.0.1:0: nope", "refused 10.0.0.1:1: nope", "refused 10.0.0.2:1: nope"]
    assert lines[3:5] == ["refused 10.0.1.0:1: nope", "refused 10.0.1.1:1: nope"]
    assert lines[5] == "8 more refused from 10.0.0.1 in the last 1s"
    assert lines[6] == "1 more refused from other addresses in the last 1s"
    assert len(lines) == 7


# -- busy ---------------------------------------------------------------------------------


async def test_coordinators_that_follow_each_other_at_once_are_all_served(pki: Pki) -> None:
    """The worker frees its coordinator slot when the coordinator has gone, not only when the
    old agent has finished exiting: the next one, connecting at once, is not refused (and
    is not retried either: busy_timeout=0)."""
    async with WorkerDaemon(worker_options(pki)) as daemon:
        _, port = daemon.address
        for value in range(3):
            async with await executor_for(pki, port, busy_timeout=0) as executor:
                assert (await executor.execute(Task.kernel("noop", value))).value == value
        assert daemon.stats.refused_busy == 0
        assert daemon.stats.sessions == 3
        assert await daemon.wait_idle(WAIT_S)
        assert daemon.stats.agent_exit_codes == [0, 0, 0]


async def test_a_coordinator_retries_a_busy_worker_and_gets_in_when_the_first_leaves(pki: Pki) -> None:
    async with WorkerDaemon(worker_options(pki)) as daemon:
        _, port = daemon.address
        first = await executor_for(pki, port)
        try:
            second = asyncio.create_task(executor_for(pki, port))  # busy_timeout: the default, 30 s
            await _until(lambda: daemon.stats.refused_busy >= 1, "the second coordinator to be refused")
            assert not second.done()  # refused, and waiting to try again
            assert (await first.execute(Task.kernel("noop", 3))).value == 3  # the first is untouched
        finally:
            await first.close()
        async with asyncio.timeout(WAIT_S):
            executor = await second
        async with executor:
            assert (await executor.execute(Task.kernel("noop", 4))).value == 4
        assert daemon.stats.sessions == 2


async def test_a_worker_that_stays_busy_is_named_when_the_coordinator_gives_up(pki: Pki) -> None:
    async with WorkerDaemon(worker_options(pki)) as daemon:
        _, port = daemon.address
        async with await executor_for(pki, port) as first:
            with pytest.raises(TLSBusyError) as busy:
                await executor_for(pki, port, busy_timeout=0.3)
            assert (await first.execute(Task.kernel("noop", 5))).value == 5
        assert daemon.stats.refused_busy >= 2  # it did retry
    message = str(busy.value)
    assert "\n" not in message and busy.value.retryable
    assert message.startswith(f"host 127.0.0.1:{port}: worker busy: ")
    assert "serves another coordinator (CN=batuta-coordinator from 127.0.0.1:" in message
    assert "tries in" in message and "raise busy_timeout in [tls] to wait longer" in message


HOLDER = """
import asyncio, sys
from batuta import RemoteExecutor, Task
from batuta.runtime.builder import PoolConfig
from batuta.runtime.pool import Pool

async def main() -> None:
    address, ca, cert, key, limit = sys.argv[1:]
    specs = RemoteExecutor.builder().add_workers([address]).tls(ca=ca, cert=cert, key=key).host_specs()
    async with Pool(specs, PoolConfig(agent_silence_limit=float(limit))) as pool:
        await pool.run(Task.kernel("noop", 1))
        print("up", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the test ends it

asyncio.run(main())
"""


async def test_a_worker_held_by_a_stopped_coordinator_says_by_whom_and_until_when(pki: Pki) -> None:
    """A coordinator stopped with Ctrl-Z (SIGSTOP) holds its worker until the agent gives up on
    its silence (agent_silence_limit): the refusal said only "serves another coordinator". It
    says which one, since when and last heard from when, and by when the worker is free at the
    latest; a coordinator that keeps retrying gets in then."""
    async with WorkerDaemon(worker_options(pki)) as daemon:
        _, port = daemon.address
        holder = await asyncio.create_subprocess_exec(
            *(sys.executable, "-c", HOLDER, f"127.0.0.1:{port}"),
            *(str(pki.ca), str(pki.client_cert), str(pki.client_key), "4"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert holder.stdout is not None
            assert await asyncio.wait_for(holder.stdout.readline(), WAIT_S) == b"up\n"
            os.kill(holder.pid, signal.SIGSTOP)
            assert daemon.busy
            with pytest.raises(TLSBusyError) as busy:
                await executor_for(pki, port, busy_timeout=0)
            message = str(busy.value)
            peer = re.escape(f"CN=batuta-coordinator from {daemon._active.peer if daemon._active else '?'}")
            assert re.search(
                rf"serves another coordinator \({peer}, for \d+ s, last heard from \d+ s ago\); it is free when "
                r"that one ends, or in \d+ s at the latest if it stays silent \(stopped with Ctrl-Z, or cut off: "
                r"its agent_silence_limit is 4 s\); a worker serves one coordinator at a time",
                message,
            ), message
            async with await executor_for(pki, port, busy_timeout=WAIT_S) as executor:  # in once it is let go
                assert (await executor.execute(Task.kernel("noop", 7))).value == 7
        finally:
            with contextlib.suppress(ProcessLookupError):
                holder.kill()
            await holder.wait()


def test_a_busy_refusal_says_when_the_holder_set_no_silence_limit_or_has_not_said() -> None:
    from batuta.agent.daemon import _Session
    from batuta.protocol.codec import encode_message
    from batuta.protocol.messages import PROTOCOL_VERSION, Welcome

    never = _Session("127.0.0.1:5000", "CN=batuta-coordinator")
    never.heard(encode_message(Welcome(protocol=PROTOCOL_VERSION, heartbeat_interval=1.0, silence_limit=0.0)))
    assert "(its agent_silence_limit is 0: stopped with Ctrl-Z, it holds the worker until it is resumed or ended)" in (
        never.busy_message("w1")
    )
    unknown = _Session("127.0.0.1:5001", "CN=batuta-coordinator")  # still in its handshake: no Welcome yet
    message = unknown.busy_message("w1")
    assert message.startswith("worker busy: w1 serves another coordinator (CN=batuta-coordinator from 127.0.0.1:5001")
    assert message.endswith("it is free when that one ends; a worker serves one coordinator at a time")


def test_cluster_file_busy_timeout(pki: Pki) -> None:
    from batuta.errors import ConfigError

    default = parse_cluster(_cluster_text(pki, 9443)).tls
    assert default is not None and default.busy_timeout == 30.0
    once = parse_cluster(_cluster_text(pki, 9443) + "busy_timeout = 0\n").tls
    assert once is not None and once.busy_timeout == 0.0
    with pytest.raises(
        ConfigError,
        match=r"tls.busy_timeout: expected a number of seconds >= 0 \(0: try a busy or full worker once\), got -1",
    ):
        parse_cluster(_cluster_text(pki, 9443) + "busy_timeout = -1\n")
