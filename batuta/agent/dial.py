"""`python -m batuta.agent.dial`: an agent that dials its coordinator (allocation nodes).

Inside a batch allocation (Slurm) the coordinator cannot reach the nodes (it does not know
them in advance, and nothing listens there), so the direction is reversed: each node's job
step runs this, which connects to the coordinator's allocation listener over mutual TLS,
says which node it is, and then relays bytes between that connection and a fresh agent
process on its pipes, the way `batuta worker` does for one session:

    node: dial --TLS--> coordinator's listener;   dial --pipes--> `python -m batuta.agent --stdio`

The first bytes on the connection are one line, `batuta-node 1 INDEX NAME\\n` (INDEX: the
node's place in the allocation, `$SLURM_NODEID`; NAME: its node name), which the listener
reads before it hands the stream to a host session; everything after is the protocol.

Credentials: `--credentials FILE` names one PEM file, mode 0600, that holds this
allocation's client certificate, its key and the allocation's CA certificate (the
coordinator wrote it for this allocation only). Only its path travels in argv; OpenSSL reads
the key from the file. The coordinator's certificate must be signed by that CA and name
`--server-name`.

A session ends when the coordinator closes the connection (the agent gets EOF, kills its
slots and exits) or when the agent exits; the node then dials again, with a fresh agent (a
coordinator that lost it waits for that), until it cannot reach the listener any more (the
run is over). The step ends on SIGTERM/SIGINT (Slurm's scancel, which the coordinator sends at
its end, or the end of the time limit): the agent's stdin is closed, it is given a bound to
exit (then SIGTERM, SIGKILL), and the connection is closed, so the coordinator sees the node
leave at once and requeues its work. Exit codes: 0 once the sessions ended, 1 when no session
could be had, 2 for bad arguments or credentials.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import ssl
import stat
import sys
from pathlib import Path

from batuta.transport.base import signal_process
from batuta.transport.local import agent_command
from batuta.transport.tls import format_address, split_address, tune_socket

log = logging.getLogger("batuta.agent.dial")

READ_CHUNK = 256 * 1024
GREETING = "batuta-node 1"  # the first line's prefix; the number is this line's version
CONNECT_ATTEMPTS = 30  # the listener is up before the job is submitted: a few tries suffice
CONNECT_DELAY_S = 1.0
AGENT_EXIT_TIMEOUT_S = 5.0
MAX_SESSIONS = 1000  # sessions one node may have with its coordinator: a bound, far past any real run
REFUSALS_BEFORE_GIVING_UP = 3  # sessions in a row the coordinator closes unheard (1, 2, 4 s apart)
EXIT_FAILED = 1
EXIT_USAGE = 2
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.S)


class DialError(Exception):
    """No session with the coordinator (after the bounded retries), or bad credentials."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def greeting(index: int, name: str) -> bytes:
    """The line a node sends first; names are one token (Slurm node names are)."""
    token = re.sub(r"\s+", "_", name.strip()) or "node"
    return f"{GREETING} {index} {token}\n".encode()


def parse_greeting(line: bytes) -> tuple[int, str] | None:
    """(index, name) from a node's first line, or None if it is not one."""
    parts = line.decode("ascii", errors="replace").split()
    if len(parts) != 4 or " ".join(parts[:2]) != GREETING or not parts[2].isdigit():
        return None
    return int(parts[2]), parts[3]


