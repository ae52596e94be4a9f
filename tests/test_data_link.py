"""The data link beside the SSH channel (transport/bulk.py, runtime/datalink.py, agent/datalink.py).

Real SSH namespace hosts (tests/support/hosts.py): with `[ssh] data_link = "ssh"` a put value
and a task's result travel over the agent's dial-back TLS connections, byte for byte, while
heartbeats keep coming over the channel; without the setting nothing listens and values use
the channel; a dialler with a wrong token, or a listener with another certificate, gets
nothing; a data connection cut mid-transfer ends the session, and the task runs again on the
relaunched host and succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import struct
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgpack
import numpy as np
import pytest

from batuta.core.task import Task, TaskStatus
from batuta.errors import ConfigError
from batuta.protocol.codec import FrameDecoder
from batuta.protocol.errors import RemoteProtocolError
from batuta.runtime import datalink
from batuta.runtime import events as pe
from batuta.runtime.cluster import ClusterHost, parse_cluster, ssh_host
from batuta.runtime.datalink import SessionLink
from batuta.runtime.pool import Pool, PoolConfig
from batuta.runtime.session import HostSession
from batuta.transport import bulk
from batuta.transport.bulk import DataLinkError
from batuta.transport.datalink_setting import DataLinkSetting, parse_data_link
from batuta.transport.growing import Growing
from tests.support.hosts import TestHosts
from tests.test_ssh_transport import settings_for

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 300.0
MIB = 2**20


def _pool(hosts: TestHosts, link: DataLinkSetting | None) -> Pool:
    host = hosts[0]
    cluster_host = ClusterHost(
        name=host.name,
        address=host.name,
        python=sys.executable,
        slots=1,
        gpus="none",
        env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        kernel_modules=("tests.support.transfer_kernels",),
    )
    return Pool([ssh_host(cluster_host, settings_for(hosts, data_link=link))], PoolConfig(heartbeat_interval=0.25))


async def _until(condition: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():
            await asyncio.sleep(0.005)
    assert condition(), what


def _link(session: HostSession) -> SessionLink:
    link = session.data_link
    assert isinstance(link, SessionLink), link
    return link


def _random(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**63, nbytes // 8, dtype=np.int64)


@pytest.mark.timeout(WAIT_S + 60)
async def test_values_go_and_come_back_over_the_data_link_byte_for_byte(
    ssh_hosts: Callable[..., TestHosts],
) -> None:
    hosts = ssh_hosts(1)
    value = _random(48 * MIB, seed=1)  # over the 32 MiB streaming threshold
    async with asyncio.timeout(WAIT_S), _pool(hosts, DataLinkSetting()) as pool:
        (session,) = pool._hosts.sessions.values()
        await _until(lambda: session.data_link is not None and _link(session).directions == 2, "the link came up")
        link = _link(session)
        heartbeats: list[bool] = []
        pool.subscribe(lambda e: heartbeats.append(True) if isinstance(e, pe.HostTelemetry) else None)
        ref = pool.put(value)
        made = await pool.submit(Task.kernel("test_reversed", ref), keep=True)
        kept = (await made).unwrap()
        back = await pool.get(kept)
        assert back.dtype == value.dtype and np.array_equal(back, value[::-1])
        assert link._sender is not None and link._sender.sent_bytes >= value.nbytes  # the put went over the link
        assert link._receiver.received_bytes >= value.nbytes  # and the fetched result came back over it
        assert session.connection is not None and session.connection.incoming.open_streams == 0
        assert link._receiver.expected == 0  # nothing announced is left waiting
        await _until(lambda: len(heartbeats) >= 2, "heartbeats still come over the channel")
        listener = link._listener
        loop = asyncio.get_running_loop()
        host = link._where.rsplit(":", 1)[0]
        with pytest.raises(DataLinkError, match="refused the token"):  # used up: each direction once
            args = (host, listener.port, link._token, listener.fingerprint, bulk.ROLE_AGENT_SENDS, 5.0)
            await loop.run_in_executor(None, bulk.dial, *args)


@pytest.mark.timeout(WAIT_S + 60)
async def test_heartbeats_keep_coming_while_a_result_comes_over_the_link(
    ssh_hosts: Callable[..., TestHosts],
) -> None:
    hosts = ssh_hosts(1)
    count = 32 * MIB  # a 256 MiB float64 result
    async with asyncio.timeout(WAIT_S), _pool(hosts, DataLinkSetting()) as pool:
        (session,) = pool._hosts.sessions.values()
        await _until(lambda: session.data_link is not None and _link(session).directions == 2, "the link came up")
        link = _link(session)
        mid_transfer: list[bool] = []
        states: list[str] = []

        def watch(event: object) -> None:
            if isinstance(event, pe.HostTelemetry):
                mid_transfer.append(session.receiving_bytes > 0)
            elif isinstance(event, pe.HostStateChanged):
                states.append(event.state)

        pool.subscribe(watch)
        result = await pool.run(Task.kernel("test_arange", count))
        assert result.status is TaskStatus.SUCCEEDED, result.error
        assert result.value.shape == (count,) and result.value[-1] == count - 1
        assert link._receiver.received_bytes >= count * 8  # it came over the link
        assert any(mid_transfer)  # heartbeats came while the result was half received
        assert "suspected" not in states and result.attempts == 1


@pytest.mark.parametrize("link", [None, DataLinkSetting(host="192.0.2.1")], ids=["off", "unbindable"])
@pytest.mark.timeout(WAIT_S + 60)
async def test_without_a_listener_values_use_the_channel(
    ssh_hosts: Callable[..., TestHosts], link: DataLinkSetting | None, caplog: pytest.LogCaptureFixture
) -> None:
    hosts = ssh_hosts(1)
    value = _random(40 * MIB, seed=2)
    caplog.set_level(logging.WARNING, "batuta.runtime.datalink")
    async with asyncio.timeout(WAIT_S), _pool(hosts, link) as pool:
        (session,) = pool._hosts.sessions.values()
        result = await pool.run(Task.kernel("test_reversed", value))
        assert result.status is TaskStatus.SUCCEEDED, result.error
        assert np.array_equal(result.value, value[::-1])
        assert session.data_link is None and pool._hosts.data_links.listeners == []
    said = [r.getMessage() for r in caplog.records]
    if link is None:
        assert said == []  # nothing to say: nothing was asked for
    else:  # an address of no interface here (TEST-NET-1): said once, and why
        assert said == ["host host0: no data link: cannot listen on 192.0.2.1:0: Cannot assign requested address; "
                        "big values go over the SSH channel"]  # fmt: skip


@pytest.mark.timeout(WAIT_S + 60)
async def test_an_agent_that_cannot_dial_back_keeps_its_values_on_the_channel(
    ssh_hosts: Callable[..., TestHosts], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The listener binds the coordinator's 127.0.0.1, which the host, in its own network
    # namespace, cannot reach: its dial is refused there, and the coordinator stops waiting.
    monkeypatch.setattr(datalink, "DIAL_WAIT_S", 1.0)
    caplog.set_level(logging.WARNING)
    hosts = ssh_hosts(1)
    value = _random(40 * MIB, seed=4)
    async with asyncio.timeout(WAIT_S), _pool(hosts, DataLinkSetting(host="127.0.0.1")) as pool:
        (session,) = pool._hosts.sessions.values()
        await _until(lambda: session.data_link is not None, "the link was offered")
        link = _link(session)
        await _until(lambda: any("did not dial" in r.getMessage() for r in caplog.records), "the coordinator gave up")
        result = await pool.run(Task.kernel("test_reversed", value))
        assert result.status is TaskStatus.SUCCEEDED, result.error
        assert np.array_equal(result.value, value[::-1])
        assert link.directions == 0 and link._receiver.received_bytes == 0  # all of it over the channel
        assert session.connection is not None and session.connection.incoming.on_open is None
        assert link._receiver.expected == 0  # nothing announced is kept for a link that never came
    said = [r.getMessage() for r in caplog.records if "data link" in r.getMessage()]
    assert sum("did not dial" in line for line in said) == 1, said  # once
    assert any("cannot connect to 127.0.0.1" in line for line in said), said  # and the agent's own why


@pytest.mark.timeout(WAIT_S + 60)
async def test_a_cut_data_connection_mid_transfer_ends_the_session_and_the_task_runs_again(
    ssh_hosts: Callable[..., TestHosts],
) -> None:
    hosts = ssh_hosts(1)
    value = _random(256 * MIB, seed=3)
    async with asyncio.timeout(WAIT_S), _pool(hosts, DataLinkSetting()) as pool:
        (session,) = pool._hosts.sessions.values()
        await _until(lambda: session.data_link is not None and _link(session).directions == 2, "the link came up")
        first = _link(session)
        states: list[str] = []

        def watch(event: object) -> None:
            if isinstance(event, pe.HostStateChanged):
                states.append(event.state)
            elif isinstance(event, pe.HostDown):
                states.append("down")

        pool.subscribe(watch)
        future = await pool.submit(Task.kernel("test_fingerprint", value))
        sender = first._sender
        assert sender is not None
        await _until(lambda: sender.sent_bytes > 0 or sender.pending_bytes > 0, "the value began to go")
        sender._sock.abort()  # the cable is cut
        result = await future
        assert result.status is TaskStatus.SUCCEEDED, result.error
        assert result.value == ("<i8", value.shape, float(value.sum(dtype=np.float64)), float(value[-1]))
        assert "down" in states and states[-1] == "up", states  # it went with the session, ran after the relaunch
        assert first._closed and first._receiver.expected == 0  # the old link let go of everything
        assert session.data_link is not first  # the relaunched session has a link of its own


@pytest.mark.timeout(WAIT_S + 60)
async def test_a_pool_closed_mid_put_over_the_link_says_nothing_of_a_broken_link(
    ssh_hosts: Callable[..., TestHosts], caplog: pytest.LogCaptureFixture
) -> None:
    """A Ctrl-C in the middle of a big `pool.put` closes the pool, which cuts the value short:
    the agent warned "data link ... broke: receiving: closed N bytes into stream 0", noise on
    the way out. (A cut while the pool runs still says so: the test above.)"""
    caplog.set_level(logging.WARNING)
    hosts = ssh_hosts(1)
    value = _random(512 * MIB, seed=5)
    async with asyncio.timeout(120):
        pool = _pool(hosts, DataLinkSetting())
        await pool.start()
        try:
            (session,) = pool._hosts.sessions.values()
            await _until(lambda: session.data_link is not None and _link(session).directions == 2, "the link came up")
            link = _link(session)
            await pool.submit(Task.kernel("test_fingerprint", pool.put(value)))  # the put goes where it runs
            sender = link._sender
            assert sender is not None
            await _until(lambda: sender.sent_bytes > 0 or sender.pending_bytes > 0, "the value began to go")
        finally:
            await pool.close()  # what the Ctrl-C's way out does
        assert link._closed
    said = [r.getMessage() for r in caplog.records if "data link" in r.getMessage()]
    assert not any("broke" in line for line in said), said


@pytest.mark.timeout(WAIT_S + 60)
async def test_a_cut_while_a_result_comes_back_neither_hangs_nor_drops_the_task(
    ssh_hosts: Callable[..., TestHosts],
) -> None:
    hosts = ssh_hosts(1)
    count = 32 * MIB  # a 256 MiB float64 result
    async with asyncio.timeout(WAIT_S), _pool(hosts, DataLinkSetting()) as pool:
        (session,) = pool._hosts.sessions.values()
        await _until(lambda: session.data_link is not None and _link(session).directions == 2, "the link came up")
        first = _link(session)
        downs: list[str] = []
        pool.subscribe(lambda e: downs.append(e.reason) if isinstance(e, pe.HostDown) else None)
        future = await pool.submit(Task.kernel("test_arange", count))
        await _until(lambda: first._receiver.expected > 0 or future.done(), "the result began to come back")
        sock = first._receiver._sock
        assert sock is not None
        sock.abort()  # the cable is cut (mid-result, or between streams if it was quicker)
        result = await future
        assert result.status is TaskStatus.SUCCEEDED, result.error
        assert result.value.shape == (count,) and result.value[-1] == count - 1 and result.value[12345] == 12345
        await _until(lambda: first._closed and bool(downs), "the session ended with its link")
        assert first._receiver.expected == 0 and session.receiving_bytes == 0  # nothing half-received is held


async def test_a_flood_of_refused_diallers_is_a_few_log_lines_per_address(caplog: pytest.LogCaptureFixture) -> None:
    """Every refused connection was a console warning: a port scan of the listener flooded the terminal."""
    listener = bulk.DataListener("127.0.0.1", 0)
    listener.start()
    loop = asyncio.get_running_loop()
    try:
        with caplog.at_level(logging.WARNING, logger="batuta.transport.bulk"):
            for _ in range(12):
                with pytest.raises(DataLinkError, match="refused the token"):
                    await loop.run_in_executor(
                        None, bulk.dial, "127.0.0.1", listener.port, bulk.new_token(), listener.fingerprint,
                        bulk.ROLE_AGENT_SENDS, 5.0,
                    )  # fmt: skip
            await _until(lambda: listener.refused == 12, "the listener refused them all")
    finally:
        await listener.close()
    refused = [r for r in caplog.records if "refused 127.0.0.1:" in r.getMessage()]
    assert len(refused) == bulk.REFUSALS_LOGGED < 12


async def test_a_wrong_token_or_another_certificate_gets_nothing() -> None:
    listener = bulk.DataListener("127.0.0.1", 0)
    listener.start()
    token = bulk.new_token()
    accepted: list[str] = []

    def on_accepted(role: str, sock: bulk._Socket) -> Callable[[], None]:
        accepted.append(role)
        return sock.close

    listener.expect(token, on_accepted)
    loop = asyncio.get_running_loop()

    async def dial(token: bytes, fingerprint: bytes, role: bytes = bulk.ROLE_AGENT_SENDS) -> bulk._Socket:
        return await loop.run_in_executor(None, bulk.dial, "127.0.0.1", listener.port, token, fingerprint, role, 5.0)

    try:
        with pytest.raises(DataLinkError, match="refused the token"):
            await dial(bulk.new_token(), listener.fingerprint)
        # the dialler may see the door close before the listener's loop has counted it
        await _until(lambda: listener.refused == 1, "the listener refused it")
        assert accepted == []
        with pytest.raises(DataLinkError, match="certificate other than"):
            await dial(token, b"\0" * 32)  # checked before the token is sent: it never leaves
        assert accepted == []
        sock = await dial(token, listener.fingerprint)
        sock.close()
        assert accepted == ["U"]
    finally:
        await listener.close()


def test_a_sessions_bytes_still_to_send_count_its_data_links() -> None:
    """What the data link's sender has queued is the host's too (it once counted only the
    channel's chunks, so a host receiving a put over its link looked idle)."""
    from batuta.runtime.session import HostSpec

    class Link:
        sending_bytes = 5 * MIB

        def close(self) -> None:
            pass

    session = HostSession(spec=HostSpec(name="h", launch=None), listener=None, heartbeat_interval=1.0)  # type: ignore[arg-type]
    assert session.sending_bytes == 0
    session.data_link = Link()
    assert session.sending_bytes == 5 * MIB


def test_the_setting_is_off_ssh_or_an_address() -> None:
    assert parse_data_link("off") is None
    assert parse_data_link("ssh") == DataLinkSetting()
    assert parse_data_link("10.0.0.5:7000") == DataLinkSetting(host="10.0.0.5", port=7000)
    assert parse_data_link("[::1]") == DataLinkSetting(host="::1", port=0)
    with pytest.raises(ValueError, match='expected "off", "ssh" or a local IP address'):
        parse_data_link("myhost")
    text = '[[hosts]]\nname = "a"\naddress = "10.0.0.1"\n[ssh]\ndata_link = "nowhere"\n'
    with pytest.raises(ConfigError, match=r"ssh.data_link: expected"):
        parse_cluster(text, source="c.toml")
    cluster = parse_cluster(text.replace("nowhere", "ssh"), source="c.toml")
    assert cluster.ssh.data_link == DataLinkSetting()


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (["h", 0, b"t" * 32, b"f" * 32, "tls"], "DataLink.port: must be a TCP port (1 to 65535), got 0"),
        (["h", 5, b"t" * 5, b"f" * 32, "tls"], "DataLink.token: must be 32 bytes, got 5"),
        (["h", 5, b"t" * 32, "f", "tls"], "DataLink.fingerprint: expected bytes, got str 'f'"),
        (
            ["h", 5, b"t" * 32, b"f" * 32, "aes"],
            "DataLink.encryption: unknown data link encryption 'aes' (known: none, tls)",
        ),
        (["h", 5, b"t" * 32, b"f" * 32], "DataLink needs 5 fields, got 4"),  # a protocol-11 coordinator's
    ],
)
def test_a_malformed_data_link_message_is_refused_naming_the_field(fields: list[object], problem: str) -> None:
    body = msgpack.packb([23, *fields])
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(RemoteProtocolError) as caught:
        decoder.next_message()
    assert str(caught.value) == problem


