"""TLS workers end to end: `batuta certs`, the worker daemon, the TLS transport, RemoteExecutor.

Real TLS over loopback, real agent processes (one per session, started by the daemon). The
daemon runs in-process where that is enough (its agents are then our children, so the tests
can see and count them) and as `python -m batuta worker` where argv and stderr matter.
Every wait is bounded; no test sleeps to let something happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import re
import signal
import socket
import ssl
import struct
import sys
import textwrap
import time
import tomllib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

from batuta.agent.daemon import WorkerDaemon, WorkerOptions
from batuta.core.task import KernelCall, Task, TaskStatus
from batuta.errors import ConfigError, TransportError
from batuta.protocol.codec import encode_message
from batuta.protocol.connection import NEED_DATA, Connection, Role
from batuta.protocol.messages import PROTOCOL_VERSION, Error, Hello, Run, Started, TaskRequest, Welcome
from batuta.runtime import events as pe
from batuta.runtime.cluster import build_pool, parse_cluster
from batuta.runtime.code import CodeCollector, CodeSpec
from batuta.runtime.remote import RemoteExecutor
from batuta.transport.certs import (
    CLIENT,
    SERVER,
    Issued,
    check_key_file,
    init_certs,
    issue,
    new_ca,
    write_private,
    write_public,
)
from batuta.transport.tls import (
    TLSBusyError,
    TLSConfigError,
    TLSRefusedError,
    TLSSettings,
    TLSVerifyError,
    client_context,
    open_tls_stream,
    server_context,
    split_address,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 20.0


# -- certificates for every case ----------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_client: tuple[Path, Path]  # signed by another CA
    expired_client: tuple[Path, Path]
    wrong_name_server: tuple[Path, Path]  # SAN: otherhost.example only
    other_ca_server: tuple[Path, Path]


def _save(issued: Issued, folder: Path, stem: str) -> tuple[Path, Path]:
    cert, key = folder / f"{stem}.pem", folder / f"{stem}.key"
    write_public(cert, issued.cert_pem())
    write_private(key, issued.key_pem())
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    paths = init_certs(folder / "certs")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca = Issued(
        x509.load_pem_x509_certificate(paths.ca_cert.read_bytes()),
        serialization.load_pem_private_key(paths.ca_key.read_bytes(), None),  # type: ignore[arg-type]
    )
    other_ca = new_ca("someone else's CA")
    now = dt.datetime.now(dt.UTC)
    return Pki(
        dir=paths.directory,
        ca=paths.ca_cert,
        server_cert=paths.server_cert,
        server_key=paths.server_key,
        client_cert=paths.client_cert,
        client_key=paths.client_key,
        other_client=_save(issue(other_ca, CLIENT, "intruder"), folder, "other-client"),
        expired_client=_save(
            issue(ca, CLIENT, "old", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)),
            folder,
            "expired-client",
        ),
        wrong_name_server=_save(issue(ca, SERVER, "worker", hosts=["otherhost.example"]), folder, "wrong-name"),
        other_ca_server=_save(issue(other_ca, SERVER, "worker", hosts=["127.0.0.1"]), folder, "other-ca-server"),
    )


def settings(pki: Pki, **overrides: object) -> TLSSettings:
    fields: dict[str, object] = {"ca": pki.ca, "cert": pki.client_cert, "key": pki.client_key, "connect_timeout": 5.0}
    fields.update(overrides)
    return TLSSettings(**fields)  # type: ignore[arg-type]


def worker_options(pki: Pki, **overrides: object) -> WorkerOptions:
    fields: dict[str, object] = {
        "cert": pki.server_cert,
        "key": pki.server_key,
        "ca": pki.ca,
        "port": 0,
        "slots": 1,
        "gpus": "none",
    }
    fields.update(overrides)
    return WorkerOptions(**fields)  # type: ignore[arg-type]


@pytest.fixture
async def daemon(pki: Pki) -> AsyncIterator[WorkerDaemon]:
    async with WorkerDaemon(worker_options(pki)) as worker:
        yield worker
    assert _agents() == [], "an agent outlived the daemon"


def _agents(*, recursive: bool = True) -> list[psutil.Process]:
    """Our descendants that run batuta's agent code: the in-process daemon's session agents
    (our children) and, with `recursive`, their forked slots."""
    found = []
    for child in psutil.Process().children(recursive=recursive):
        with contextlib.suppress(psutil.Error):
            if "batuta.agent" in " ".join(child.cmdline()):
                found.append(child)
    return found


async def _gone(pids: list[int], timeout: float = WAIT_S) -> list[int]:
    """The pids still alive after waiting up to `timeout` for them all to exit."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        await asyncio.sleep(0.05)


async def _until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait (bounded) for what another task or the daemon does, as tests/test_serve.py's until."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def executor_for(pki: Pki, port: int, **tls: object) -> RemoteExecutor:
    builder = RemoteExecutor.builder().add_workers([f"127.0.0.1:{port}"])
    builder.tls(ca=pki.ca, cert=pki.client_cert, key=pki.client_key, connect_timeout=5.0, **tls)  # type: ignore[arg-type]
    builder.relaunch(max_relaunches=3, backoff=0.1)
    return await builder.build()


