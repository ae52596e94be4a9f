"""Which names a refused peer's certificate holds, and what to do about a refused certificate.

A coordinator that refuses a worker's certificate for its names (or a viewer, a served
coordinator's) has no certificate left to look at: the failed handshake keeps none. So it
reads the names over a second connection (`names_presented`) that checks the chain against
its CA but not the name, and presents no certificate of its own: under TLS 1.3 its side of
the handshake is done before the listener looks for one, and the listener then refuses the
connection, so no session starts there. That connection offers the ALPN protocol
`NAMES_PROBE`, which the listener's context also names (tls.server_context): the worker
then logs its refusal as this probe, at DEBUG, not as a second failed handshake (daemon.py). Under
TLS 1.2 the listener refuses before our side is done, and the names cannot be read: the
hint then says how to list them on the listener's machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Sequence

NAMES_PROBE = "batuta-names"  # the ALPN protocol the probe offers


async def names_presented(
    host: str, port: int, context: ssl.SSLContext, server_name: str, timeout: float
) -> list[str] | None:
    """The names the listener's certificate holds, read over a connection with `context`
    (`tls.names_probe_context`); None where they cannot be read (TLS 1.2, or it failed)."""
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host, port, ssl=context, server_hostname=server_name, ssl_handshake_timeout=timeout
            ),
            timeout,
        )
    except (ssl.SSLError, OSError, TimeoutError, ValueError):
        return None
    # as the handshake left it: the listener's refusal may already have closed the connection
    presented = writer.get_extra_info("peercert") or {}
    writer.transport.abort()
    names = []
    for kind, value in presented.get("subjectAltName", ()):
        if kind == "DNS":
            names.append(value)
        elif kind == "IP Address":  # OpenSSL writes ::1 as 0:0:0:0:0:0:0:1
            names.append(str(ipaddress.ip_address(value.strip())))
    return names or None


def name_mismatch(exc: ssl.SSLCertVerificationError) -> bool:
    message = (exc.verify_message or "").lower()
    return "hostname mismatch" in message or "ip address mismatch" in message


def verify_hint(
    exc: ssl.SSLCertVerificationError,
    server_name: str,
    whose: str = "worker",
    *,
    names: Sequence[str] | None = None,
    dialled: bool = True,
) -> str:
    """What to do about a certificate refused. `names`: those its certificate holds, when read
    (`names_presented`); `dialled`: `server_name` is the address dialled, not [tls] server_name."""
    message = (exc.verify_message or "").lower()
    if name_mismatch(exc):
        if not names:
            where = "its --cert file" if whose == "worker" else "the server.pem of its --serve-certs DIR"
            return (
                f"its certificate does not name {server_name!r}, and which names it holds could not be read from "
                f"here (they cannot be under TLS 1.2): on the {whose}'s machine, `openssl x509 -noout -ext "
                f"subjectAltName -in` {where} lists them; dial one of those, or reissue the {whose}'s certificate "
                f"with `batuta certs reissue DIR --host {server_name}` and a --host for each name to keep"
            )
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        hosts = " ".join(f"--host {name}" for name in [*names, server_name])
        reissue = (
            f"or reissue the {whose}'s certificate with `batuta certs reissue DIR {hosts}` (DIR: its CA's, "
            "from `batuta certs init`; the other side keeps its files)"
        )
        if not dialled:
            return f"it names {listed}, not {server_name} ([tls] server_name): set it to one of those, {reissue}"
        # [tls] server_name is the cluster file's: a viewer dialling a coordinator has none
        alias = ""
        if whose == "worker":
            alias = f" (or, where {server_name} reaches the same worker, name one as [tls] server_name)"
        return f"it names {listed}, not {server_name}, the address dialled: dial one of those{alias}, {reissue}"
    if "expired" in message:
        return f"renew the {whose}'s certificate (`batuta certs init`)"
    ours = "[tls] ca" if whose == "worker" else "the ca.pem of --certs DIR"
    return f"check that {ours} is the CA that signed the {whose}'s certificate"