@contextlib.asynccontextmanager
async def _one_way_link(
    filled: Callable[[int, int], None],
    failed: Callable[[str], None],
    aborted: Callable[[int], None] | None,
    sender_failed: Callable[[str], None],
) -> AsyncIterator[tuple[bulk.BulkReceiver, bulk.BulkSender]]:
    """One direction of a link over loopback TLS: the agent's sender, the coordinator's
    receiver (`aborted` None: the agent's receiver, which never hears of an aborted stream)."""
    listener = bulk.DataListener("127.0.0.1", 0)
    listener.start()
    token = bulk.new_token()
    loop = asyncio.get_running_loop()
    receiver = bulk.BulkReceiver("test", eof_fails=False)

    def on_accepted(role: str, sock: bulk._Socket) -> Callable[[], None]:
        return lambda: receiver.start(sock, loop, filled, failed, aborted)

    listener.expect(token, on_accepted)
    args = ("127.0.0.1", listener.port, token, listener.fingerprint, bulk.ROLE_AGENT_SENDS, 5.0)
    sock = await loop.run_in_executor(None, bulk.dial, *args)
    sender = bulk.BulkSender(sock, 0, loop, sender_failed, "test")
    try:
        yield receiver, sender
    finally:
        sender.close()
        receiver.close()
        await listener.close()


