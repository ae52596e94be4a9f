"""A data link without encryption (`[ssh] data_link_encryption = "none"`: transport/linkauth.py).

The handshake's proofs (unit), then over loopback: a dialler without the token, or one that
tries TLS, is refused and logged; a listener that cannot prove the token gets nothing after
the agent's proof (not the token, not data). Over a real SSH namespace host: values go and
come back byte for byte over plain TCP; an agent whose proof matches no token is refused,
says why, and its values use the channel; a stranger dialling a live link's listener is
refused while the session goes on. The key is validated like every cluster-file key.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Callable

import numpy as np
import pytest

from batuta.core.task import Task, TaskStatus
from batuta.errors import ConfigError
from batuta.runtime import datalink
from batuta.runtime.cluster import parse_cluster
from batuta.transport import bulk, linkauth
from batuta.transport.bulk import DataLinkError
from batuta.transport.datalink_setting import DataLinkSetting, parse_data_link_encryption
from tests.support.hosts import TestHosts
from tests.test_data_link import MIB, WAIT_S, _link, _pool, _random, _until

PLAIN = DataLinkSetting(encrypted=False)
U, D = bulk.ROLE_AGENT_SENDS, bulk.ROLE_AGENT_RECEIVES


# -- the proofs -----------------------------------------------------------------------------


def test_each_side_proves_the_token_for_this_connection_only() -> None:
    tokens = [bytes([i]) * 32 for i in range(5)]
    agent_nonce, coordinator_nonce = linkauth.new_nonce(), linkauth.new_nonce()
    proof = linkauth.agent_proof(tokens[3], U, agent_nonce, coordinator_nonce)
    assert linkauth.find_token(tokens, proof, U, agent_nonce, coordinator_nonce) == tokens[3]
    assert linkauth.find_token(tokens[:3], proof, U, agent_nonce, coordinator_nonce) is None  # not offered
    assert linkauth.find_token(tokens, proof, D, agent_nonce, coordinator_nonce) is None  # the other role
    assert linkauth.find_token(tokens, proof, U, agent_nonce, linkauth.new_nonce()) is None  # replayed
    assert linkauth.find_token(tokens, proof[::-1], U, agent_nonce, coordinator_nonce) is None  # tampered
    theirs = linkauth.coordinator_proof(tokens[3], U, agent_nonce, coordinator_nonce)
    assert linkauth.proves_coordinator(theirs, tokens[3], U, agent_nonce, coordinator_nonce)
    assert theirs != proof and tokens[3] not in proof + theirs
    # a side's own proof sent back is never the other's (a label each)
    assert not linkauth.proves_coordinator(proof, tokens[3], U, agent_nonce, coordinator_nonce)
    assert linkauth.find_token(tokens, theirs, U, agent_nonce, coordinator_nonce) is None
    assert not linkauth.proves_coordinator(theirs, tokens[2], U, agent_nonce, coordinator_nonce)


def test_the_setting_is_tls_or_none() -> None:
    assert parse_data_link_encryption("tls") is True and parse_data_link_encryption("none") is False
    text = '[[hosts]]\nname = "a"\naddress = "10.0.0.1"\n[ssh]\ndata_link = "ssh"\n'
    assert parse_cluster(text, source="c.toml").ssh.data_link == DataLinkSetting()  # TLS by default
    plain = parse_cluster(text + 'data_link_encryption = "none"\n', source="c.toml")
    assert plain.ssh.data_link == DataLinkSetting(encrypted=False)
    for bad, shown in (('"off"', "'off'"), ("false", "a bool")):
        with pytest.raises(ConfigError) as caught:
            parse_cluster(text + f"data_link_encryption = {bad}\n", source="c.toml")
        assert "ssh.data_link_encryption:" in str(caught.value) and shown in str(caught.value), caught.value
        assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=r'ssh.data_link_encryption: expected "tls" \(the default\) or "none"'):
        parse_cluster(text + 'data_link_encryption = "plain"\n', source="c.toml")
    # "none" without a data link would silently change nothing: refused, naming both fixes
    linkless = text.replace('data_link = "ssh"\n', "")
    assert parse_cluster(linkless + 'data_link_encryption = "tls"\n', source="c.toml").ssh.data_link is None
    with pytest.raises(ConfigError) as caught:
        parse_cluster(linkless + 'data_link_encryption = "none"\n', source="c.toml")
    assert str(caught.value) == (
        'c.toml:5: ssh.data_link_encryption: "none" applies to data links, and data_link is off: '
        'set data_link = "ssh" (or an address) as well, or remove data_link_encryption'
    )


# -- over loopback --------------------------------------------------------------------------


async def _dial(port: int, token: bytes, *, encrypted: bool = False, role: bytes = U) -> bulk._Socket:
    loop = asyncio.get_running_loop()
    dialling = lambda: bulk.dial("127.0.0.1", port, token, bytes(32), role, 5.0, encrypted=encrypted)  # noqa: E731
    return await loop.run_in_executor(None, dialling)


async def test_a_dialler_without_the_token_or_speaking_tls_is_refused_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "batuta.transport.bulk")
    listener = bulk.DataListener("127.0.0.1", 0, encrypted=False)
    listener.start()
    token = bulk.new_token()
    accepted: list[str] = []

    def on_accepted(role: str, sock: bulk._Socket) -> Callable[[], None]:
        accepted.append(role)
        return sock.close

    listener.expect(token, on_accepted)
    try:
        with pytest.raises(DataLinkError, match="refused the token"):
            await _dial(listener.port, bulk.new_token())
        with pytest.raises(DataLinkError, match=r"TLS handshake with 127\.0\.0\.1:\d+ failed"):
            await _dial(listener.port, token, encrypted=True)  # a TLS dialler: no agreement, nothing sent
        # the dialler may see its failure before the listener's thread has judged the handshake
        await _until(lambda: listener.refused == 2, "the listener refused both")
        assert accepted == []
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 2 and all("\n" not in line for line in said), said
        assert said[0].endswith("its proof matches no offered token (a wrong token or HMAC)")
        assert "not a greeting of a batuta data link without encryption" in said[1]
        sock = await _dial(listener.port, token, role=D)
        sock.close()
        assert accepted == ["D"]
    finally:
        await listener.close()


async def test_a_plain_dialler_at_a_tls_listener_is_refused() -> None:
    listener = bulk.DataListener("127.0.0.1", 0)
    listener.start()
    token = bulk.new_token()
    listener.expect(token, lambda role, sock: sock.close)
    try:
        with pytest.raises(DataLinkError, match=r"refused the token|127\.0\.0\.1"):
            await _dial(listener.port, token)
        await _until(lambda: listener.refused == 1, "the listener refused it")
    finally:
        await listener.close()


async def test_a_listener_that_cannot_prove_the_token_gets_nothing_more() -> None:
    # A stranger listening where the agent dials: it answers with a nonce, reads the agent's
    # proof, and answers with a proof made without the token.
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    heard = bytearray()
    done = threading.Event()

    def impostor() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10.0)
            while len(heard) < len(linkauth.PLAIN_MAGIC) + 1 + linkauth.NONCE_BYTES:
                heard.extend(conn.recv(4096))
            conn.sendall(linkauth.new_nonce())
            while len(heard) < len(linkauth.PLAIN_MAGIC) + 1 + linkauth.NONCE_BYTES + linkauth.PROOF_BYTES:
                heard.extend(conn.recv(4096))
            conn.sendall(bytes(linkauth.PROOF_BYTES) + bulk.ACCEPTED)
            while chunk := conn.recv(4096):  # until the agent closes: whatever it still sends
                heard.extend(chunk)
        done.set()

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    token = bulk.new_token()
    try:
        with pytest.raises(
            DataLinkError, match=r"did not prove it holds the token \(a wrong HMAC\): not the coordinator"
        ):
            await _dial(port, token)
        assert await asyncio.get_running_loop().run_in_executor(None, done.wait, 10.0)
        assert len(heard) == len(linkauth.PLAIN_MAGIC) + 1 + linkauth.NONCE_BYTES + linkauth.PROOF_BYTES
        assert token not in heard  # the token itself never went
    finally:
        server.close()
        thread.join(10.0)


# -- over SSH namespace hosts ---------------------------------------------------------------


@pytest.mark.timeout(WAIT_S + 60)
async def test_values_go_and_come_back_over_a_plain_link_byte_for_byte(
    ssh_hosts: Callable[..., TestHosts], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "batuta.transport.bulk")
    hosts = ssh_hosts(1)
    value = _random(48 * MIB, seed=11)
    async with asyncio.timeout(WAIT_S), _pool(hosts, PLAIN) as pool:
        (session,) = pool._hosts.sessions.values()
        await _until(lambda: session.data_link is not None and _link(session).directions == 2, "the link came up")
        link = _link(session)
        assert not link._listener.encrypted and link._sender is not None
        assert not isinstance(link._sender._sock.conn, ssl.SSLSocket)  # plain TCP
        ref = pool.put(value)
        kept = (await (await pool.submit(Task.kernel("test_reversed", ref), keep=True))).unwrap()
        back = await pool.get(kept)
        assert back.dtype == value.dtype and np.array_equal(back, value[::-1])
        assert link._sender.sent_bytes >= value.nbytes and link._receiver.received_bytes >= value.nbytes
        # a stranger with a wrong token is refused, and the session goes on over its link
        with pytest.raises(DataLinkError, match="refused the token"):
            await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: bulk.dial(
                    link._where.rsplit(":", 1)[0], link._listener.port, bulk.new_token(), bytes(32), U, 5.0,
                    encrypted=False,
                ),
            )  # fmt: skip
        again = await pool.get(kept)
        assert np.array_equal(again, back) and session.connection is not None
        assert link._receiver.received_bytes >= 2 * value.nbytes
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].endswith("its proof matches no offered token (a wrong token or HMAC)"), said


@pytest.mark.timeout(WAIT_S + 60)
async def test_an_agent_whose_proof_matches_no_token_keeps_its_values_on_the_channel(
    ssh_hosts: Callable[..., TestHosts], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The listener expects a token other than the one the agent is given: the agent's proof
    # matches nothing, so both of its dials are refused.
    monkeypatch.setattr(datalink, "DIAL_WAIT_S", 3.0)
    expect = bulk.DataListener.expect
    monkeypatch.setattr(bulk.DataListener, "expect", lambda self, token, on: expect(self, bulk.new_token(), on))
    caplog.set_level(logging.WARNING)
    hosts = ssh_hosts(1)
    value = _random(40 * MIB, seed=12)
    async with asyncio.timeout(WAIT_S), _pool(hosts, PLAIN) as pool:
        (session,) = pool._hosts.sessions.values()
        await _until(lambda: any("did not dial" in r.getMessage() for r in caplog.records), "the coordinator gave up")
        link = _link(session)
        result = await pool.run(Task.kernel("test_reversed", value))
        assert result.status is TaskStatus.SUCCEEDED, result.error
        assert np.array_equal(result.value, value[::-1])
        assert link.directions == 0 and link._receiver.received_bytes == 0  # all of it over the channel
        assert link._listener.refused == 2
    said = [r.getMessage() for r in caplog.records if "data l" in r.getMessage()]
    refused = [line for line in said if "its proof matches no offered token" in line]
    assert len(refused) == 2, said  # the coordinator's why, once a dial
    assert sum("refused the token" in line for line in said) == 2, said  # and the agent's, once a direction