def client_context(credentials: Path) -> ssl.SSLContext:
    """The node's TLS context from its credentials file (cert, key, and the CA last)."""
    try:
        mode = os.stat(credentials).st_mode
        data = credentials.read_bytes()  # certificates are public; the key is left to OpenSSL below
    except OSError as exc:
        raise DialError(f"credentials {credentials}: {exc.strerror}", usage=True) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise DialError(
            f"credentials {credentials} can be read by others (mode {stat.S_IMODE(mode):04o}); "
            "the coordinator writes it 0600: do not copy it with other permissions",
            usage=True,
        )
    certificates = _PEM_CERT.findall(data)
    if len(certificates) < 2:
        raise DialError(f"credentials {credentials}: expected the node's certificate and the CA's", usage=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_verify_locations(cadata=certificates[-1].decode("ascii"))
        context.load_cert_chain(certfile=str(credentials))
    except (ssl.SSLError, ValueError) as exc:
        raise DialError(f"credentials {credentials}: cannot load: {exc}", usage=True) from None
    return context


async def connect(
    host: str, port: int, context: ssl.SSLContext, server_name: str, timeout: float, stop: asyncio.Event
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A TLS connection to the coordinator, retried a bounded number of times; None once
    `stop` is set (scancel, the time limit) while it tries."""
    last = ""
    for attempt in range(CONNECT_ATTEMPTS):
        if stop.is_set():
            return None
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(
                    host, port, ssl=context, server_hostname=server_name, ssl_handshake_timeout=timeout
                ),
                timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            raise DialError(f"the coordinator's certificate is not acceptable: {exc.verify_message}") from None
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            last = str(exc) or type(exc).__name__
        if attempt + 1 < CONNECT_ATTEMPTS:
            with contextlib.suppress(TimeoutError):  # backoff between bounded tries, cut short by `stop`
                await asyncio.wait_for(stop.wait(), CONNECT_DELAY_S)
    raise DialError(f"cannot reach the coordinator at {format_address(host, port)} ({last})")


async def relay(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, agent_argv: list[str], stop: asyncio.Event
) -> tuple[str, bool]:
    """Run the agent and copy bytes both ways until one side ends or `stop` is set; returns why,
    and whether the coordinator sent anything (a node it refuses hears nothing: it closes)."""
    agent = await asyncio.create_subprocess_exec(
        *agent_argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=READ_CHUNK
    )
    assert agent.stdin is not None and agent.stdout is not None
    heard = [0]
    inbound = asyncio.create_task(_copy(reader, agent.stdin, heard), name="dial-in")
    outbound = asyncio.create_task(_copy(agent.stdout, writer), name="dial-out")
    stopping = asyncio.create_task(stop.wait(), name="dial-stop")
    done, _ = await asyncio.wait({inbound, outbound, stopping}, return_when=asyncio.FIRST_COMPLETED)
    why = (
        "stopped by a signal"
        if stopping in done
        else "the coordinator closed the connection"
        if inbound in done
        else "the agent exited"
    )
    with contextlib.suppress(Exception):
        agent.stdin.close()  # EOF: the agent kills its slots and exits
    for signum in (None, signal.SIGTERM, signal.SIGKILL):
        if signum is not None:
            signal_process(agent, signum)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(agent.wait(), AGENT_EXIT_TIMEOUT_S if signum is None else 2.0)
            break
    await asyncio.wait({outbound}, timeout=2.0)  # its last words, then the connection goes
    for task in (inbound, outbound, stopping):
        task.cancel()
    await asyncio.gather(inbound, outbound, stopping, return_exceptions=True)
    with contextlib.suppress(Exception):
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 2.0)
    return why, heard[0] > 0


async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter, counted: list[int] | None = None) -> None:
    while True:
        try:
            data = await source.read(READ_CHUNK)
        except (ConnectionError, OSError, ssl.SSLError):
            return
        if not data:
            return
        if counted is not None:
            counted[0] += len(data)
        try:
            sink.write(data)
            await sink.drain()
        except (ConnectionError, OSError, ssl.SSLError):
            return


async def run(options: argparse.Namespace) -> int:
    host, port = split_address(options.connect, 0)
    context = client_context(Path(options.credentials))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, stop.set)
    index = options.index if options.index is not None else int(os.environ.get("SLURM_NODEID", "0"))
    name = options.node_name or os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    argv = agent_command(
        slots=options.slots if options.slots is not None else _slurm_cpus(),
        gpus=options.gpus,
        kernel_modules=options.kernel_module,
        name=name,
        python=sys.executable,
    )
    unheard = 0  # sessions in a row the coordinator said nothing in: it refuses this node
    for session in range(MAX_SESSIONS):
        if session:  # a pause before dialling again, longer while the coordinator will not have it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CONNECT_DELAY_S * 2**unheard)
            if stop.is_set():
                return 0
        try:
            connected = await connect(host, port, context, options.server_name or host, options.connect_timeout, stop)
        except DialError:
            if session == 0:
                raise  # no session at all: exit 1, saying why
            print(f"batuta dial: node {name} ({index}): the coordinator is gone; done", file=sys.stderr, flush=True)
            return 0
        if connected is None:
            return 0
        reader, writer = connected
        tune_socket(writer.get_extra_info("socket"), keepalive_s=max(4.0, options.connect_timeout))
        writer.write(greeting(index, name))
        why, heard = await relay(reader, writer, argv, stop)
        print(f"batuta dial: node {name} ({index}): session ended: {why}", file=sys.stderr, flush=True)
        if stop.is_set():
            return 0
        unheard = 0 if heard else unheard + 1
        if unheard >= REFUSALS_BEFORE_GIVING_UP:  # its run is over (or it never wanted this node)
            print(f"batuta dial: node {name} ({index}): the coordinator refuses this node; done", file=sys.stderr)
            return 0
        # The coordinator lost this node (it was frozen, its link cut for a while) and waits for
        # it to dial again, as the README says: the node was left allocated and idle, and the
        # one node of a one-node allocation held the run until its time limit. At the run's
        # end the coordinator cancels the job (SIGTERM: `stop`), or its listener is gone.
        print(f"batuta dial: node {name} ({index}): dialling the coordinator again", file=sys.stderr, flush=True)
    return 0


def _slurm_cpus() -> int | None:
    """The CPUs Slurm gave the job on this node (one task per node: all of them are the agent's),
    for the default slot count: one slot per core of the node ran more slots than the CPUs
    granted on a node that Slurm shares with other jobs. None outside a Slurm step."""
    for key in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m batuta.agent.dial", description=__doc__.splitlines()[0])
    parser.add_argument("--connect", required=True, metavar="HOST:PORT", help="the coordinator's listener")
    parser.add_argument("--credentials", required=True, metavar="FILE", help="PEM file (0600): cert, key, CA")
    parser.add_argument("--server-name", metavar="NAME", help="the name the coordinator's certificate must carry")
    parser.add_argument("--index", type=int, help="this node's index (default: $SLURM_NODEID)")
    parser.add_argument("--node-name", help="this node's name (default: $SLURMD_NODENAME, else the hostname)")
    parser.add_argument(
        "--slots", type=int, help="CPU slots (default: the CPUs Slurm gave the job here, else one per core)"
    )
    parser.add_argument("--gpus", default="auto", help="GPU slots: auto, none, or indices")
    parser.add_argument("--kernel-module", action="append", default=[], metavar="MODULE")
    parser.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="batuta dial: %(message)s")
    try:
        options = parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return asyncio.run(run(options))
    except DialError as exc:
        print(f"batuta dial: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE if exc.usage else EXIT_FAILED
    except ValueError as exc:  # a malformed --connect
        print(f"batuta dial: error: --connect {options.connect}: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
