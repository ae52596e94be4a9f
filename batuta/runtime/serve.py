"""A coordinator that outlives its terminal: it serves its pool's events to attached viewers.

`CoordinatorServer` listens on a Unix socket in the user's runtime folder
(batuta/runtime/serve_paths.py; mode 0600, and each peer's uid is checked against ours) and,
with `tls_bind`, on a TCP address behind mutual TLS (the worker certificates of `batuta
certs init`, batuta/transport/tls.py). A viewer (`batuta tui --attach`) sends "attach" and
gets a hello, a snapshot of the bounded history (batuta/runtime/serve_history.py) and then
every event as it happens; `batuta ps` sends "info"; a viewer or `batuta stop` sends
"control" (pause, resume, cancel a job, drain or undrain a host, stop). The wire is in serve_wire.py.

The pool's bus calls `_pending.append` and nothing else. Every `flush_s` the batch is
encoded once, remembered in the history and, as one frame, queued for each viewer: the
coordinator's cost does not grow with the number of viewers, and a viewer never makes the
pool wait. Each viewer has its own writer task and a queue bounded by `viewer_buffer_bytes`;
a viewer that does not keep up (a slow link, a suspended terminal, a process that stopped
reading) has its queue discarded, the items in it counted as dropped, and is sent a fresh
snapshot once its socket drains: it gets merged state instead of the detail it missed. A
viewer that goes away, cleanly or killed, is simply forgotten; the job goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from batuta.errors import ServeError, UsageError, ViewerProtocolError
from batuta.runtime import events as pe
from batuta.runtime import serve_paths
from batuta.runtime import serve_wire as w
from batuta.runtime.serve_history import ViewerHistory
from batuta.runtime.views import HostView, SlotView
from batuta.transport.tls import format_address

log = logging.getLogger("batuta.serve")

READ_CHUNK = 64 * 1024
FIRST_REQUEST_TIMEOUT_S = 10.0
WRITE_HIGH_WATER = 1 << 20


class ServedPool(Protocol):
    """What the server needs of a pool (a `Pool`, or a stand-in in tests and benchmarks)."""

    @property
    def paused(self) -> bool: ...
    def subscribe(self, callback: pe.Subscriber) -> Callable[[], None]: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def drain(self, host: str, *, undo: bool = False) -> None: ...
    def slots(self) -> list[SlotView]: ...
    def hosts(self) -> list[HostView]: ...


class Controls(Protocol):
    """What runs the job: cancelling one, and stopping the whole coordinator."""

    def cancel_job(self, name: str) -> int: ...
    def stop(self) -> None: ...


@dataclass(slots=True)
class ViewerStats:
    """One viewer, as `CoordinatorServer.viewers()` reports it."""

    viewer_id: int
    peer: str
    sent_items: int = 0
    dropped_items: int = 0
    resyncs: int = 0


class _Viewer:
    __slots__ = ("queue", "queued_bytes", "resync", "stats", "task", "wake", "writer")

    def __init__(self, writer: asyncio.StreamWriter, stats: ViewerStats) -> None:
        self.writer = writer
        self.stats = stats
        self.queue: deque[tuple[bytes, int]] = deque()
        self.queued_bytes = 0
        self.resync = False
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The connecting process's uid on a Unix socket (SO_PEERCRED); None on other sockets."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class CoordinatorServer:
    """Serve `pool` under `name` to any number of viewers; see the module docstring."""

    def __init__(
        self,
        pool: ServedPool,
        *,
        name: str,
        job: str,
        path: Path | None = None,
        controls: Controls | None = None,
        cluster_label: str = "local",
        flush_s: float = 0.05,
        slot_poll_s: float = 0.5,
        viewer_buffer_bytes: int = 4 << 20,
        tls_bind: tuple[str, int] | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.pool = pool
        self.name = serve_paths.check_name(name)
        self.job = job
        self.path = path if path is not None else serve_paths.socket_path(name)
        self.controls = controls
        self.cluster_label = cluster_label
        self.history = ViewerHistory()
        self.state = "starting"  # starting | running | done | failed | cancelled | stopping
        self.summary = ""
        self.started_wall = time.time()
        self.tls_address: tuple[str, int] | None = None
        self.metrics_url = ""  # where its Prometheus metrics are served, when they are
        self._flush_s = flush_s
        self._slot_poll_s = slot_poll_s
        self._buffer_bytes = viewer_buffer_bytes
        self._tls_bind = tls_bind
        self._tls_context = tls_context
        self._pending: list[Any] = []
        self._viewers: dict[int, _Viewer] = {}
        self._ids = itertools.count(1)
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._log_handler: _LogToViewers | None = None
        self._saved_log_level = logging.NOTSET
        self._slot_signature: object = None
        self._paused = False
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.dropped_items = 0  # over every viewer, ever

    # -- life -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (the socket 0600, a stale one left by a crashed coordinator replaced)."""
        path = self.path
        if path.exists() or path.is_symlink():
            if not serve_paths.is_stale(path):
                raise UsageError(
                    f"a coordinator named {self.name!r} is already running ({path}); "
                    f"pick another --name, or end it with 'batuta stop {self.name}'"
                )
            log.info("removing the stale socket %s (its coordinator is gone)", path)
            path.unlink()
        try:
            server = await asyncio.start_unix_server(self._serve_client, path=str(path), limit=READ_CHUNK)
        except OSError as exc:
            raise ServeError(
                f"cannot listen on {path}: {exc.strerror or exc}; check the folder's permissions"
            ) from None
        os.chmod(path, 0o600)
        self._servers.append(server)
        if self._tls_bind is not None:
            host, port = self._tls_bind
            try:
                tls_server = await asyncio.start_server(self._serve_client, host, port, ssl=self._tls_context)
            except OSError as exc:
                await self.close()
                raise UsageError(
                    f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --serve-bind"
                ) from None
            self._servers.append(tls_server)
            self.tls_address = tls_server.sockets[0].getsockname()[:2]
        self._unsubscribe = self.pool.subscribe(self._pending.append)
        self._log_handler = _LogToViewers(self)
        logger = logging.getLogger("batuta")
        self._saved_log_level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:  # the viewers' log panel shows INFO, as a local dashboard's does
            logger.setLevel(logging.INFO)  # (the console's handlers hold to their own levels)
        logger.addHandler(self._log_handler)
        self._tasks.append(asyncio.create_task(self._flush_forever(), name="serve flush"))
        self._tasks.append(asyncio.create_task(self._poll_forever(), name="serve slot poll"))

    async def close(self, reason: str = "the coordinator ended") -> None:
        """Say goodbye to every viewer, stop listening and remove the socket."""
        self.flush()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._log_handler is not None:
            logger = logging.getLogger("batuta")
            logger.removeHandler(self._log_handler)
            logger.setLevel(self._saved_log_level)
            self._log_handler = None
        for server in self._servers:
            server.close()
        for task in self._tasks:
            task.cancel()
        bye = w.frame(["bye", reason])
        writer_tasks = []
        for viewer in list(self._viewers.values()):
            with contextlib.suppress(Exception):
                if not viewer.resync:
                    for data, _count in viewer.queue:
                        viewer.writer.write(data)
                    viewer.writer.write(bye)
            if viewer.task is not None:
                viewer.task.cancel()
                writer_tasks.append(viewer.task)
        for writer in list(self._writers):  # their handlers read EOF and return
            with contextlib.suppress(Exception):
                writer.close()
        for task in [*self._tasks, *writer_tasks]:
            with contextlib.suppress(BaseException):
                await task
        if self._handlers:  # a viewer that reads nothing never takes its bye: cut it off
            await asyncio.wait(list(self._handlers), timeout=2.0)
        for writer in list(self._writers):
            writer.transport.abort()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=2.0)
        self._viewers.clear()
        with contextlib.suppress(FileNotFoundError):
            if self._servers:
                self.path.unlink()
        self._servers.clear()

    # -- what the runner tells us -----------------------------------------------------------

    def note(self, item: w.Note) -> None:
        """Tell the viewers something that is not a pool event (a job's state, the status)."""
        self._pending.append(item)

    def set_state(self, state: str, summary: str = "") -> None:
        """What `batuta ps` shows: running, done, failed, cancelled, stopping; and the one-line summary."""
        self.state = state
        self.summary = summary
        status = {"running": "running", "starting": "starting"}.get(state, "closed")
        self.note(w.StatusChanged(status=status, detail=summary))

    def hosts_closed(self, reason: str) -> None:
        """The pool closed (the job ended): the hosts still shown up are shown closed. The pool
        publishes no event for the hosts it lets go, so `batuta ps` and the attached dashboards
        went on counting them up."""
        self.flush()
        at = asyncio.get_running_loop().time()  # the pool's events' clock
        for host in self.history.hosts_up():
            self._pending.append(pe.HostStateChanged(host=host, state="closed", reason=reason, at=at))
        self.flush()

    def viewers(self) -> list[ViewerStats]:
        return [viewer.stats for viewer in self._viewers.values()]

    def info(self) -> dict[str, Any]:
        """One coordinator as `batuta ps` lists it (what happened until now: flushed first)."""
        self.flush()
        history = self.history
        return {
            "name": self.name,
            "job": self.job,
            "pid": os.getpid(),
            "started": self.started_wall,
            "state": self.state,
            "paused": self.pool.paused,  # a dashboard's `p`: nothing new starts until one resumes it
            "summary": self.summary,
            # every host the pool has, those that never came up too (an unreachable one hid in 2/2)
            "hosts": max(len(history.host_up), len(self.pool.hosts())),
            "hosts_up": len(history.hosts_up()),
            "submitted": history.submitted,
            "finished": history.finished,
            "failed": history.failed,
            "viewers": len(self._viewers),
            "dropped": self.dropped_items,
            "socket": str(self.path),
            "tls": format_address(*self.tls_address) if self.tls_address else "",  # [v6]:port, as tls:// takes it
            "metrics": self.metrics_url,  # with --metrics-port 0, the port picked is found here
        }

    # -- the event stream -------------------------------------------------------------------

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            self.flush()

    async def _poll_forever(self) -> None:
        """The scheduler publishes no slot events and no pause events: poll them, send changes."""
        while True:
            paused = self.pool.paused
            if paused != self._paused:
                self._paused = paused
                self.note(w.PausedChanged(paused=paused))
            views = self.pool.slots()
            signature = tuple(
                (v.slot_id, v.state, v.deque_depth, v.in_flight, v.window_limit, v.steals_in, v.steals_out, v.completed)
                for v in views
            )
            if signature != self._slot_signature:
                self._slot_signature = signature
                self.note(w.SlotsPolled(views=tuple(views)))
            await asyncio.sleep(self._slot_poll_s)

    def flush(self) -> None:
        """Encode what happened since the last flush once; remember it; queue it for each viewer."""
        pending = self._pending
        if not pending:
            return
        items = [w.encode_item(event) for event in pending]
        pending.clear()
        self.history.record(items)
        if not self._viewers:
            return
        data = w.frame(["events", items])
        count = len(items)
        limit = self._buffer_bytes
        for viewer in self._viewers.values():
            if viewer.resync:  # it gets a fresh snapshot once it drains, which holds these too
                viewer.stats.dropped_items += count
                self.dropped_items += count
            elif viewer.queue and viewer.queued_bytes + len(data) > limit:
                dropped = count + sum(c for _d, c in viewer.queue)
                viewer.stats.dropped_items += dropped
                self.dropped_items += dropped
                viewer.queue.clear()
                viewer.queued_bytes = 0
                viewer.resync = True
                viewer.wake.set()
            else:
                viewer.queue.append((data, count))
                viewer.queued_bytes += len(data)
                viewer.wake.set()

    def _snapshot_frame(self, dropped: int = 0) -> bytes:
        return w.frame(["snapshot", self.history.snapshot(dropped=dropped)])

    async def _write_forever(self, viewer: _Viewer) -> None:
        writer = viewer.writer
        while True:
            await viewer.wake.wait()
            viewer.wake.clear()
            if viewer.resync:  # built now, from everything flushed: what was queued is in it
                viewer.resync = False
                viewer.queue.clear()
                viewer.queued_bytes = 0
                viewer.stats.resyncs += 1
                writer.write(self._snapshot_frame(viewer.stats.dropped_items))
                await writer.drain()
            while viewer.queue and not viewer.resync:
                data, count = viewer.queue.popleft()
                viewer.queued_bytes -= len(data)
                viewer.stats.sent_items += count
                writer.write(data)
                await writer.drain()

    # -- connections ------------------------------------------------------------------------

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self._writers.add(writer)
        peer = str(writer.get_extra_info("peername") or "the unix socket")
        viewer: _Viewer | None = None
        try:
            uid = _peer_uid(writer)
            if uid is not None and uid != os.getuid():
                log.warning("refused a viewer running as uid %d: this coordinator serves uid %d only", uid, os.getuid())
                writer.write(w.frame(["bye", f"this coordinator serves uid {os.getuid()} only"]))
                return
            writer.transport.set_write_buffer_limits(high=min(WRITE_HIGH_WATER, self._buffer_bytes))
            frames = w.FrameReader(w.VIEWER_FRAME_LIMIT)
            request = await asyncio.wait_for(_next_message(reader, frames), FIRST_REQUEST_TIMEOUT_S)
            if request is None:
                return
            kind, detail = w.decode_request(request)
            if kind == "info":
                writer.write(w.frame(["info", self.info()]))
                await writer.drain()
                return
            if isinstance(detail, w.Control):
                writer.write(w.frame(self._control(detail)))
                await writer.drain()
                return
            if detail != w.VERSION:
                writer.write(
                    w.frame(["bye", f"viewer protocol {detail} is not {w.VERSION}; use the same batuta version"])
                )
                return
            viewer = self._attach(writer, peer)
            while True:
                message = await _next_message(reader, frames)
                if message is None:
                    return
                kind, detail = w.decode_request(message)
                if not isinstance(detail, w.Control):
                    raise ViewerProtocolError(f"{kind!r} after attach; an attached viewer sends control only")
                viewer.queue.append((w.frame(self._control(detail)), 0))
                viewer.wake.set()
        except (ViewerProtocolError, TimeoutError) as exc:
            reason = str(exc) if isinstance(exc, ViewerProtocolError) else "no request within 10 s"
            log.warning("a viewer on %s was refused: %s", peer, reason)
            with contextlib.suppress(Exception):
                writer.write(w.frame(["bye", reason]))
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass  # the viewer went away (closed, killed): the job goes on
        finally:
            if viewer is not None:
                self._viewers.pop(viewer.stats.viewer_id, None)
                if viewer.task is not None:
                    viewer.task.cancel()
                log.debug("viewer %d detached", viewer.stats.viewer_id)
            with contextlib.suppress(Exception):
                writer.close()
            self._writers.discard(writer)
            if task is not None:
                self._handlers.discard(task)

    def _attach(self, writer: asyncio.StreamWriter, peer: str) -> _Viewer:
        """Hello and a snapshot now (synchronously: nothing flushed can fall between them), then live."""
        self.flush()
        stats = ViewerStats(viewer_id=next(self._ids), peer=peer)
        viewer = _Viewer(writer, stats)
        hello = {**self.info(), "now": asyncio.get_running_loop().time(), "label": self.cluster_label}
        writer.write(w.frame(["hello", w.VERSION, hello]))
        writer.write(self._snapshot_frame())
        self._viewers[stats.viewer_id] = viewer
        viewer.task = asyncio.create_task(self._write_forever(viewer), name=f"viewer {stats.viewer_id}")
        return viewer

    def _control(self, control: w.Control) -> list[Any]:
        """Carry out a viewer's request; the reply says what happened, in a line."""
        action, argument = control.action, control.argument
        pool = self.pool
        try:
            if action == "pause":
                pool.pause()
                text = "scheduling paused: running tasks finish, queued ones wait"
            elif action == "resume":
                pool.resume()
                text = "scheduling resumed"
            elif action == "drain_host":
                pool.drain(argument)
                text = f"draining {argument}: no new work goes there"
            elif action == "undrain_host":
                pool.drain(argument, undo=True)
                text = f"{argument} takes work again"
            elif action == "cancel_job":
                if self.controls is None:
                    raise UsageError("this coordinator has no job to cancel")
                count = self.controls.cancel_job(argument)
                text = f"cancelled {count:,} unfinished task{'s' if count != 1 else ''} of job {argument}"
            else:  # stop
                if self.controls is None:
                    raise UsageError("this coordinator cannot be stopped from a viewer")
                self.controls.stop()
                if self.state in ("starting", "running"):
                    text = f"stopping {self.name}: its tasks are cancelled and its hosts released"
                else:  # done, failed or cancelled, and lingering for `batuta ps`: nothing runs to cancel
                    text = f"stopping {self.name}: its job had ended ({self.state}); it lingered for ps only"
        except Exception as exc:  # a bad request is the viewer's news, never the coordinator's end
            log.warning("viewer request %s %r failed: %s", action, argument, exc)
            return ["reply", control.request_id, False, str(exc)]
        log.info("viewer request: %s", text)
        return ["reply", control.request_id, True, text]


async def _next_message(reader: asyncio.StreamReader, frames: w.FrameReader) -> list[Any] | None:
    """The next whole message from `reader`, or None at a clean end of stream."""
    while True:
        message = frames.next()
        if message is not None:
            return message
        data = await reader.read(READ_CHUNK)
        if not data:
            return None
        frames.feed(data)


class _LogToViewers(logging.Handler):
    """The `batuta` logger's records, INFO and up, as log lines for the viewers' log panel."""

    def __init__(self, server: CoordinatorServer) -> None:
        super().__init__(logging.INFO)
        self.server = server

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                message = f"{message}: {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            self.server.note(
                w.LogNoted(level=record.levelno, logger=record.name, message=message, created=record.created)
            )
        except Exception:  # a logging handler must never raise into the code that logged
            self.handleError(record)
