"""The nodes the stack commands look at, and a session with one node's agent.

A node is one host of the cluster file (the `[local]` one first), or, without a cluster
file, the embedded local agent. Each is reached exactly as a pool reaches it (same
transport, same handshake), through a `Pool` of its own: one CPU slot (enough to check it,
and light on a small machine) plus the GPU slots the file gives it. One pool per node keeps
the nodes apart: a node that hangs or dies fails its own checks and nobody else's, and every
task lands on the node it is meant for.

The runtime's own version check is off for these pools (`check_versions=False`): a node
whose batuta or Python differs must still be reached, so that the difference is reported as
a finding with its fix rather than as a refused connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from batuta._version import __version__
from batuta.core.task import Task, TaskResult, TaskStatus
from batuta.errors import AgentError, BatutaError, HostUnusableError, TransportError
from batuta.protocol import messages as m
from batuta.runtime.cluster import ClusterConfig, host_specs
from batuta.runtime.pool import Pool, PoolConfig, local_host
from batuta.runtime.session import HostSession, HostSpec
from batuta.stack.model import ERROR, ROLE_LOCAL, ROLE_SSH, ROLE_TLS, Finding
from batuta.transport.base import ByteStream
from batuta.transport.ssh_settings import HostKeyError, SSHAuthError

STACK_SLOTS = 1  # CPU slots per node while it is checked
_TRANSPORT_LOGGER = "batuta.transport"
_STDERR_LINES_KEPT = 20
_AGENT_ERROR = "batuta agent: error:"  # how the agent's main() words a refused command line


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeTarget:
    """One node to look at: how to reach it and what the cluster file says about it."""

    name: str
    role: str  # ROLE_LOCAL, ROLE_SSH or ROLE_TLS
    spec: HostSpec
    gpus: str = "auto"  # as in the cluster file: "auto", "none" or indices "0,1"
    slots: int | None = None  # CPU slots as in the cluster file (None: one per core); checked with 1
    python: str = ""  # the interpreter the file names ("": the default, see `ClusterHost.python`)
    address: str = ""  # where it is reached ("" for a local agent)
    cluster_file: str = ""  # the cluster file it comes from, for suggestions

    def install_fix(self, version: str) -> str:
        """How to give this node the coordinator's batuta `version`, in one line."""
        if self.role == ROLE_TLS:
            return f"install batuta {version} where `batuta worker` runs on {self.name} (its owner does)"
        if self.role == ROLE_LOCAL:
            return f"reinstall batuta {version} for {self.python or 'the coordinator'}"
        install = f"batuta cluster install --cluster {self.cluster_file or 'FILE'}"
        if self.python:
            return f"remove python = {self.python!r} for {self.name} from the cluster file, then {install}"
        return f"put the coordinator's batuta there: {install}"

    @property
    def declares_gpus(self) -> bool:
        """The file names GPU indices for this node (so CUDA and NVML must work there)."""
        return self.gpus not in ("auto", "none")


def cluster_targets(cluster: ClusterConfig) -> list[NodeTarget]:
    """Every host of `cluster` as a node, the local one first, each with one CPU slot (a TLS
    worker keeps the slots its own command line gave it)."""
    hosts = tuple(replace(h, slots=STACK_SLOTS) for h in cluster.hosts)
    local = replace(cluster.local, slots=STACK_SLOTS) if cluster.local is not None else None
    specs = host_specs(replace(cluster, hosts=hosts, local=local))
    targets: list[NodeTarget] = []
    if local is not None:
        spec = replace(specs.pop(0), check_versions=False)
        targets.append(
            NodeTarget(
                name=local.name,
                role=ROLE_LOCAL,
                spec=spec,
                gpus=local.gpus,
                slots=cluster.local.slots if cluster.local is not None else None,
                python=local.python or "",
            )
        )
    for host, configured, spec in zip(hosts, cluster.hosts, specs, strict=True):
        targets.append(
            NodeTarget(
                name=host.name,
                role=ROLE_TLS if getattr(host, "transport", "ssh") == "tls" else ROLE_SSH,
                spec=replace(spec, check_versions=False),
                gpus=host.gpus,
                slots=configured.slots,
                python=host.python or "",
                address=host.address,
                cluster_file=cluster.source,
            )
        )
    return targets