async def test_a_growing_stream_goes_as_it_fills_and_an_aborted_one_is_never_handed_on() -> None:
    filled: list[tuple[int, int]] = []
    aborted: list[int] = []
    failed: list[str] = []
    source = _random(8 * MIB, seed=5).view(np.uint8)
    targets = [np.zeros(source.nbytes, dtype=np.uint8) for _ in range(3)]
    async with _one_way_link(lambda *a: filled.append(a), failed.append, aborted.append, failed.append) as (
        receiver,
        sender,
    ):
        for stream_id, target in enumerate(targets):
            receiver.expect(stream_id, target)
        growing = Growing(source.nbytes)
        sender.send(0, source.data, growing)
        growing.advance(3 * MIB)  # the rest of the array is not there yet
        await _until(lambda: receiver.received_bytes == 3 * MIB, "the filled part came at once")
        assert filled == [] and np.array_equal(targets[0][: 3 * MIB], source[: 3 * MIB])
        growing.advance(source.nbytes)
        await _until(lambda: filled == [(0, source.nbytes)], "the stream was handed on once whole")
        assert np.array_equal(targets[0], source) and receiver.growing_streams == 1

        dying = Growing(source.nbytes)
        sender.send(1, source.data, dying)
        dying.advance(MIB)
        await _until(lambda: receiver.received_bytes == source.nbytes + MIB, "a piece of the second came")
        dying.abort()  # its source died part-way
        await _until(lambda: aborted == [1], "the receiver was told")
        sender.send(2, source.data)  # the link goes on: a whole array after it
        await _until(lambda: len(filled) == 2, "the next stream came")
        assert filled[1] == (2, source.nbytes) and np.array_equal(targets[2], source)
        assert receiver.aborted_streams == 1 and receiver.expected == 0 and failed == []
        assert sender.sent_bytes == 2 * source.nbytes + MIB  # what went of the aborted one, no more