# -- certs --------------------------------------------------------------------------------


def test_certs_init_writes_a_ca_and_leaf_certificates_with_the_right_usages(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    paths = init_certs(tmp_path / "certs", hosts=["worker1.lan", "10.0.0.7"])
    assert (paths.directory.stat().st_mode & 0o777) == 0o700
    for key in (paths.ca_key, paths.server_key, paths.client_key):
        assert (key.stat().st_mode & 0o777) == 0o600
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["worker1.lan"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    client = x509.load_pem_x509_certificate(paths.client_cert.read_bytes())
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert server.issuer == ca.subject == client.issuer


def test_certs_init_never_overwrites_unless_forced(tmp_path: Path) -> None:
    from batuta.errors import UsageError

    first = init_certs(tmp_path / "c")
    before = first.server_key.read_bytes()
    with pytest.raises(UsageError, match="--force"):
        init_certs(tmp_path / "c")
    assert first.server_key.read_bytes() == before
    again = init_certs(tmp_path / "c", force=True)
    assert again.server_key.read_bytes() != before
    assert (again.server_key.stat().st_mode & 0o777) == 0o600
    with pytest.raises(UsageError, match="neither a DNS name"):
        init_certs(tmp_path / "d", hosts=["bad host!"])


def test_certs_cli(tmp_path: Path) -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "batuta", "certs", "init", str(tmp_path / "c"), "--host", "gpu1", "--host", "::1"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "server.pem: batuta-worker (serverAuth) for gpu1, ::1" in out.stdout
    assert "PRIVATE KEY" not in out.stdout + out.stderr
    assert ((tmp_path / "c" / "client.key").stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize(
    ("hosts", "bind"),
    [(["gpu2.lan", "10.0.0.12"], "gpu2.lan:9443"), (["::1", "gpu2.lan"], "[::1]:9443"), ([], "127.0.0.1:9443")],
)
def test_certs_init_tells_the_worker_to_bind_the_first_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], hosts: list[str], bind: str
) -> None:
    from batuta.cli import main

    argv = ["certs", "init", str(tmp_path / "c")]
    for host in hosts:
        argv += ["--host", host]
    assert main(argv) == 0
    assert f"batuta worker --bind {bind} --cert " in capsys.readouterr().out


async def test_certs_reissue_gives_a_worker_new_names_and_the_coordinators_keep_their_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker's host renamed: the only way was `certs init --force`, a new CA, new files for
    every worker and coordinator. `certs reissue` signs a new server certificate with the CA."""
    from batuta.cli import main

    paths = init_certs(tmp_path / "c", hosts=["oldname.lan"])
    kept = {p: p.read_bytes() for p in (paths.ca_cert, paths.ca_key, paths.client_cert, paths.client_key)}
    assert main(["certs", "reissue", str(paths.directory), "--host", "127.0.0.1", "--name", "gpu2"]) == 0
    out = capsys.readouterr().out
    assert "gpu2.pem: batuta-worker (serverAuth) for 127.0.0.1" in out and "coordinators keep their files" in out
    assert "PRIVATE KEY" not in out
    assert all(p.read_bytes() == data for p, data in kept.items())  # the CA and the coordinators' files
    cert, key = paths.directory / "gpu2.pem", paths.directory / "gpu2.key"
    assert (key.stat().st_mode & 0o777) == 0o600
    options = WorkerOptions(cert=cert, key=key, ca=paths.ca_cert, port=0, slots=1, gpus="none")
    async with WorkerDaemon(options) as worker:
        _, port = worker.address
        builder = RemoteExecutor.builder().add_workers([f"127.0.0.1:{port}"])
        builder.tls(ca=paths.ca_cert, cert=paths.client_cert, key=paths.client_key, connect_timeout=5.0)
        async with await builder.build() as executor:
            assert (await executor.execute(Task.kernel("noop", 4))).value == 4
    # without --name it replaces server.pem and server.key
    before = paths.server_cert.read_bytes()
    assert main(["certs", "reissue", str(paths.directory), "--host", "gpu2.lan"]) == 0
    assert paths.server_cert.read_bytes() != before and "for gpu2.lan" in capsys.readouterr().out
    # a folder without the CA, a name that would overwrite it: one line, exit 2
    assert main(["certs", "reissue", str(tmp_path / "none"), "--host", "x.lan"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"batuta: error: certs reissue: {tmp_path / 'none'} has no ca.pem or ca.key; run it on the folder "
        "'batuta certs init' made (ca.key stays there, off the workers)"
    )
    assert main(["certs", "reissue", str(paths.directory), "--host", "x.lan", "--name", "ca"]) == 2
    assert "--name 'ca': give a plain file name" in capsys.readouterr().err
    assert all(p.read_bytes() == data for p, data in kept.items())


def test_certs_init_takes_a_bracketed_address_and_refuses_an_impossible_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--host 10.0.0.300` became the DNS name "10.0.0.300", a mismatch found only at the first
    handshake; `--host [::1]`, as an address is written with a port, was refused."""
    from cryptography import x509

    from batuta.cli import main

    assert main(["certs", "init", str(tmp_path / "a"), "--host", "10.0.0.300"]) == 2
    assert capsys.readouterr().err.strip() == (
        "batuta: error: certs init: --host '10.0.0.300' is not an IP address (each of its four numbers is 0-255)"
    )
    assert main(["certs", "init", str(tmp_path / "b"), "--host", "[::1]"]) == 0
    out = capsys.readouterr().out
    assert "batuta worker --bind [::1]:9443 " in out
    # the coordinator's part pastes into a cluster file as it is
    snippet = out.split("coordinator, in its cluster file:\n", 1)[1].split("keep ", 1)[0]
    tls = tomllib.loads(textwrap.dedent(snippet))["tls"]
    assert tls == {
        name: str(tmp_path / "b" / f) for name, f in (("ca", "ca.pem"), ("cert", "client.pem"), ("key", "client.key"))
    }
    server = x509.load_pem_x509_certificate((tmp_path / "b" / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["::1"]


def test_certs_init_refuses_leaves_that_outlive_their_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography import x509

    from batuta.cli import main

    assert main(["certs", "init", str(tmp_path / "c"), "--days", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "batuta: error: certs init: --days 100000: at most 3650, the lifetime of the CA that signs them; "
        "the certificates would not be valid beyond it"
    )
    assert not (tmp_path / "c").exists()
    paths = init_certs(tmp_path / "d", days=3650)  # the most: no later than the CA
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    for leaf in (paths.server_cert, paths.client_cert):
        assert x509.load_pem_x509_certificate(leaf.read_bytes()).not_valid_after_utc <= ca.not_valid_after_utc


def test_a_listener_refuses_a_client_certificate_or_a_leaf_as_its_ca(pki: Pki) -> None:
    """`batuta worker --cert client.pem` started, and every coordinator then failed with a hint
    about its own files; `--ca server.pem` was taken too."""
    with pytest.raises(TLSConfigError, match=r"^worker: certificate .*client\.pem is not a server's: its "):
        server_context(cert=pki.client_cert, key=pki.client_key, ca=pki.ca)
    with pytest.raises(TLSConfigError, match=r"^worker: certificate .*ca\.pem is a CA certificate"):
        server_context(cert=pki.ca, key=pki.dir / "ca.key", ca=pki.ca)
    with pytest.raises(TLSConfigError, match=r"^worker: CA certificate .*server\.pem holds a certificate that"):
        server_context(cert=pki.server_cert, key=pki.server_key, ca=pki.server_cert)
    server_context(cert=pki.server_cert, key=pki.server_key, ca=pki.ca)


def test_a_coordinator_refuses_a_server_certificate_or_a_leaf_as_its_ca(pki: Pki) -> None:
    """[tls] cert = server.pem, or ca = client.pem: every worker's handshake failed (exit 3)
    with OpenSSL's words, "sslv3 alert unsupported certificate", "self-signed certificate"."""
    with pytest.raises(TLSConfigError, match=r"^tls: certificate .*server\.pem is not a client's: its "):
        client_context(TLSSettings(ca=pki.ca, cert=pki.server_cert, key=pki.server_key))
    with pytest.raises(TLSConfigError, match=r"^tls: CA certificate .*client\.pem holds a certificate that is not"):
        client_context(TLSSettings(ca=pki.client_cert, cert=pki.client_cert, key=pki.client_key))
    client_context(TLSSettings(ca=pki.ca, cert=pki.client_cert, key=pki.client_key))


async def test_stop_at_a_workers_address_says_it_is_a_worker(
    pki: Pki, daemon: WorkerDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """It printed the viewer wire's "a message must be an array starting with its tag"."""
    from batuta.cli import main

    _, port = daemon.address
    assert await asyncio.to_thread(main, ["stop", f"tls://127.0.0.1:{port}", "--certs", str(pki.dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"batuta: error: tls://127.0.0.1:{port}: that is a batuta worker, not a served coordinator")
    assert "\n" not in err


def test_contexts_require_tls_1_2_and_certificates(pki: Pki) -> None:
    server = server_context(cert=pki.server_cert, key=pki.server_key, ca=pki.ca)
    client = client_context(settings(pki))
    for context in (server, client):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname


def test_addresses() -> None:
    assert split_address("10.0.0.1:9000") == ("10.0.0.1", 9000)
    assert split_address("[::1]:9443") == ("::1", 9443)
    assert split_address(":7000") == ("127.0.0.1", 7000)
    assert split_address("gpu1") == ("gpu1", 9443)
    for bad in ("::1", "h:port", "h:70000", ""):
        with pytest.raises(ValueError):
            split_address(bad)
    with pytest.raises(ValueError, match=r"'9443' looks like a port: write HOST:PORT, e.g. 127.0.0.1:9443"):
        split_address("9443")


def test_address_mistakes_get_a_suggestion_that_parses() -> None:
    """`::1:9482` was told "e.g. [::1:9482]:9443"; a coordinator's address without a port took
    9443, a worker's."""
    with pytest.raises(ValueError, match=re.escape("e.g. [::1]:9482 (or [::1:9482]:9443 if all of it")):
        split_address("::1:9482")
    assert split_address("[::1]:9482") == ("::1", 9482)
    with pytest.raises(ValueError, match=re.escape("e.g. [fe80::1]:PORT")):
        split_address("fe80::1", None)
    with pytest.raises(ValueError, match=re.escape("'127.0.0.1' has no port; write HOST:PORT, e.g. 127.0.0.1:")):
        split_address("127.0.0.1", None)
    assert split_address("127.0.0.1:9470", None) == ("127.0.0.1", 9470)


# -- the happy path -----------------------------------------------------------------------


async def test_remote_executor_runs_tasks_over_mutual_tls(pki: Pki, daemon: WorkerDaemon) -> None:
    _, port = daemon.address
    async with await executor_for(pki, port) as executor:
        result = await executor.execute(Task.kernel("noop", 41))
        assert result.status is TaskStatus.SUCCEEDED and result.value == 41
        assert await executor.map("noop", [(i,) for i in range(200)]) == list(range(200))
        a = np.arange(1 << 17, dtype=np.float64)  # 1 MiB: written to the TLS transport as an array
        summed = await asyncio.wait_for(executor.execute(Task.kernel("vadd", a, a)), WAIT_S)
        assert summed.status is TaskStatus.SUCCEEDED, summed
        np.testing.assert_array_equal(summed.value, 2 * a)
        (host,) = executor.pool.hosts()
        assert host.description.startswith(f"tls 127.0.0.1:{port} (TLSv1.")
    assert await daemon.wait_idle(WAIT_S)
    assert daemon.stats.sessions == 1 and daemon.stats.agent_exit_codes == [0]


# -- refused clients ----------------------------------------------------------------------


def _client_context(pki: Pki, cert_key: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(pki.ca))
    if cert_key is not None:
        context.load_cert_chain(str(cert_key[0]), str(cert_key[1]))
    return context


@pytest.mark.parametrize("client", ["no certificate", "another CA", "expired"])
async def test_bad_client_certificates_are_refused_and_the_daemon_keeps_serving(
    pki: Pki, daemon: WorkerDaemon, client: str, caplog: pytest.LogCaptureFixture
) -> None:
    cert_key = {"no certificate": None, "another CA": pki.other_client, "expired": pki.expired_client}[client]
    _, port = daemon.address
    with pytest.raises(TLSRefusedError) as refused:
        await open_tls_stream("127.0.0.1", port, settings(pki), context=_client_context(pki, cert_key))
    assert refused.value.retryable is False
    assert "refused our client certificate" in str(refused.value)
    assert daemon.stats.refused_tls == 1 and daemon.stats.sessions == 0
    assert "TLS handshake failed" in caplog.text
    assert _agents() == []  # nothing was started for it
    async with await executor_for(pki, port) as executor:
        assert (await executor.execute(Task.kernel("noop", 1))).value == 1


def test_an_expired_certificate_is_refused_where_it_is_loaded_naming_the_date(pki: Pki, tmp_path: Path) -> None:
    """Said by the side that holds it, at start (`batuta worker` exits 2, the run names the
    host's file), not only as a failed handshake on the other side."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    with pytest.raises(TLSConfigError, match=r"^tls: certificate .*expired-client\.pem expired on \d{4}-\d\d-\d\d "):
        client_context(settings(pki, cert=pki.expired_client[0], key=pki.expired_client[1]))
    ca = Issued(
        x509.load_pem_x509_certificate(pki.ca.read_bytes()),
        serialization.load_pem_private_key((pki.ca.parent / "ca.key").read_bytes(), None),  # type: ignore[arg-type]
    )
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    cert, key = _save(issue(ca, SERVER, "w", hosts=["127.0.0.1"], not_before=later), tmp_path, "future")
    with pytest.raises(TLSConfigError, match=r"is not valid before .* \(is this machine's clock right\?\)"):
        server_context(cert=cert, key=key, ca=pki.ca)
    server_context(cert=pki.server_cert, key=pki.server_key, ca=pki.ca)  # a valid one loads


async def test_plaintext_client_gets_nothing_and_the_daemon_keeps_serving(pki: Pki, daemon: WorkerDaemon) -> None:
    _, port = daemon.address
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(encode_message(Welcome(protocol=PROTOCOL_VERSION, heartbeat_interval=1.0)) + b"GET / HTTP/1.0\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), WAIT_S)
    assert b"batuta" not in data  # no Hello, no protocol bytes: at most a TLS alert
    writer.close()
    assert daemon.stats.refused_tls == 1 and daemon.stats.sessions == 0
    async with await executor_for(pki, port) as executor:
        assert (await executor.execute(Task.kernel("noop", 2))).value == 2


# -- the coordinator checks the worker ----------------------------------------------------


async def test_server_certificate_with_the_wrong_name_is_refused_not_retried(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = pki.wrong_name_server
    caplog.set_level(logging.DEBUG, logger="batuta.agent.daemon")
    async with WorkerDaemon(worker_options(pki, cert=cert, key=key)) as worker:
        _, port = worker.address
        with pytest.raises(TLSVerifyError) as refused:
            await executor_for(pki, port)
        assert refused.value.retryable is False
        assert (  # the names it holds, read over a connection the worker refuses: no session started
            "it names otherhost.example, not 127.0.0.1, the address dialled: dial one of those (or, where 127.0.0.1 "
            "reaches the same worker, name one as [tls] server_name), or reissue the worker's certificate with "
            "`batuta certs reissue DIR --host otherhost.example --host 127.0.0.1`"
        ) in str(refused.value) and worker.stats.sessions == 0
        # the worker's log: the coordinator's refusal once, and the names read as that, not a second failure
        said = lambda: [r.getMessage() for r in caplog.records if r.name == "batuta.agent.daemon"]  # noqa: E731
        await _until(lambda: any("read the names of this worker's certificate" in line for line in said()))
        assert len([line for line in said() if "refused" in line]) == 1, said()
        # batuta's own probe: at DEBUG, not a line for the worker's operator beside the refusal
        [probe] = [r for r in caplog.records if "read the names of this worker's certificate" in r.getMessage()]
        assert probe.levelno == logging.DEBUG
        assert worker.stats.refused_tls == 1
        with pytest.raises(TLSVerifyError) as refused:
            await executor_for(pki, port, server_name="elsewhere.example")
        assert "it names otherhost.example, not elsewhere.example ([tls] server_name): set it to" in str(refused.value)
        # checked against the name it does carry, the same worker is fine
        async with await executor_for(pki, port, server_name="otherhost.example") as executor:
            assert (await executor.execute(Task.kernel("noop", 3))).value == 3


async def test_server_certificate_from_another_ca_is_refused(pki: Pki) -> None:
    cert, key = pki.other_ca_server
    async with WorkerDaemon(worker_options(pki, cert=cert, key=key)) as worker:
        _, port = worker.address
        with pytest.raises(TLSVerifyError, match="not acceptable") as refused:
            await open_tls_stream("127.0.0.1", port, settings(pki))
        assert not refused.value.retryable


async def test_nothing_listening_is_a_retryable_error(pki: Pki) -> None:
    with pytest.raises(TransportError, match="connection refused") as refused:
        await open_tls_stream("127.0.0.1", 1, settings(pki))
    assert refused.value.retryable


# -- sessions -----------------------------------------------------------------------------


async def test_second_coordinator_is_refused_with_a_protocol_error_while_one_is_active(
    pki: Pki, daemon: WorkerDaemon
) -> None:
    _, port = daemon.address
    first = await executor_for(pki, port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(settings(pki)))
        conn = Connection(Role.COORDINATOR)
        conn.receive_data(await asyncio.wait_for(reader.read(65536), WAIT_S))
        error = conn.next_event()  # the protocol's own Error, which any coordinator understands
        assert isinstance(error, Error) and error.message.startswith("worker busy: ")
        assert "one coordinator at a time" in error.message
        writer.close()
        with pytest.raises(TLSBusyError, match="worker busy"):
            await (
                RemoteExecutor.builder()
                .add_workers([f"127.0.0.1:{port}"])
                .tls(ca=pki.ca, cert=pki.client_cert, key=pki.client_key, busy_timeout=0)
                .relaunch(max_relaunches=0, backoff=0.1)
                .build()
            )
        assert (await first.execute(Task.kernel("noop", 4))).value == 4  # the first is untouched
    finally:
        await first.close()
    assert daemon.stats.refused_busy == 2
    assert await daemon.wait_idle(WAIT_S)
    async with await executor_for(pki, port) as second:  # the worker waits for the next
        assert (await second.execute(Task.kernel("noop", 5))).value == 5


async def test_a_vanished_coordinator_has_its_work_killed(pki: Pki, daemon: WorkerDaemon) -> None:
    _, port = daemon.address
    stream = await open_tls_stream("127.0.0.1", port, settings(pki))
    conn = Connection(Role.COORDINATOR)
    conn.receive_data(await stream.read())
    assert isinstance(conn.next_event(), Hello)
    stream.write(conn.send(Welcome(protocol=PROTOCOL_VERSION, heartbeat_interval=60.0)))
    spin = TaskRequest(task_id=1, slot=0, attempt=1, call=KernelCall(name="spin", args=(60.0,)))
    stream.write(conn.send(Run(tasks=(spin,))))
    async with asyncio.timeout(WAIT_S):
        started = False
        while not started:
            data = await stream.read()
            assert data
            conn.receive_data(data)
            while (event := conn.next_event()) is not NEED_DATA:
                started = started or isinstance(event, Started)
    (agent,) = _agents(recursive=False)
    everything = [agent.pid] + [p.pid for p in agent.children(recursive=True)]
    assert len(everything) >= 2  # the agent and its slot, which runs the spin
    stream.kill()  # no close_notify, no Shutdown: the coordinator just vanished
    assert await _gone(everything) == []
    assert await daemon.wait_idle(WAIT_S)
    async with await executor_for(pki, port) as executor:
        assert (await executor.execute(Task.kernel("noop", 6))).value == 6


async def test_the_pool_reconnects_with_backoff_when_the_worker_comes_back(pki: Pki) -> None:
    worker = WorkerDaemon(worker_options(pki))
    await worker.start()
    _, port = worker.address
    executor = await executor_for(pki, port)
    try:
        assert (await executor.execute(Task.kernel("noop", 7))).value == 7
        await worker.close()  # the worker goes away: its session and agent end
        successor = WorkerDaemon(worker_options(pki, port=port))
        await successor.start()
        try:
            result = await asyncio.wait_for(executor.execute(Task.kernel("noop", 8)), WAIT_S)
            assert result.value == 8
            assert successor.stats.sessions == 1
        finally:
            await executor.close()
            await successor.close()
    finally:
        await executor.close()
        await worker.close()


async def test_a_lost_tls_worker_says_how_its_connection_ended(pki: Pki) -> None:
    """It read "agent closed the stream", which nothing here knows: a TLS worker's agent runs
    on its own machine, so what is said is how the connection to it ended, and where."""
    worker = WorkerDaemon(worker_options(pki))
    await worker.start()
    _, port = worker.address
    downs: list[str] = []
    try:
        async with build_pool(parse_cluster(_cluster_text(pki, port))) as pool:
            pool.subscribe(lambda e: downs.append(e.reason) if isinstance(e, pe.HostDown) else None)
            assert (await pool.run(Task.kernel("noop", 1))).value == 1
            await worker.close()  # its session ends: close_notify, then the socket closes
            await _until(lambda: bool(downs))
    finally:
        await worker.close()
    assert downs[0] == (
        f"the TLS connection (tls 127.0.0.1:{port} (TLSv1.3)) closed (EOF) with no word from the agent: it ended "
        "there, or that machine or the network dropped the connection; the log there says which"
    )


@pytest.mark.parametrize(("ending", "said"), [("close", "EOF"), ("reset", "reset")])
async def test_a_tls_stream_says_how_the_connection_ended(pki: Pki, ending: str, said: str) -> None:
    """EOF (close_notify or a bare close) and a reset (RST) are told apart, naming the address."""
    connected = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"first words")
        await writer.drain()
        await connected.wait()
        if ending == "reset":  # linger 0: the close sends RST, not FIN
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()

    context = server_context(cert=pki.server_cert, key=pki.server_key, ca=pki.ca)
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        stream = await open_tls_stream("127.0.0.1", port, settings(pki))
        assert await stream.how_it_ended(0) == ""  # still up
        assert await stream.read() == b"first words"
        connected.set()
        async with asyncio.timeout(WAIT_S):
            assert await stream.read() == b""
        assert (await stream.how_it_ended(WAIT_S)).startswith(
            f"the TLS connection (tls 127.0.0.1:{port} (TLSv1.3)) closed ({said}) with no word from the agent"
        )
        stream.kill()
    finally:
        server.close()
        await server.wait_closed()


# -- the cluster file ---------------------------------------------------------------------


def _cluster_text(pki: Pki, port: int, extra: str = "") -> str:
    return f"""
[[hosts]]
name = "w1"
address = "127.0.0.1"
port = {port}
transport = "tls"
tags = ["tls"]
{extra}

[tls]
ca = "{pki.ca}"
cert = "{pki.client_cert}"
key = "{pki.client_key}"
"""


async def test_cluster_file_tls_hosts_run_tasks(pki: Pki, daemon: WorkerDaemon) -> None:
    _, port = daemon.address
    cluster = parse_cluster("[defaults]\nuser = 'ops'\npython = 'python3.11'\nport = 2222\n" + _cluster_text(pki, port))
    (host,) = cluster.hosts
    assert host.transport == "tls" and host.port == port and host.user is None
    assert cluster.tls is not None and cluster.tls.cert == pki.client_cert
    async with build_pool(cluster) as pool:
        result = await pool.run(Task.kernel("noop", 9))
        assert result.value == 9 and result.host == "w1"


async def test_a_tls_worker_is_sent_the_users_code_like_any_host(
    pki: Pki, daemon: WorkerDaemon, tmp_path: Path
) -> None:
    module = tmp_path / "cs_tls_kernels.py"
    module.write_text(
        "from batuta import kernel\n\n\n@kernel('cs_tls')\ndef cs_tls(x):\n    return x + 0.5\n\n\n"
        "cs_tls.cpu(cs_tls.reference)\n"
    )
    _, port = daemon.address
    cluster = parse_cluster(_cluster_text(pki, port))
    code = CodeSpec(modules=(module,))
    expected = CodeCollector(code).bundle()
    assert expected is not None
    async with build_pool(dataclasses.replace(cluster, pool=dataclasses.replace(cluster.pool, code=code))) as pool:
        result = await pool.run(Task.kernel("cs_tls", 2))
    assert (result.status, result.value, result.host, result.code) == (TaskStatus.SUCCEEDED, 2.5, "w1", expected.digest)


def test_cluster_file_tls_mistakes_name_the_fix(pki: Pki) -> None:
    with pytest.raises(ConfigError, match=r"hosts\[0\].slots: has no effect on a tls host.*batuta worker --slots"):
        parse_cluster(_cluster_text(pki, 9443, "slots = 4"))
    # one worker listed twice: its second session was refused as "busy with another coordinator" (itself)
    twice = '\n[[hosts]]\nname = "w2"\naddress = "localhost"\nport = 9443\ntransport = "tls"\n'
    with pytest.raises(ConfigError, match=r"hosts\[1\].address: w1 is the worker w2 is \(127.0.0.1:9443\); a worker"):
        parse_cluster(twice + _cluster_text(pki, 9443))
    assert len(parse_cluster(twice + _cluster_text(pki, 9444)).hosts) == 2  # two workers on one machine
    # an SSH setting has no worker option to point at (it named `--slots N --gpus ...` for user)
    with pytest.raises(ConfigError, match=r"hosts\[0\].user: has no effect on a tls host: an SSH setting; a worker"):
        parse_cluster(_cluster_text(pki, 9443, 'user = "me"'))
    with pytest.raises(ConfigError, match=r"hosts\[0\].transport: a tls host needs a \[tls\] table"):
        parse_cluster(_cluster_text(pki, 9443).split("[tls]")[0])
    with pytest.raises(ConfigError, match='expected "ssh" or "tls"'):
        parse_cluster('[[hosts]]\naddress = "a"\ntransport = "https"\n')
    with pytest.raises(ConfigError, match="tls: missing key"):
        parse_cluster(_cluster_text(pki, 9443).replace(f'key = "{pki.client_key}"', ""))
    default_port = parse_cluster(_cluster_text(pki, 9443).replace("port = 9443\n", ""))
    assert default_port.hosts[0].port is None  # 9443 at launch


# -- the daemon as a program: argv, logs, bind ----------------------------------------------


async def test_worker_command_keeps_keys_out_of_argv_and_logs(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batuta", "worker", "--bind", "127.0.0.1:0",
        "--cert", str(pki.server_cert), "--key", str(pki.server_key), "--ca", str(pki.ca),
        "--slots", "1", "--gpus", "none", "--log-level", "debug",
        stderr=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.stderr is not None
    stderr = bytearray()
    try:
        async with asyncio.timeout(WAIT_S):
            while not (found := re.search(rb"listening on 127\.0\.0\.1:(\d+) \(this machine only\)", stderr)):
                line = await proc.stderr.readline()
                assert line, stderr.decode()
                stderr += line
        port = int(found[1])
        with pytest.raises(TLSRefusedError):  # a refusal is logged on both sides
            await open_tls_stream("127.0.0.1", port, settings(pki), context=_client_context(pki, pki.other_client))
        async with await executor_for(pki, port) as executor:
            assert (await executor.execute(Task.kernel("noop", 10))).value == 10
            daemon_process = psutil.Process(proc.pid)
            argvs = [p.cmdline() for p in [daemon_process, *daemon_process.children(recursive=True)]]
        assert len(argvs) >= 3  # daemon, agent, slot
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT_S):
            stderr += await proc.stderr.read()
            assert await proc.wait() == 0
    secrets = [_pem_body(path) for path in (pki.server_key, pki.client_key)]
    visible = "\n".join(" ".join(argv) for argv in argvs)
    assert str(pki.server_key) in visible  # paths are fine
    text = stderr.decode() + caplog.text + visible
    assert "refused 127.0.0.1" in text and "session from 127.0.0.1" in text
    assert "PRIVATE KEY" not in text and "-----BEGIN" not in text
    for body in secrets:
        for chunk in (body[i : i + 24] for i in range(0, len(body) - 24, 24)):
            assert chunk not in text


def _pem_body(path: Path) -> str:
    return "".join(line for line in path.read_text().splitlines() if not line.startswith("-----"))


def test_worker_binds_loopback_by_default_and_checks_its_arguments(pki: Pki, tmp_path: Path) -> None:
    from batuta.cli import build_parser, main

    args = build_parser().parse_args(["worker", "--cert", "c", "--key", "k", "--ca", "a"])
    assert args.bind == "127.0.0.1:9443"
    assert WorkerOptions(cert=Path("c"), key=Path("k"), ca=Path("a")).host == "127.0.0.1"
    common = ["--cert", str(pki.server_cert), "--key", str(pki.server_key), "--ca", str(pki.ca)]
    assert main(["worker", "--bind", "1.2.3.4:notaport", *common]) == 2
    assert main(["worker", "--bind", "9443", *common]) == 2  # a bare port is not an address
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["worker", "--bind", f"127.0.0.1:{busy.getsockname()[1]}", *common]) == 2
    assert main(["worker", "--bind", "127.0.0.1:0", "--slots", "-1", *common]) == 2
    assert main(["worker", "--bind", "127.0.0.1:0", "--cert", str(tmp_path / "none.pem"),
                 "--key", str(pki.server_key), "--ca", str(pki.ca)]) == 2  # fmt: skip

    loose = tmp_path / "loose.key"
    loose.write_bytes(b"x")
    os.chmod(loose, 0o644)
    assert "chmod 600" in (check_key_file(loose) or "")
    assert check_key_file(pki.server_key) is None


def test_a_coordinators_key_others_may_read_is_warned_about_once(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`batuta worker --key` warned; [tls] key and --serve-certs's server.key were used silently."""
    loose = tmp_path / "client.key"
    loose.write_bytes(pki.client_key.read_bytes())
    os.chmod(loose, 0o644)
    with caplog.at_level(logging.WARNING, logger="batuta.transport.tls"):
        for _ in range(3):  # a context per connection: said once
            client_context(TLSSettings(ca=pki.ca, cert=pki.client_cert, key=loose))
    [said] = [r.getMessage() for r in caplog.records]
    assert said == f"tls: key file {loose} is accessible by others (mode 0644); run `chmod 600 {loose}`"


def test_a_certificate_its_ca_file_did_not_issue_is_warned_about_once(
    pki: Pki, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker given the ca.pem of one folder and the server.pem of another started silently;
    every coordinator's handshake then failed, with words about the coordinator's files."""
    from batuta.transport import certs

    monkeypatch.setattr(certs, "_warned", set())  # once per process: earlier tests loaded this pair
    cert, key = pki.other_ca_server
    with caplog.at_level(logging.WARNING, logger="batuta.transport.tls"):
        server_context(cert=pki.server_cert, key=pki.server_key, ca=pki.ca)  # one folder's: nothing said
        assert not caplog.records
        for _ in range(2):
            server_context(cert=cert, key=key, ca=pki.ca)
    [said] = [r.getMessage() for r in caplog.records]
    assert said == (
        f"worker: certificate {cert} was not issued by the CA in {pki.ca}; a peer that trusts only that CA "
        "refuses it (the files of two `batuta certs init` folders mixed?)"
    )


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (["--gpus", "7"], "--gpus 7: no GPU 7 on this host"),
        (["--slots", "0", "--gpus", "none"], "--slots 0 and no GPU slot: this worker would offer no slots at all"),
        (["--kernel-module", "batuta_no_such_module"], "--kernel-module batuta_no_such_module: no such module"),
    ],
    ids=["absent-gpu", "no-slots", "missing-module"],
)
def test_a_worker_that_could_serve_no_coordinator_refuses_to_start(
    pki: Pki, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, options: list[str], said: str
) -> None:
    """It listened, and every coordinator then failed ("closed the session before saying
    hello"), the reason in the worker's log alone."""
    from batuta.cli import main

    monkeypatch.delenv("BATUTA_FAKE_GPUS", raising=False)
    common = ["--cert", str(pki.server_cert), "--key", str(pki.server_key), "--ca", str(pki.ca)]
    assert main(["worker", "--bind", "127.0.0.1:0", *options, *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"batuta: error: {said}") and len(err.splitlines()) == 1, err


def test_a_worker_given_a_folder_for_a_file_says_which_files_it_holds(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said "batuta: error: batuta worker: certificate DIR: no such file", prefixed twice."""
    from batuta.cli import main

    folder = pki.server_cert.parent
    keys = ["--key", str(pki.server_key), "--ca", str(pki.ca)]
    assert main(["worker", "--bind", "127.0.0.1:0", "--cert", str(folder), *keys]) == 2
    assert capsys.readouterr().err == (
        f"batuta: error: worker: certificate {folder} is a folder; give the file in it (`batuta certs init DIR` "
        "writes ca.pem, server.pem and server.key for a worker, client.pem and client.key for a coordinator)\n"
    )


def test_a_tls_address_that_answers_with_something_else_is_named_as_such() -> None:
    """It got the SSH hint (a login banner, a shell startup file) and the bytes as mojibake."""
    from batuta.protocol.errors import ProtocolError
    from batuta.runtime.session import _not_an_agent

    said = _not_an_agent(b"\x1d\xfe\xfe\x76\xb3\x9a\x00\x01", ProtocolError("bad frame"), "tls 10.0.0.2:9443")
    assert said == (
        "protocol error before the worker's hello: it began with bytes 1d fe fe 76 b3 9a 00 01 ..., not a batuta "
        "frame (bad frame); is that address a `batuta worker` of the same batuta version, and not another service?"
    )
    assert "login banner" in _not_an_agent(b"Welcome!\n", ProtocolError("bad frame"), "ssh node1")