def embedded_targets() -> list[NodeTarget]:
    """Without a cluster file: the local agent `batuta run` and `batuta tui` would start."""
    spec = replace(local_host(STACK_SLOTS, gpus="auto", name="local"), check_versions=False)
    return [NodeTarget(name="local", role=ROLE_LOCAL, spec=spec)]


def stack_pool_config(base: PoolConfig, timeout: float, modules: tuple[Path, ...] = ()) -> PoolConfig:
    """`base` (the cluster's [pool]) for a short-lived check: no relaunches, bounded start;
    `modules` (`--module PATH`) ship to every node as they do for `batuta run`."""
    code = replace(base.code, modules=tuple(modules))
    # Every node is checked: start-up waits for each (until it answers or its timeouts end).
    start = min(base.start_timeout, timeout)
    return replace(base, max_relaunches=0, start_timeout=start, start_wait=math.inf, code=code)


# -- one node's session -------------------------------------------------------------------


class _NodePool(Pool):
    """A pool over one node that keeps the agent's Hello (the versions live there)."""

    def __init__(self, spec: HostSpec, config: PoolConfig) -> None:
        super().__init__([spec], config)
        self.hello: m.Hello | None = None
        self.where = ""
        self.code_sent: m.Code | None = None  # the user's code sent after Welcome (None: nothing shipped)
        self.code_loaded: m.CodeLoaded | None = None  # the agent's answer to it
        self.code_answered = asyncio.Event()
        self.lost: str | None = None  # why the node was lost during the check, if it was

    def host_lost(self, host: str, reason: str, *, retired: bool) -> None:
        if self.lost is None:
            self.lost = reason
        super().host_lost(host, reason, retired=retired)

    def host_ready(self, session: HostSession) -> None:
        self.hello = session.hello
        self.where = session.description
        self.code_sent = session.code
        super().host_ready(session)

    def host_messages(self, session: HostSession, messages: list[m.Message]) -> None:
        for message in messages:  # the agent answers Code before any task's result
            if isinstance(message, m.CodeLoaded):
                self.code_loaded = message
                self.code_answered.set()
        super().host_messages(session, messages)


@dataclass(eq=False)
class NodeSession:
    """A started node: its Hello, how long it took, and a way to run tasks on it."""

    target: NodeTarget
    pool: _NodePool
    hello: m.Hello
    ready_s: float  # from launch to the agent's Hello
    connect_s: float | None  # of that, until the stream was open (SSH connected, command started)
    where: str

    @property
    def code_sent(self) -> m.Code | None:
        return self.pool.code_sent

    @property
    def code_loaded(self) -> m.CodeLoaded | None:
        return self.pool.code_loaded

    @property
    def lost(self) -> str | None:
        """Why the node was lost during the check (its link, its host), or None."""
        return self.pool.lost

    @property
    def gpu_slots(self) -> int:
        return sum(1 for s in self.hello.slots if "gpu" in s.capabilities)

    @property
    def gpu_indices(self) -> tuple[int, ...]:
        """The host's GPU numbers that have a slot (a task asks for one with `gpu_capability`)."""
        return tuple(
            sorted({s.gpu_index for s in self.hello.slots if "gpu" in s.capabilities and s.gpu_index is not None})
        )

    async def code_imported(self, timeout: float) -> bool:
        """Whether the shipped code (if any) was imported there within `timeout` seconds: its
        tasks wait for that, and a module whose import never ends would hold them for ever."""
        if self.pool.code_sent is None:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.pool.code_answered.wait(), timeout)
        return self.pool.code_loaded is not None

    async def run(self, task: Task, *, timeout: float) -> TaskResult:
        """Run `task` once (no retries) with `timeout` seconds of run time; never raises for
        a task that failed, timed out or was lost: the result says so.

        No wall-clock limit is added here: a task may queue behind others on the node's one
        slot for longer than its own timeout (a first compile of every kernel takes a while),
        and the pool already resolves every task: the agent kills it at its timeout, and a
        node that goes silent is lost, which fails what it held.
        """
        task = task.with_options(timeout=timeout, max_attempts=1)
        try:
            return await self.pool.run(task)
        except BatutaError as exc:
            return TaskResult(task_id=0, name=task.name, status=TaskStatus.LOST, error=str(exc))

    async def close(self) -> None:
        await self.pool.close()