async def test_a_stream_its_receiver_could_not_allocate_is_read_and_dropped_and_the_link_goes_on() -> None:
    """An array the agent could not allocate is announced to the link by its size alone
    (chunks.py, `Unheld`): its bytes, whole or in pieces, are read and dropped, in step."""
    filled: list[tuple[int, int]] = []
    failed: list[str] = []
    source = _random(3 * MIB + 5, seed=6).view(np.uint8)  # not a whole number of pieces
    target = np.zeros(source.nbytes, dtype=np.uint8)
    async with _one_way_link(lambda *a: filled.append(a), failed.append, lambda _: None, failed.append) as (
        receiver,
        sender,
    ):
        receiver.expect(0, source.nbytes)  # dropped
        receiver.expect(1, source.nbytes)  # dropped, arriving in pieces
        receiver.expect(2, target)
        sender.send(0, source.data)
        growing = Growing(source.nbytes)
        sender.send(1, source.data, growing)
        growing.advance(source.nbytes)
        sender.send(2, source.data)
        await _until(lambda: len(filled) == 3, "all three streams came")
        assert filled == [(0, source.nbytes), (1, source.nbytes), (2, source.nbytes)] and failed == []
        assert np.array_equal(target, source) and receiver.expected == 0


async def test_a_growing_stream_on_a_side_that_never_expects_one_breaks_the_link() -> None:
    failed: list[str] = []
    # the agent's receiver: the coordinator never aborts
    async with _one_way_link(lambda *a: None, failed.append, None, lambda reason: None) as (receiver, sender):
        receiver.expect(0, np.zeros(MIB, dtype=np.uint8))
        growing = Growing(MIB)
        growing.advance(MIB)
        sender.send(0, np.ones(MIB, dtype=np.uint8).data, growing)
        await _until(lambda: bool(failed), "the receiver refused it")
        assert failed == ["stream 0 came as pieces, which this direction never sends"]


