"""The host agent: one per host, one framed stream to the coordinator, one process per slot.

What it does, in the order a session goes:

1. Send `Hello`, then spawn the slot processes (CPU slots `0..N-1`, then one GPU slot per
   selected GPU; see `spawn.py`) without waiting for them to be ready; wait for `Welcome` (or
   `Error`: print it, exit 1). Nothing but an `Error` may go out before `Welcome`, so a
   `SlotChanged` from that time waits for it. Heartbeats start with `Welcome`, one at once,
   then every `heartbeat_interval`.
2. Serve: `Code` (the user's modules, right after Welcome) is written to the cache (answered
   `CodeStored`), imported here (on a thread, the heartbeats going on; later messages wait)
   and answered with `CodeLoaded`; the slots are replaced by ones with that code (see
   `code.py` and `supervisor.py`). A task whose `code` digest is not the one loaded is
   answered "error" and not run. `Put`, `Drop` and `Fetch` go to the object store, and for
   objects kept in slot processes to `keeper.py`. `Run` queues tasks on their slots
   (`supervisor.py` has the rules for feeding, Started inference, timeouts, cancel,
   steal-back, slot death and restarts); `StealBack` answers at once with what was still
   queued; `Cancel` answers each held task "cancelled" (a task already fed to its slot when
   the slot gets to it); unknown ids are ignored.
3. End: `Shutdown` kills all work and slots, sends the results it already has, says `Bye`,
   exits 0; killed tasks are not answered. EOF on stdin (the coordinator closed the stream,
   its SSH channel died, or it was killed) kills everything and exits 0 without a word, also
   where it cuts a message or a streamed array short (a Ctrl-C during a transfer). A protocol
   error from the coordinator is answered with `Error(message)`, then everything stops and
   the agent exits 1. SIGTERM, SIGHUP and SIGINT
   kill everything, say `Bye`, exit 128 + the signal number.

Outgoing messages are collected during one pass of the event loop and written with one
`send_many` call (scheduled with `call_soon`): `Started` ids first, without those whose
result goes out in the same write, then everything else in the order it happened, with
consecutive results merged into `Done` frames. Two kinds may wait up to `REPORT_DELAY_S`
for more to join them (`outbox.Flusher`, which says why): `Started`, and, on a host whose
every core has a slot, the result of a slot with work in hand for a while; anything else
(a result that leaves its slot idle, a heartbeat, a steal-back answer, a fetched value)
goes at the end of the pass and takes them along. Large result arrays stream
(`protocol/chunks.py`): their chunks go out while the stdout pipe holds less than
`CHUNK_HIGH_WATER` bytes, and each write of messages goes in between, so heartbeats and other
results are never stuck behind a large value.

A `Run` for a slot this agent does not have is answered with an "error" outcome per task.
A `Run` for a slot that is down is not answered: "down" already handed every task of that
slot back to the coordinator (see `supervisor.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any

from batuta._version import __version__
from batuta.agent.code import CodeLoader, SlotCode, cache_root, module_source_digest, stale_error
from batuta.agent.datalink import AgentDataLink
from batuta.agent.execute import print_error
from batuta.agent.keeper import Keeper
from batuta.agent.objects import ObjectStore, default_cap, host_memory, parse_object_memory
from batuta.agent.options import AgentOptions
from batuta.agent.outbox import WAIT_IF_BUSY_FOR_S, DoneBatch, Flusher, Item, encode_one_by_one, outbox_messages
from batuta.agent.shm import SharedArena
from batuta.agent.spawn import SlotProcess, preload_for_fork, spawn_mode
from batuta.agent.supervisor import SlotSupervisor
from batuta.agent.telemetry import TelemetrySource, package_versions, with_device_caches
from batuta.agent.threads import BLAS_THREADS_ENV, budget_env, limit_loaded_blas, slot_share, usable_cores
from batuta.core.objects import ObjectRef, refs_in
from batuta.core.task import KernelCall, Outcome
from batuta.protocol._fields import first_unheld
from batuta.protocol.connection import CLOSED, NEED_DATA, Connection, Role
from batuta.protocol.errors import CutShortError, LocalProtocolError, RemoteProtocolError
from batuta.protocol.messages import (
    PROTOCOL_VERSION,
    Bye,
    Cancel,
    Code,
    CodeLoaded,
    CodeStored,
    DataLink,
    Drop,
    Error,
    Fetch,
    GpuInfo,
    Heartbeat,
    Hello,
    Keepalive,
    Message,
    Put,
    Run,
    Shutdown,
    SlotChanged,
    SlotInfo,
    Started,
    StealBack,
    StealBackReply,
    TaskOutcome,
    Welcome,
)
from batuta.transport.fdio import FdReader, FdWriter

CHUNK_HIGH_WATER = 8 * 2**20  # chunk bytes queued on stdout before the agent waits for it to drain
DRAIN_TIMEOUT_S = 5.0  # how long a Bye or Error may take to reach the coordinator at exit
IMPORT_NOTE_ENV = "BATUTA_IMPORT_NOTE_S"  # seconds before the first "still importing" line (default 30)
EXIT_OK = 0
EXIT_ERROR = 1


class Agent:
    """The agent's event-loop side. `await run()` returns the process exit code."""

    def __init__(
        self,
        options: AgentOptions,
        telemetry: TelemetrySource,
        *,
        frames_in: int,
        frames_out: int,
        gpus: tuple[GpuInfo, ...],
        gpu_slots: tuple[tuple[GpuInfo, dict[str, str]], ...],
    ) -> None:
        self._options = options
        self._telemetry = telemetry
        self._telemetry_failure = ""  # said once until it changes: it repeated every heartbeat (EMFILE)
        self._frames_in = frames_in
        self._frames_out = frames_out
        self._gpus = gpus
        self._gpu_slots = gpu_slots
        # large frames and streamed arrays land in shared memory, which slots map (shm.py)
        memory_total = host_memory()
        self._arena = SharedArena(most_bytes=memory_total)
        self._conn = Connection(Role.AGENT, allocate=self._arena.allocate)
        self._host_name = options.name or os.uname().nodename
        self._code = CodeLoader(self._host_name)
        self._spawn_mode = spawn_mode()
        self._slots: dict[int, SlotSupervisor] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: FdReader | None = None
        self._writer: FdWriter | None = None
        self._exit: asyncio.Future[int] | None = None
        self._welcomed = False
        self._stopping = False
        self._importing = False  # the user's code imports on a thread; messages after it wait
        self._heartbeat_interval = 1.0
        self._heartbeat_seq = 0
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._heartbeat_due = 0.0
        self._silence_limit = 0.0  # Welcome's: exit after this long without a byte from the coordinator
        self._last_heard = time.monotonic()
        # The outbox of one loop pass: Started ids, and messages or result batches in order.
        self._started: list[int] = []
        self._finished_ids: set[int] = set()
        self._outbox: list[Item] = []
        self._flusher = Flusher(self._flush)
        self._no_spare_core = False  # every core has a slot (`_spawn_slots`): results may wait
        self._chunk_pump: asyncio.Task[None] | None = None  # waits for stdout to drain, then sends more chunks
        self._touched: set[SlotSupervisor] = set()  # slots whose queue changed in this read
        cap = (
            parse_object_memory(options.object_memory, memory_total)
            if options.object_memory
            else default_cap(memory_total)
        )
        # what the coordinator put here (pool.put) and results kept here (keep=True)
        self._keeper: Keeper  # made below, with the store
        spilled, evict = (lambda i: self._keeper.spilled(i)), (lambda i, n: self._keeper.evict(i, n))
        self._objects = ObjectStore(cap, cache_root(), on_spill=spilled, on_evict=evict, warn=_warn)
        self._keep_as: dict[int, int] = {}  # task id -> the object id its result is kept as
        # put values this host could not allocate (out of memory): why, for the tasks that read them
        self._unheld: dict[int, str] = {}
        self._killed: list[SlotProcess] = []  # slot processes to reap at exit
        self._data_link = AgentDataLink(self._conn, self._take_messages, self._link_broke, _warn)  # big arrays
        self._keeper = Keeper(  # objects kept in slot processes, and the Fetches for them
            objects=self._objects,
            slots=self._slots,
            data_link=self._data_link,
            host_name=self._host_name,
            emit=self._emit,
            forward=self._emit,
            finished=self._add_result,  # a Fetch answered: at once
            call_soon=lambda *args: self._loop.call_soon(*args) if self._loop is not None else None,
            call_soon_threadsafe=lambda *args: (
                self._loop.call_soon_threadsafe(*args) if self._loop is not None else None
            ),
        )

    # -- SlotEvents ---------------------------------------------------------------------

    def task_started(self, task_id: int) -> None:
        self._started.append(task_id)
        self._schedule_flush(wait=True)

    def task_finished(self, outcome: TaskOutcome) -> None:
        slot = self._slots.get(outcome.slot)  # busy for a while: not waiting for the coordinator
        wait = self._no_spare_core and slot is not None and slot.busy_for() >= WAIT_IF_BUSY_FOR_S
        self._add_result(outcome, wait=wait)

    def _add_result(self, outcome: TaskOutcome, *, wait: bool = False) -> None:
        """Queue an outcome; `wait`: it may wait a little for others to join it (`Flusher`)."""
        keep = self._keep_as.pop(outcome.task_id, 0) if self._keep_as else 0
        if keep and outcome.status is Outcome.OK:
            outcome = self._kept(keep, outcome)
        last = self._outbox[-1] if self._outbox else None
        if not isinstance(last, DoneBatch):
            last = DoneBatch()
            self._outbox.append(last)
        last.results.append(outcome)
        self._finished_ids.add(outcome.task_id)
        self._schedule_flush(wait=wait)

    def slot_changed(self, state: SlotChanged) -> None:
        self._emit(state)

    def _kept(self, object_id: int, outcome: TaskOutcome) -> TaskOutcome:
        """The slot kept the result as `object_id` and sent what it is, not its bytes
        (`(ObjectRef, nbytes, shape, dtype)`, passed on to the coordinator as it came)."""
        value = outcome.value
        if not (
            type(value) is tuple
            and len(value) == 4
            and type(value[0]) is ObjectRef
            and value[0].object_id == object_id
            and type(value[1]) is int
        ):
            return TaskOutcome(
                task_id=outcome.task_id,
                slot=outcome.slot,
                attempt=outcome.attempt,
                status=Outcome.ERROR,
                error=f"slot {outcome.slot} reported kept object {object_id} as {type(value).__name__}, "
                "not (ref, nbytes, shape, dtype)",
                run_s=outcome.run_s,
            )
        self._objects.keep_in_slot(object_id, outcome.slot, value[1])
        return outcome

    # -- writing ------------------------------------------------------------------------

    def _emit(self, item: Item) -> None:
        self._outbox.append(item)
        self._schedule_flush()

    def _schedule_flush(self, *, wait: bool = False) -> None:
        if self._loop is not None:
            self._flusher.soon(self._loop, wait=wait)

    def _flush(self) -> None:
        self._flusher.began()
        if not self._welcomed:
            # Before Welcome the agent may send nothing but Error; a slot that restarted
            # meanwhile is reported once the session is accepted.
            return
        messages: list[Message] = []
        if self._started:
            finished = self._finished_ids
            ids = tuple(t for t in self._started if t not in finished)
            if ids:
                messages.append(Started(task_ids=ids))
        more, growing = outbox_messages(self._outbox, forwarding=self._data_link.sending)
        messages += more
        self._started = []
        self._finished_ids = set()
        self._outbox = []
        if not messages or self._writer is None:
            return
        with self._data_link.growing(growing):  # arrays still arriving go piece by piece
            try:  # the usual path: a vectored write, result arrays not joined into one bytes first
                self._writer.write_parts(self._conn.send_many_parts(messages))
            except LocalProtocolError:
                data = encode_one_by_one(self._conn, messages, fail=self._fail, warn=_warn)
                if data:
                    self._writer.write(data)
        self._send_chunks()

    def _send_chunks(self) -> None:
        """Write chunks of streaming results while stdout holds less than CHUNK_HIGH_WATER;
        past it, wait for the pipe to drain (a task), then go on."""
        writer, conn = self._writer, self._conn
        if writer is None or self._chunk_pump is not None or self._stopping:
            return
        while conn.streaming and writer.buffered < CHUNK_HIGH_WATER and not writer.failed:
            writer.write_parts(conn.next_chunk_parts(CHUNK_HIGH_WATER))
        if conn.streaming and not writer.failed and self._loop is not None:
            self._chunk_pump = self._loop.create_task(self._await_drain(writer))

    async def _await_drain(self, writer: FdWriter) -> None:
        await writer.drain()
        self._chunk_pump = None
        self._send_chunks()

    def _on_write_error(self, exc: OSError) -> None:
        # The coordinator's end of our stdout is gone; its end of stdin will follow.
        self._finish(EXIT_OK, bye=None)

    # -- reading ------------------------------------------------------------------------

    def _on_input(self, data: bytes) -> None:
        if self._stopping:
            return
        self._last_heard = time.monotonic()
        try:
            self._conn.receive_data(data)
        except RemoteProtocolError as exc:
            self._fail(f"protocol error from the coordinator: {exc}", send_error=True)
            return
        self._take_messages()

    def _on_received(self, nbytes: int) -> None:
        """Bytes read straight into a large frame's buffer or a streamed array."""
        if self._stopping:
            return
        self._last_heard = time.monotonic()
        self._conn.received(nbytes)
        self._take_messages()

    def _take_messages(self) -> None:
        try:
            # a data link may call this after the end (agent/datalink.py); while the user's
            # code imports, what follows its Code waits (a Run may need it)
            while not self._stopping and not self._importing:
                event = self._conn.next_event()
                if event is NEED_DATA:
                    break
                if event is CLOSED:
                    self._finish(EXIT_OK, bye=None)
                    return
                self._dispatch(event)
                if self._stopping:
                    return
        except CutShortError:  # the coordinator went away mid-transfer (a Ctrl-C): its end, not a fault
            self._finish(EXIT_OK, bye=None)
            return
        except RemoteProtocolError as exc:
            self._fail(f"protocol error from the coordinator: {exc}", send_error=True)
            return
        except Exception as exc:  # a bug here: say so on both channels rather than limp on
            self._fail(f"agent failed: {type(exc).__name__}: {exc}", send_error=True)
            raise
        for slot in self._touched:
            slot.pump()
        self._touched.clear()

    def _dispatch(self, message: Any) -> None:
        if isinstance(message, Run):
            self._on_run(message)
        elif isinstance(message, StealBack):
            self._on_steal_back(message)
        elif isinstance(message, Cancel):
            self._on_cancel(message.task_ids)
        elif isinstance(message, Put):
            self._on_put(message)
        elif isinstance(message, Fetch):
            self._keeper.fetch(message)
        elif isinstance(message, Drop):
            for object_id in message.object_ids:
                self._objects.discard(object_id)
                self._unheld.pop(object_id, None)
            self._keeper.drop(message.object_ids)
        elif isinstance(message, Code):
            self._on_code(message)
        elif isinstance(message, Welcome):
            self._on_welcome(message)
        elif isinstance(message, DataLink):  # big arrays beside this channel (agent/datalink.py)
            self._data_link.offered(message)
        elif isinstance(message, Keepalive):
            pass  # its bytes were the point (`_last_heard`)
        elif isinstance(message, Shutdown):
            self._finish(EXIT_OK, bye=Bye(reason=message.reason or "shutdown requested"))
        elif isinstance(message, Error):
            _warn(f"the coordinator ended the session: {message.message}")
            self._finish(EXIT_ERROR, bye=None)
        else:
            raise RemoteProtocolError(f"unexpected {type(message).__name__} from the coordinator")

    def _on_put(self, put: Put) -> None:
        unheld = first_unheld(put.value) if self._conn.incoming.unheld_count else None
        if unheld is None:
            self._unheld.pop(put.object_id, None)
            self._objects.put(put.object_id, put.value)
            return
        # Its bytes were read and dropped (chunks.py): the tasks that read it fail here, saying
        # why, rather than the whole host going down and the value coming again for ever.
        self._objects.discard(put.object_id)
        self._unheld[put.object_id] = unheld.describe()
        _warn(f"could not hold object {put.object_id} in memory: {unheld.describe()}")

    def _unheld_problem(self, call: KernelCall) -> str | None:
        """Why a task cannot run here if an argument of its, or an object it reads, could not be
        allocated on this host (out of memory)."""
        if not self._conn.incoming.unheld_count:  # the usual case: nothing to look for
            return None
        unheld = first_unheld(call.args)
        if unheld is not None:
            what = f"this task's arguments in memory: {unheld.describe()}"
        else:
            held_not = [r.object_id for r in refs_in(call.args) if r.object_id in self._unheld]
            if not held_not:
                return None
            what = f"put value {held_not[0]} in memory: {self._unheld[held_not[0]]}"
        return (
            f"host {self._host_name} could not hold {what}; run it on a host with more free memory "
            "(requires=[a tag of such hosts]) or pass the array in parts (Pool.map_chunked)"
        )

    def _on_welcome(self, welcome: Welcome) -> None:
        self._welcomed = True
        self._schedule_flush()  # SlotChanged changes that happened during the handshake
        self._heartbeat_interval = max(0.05, float(welcome.heartbeat_interval))
        self._silence_limit = float(welcome.silence_limit)
        assert self._loop is not None
        self._heartbeat_due = self._loop.time()
        self._heartbeat()

    def _on_code(self, code: Code) -> None:
        """Write the user's code and say so at once (`ship` waits for that, not for the compile),
        then import it, answer what happened and give the slots the code, before any later
        message is handled. The import runs on a thread: a module that imports torch or
        compiles kernels for half a minute must not stop the heartbeats (the coordinator would
        take the host for lost, relaunch it and lose it again, for ever)."""
        self._code.store(code)
        self._emit(CodeStored(digest=self._code.current.digest))
        self._flush()
        if not self._code.import_pending:
            self._code_imported(self._code.current)
            return
        assert self._loop is not None
        self._importing = True
        imported = self._loop.run_in_executor(None, self._code.import_stored)
        imported.add_done_callback(self._on_imported)
        first = _import_note_s()
        self._loop.call_later(first, self._still_importing, imported, first)

    def _still_importing(self, imported: asyncio.Future[SlotCode], waited: float) -> None:
        """Say (in the coordinator's log) that the user's modules are still importing, and
        again at doubling intervals: every task here waits for them, and a module that does
        work at import time (a download, a loop, a wait) would hold the run in silence."""
        if imported.done() or self._stopping:
            return
        modules = ", ".join(self._code.current.modules)
        _warn(f"still importing {modules} after {waited:g} s; the tasks sent here wait for it")
        assert self._loop is not None
        self._loop.call_later(waited, self._still_importing, imported, 2 * waited)

    def _on_imported(self, imported: asyncio.Future[SlotCode]) -> None:
        self._importing = False
        if self._stopping or imported.cancelled():
            return
        exc = imported.exception()
        if exc is not None:  # import_stored records the user's failures; this is batuta's own
            self._fail(f"agent failed importing the code: {type(exc).__name__}: {exc}", send_error=True)
            return
        self._code_imported(imported.result())
        self._take_messages()  # those that waited for it

    def _code_imported(self, loaded: SlotCode) -> None:
        self._emit(CodeLoaded(digest=loaded.digest, errors=dict(loaded.errors)))  # the coordinator logs errors
        # Out now, not after the slots are replaced: nothing this agent reads next (a Run for
        # the new code) is handled before the loop below has forked them.
        self._flush()
        for slot in self._slots.values():
            slot.use_code(loaded)

    def _on_run(self, run: Run) -> None:
        digest = self._code.current.digest
        for request in run.tasks:
            slot = self._slots.get(request.slot)
            problem = (
                f"this agent has no slot {request.slot} (it has {len(self._slots)}: 0..{len(self._slots) - 1})"
                if slot is None
                else None
            )
            status = Outcome.ERROR
            if slot is not None and request.code != digest:
                problem = stale_error(request, self._code.current, f"host {self._host_name} has")
            elif slot is not None and isinstance(request.call, KernelCall) and request.call.args:
                problem = self._unheld_problem(request.call)
                if problem is not None:
                    status = Outcome.UNFIT  # this host's memory: another host may hold it (core/hostfit.py)
                else:
                    problem = self._missing_objects(request.call, slot)
                if problem is not None and any(self._objects.was_lost(r.object_id) for r in refs_in(request.call.args)):
                    status = Outcome.CRASHED  # lost with a slot's process: it runs again once remade
            if slot is None or problem is not None:
                self.task_finished(
                    TaskOutcome(
                        task_id=request.task_id,
                        slot=request.slot,
                        attempt=request.attempt,
                        status=status,
                        error=problem,
                    )
                )
                continue
            if request.keep:
                self._keep_as[request.task_id] = request.keep
            slot.enqueue(request)
            self._touched.add(slot)

    def _missing_objects(self, call: KernelCall, slot: SlotSupervisor) -> str | None:
        """Why a task cannot run here, if it names an object this host does not hold and no task
        ahead of it on its slot makes (fed ahead). The supervisor sends values to the slot."""
        missing = sorted({r.object_id for r in refs_in(call.args) if r.object_id not in self._objects})
        missing = [object_id for object_id in missing if not slot.makes(object_id)]
        if not missing:
            return None
        return (
            f"object(s) {', '.join(map(str, missing))} are not on this host: dropped with pool.drop() "
            "before the task ran, or the agent restarted without them"
        )

    def _on_steal_back(self, message: StealBack) -> None:
        slot = self._slots.get(message.slot)
        if slot is None:
            returned: tuple[int, ...] = ()
            refused = tuple(message.task_ids)
        else:
            returned, refused = slot.steal_back(message.task_ids)
            for task_id in returned:
                self._keep_as.pop(task_id, None)
            # Room in the queue does not change feeding; nothing to pump.
        self._emit(StealBackReply(slot=message.slot, returned=returned, refused=refused))

    def _on_cancel(self, task_ids: Iterable[int]) -> None:
        by_slot: dict[SlotSupervisor, list[int]] = {}
        for task_id in task_ids:
            for slot in self._slots.values():
                if slot.holds(task_id):
                    by_slot.setdefault(slot, []).append(task_id)
                    break
        for slot, ids in by_slot.items():
            slot.cancel(ids)
            self._touched.add(slot)

    # -- heartbeats ---------------------------------------------------------------------

    def _heartbeat(self) -> None:
        if self._stopping:
            return
        assert self._loop is not None
        silent = time.monotonic() - self._last_heard
        if self._silence_limit and silent > self._silence_limit:
            # No end of stream comes through a network partition: without this, the agent and
            # its slots would outlive the run on a host cut off from it (until TCP gave up).
            _warn(
                f"nothing from the coordinator for {silent:.0f}s (it sends at least a keepalive well "
                f"within {self._silence_limit:g}s): it is gone or cut off; exiting"
            )
            self._finish(EXIT_ERROR, bye=None)
            return
        try:
            sample = self._telemetry.sample()
        except Exception as exc:  # telemetry must never take the agent down
            if str(exc) != self._telemetry_failure:
                self._telemetry_failure = str(exc)
                _warn(f"telemetry failed: {exc} (said again only if it changes)")
            sample = None
        if sample is not None:
            objects, object_bytes, spilled_bytes = self._objects.stats()
            self._emit(
                Heartbeat(
                    seq=self._heartbeat_seq,
                    cpu_percent=sample.cpu_percent,
                    memory_used=sample.memory_used,
                    memory_total=sample.memory_total,
                    gpus=with_device_caches(sample.gpus, self._slots.values()),
                    gpu_status=sample.gpu_status,
                    objects=objects,
                    object_bytes=object_bytes,
                    spilled_bytes=spilled_bytes,
                    slot_object_bytes=self._keeper.slot_object_bytes,
                )
            )
            self._heartbeat_seq += 1
        now = self._loop.time()
        # A fixed cadence, not "interval after the last one"; after a stall, skip ahead
        # rather than send a burst.
        self._heartbeat_due += self._heartbeat_interval
        if self._heartbeat_due < now:
            self._heartbeat_due = now + self._heartbeat_interval
        self._heartbeat_timer = self._loop.call_at(self._heartbeat_due, self._heartbeat)

    # -- start and stop -----------------------------------------------------------------

    def _hello(self, slots: list[SlotInfo]) -> Hello:
        return Hello(
            protocol=PROTOCOL_VERSION,
            batuta_version=__version__,
            python_version="{}.{}.{}".format(*sys.version_info[:3]),
            hostname=self._host_name,
            pid=os.getpid(),
            cpu_count=os.cpu_count() or 1,
            slots=tuple(slots),
            gpus=self._gpus,
            packages=package_versions(),
            modules={name: module_source_digest(name) for name in self._options.kernel_modules},
        )

    def _fail(self, message: str, *, send_error: bool) -> None:
        _warn(message)
        self._finish(EXIT_ERROR, bye=None, error=Error(message=message) if send_error else None)

    def _link_broke(self, message: str, *, send_error: bool) -> None:
        """The data link broke: a fault while the session runs; once it is ending (the
        coordinator's EOF or Shutdown came first), the coordinator closing its end is not."""
        if not self._stopping:
            self._fail(message, send_error=send_error)

    def _finish(self, code: int, *, bye: Bye | None, error: Error | None = None) -> None:
        """Stop everything now; the exit future resolves once the last words are written."""
        if self._stopping:
            return
        self._stopping = True
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
        if self._chunk_pump is not None:
            self._chunk_pump.cancel()
            self._chunk_pump = None
        if self._reader is not None:
            self._reader.stop()
        self.stop_slots()
        # Results that already exist still go out; Started for work just killed does not
        # (the coordinator asked for the end, or is gone, and knows what was outstanding).
        self._started = []
        self._outbox = [m for m in self._outbox if not isinstance(m, Heartbeat)]
        for last_word in (error, bye):
            if last_word is not None:
                self._outbox.append(last_word)
        self._flush_for_exit()
        if self._exit is not None and not self._exit.done():
            self._exit.set_result(code)

    def _flush_for_exit(self) -> None:
        self._flusher.stop()
        outbox: list[Item] = [m for m in self._outbox if self._welcomed or isinstance(m, Error)]
        messages, _ = outbox_messages(outbox, forwarding=False)  # before Welcome only an Error may go out
        self._outbox = []
        if not messages or self._writer is None:
            return
        for message in messages:
            try:
                self._writer.write(self._conn.send(message))
            except Exception:
                # The connection refuses (e.g. an Error after a protocol error, or before
                # Hello): what is left is best effort.
                if isinstance(message, Error):
                    self._writer.write(_raw_error_frame(message))

    def stop_slots(self) -> list[SlotProcess]:
        """Kill every slot's process group; returns the processes to reap."""
        killed = []
        self._keeper.abort_pipes()
        for slot in self._slots.values():
            proc = slot.close()
            if proc is not None:
                killed.append(proc)
        self._killed.extend(killed)
        return killed

    def _on_signal(self, signum: int) -> None:
        self._finish(128 + signum, bye=Bye(reason=f"agent got {signal.Signals(signum).name}"))

    def _spawn_slots(self, infos: list[SlotInfo], envs: list[dict[str, str]]) -> None:
        assert self._loop is not None
        for info, env in zip(infos, envs, strict=True):
            # A GPU slot is a fresh process, never a fork of this one: the agent reads NVML for
            # its heartbeats, and on the H200 a CUDA out-of-memory error in a child forked after
            # that was a SIGSEGV (the slot died, its device values with it), not an error.
            gpu = "gpu" in info.capabilities
            slot = SlotSupervisor(
                info=info,
                env=env,
                kernel_modules=self._options.kernel_modules,
                events=self,
                loop=self._loop,
                spawn_mode="exec" if gpu else self._spawn_mode,
                objects=self._objects,
                code=self._code.current,
                locate=self._arena.locate,
                keeper=self._keeper,
            )
            self._slots[info.slot] = slot
            slot.start()
        # A result waits (outbox.Flusher) only where no core is spare: there, sent at once, it
        # ran this agent's and the coordinator's work on the core of the slot that just finished.
        # With a core to spare that work runs on it, and a wait only left slots without their
        # next task (h200, 2 slots on 16 cores, alternated: 1.018-1.022 of the bound without
        # it, 1.024-1.037 with; the time a slot stood waiting for a task, p90: 6-17 us, 450-680).
        self._no_spare_core = len(self._slots) >= usable_cores()

    async def run(self) -> int:
        """Serve the session; returns the exit code. Slots are dead when it returns."""
        self._loop = loop = asyncio.get_running_loop()
        self._exit = loop.create_future()
        try:
            for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal, signum)
            cpu_infos = [SlotInfo(slot=i, capabilities=("cpu",)) for i in range(self._options.cpu_slots)]
            first_gpu_slot = len(cpu_infos)
            gpu_infos = [
                SlotInfo(slot=first_gpu_slot + k, capabilities=("gpu",), gpu_index=gpu.index)
                for k, (gpu, _) in enumerate(self._gpu_slots)
            ]
            # Hello only describes the slots, so it goes out before they are spawned: on a
            # busy host the coordinator hears from us without waiting for the slot processes.
            self._writer = FdWriter(loop, self._frames_out, self._on_write_error)
            self._writer.write(self._conn.send(self._hello(cpu_infos + gpu_infos)))
            base_env = dict(os.environ)
            cpu_env = dict(base_env)
            if cpu_infos:  # the slots share the cores: see batuta/agent/threads.py
                cpu_env.update(budget_env(base_env, slot_share(len(cpu_infos))))
            if self._spawn_mode == "fork":
                preload_for_fork()
                if cpu_infos and not any(name in base_env for name in BLAS_THREADS_ENV):
                    limit_loaded_blas(slot_share(len(cpu_infos)))
            self._spawn_slots(cpu_infos, [cpu_env] * len(cpu_infos))
            self._spawn_slots(gpu_infos, [{**base_env, **env} for _, env in self._gpu_slots])
            self._reader = FdReader(
                loop,
                self._frames_in,
                self._on_input,
                receive_buffer=self._conn.receive_buffer,
                on_received=self._on_received,
            )

            code = await self._exit
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._writer.drain(), DRAIN_TIMEOUT_S)
            return code
        finally:
            for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                loop.remove_signal_handler(signum)
            self.stop_slots()
            self.reap(self._killed)
            self._objects.close()
            if self._reader is not None:
                self._reader.close()
            if self._writer is not None:
                self._writer.close()

    @staticmethod
    def reap(procs: list[SlotProcess], timeout: float = 2.0) -> None:
        """Wait for killed slot processes, so none is left a zombie or an orphan."""
        deadline = time.monotonic() + timeout
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))


def _raw_error_frame(message: Error) -> bytes:
    """An Error frame encoded without the connection's state checks (last words only)."""
    from batuta.protocol.codec import encode_message

    try:
        return encode_message(message)
    except Exception:
        return b""


def _import_note_s() -> float:
    """How long the user's modules may import before the log says so (then again at twice
    that, and so on): 30 s, or `BATUTA_IMPORT_NOTE_S` in the host's environment."""
    try:
        seconds = float(os.environ.get(IMPORT_NOTE_ENV, "30"))
    except ValueError:
        return 30.0
    return seconds if 0 < seconds < float("inf") else 30.0


def _warn(message: str) -> None:
    print_error(f"batuta agent: {message}")