async def open_node(target: NodeTarget, config: PoolConfig) -> NodeSession:
    """Start `target`'s agent; raises what the transport or handshake raised."""
    opened: list[float] = []
    launch = target.spec.launch

    async def timed_launch() -> ByteStream:
        stream = await launch()
        opened.append(time.perf_counter())
        return stream

    pool = _NodePool(replace(target.spec, launch=timed_launch), config)
    started = time.perf_counter()
    await pool.start()  # one host: if it fails, start() raises its error
    ready_s = time.perf_counter() - started
    if pool.hello is None:  # not reachable: start() returns only once the host said hello
        await pool.close()
        raise AgentError(f"host {target.name}: no hello from its agent")
    connect_s = opened[0] - started if opened else None
    return NodeSession(
        target=target, pool=pool, hello=pool.hello, ready_s=ready_s, connect_s=connect_s, where=pool.where
    )


# -- why a node could not be reached ------------------------------------------------------


def one_line(text: str) -> str:
    return " ".join(text.split())


def split_fix(text: str) -> tuple[str, str]:
    """batuta's error lines read "<what>; <fix>": split them into message and suggestion."""
    what, sep, fix = one_line(text).partition("; ")
    return (what, fix) if sep else (what, "")


_NO_HELLO = "agent did not say hello within"  # runtime/session.py's words for a start that timed out
_REMOVE_KEY = re.compile(r"`(ssh-keygen -R [^`]+)`")  # transport/ssh.py's fix for a changed host key
_MISSING_MODULE = re.compile(r"No module named '?([\w.]+)'?")  # a Python import error's words


def unreachable_finding(
    target: NodeTarget, exc: BaseException, stderr: list[str], *, by_timeout: bool = False
) -> Finding:
    """The finding for a node whose agent could not be started, naming the likely fix;
    `by_timeout`: the agent's start was bounded by the command's --timeout."""
    text = one_line(str(exc)) or type(exc).__name__
    name = target.name
    if by_timeout and isinstance(exc, AgentError) and _NO_HELLO in text:
        what, _ = split_fix(text)
        fix = "check that batuta is installed there, or give it longer with --timeout"
        return Finding(node=name, check="agent", severity=ERROR, message=what, suggestion=fix)
    if isinstance(exc, HostKeyError):
        what = text.split("; refused", 1)[0]
        if exc.changed:
            # the transport's command names the known_hosts file the cluster uses: a bare
            # `ssh-keygen -R host` edits ~/.ssh/known_hosts, and the key stayed refused
            command = _REMOVE_KEY.search(text)
            remove = f"with `{command.group(1)}`" if command else "from known_hosts (ssh-keygen -R)"
            fix = (
                f"if {name} was reinstalled, remove its old key {remove} and add the "
                "new one after checking its fingerprint; otherwise treat it as a machine in the middle"
            )
        else:
            fix = f"add {name}'s key to known_hosts after checking its fingerprint, or set trust_on_first_use"
        return Finding(node=name, check="ssh", severity=ERROR, message=what, suggestion=fix)
    if isinstance(exc, SSHAuthError):
        what, fix = split_fix(text)
        return Finding(node=name, check="ssh", severity=ERROR, message=what, suggestion=fix)
    if isinstance(exc, HostUnusableError):  # reached over SSH, but its Python cannot run the agent
        what, fix = split_fix(text)
        return Finding(node=name, check="python", severity=ERROR, message=what, suggestion=fix)
    if isinstance(exc, TransportError) and target.role in (ROLE_SSH, ROLE_TLS):
        what, fix = split_fix(text)
        over = "SSH" if target.role == ROLE_SSH else "TLS (is `batuta worker` running there?)"
        fix = fix or f"check that {name} is up and reachable at {target.address or name} over {over}"
        prefix = "unreachable: " if getattr(exc, "retryable", True) else ""
        return Finding(node=name, check=target.role, severity=ERROR, message=f"{prefix}{what}", suggestion=fix)
    said = [one_line(line) for line in stderr if line.strip()]
    refused = [line for line in said if _AGENT_ERROR in line]
    if refused:  # the agent ran, and refused its command line (the cluster file's entry)
        reason = refused[-1].split(_AGENT_ERROR, 1)[1].strip()
        if reason.startswith("--gpus"):
            fix = f'set gpus for {name} in the cluster file to GPU indices it has, or "auto"'
            return Finding(node=name, check="gpu", severity=ERROR, message=reason, suggestion=fix)
        fix = f"check {name}'s entry in the cluster file"
        return Finding(node=name, check="agent", severity=ERROR, message=f"agent refused: {reason}", suggestion=fix)
    what, fix = split_fix(text)
    if said and said[-1] not in what:  # the error may quote the agent's last line already
        what = f"{what}; the agent said: {said[-1]}"
    python = target.python or sys.executable
    if target.python and any(
        target.python in line and ("Is a directory" in line or "Permission denied" in line) for line in said
    ):  # `python = "/opt/venv"`: a folder, or a file that is no program; its fix was "/opt/venv -m batuta version"
        fix = f"python = {target.python!r} is not a Python interpreter on {name}; name one (such as .../bin/python3)"
        return Finding(node=name, check="agent", severity=ERROR, message=what, suggestion=fix)
    missing = _MISSING_MODULE.search(f"{text}\n" + "\n".join(said[-3:]))
    if not fix and missing is not None:  # batuta, or one of its dependencies (numpy, msgpack, ...)
        lacks = missing[1]
        if lacks.partition(".")[0] != "batuta":  # `python -m batuta`'s own "No module named batuta"
            fix = f"{target.python or 'the python'} on {name} lacks {lacks}, which batuta needs: "
        fix += target.install_fix(__version__)
    if not fix and target.role == ROLE_SSH and not target.python:
        fix = target.install_fix(__version__)
    fix = fix or f"check that {python} on {name} runs and has batuta installed: {python} -m batuta version"
    return Finding(node=name, check="agent", severity=ERROR, message=what, suggestion=fix)