@pytest.mark.timeout(WAIT_S + 60)
async def test_a_kept_result_is_forwarded_while_it_arrives_and_a_slot_killed_mid_way_reruns_it(
    ssh_hosts: Callable[..., TestHosts],
) -> None:
    hosts = ssh_hosts(1)
    count = 32 * MIB  # a 256 MiB float64 result, kept in the slot's process
    async with asyncio.timeout(WAIT_S), _pool(hosts, DataLinkSetting()) as pool:
        (session,) = pool._hosts.sessions.values()
        await _until(lambda: session.data_link is not None and _link(session).directions == 2, "the link came up")
        receiver = _link(session)._receiver
        conn = session.connection
        assert conn is not None
        kept = (await (await pool.submit(Task.kernel("test_arange", count), keep=True))).unwrap()
        back = await pool.get(kept)
        assert back.shape == (count,) and back[-1] == count - 1 and back[12345] == 12345
        # it went while the slot was still sending it to the agent: as a growing stream
        assert receiver.growing_streams == 1 and receiver.aborted_streams == 0
        assert conn.incoming.open_streams == 0 and conn.incoming.held == 0

        again = (await (await pool.submit(Task.kernel("test_arange", count + 1), keep=True))).unwrap()
        pid = (await pool.run(Task.kernel("test_slot_pid"))).unwrap()  # one slot: the process holding it
        started = receiver.received_bytes
        getting = asyncio.ensure_future(pool.get(again))
        await _until(lambda: receiver.received_bytes > started or getting.done(), "its first piece came")
        os.kill(pid, signal.SIGKILL)  # the slot dies mid-way through sending it
        value = await getting
        assert value.shape == (count + 1,) and value[-1] == count and value[12345] == 12345  # made again
        assert receiver.aborted_streams == 1  # the half that came was forgotten, never handed on
        assert receiver.growing_streams == 3  # the aborted one, then the re-made value, forwarded again
        assert conn.incoming.open_streams == 0 and conn.incoming.held == 0 and receiver.expected == 0
        assert session.connection is conn  # the session lived on: only that value was lost