# -- agent stderr, kept for the findings ---------------------------------------------------


class _StderrKeeper(logging.Handler):
    """Keeps the last lines each node's agent wrote to stderr (the transports log them)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(level=logging.WARNING)
        self.lines: dict[str, list[str]] = {name: [] for name in names}
        self.forward_to: logging.Logger | None = None  # where records the user asked for still go
        self.forward_level = logging.CRITICAL

    def emit(self, record: logging.LogRecord) -> None:
        if self.forward_to is not None and record.levelno >= self.forward_level:
            self.forward_to.handle(record)
        try:
            message = record.getMessage()
        except Exception:
            return
        for name, kept in self.lines.items():
            # "host0 agent: ..." (SSH) or "local agent[1234]: ..." (a local subprocess)
            if message.startswith(f"{name} agent:") or message.startswith(f"{name} agent["):
                kept.append(message.split(": ", 1)[1] if ": " in message else message)
                del kept[:-_STDERR_LINES_KEPT]
                return


@contextlib.contextmanager
def keep_agent_stderr(names: list[str]) -> Iterator[dict[str, list[str]]]:
    """While inside, collect what each named node's agent writes to stderr.

    Those lines are logged by the transports at warning level; when the user asked for less
    (the stack commands default to errors only), they are let through to this handler alone,
    which passes on what reaches the level the user asked for.
    """
    logger = logging.getLogger(_TRANSPORT_LOGGER)
    keeper = _StderrKeeper(names)
    saved: tuple[int, bool] | None = None
    if not logger.isEnabledFor(logging.WARNING):
        saved = (logger.level, logger.propagate)
        keeper.forward_to = logger.parent if logger.propagate else None
        keeper.forward_level = logger.getEffectiveLevel()
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    logger.addHandler(keeper)
    try:
        yield keeper.lines
    finally:
        logger.removeHandler(keeper)
        if saved is not None:
            logger.setLevel(saved[0])
            logger.propagate = saved[1]


def result_error(result: TaskResult) -> str:
    """A failed task's error in one line, with its status when the error says nothing."""
    error = one_line(result.error or "")
    return error or f"task {result.status.value}"


def value_of(result: TaskResult) -> Any:
    return result.value if result.status is TaskStatus.SUCCEEDED else None