def _high_water_mib(pid: int) -> float:
    """A process's peak resident set so far (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.mark.timeout(WAIT_S + 60)
async def test_a_kept_result_fetched_over_the_link_is_lent_never_copied_to_the_agent(
    ssh_hosts: Callable[..., TestHosts],
) -> None:
    """agent/lend.py: the agent reads the value from the slot process's memory while the link
    sends it; not one byte of it crosses the slot's pipe, and the agent's peak memory does
    not grow by the value (it once received a whole copy first)."""
    hosts = ssh_hosts(1)
    count = 32 * MIB  # a 256 MiB float64 result, kept in the slot's process
    async with asyncio.timeout(WAIT_S), _pool(hosts, DataLinkSetting()) as pool:
        (session,) = pool._hosts.sessions.values()
        await _until(lambda: session.data_link is not None and _link(session).directions == 2, "the link came up")
        reports: list[pe.HostTelemetry] = []
        pool.subscribe(lambda e: reports.append(e) if isinstance(e, pe.HostTelemetry) else None)
        kept = (await (await pool.submit(Task.kernel("test_arange", count), keep=True))).unwrap()
        slot_pid = (await pool.run(Task.kernel("test_slot_pid"))).unwrap()
        agent_pid = _parent(slot_pid)  # the agent forked it
        before = _high_water_mib(agent_pid)
        back = await pool.get(kept)
        assert back.shape == (count,) and np.array_equal(back[:: 1 << 16], np.arange(0, count, 1 << 16))
        assert back[-1] == count - 1
        grew = _high_water_mib(agent_pid) - before
        assert grew < 64, f"the agent's peak grew by {grew:.0f} MiB for a 256 MiB get"
        heard = len(reports)
        await _until(lambda: len(reports) > heard, "a heartbeat after the get")
        assert reports[-1].slot_object_bytes == 0  # nothing came down the slot's pipe
        assert _link(session)._receiver.growing_streams == 1


def _parent(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no parent for pid {pid}")
