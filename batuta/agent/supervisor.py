"""One worker slot as the agent sees it: its process, its queue, what it runs, its restarts.

The rules, in one place (the agent's module docstring refers here):

Queue and feed. Tasks from `Run` wait in the agent-side `queue`. Only a few are *fed* to the
slot process (written down its pipe): `depth = 1 + min(31, floor(1 ms / mean run time))`,
the mean being an exponentially weighted average (weight 0.2) of the slot's recent run
times; the depth is 1 until the first result. Long tasks are therefore fed one at a time,
so all but the running one stay stealable; trivial tasks are fed up to 32 deep, so the slot
never waits on the agent. A fed task counts as started for steal-back: only tasks still in
`queue` are returned. A *tail* task (`TaskRequest.tail`, `core/tailfeed.py`) is fed only to
an idle slot process, whatever the depth: it stays stealable while the task ahead of it runs.

Started inference. The slot runs fed tasks in order, so the *head* of `fed` is the one
running. A task becomes the head, and is reported in `Started`, when it is fed to an idle
ready slot, when the previous head's result arrives, or when a (re)started slot process
says it is ready (tasks may be fed before that; they start then). Its timeout runs from
that moment.

Timeout and cancel of the running task. Whatever the pipe already holds is read first
(the task may have just finished: then its real outcome stands). If it is still the head,
the slot's whole process group is SIGKILLed (binaries and their children die with it), the
task is answered "timeout" (error "timed out after N s; ...") or "cancelled", the other fed
tasks go back to the front of `queue`, and a new slot process starts at once, announced
like any restart: `SlotChanged("restarting", reason)`, then `SlotChanged("up")` when it is ready.

Cancel of other tasks. A queued task is removed and answered "cancelled" at once. A fed task
that is not running is marked and a `Cancel` goes down the pipe: the slot skips it, answering
"cancelled", when it finishes the task in hand (the slot reads its input between tasks, so
it never starts a task whose Cancel had arrived). If the task becomes the head before that
answer comes (the slot had begun it), it gets `CANCEL_GRACE_S`, then is killed as above.
Ids this slot does not hold are ignored.

Slot death (the process exits or is killed, e.g. `kill -9`). The group is SIGKILLed and the
process reaped. The head, if it had started, is answered "crashed" (error "slot N worker
process (pid P) killed by signal 9 (SIGKILL) while running it", or "exited with code C");
the other fed tasks go back to the front of `queue` in order (they never started, so the
coordinator's attempt counts are untouched); marked cancels among them are answered
"cancelled". `SlotChanged("restarting", reason)` is sent and a new process started;
`SlotChanged("up")` follows when it is ready.

The user's code. Every task names the digest of the code it must run with; the slot process
was started with one (`SlotCode`, see `code.py`). When the agent loads other code (`use_code`),
tasks still queued for the old code are answered "error" (they can never run here now), and
the process is replaced by one started with the new code: at once when no task is fed to it,
otherwise as soon as the fed tasks (sent for the old code, which that process has) are done.
Nothing new is fed to a process with other code, so no slot ever runs a task with code
other than the one it names. The replacement is not a restart: no SlotChanged.

Kept results. A task sent with `keep` leaves its result in the slot process (`slot.py`);
the agent's store records where (`objects.py`), and each slot what its process holds
(`slot_values.py`, which also encodes the Puts, Runs and Drops sent to it). A task naming
an object that lives in another slot's process is not fed until the agent has fetched it
from there (`SlotKeeper`).
A task may name an object that a task ahead of it on this slot will keep (the coordinator
fed it ahead, `core/feedahead.py`): nothing is sent for it, the slot process has it by the
time it runs the task; if that producer made nothing, the slot answers the task "error"
(the coordinator has resolved it already, or takes the answer for no result and sends it again).
Whenever a process goes (death, a kill at timeout or cancel, a code replacement), the agent
hears it first (`process_lost`), before any outcome that follows, and reports the objects
lost with it; a queued task naming a lost object is answered "crashed", so the coordinator
runs it again once the object is made again (lineage).

Device cache. A GPU slot keeps values on its card between tasks and reports their count, bytes
and cap in `GpuCache` whenever they change; the supervisor keeps the latest (`gpu_cache`) for
the agent's heartbeats and forgets it whenever the process goes (the card's memory goes too).

A slot that dies before it becomes ready, or while idle, has *failed to start*. Restarts
back off (0, 0.05, 0.2, 0.5, 1 s); after `MAX_FAILED_STARTS` (6) failures in a row the slot
is given up: `SlotChanged("down", reason)`. Down is final for this agent's lifetime, and it
means: every task the coordinator sent to this slot that has not been answered by then --
and any it sends later -- is handed back *unanswered*, as if returned by a steal-back. The
coordinator requeues them elsewhere without counting an attempt; only a task that was
running when a process died is ever answered "crashed". A result always goes out before a
`SlotChanged` that follows it, so the coordinator never reclaims a task that is also answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from batuta.agent.code import SlotCode, stale_error
from batuta.agent.execute import EXIT_CONTEXT_LOST, print_error
from batuta.agent.objects import ObjectStore
from batuta.agent.slot_stderr import SlotStderr
from batuta.agent.slot_values import SlotValues
from batuta.agent.spawn import SlotProcess, spawn_slot
from batuta.core.objects import refs_in
from batuta.core.task import KernelCall, Outcome
from batuta.protocol.chunks import StreamAssembler
from batuta.protocol.codec import FrameDecoder, encode_message
from batuta.protocol.messages import (
    SLOT_DOWN,
    SLOT_RESTARTING,
    SLOT_UP,
    Cancel,
    Done,
    Drop,
    Fetch,
    GpuCache,
    Put,
    SlotChanged,
    SlotInfo,
    TaskOutcome,
    TaskRequest,
)
from batuta.transport.base import describe_exit
from batuta.transport.fdio import FdReader, FdWriter

MAX_DEPTH = 32
INITIAL_DEPTH = 1  # until a run time is known: keep everything stealable
DEPTH_TARGET_S = 0.001  # feed about this much work ahead of the running task
PREFETCH_BELOW_S = 0.02  # tasks shorter than this always get one more fed behind them
RUN_TIME_WEIGHT = 0.2  # weight of the newest run time in the moving average
CANCEL_GRACE_S = 0.05  # how long a fed, cancelled task may take to be skipped by the slot
RESTART_BACKOFF_S = (0.0, 0.05, 0.2, 0.5, 1.0)  # before the 1st, 2nd, ... retry after failed starts
MAX_FAILED_STARTS = len(RESTART_BACKOFF_S) + 1
_STARTING = "starting"  # internal: the first process is not ready yet (never on the wire)


class SlotEvents(Protocol):
    """What a supervisor tells the agent; the agent turns these into wire messages."""

    def task_started(self, task_id: int) -> None: ...

    def task_finished(self, outcome: TaskOutcome) -> None: ...

    def slot_changed(self, state: SlotChanged) -> None: ...


class SlotKeeper(Protocol):
    """What a supervisor tells the agent about objects kept in slot processes."""

    def object_wanted(self, object_id: int) -> None: ...

    def object_arrived(self, slot: int, object_id: int, value: Any, present: bool) -> None: ...

    def process_lost(self, slot: int, reason: str) -> None: ...

    def pipe_opened(self, slot: int, streams: StreamAssembler) -> None: ...  # a new process's pipe


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by `pid` (a slot and every binary it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class SlotSupervisor:
    """Owns one slot: feeds its worker process, infers starts, enforces timeouts, restarts it.

    Everything runs on the agent's event loop; no method blocks for more than a process
    spawn. Methods that change the queue do not write to the pipe themselves: the agent
    calls `pump()` once per batch of changes, so one frame carries many tasks.
    """

    def __init__(
        self,
        *,
        info: SlotInfo,
        env: dict[str, str],
        kernel_modules: tuple[str, ...],
        events: SlotEvents,
        loop: asyncio.AbstractEventLoop,
        spawn_mode: str = "fork",
        objects: ObjectStore | None = None,
        code: SlotCode | None = None,
        locate: Callable[[Any], bytes | None] | None = None,
        keeper: SlotKeeper | None = None,
    ) -> None:
        self.info = info
        self._code = code if code is not None else SlotCode()  # what tasks must name, from now on
        self._proc_code = self._code  # what the current process was started with
        self._objects = objects if objects is not None else ObjectStore(0, Path())  # the agent's store
        self._keeper = keeper
        self._values = SlotValues(self._objects, locate)  # what the current process holds of them
        self.gpu_cache: GpuCache | None = None  # the current process's device cache, as last reported
        self.index = info.slot
        self._env = env
        self._kernel_modules = kernel_modules
        self._spawn_mode = spawn_mode
        self._events = events
        self._loop = loop

        self.state = _STARTING
        self.queue: deque[TaskRequest] = deque()  # received, not yet fed: stealable
        self.fed: deque[TaskRequest] = deque()  # written to the slot process, in order
        self._held: dict[int, TaskRequest] = {}  # every task in queue or fed, by id
        self._cancel_requested: set[int] = set()
        self._head_started_at: float | None = None  # loop time the head was inferred to start
        self._deadline: asyncio.TimerHandle | None = None
        self._run_time_mean: float | None = None

        self._proc: SlotProcess | None = None
        self._stderr: SlotStderr | None = None  # its stderr until it is ready (slot_stderr.py)
        self._reader: FdReader | None = None
        self._writer: FdWriter | None = None
        self._decoder = FrameDecoder()
        self._ready = False
        self._announce_up = False  # send SlotChanged "up" when the current process is ready
        self._failed_starts = 0
        self._restart_timer: asyncio.TimerHandle | None = None
        self._closed = False

    # -- queries --------------------------------------------------------------------------

    def holds(self, task_id: int) -> bool:
        return task_id in self._held

    def makes(self, object_id: int) -> bool:
        """Whether a task this slot holds (fed or queued) keeps its result as `object_id`: a
        task sent behind it may name that object before it exists (fed ahead)."""
        return any(r.keep == object_id for r in self.fed) or any(r.keep == object_id for r in self.queue)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def busy_for(self) -> float:
        """About how long the tasks held for the slot keep it busy: 0 until a run time is known."""
        return (len(self.fed) + len(self.queue)) * (self._run_time_mean or 0.0)

    def depth(self) -> int:
        """How many tasks to keep fed to the slot process."""
        mean = self._run_time_mean
        if mean is None:
            return INITIAL_DEPTH
        if mean <= 0.0:
            return MAX_DEPTH
        # One task waiting in the pipe hides the agent round trip between tasks (tens of
        # microseconds on a busy host, paid per task); that beats keeping it stealable while
        # tasks are short, since at most that one task is committed at the end.
        ahead = max(int(DEPTH_TARGET_S / mean), 1 if mean < PREFETCH_BELOW_S else 0)
        return 1 + min(MAX_DEPTH - 1, ahead)

    # -- process lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Spawn the slot process (Hello goes out before it is ready; tasks may be fed now)."""
        self._spawn()

    def _spawn(self) -> None:
        self._restart_timer = None
        if self._closed:
            return
        try:
            proc, to_slot, from_slot, from_err = spawn_slot(
                slot=self.index,
                env=self._env,
                kernel_modules=self._kernel_modules,
                mode=self._spawn_mode,
                code=self._code,
            )
        except OSError as exc:
            self._failed_starts += 1
            self._after_death(f"could not start a worker process for slot {self.index}: {exc}")
            return
        self._proc = proc
        self._stderr = SlotStderr(self._loop, from_err)
        self._proc_code = self._code
        self._decoder = FrameDecoder()
        self._values.new_process()
        self._ready = False
        decoder = self._decoder
        if self._keeper is not None:  # fetched values are forwarded while they arrive (forward.py)
            self._keeper.pipe_opened(self.index, decoder.streams)
        self._reader = FdReader(
            self._loop,
            from_slot,
            self._on_slot_data,
            receive_buffer=decoder.receive_buffer,
            on_received=self._on_slot_received,
        )
        self._writer = FdWriter(self._loop, to_slot)
        self.pump()

    def _detach_process(self) -> SlotProcess | None:
        """Forget the current process: stop reading and writing it, kill its group."""
        proc, self._proc = self._proc, None
        self._close_stderr()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._ready = False
        if proc is not None:
            kill_group(proc.pid)  # before reaping: the group id cannot be reused until then
            self._reap(proc)
        return proc

    def _close_stderr(self) -> str:
        """Stop reading the process's stderr, what is there read first; its last line."""
        stderr, self._stderr = self._stderr, None
        return stderr.finish() if stderr is not None else ""

    def _reap(self, proc: SlotProcess, tries: int = 0) -> None:
        """Collect the exit status without blocking the loop (SIGKILL takes a moment)."""
        if proc.poll() is None and tries < 500:
            self._loop.call_later(0.01, self._reap, proc, tries + 1)

    def close(self) -> SlotProcess | None:
        """Kill the slot's processes for good (agent shutdown); no outcomes are sent.
        Returns the killed process, for the caller to reap."""
        self._closed = True
        self.gpu_cache = None
        self._cancel_deadline()
        if self._restart_timer is not None:
            self._restart_timer.cancel()
            self._restart_timer = None
        proc, self._proc = self._proc, None
        self._close_stderr()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if proc is not None:
            kill_group(proc.pid)
        return proc

    # -- the user's code --------------------------------------------------------------------

    def use_code(self, code: SlotCode) -> None:
        """From now on tasks must name `code`: refuse the queued ones that name other code,
        and replace the process (now if it is idle, else once its fed tasks are done)."""
        self._code = code
        digest = code.digest
        if any(request.code != digest for request in self.queue):
            kept: deque[TaskRequest] = deque()
            for request in self.queue:
                if request.code == digest:
                    kept.append(request)
                else:
                    self._refuse_stale(request)
            self.queue = kept
        self._replace_if_idle()

    def _refuse_stale(self, request: TaskRequest) -> None:
        self._held.pop(request.task_id, None)
        error = stale_error(request, self._code, f"host {self._code.host or '?'} now has")
        self._events.task_finished(self._outcome(request, Outcome.ERROR, error, 0.0))

    def _replace_if_idle(self) -> None:
        """Start a process with the current code in place of one with other code, if no task
        is fed to it (a running task finishes with the code it was sent for)."""
        if self._proc is None or self._closed or self.fed or self._proc_code.digest == self._code.digest:
            return  # nothing to replace (a pending restart spawns with the current code), or not yet
        self._lost_process(f"slot {self.index} worker process was replaced to load new code")
        self._detach_process()
        self._spawn()

    # -- feeding --------------------------------------------------------------------------

    def enqueue(self, request: TaskRequest) -> None:
        """Take a task from `Run`. A down slot hands it straight back (see module docstring)."""
        if self.state == SLOT_DOWN:
            return
        self.queue.append(request)
        self._held[request.task_id] = request

    def pump(self) -> None:
        """Feed the slot process up to its depth; start the head if the slot is idle."""
        for _ in range(len(self.queue)):  # each pass feeds, or answers at least one task
            if not self._pump_once():
                return

    def _pump_once(self) -> bool:
        """One pass of `pump`; True when every task it took was answered here (its input gone,
        as behind a failed producer fed ahead) and more wait: the next ones need a pass too."""
        writer = self._writer
        if writer is None or not self.queue:
            return False
        digest = self._code.digest
        if self._proc_code.digest != digest:  # other code in this process: never feed it new tasks
            self._replace_if_idle()
            return False
        room = self.depth() - len(self.fed)
        if room <= 0:
            return False
        was_idle = not self.fed
        batch: list[TaskRequest] = []
        queue = self.queue
        in_slots = self._objects.in_slots
        while queue and (len(batch) < room or self._follows(queue[0], batch)):
            request = queue[0]
            if request.tail and (self.fed or batch):  # stealable until the slot is idle (core/tailfeed.py)
                break
            if request.code != digest:  # sent for code this host no longer has (requeued after a crash, say)
                self._refuse_stale(queue.popleft())
                continue
            elsewhere = self._values.in_other_slot(request) if in_slots else None
            if elsewhere is not None:  # fed once the agent has it (it pumps every slot then)
                if self._keeper is not None:
                    self._keeper.object_wanted(elsewhere)
                break
            batch.append(queue.popleft())
        if not batch:
            return False
        values = self._values
        puts = values.wanted(batch, self.fed, self._refuse)  # may answer (and remove) a task whose object is gone
        if not batch:
            writer.write_parts(values.put_parts(puts, shared=False))
            return bool(self.queue)
        puts = values.put_parts(puts, shared=True)
        parts = values.run_parts(batch, self._refuse)
        self.fed.extend(batch)
        writer.write_parts(puts + parts)
        if was_idle and self.fed and self._ready:
            self._start_head()
        return False

    def _follows(self, request: TaskRequest, batch: list[TaskRequest]) -> bool:
        """Whether `request` reads what a task fed ahead of it keeps (a chain's next stage,
        fed ahead by the coordinator): it goes to the process past the feed depth, up to
        `MAX_DEPTH`, since it can run nowhere sooner, and a GPU slot then launches a chain's
        stages back to back instead of waiting for this agent between them."""
        call = request.call
        if len(self.fed) + len(batch) >= MAX_DEPTH or not isinstance(call, KernelCall) or not call.args:
            return False
        named = [ref.object_id for ref in refs_in(call.args)]
        if not named:  # the common case: arrays and scalars, nothing kept
            return False
        ahead = {r.keep for r in self.fed if r.keep} | {r.keep for r in batch if r.keep}
        return any(object_id in ahead for object_id in named)

    def fetch_object(self, object_id: int, *, lend: bool = False) -> bool:
        """Ask the slot process for an object it holds (answered `object_arrived`), or to lend
        it (`lend.py`); False when there is no process to ask."""
        if self._writer is None or object_id not in self._values.held:
            return False
        self._writer.write(encode_message(Fetch(object_id=object_id, request_id=0, lend=lend)))
        return True

    def drop_objects(self, object_ids: Iterable[int]) -> None:
        """The agent forgot these objects: so does the slot process, if it holds them."""
        frame = self._values.drop_frame(object_ids)
        if frame is not None and self._writer is not None:
            self._writer.write(frame)

    def _refuse(self, request: TaskRequest, status: Outcome, error: str) -> None:
        """Answer a task taken from the queue that cannot be sent to the process (`SlotValues`)."""
        self._held.pop(request.task_id, None)
        self._events.task_finished(self._outcome(request, status, error, 0.0))

    def _start_head(self) -> None:
        head = self.fed[0]
        now = self._loop.time()
        self._head_started_at = now
        self._events.task_started(head.task_id)
        self._cancel_deadline()
        if head.task_id in self._cancel_requested:
            delay: float | None = CANCEL_GRACE_S
        else:
            delay = head.timeout
        if delay is not None:
            self._deadline = self._loop.call_at(now + delay, self._on_deadline, head.task_id)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    # -- what the slot process says -------------------------------------------------------

    def _on_slot_received(self, nbytes: int) -> None:
        """Bytes read straight into a large result frame or a streamed result array."""
        self._decoder.received(nbytes)
        self._take_results()

    def _on_slot_data(self, data: bytes) -> None:
        if not data:
            self._on_process_exit()
            return
        self._decoder.feed(data)
        self._take_results()

    def _take_results(self) -> None:
        try:
            while (message := self._decoder.next_message()) is not None:
                if isinstance(message, Done):
                    for outcome in message.results:
                        self._on_outcome(outcome)
                elif isinstance(message, SlotChanged) and message.state == SLOT_UP:
                    self._on_ready()
                elif isinstance(message, Put) and self._keeper is not None:  # a Fetch answered
                    self._keeper.object_arrived(self.index, message.object_id, message.value, True)
                elif isinstance(message, Drop) and self._keeper is not None:  # a Fetch it could not answer
                    for object_id in message.object_ids:
                        self._values.held.discard(object_id)
                        self._keeper.object_arrived(self.index, object_id, None, False)
                elif isinstance(message, GpuCache):  # its device cache changed (a GPU slot)
                    if message.slot != self.index:
                        raise ValueError(f"GpuCache names slot {message.slot}")
                    self.gpu_cache = message
                else:
                    raise ValueError(f"unexpected {type(message).__name__}")
        except Exception as exc:
            # a corrupt stream (something wrote to its frame fd): the process is untrustworthy
            print_error(f"batuta agent: slot {self.index} sent a bad frame ({exc}); restarting it")
            self._on_process_exit()
            return
        self.pump()

    def _on_ready(self) -> None:
        self._ready = True
        if self._stderr is not None:
            self._stderr.ready()
        self.state = SLOT_UP
        if self._announce_up:
            self._announce_up = False
            self._events.slot_changed(SlotChanged(slot=self.index, state=SLOT_UP))
        if self.fed and self._head_started_at is None:
            self._start_head()

    def _on_outcome(self, outcome: TaskOutcome) -> None:
        task_id = outcome.task_id
        if self.fed and self.fed[0].task_id == task_id:
            request = self.fed.popleft()
            was_head = True
        else:
            # Only a task the slot skipped after our Cancel finishes out of order.
            for i, request in enumerate(self.fed):
                if request.task_id == task_id:
                    del self.fed[i]
                    break
            else:
                return  # not ours (cannot happen with a well-behaved slot)
            was_head = False
        if request.keep and outcome.status is Outcome.OK:
            self._values.held.add(request.keep)  # the slot process kept its own result too
        self._held.pop(task_id, None)
        self._cancel_requested.discard(task_id)
        self._failed_starts = 0
        if not self.fed:  # every frame written so far was read
            self._values.all_read()
        mean, run_s = self._run_time_mean, outcome.run_s
        self._run_time_mean = run_s if mean is None else mean + RUN_TIME_WEIGHT * (run_s - mean)
        self._events.task_finished(outcome)
        if was_head:
            self._cancel_deadline()
            self._head_started_at = None
            if self.fed and self._ready:
                self._start_head()
        if not self.fed and self._proc_code.digest != self._code.digest:
            self._replace_if_idle()

    # -- steal-back and cancel ------------------------------------------------------------

    def steal_back(self, task_ids: Iterable[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Remove the listed tasks still in `queue`; (returned, refused), in request order."""
        wanted = list(task_ids)
        queued = {r.task_id for r in self.queue}
        returned = tuple(t for t in wanted if t in queued)
        if returned:
            taking = set(returned)
            self.queue = deque(r for r in self.queue if r.task_id not in taking)
            for task_id in returned:
                self._held.pop(task_id, None)
        refused = tuple(t for t in wanted if t not in queued)
        return returned, refused

    def cancel(self, task_ids: Iterable[int]) -> None:
        """Cancel tasks this slot holds: queued ones now, fed ones via the slot, the running
        one by killing the process. Each is answered "cancelled" exactly once."""
        ids = [t for t in task_ids if t in self._held]
        if not ids:
            return
        wanted = set(ids)
        kept: deque[TaskRequest] = deque()
        for request in self.queue:
            if request.task_id in wanted:
                wanted.discard(request.task_id)
                self._held.pop(request.task_id, None)
                self._events.task_finished(
                    self._outcome(request, Outcome.CANCELLED, "cancelled before it started", 0.0)
                )
            else:
                kept.append(request)
        self.queue = kept
        if not wanted:
            return
        # The rest are fed. Mark them all first: if the head is killed below, the restart
        # answers the marked ones "cancelled" instead of requeueing them.
        self._cancel_requested.update(r.task_id for r in self.fed if r.task_id in wanted)
        head = self.fed[0] if self.fed else None
        if head is not None and head.task_id in wanted and self._head_started_at is not None:
            self._kill_head(head.task_id)
        # Whatever is still fed (not yet begun by the slot, or the head of a slot that is not
        # ready yet) is skipped by the slot when it sees this Cancel.
        waiting = tuple(r.task_id for r in self.fed if r.task_id in wanted)
        if waiting and self._writer is not None:
            self._writer.write(encode_message(Cancel(task_ids=waiting)))

    # -- killing the running task ---------------------------------------------------------

    def _on_deadline(self, task_id: int) -> None:
        self._deadline = None
        self._kill_head(task_id)

    def _kill_head(self, task_id: int) -> None:
        """Timeout or cancel of the running task: kill the group, answer, restart."""
        if self._reader is not None:
            self._reader.read_available()  # it may have finished just now
        if not self.fed or self.fed[0].task_id != task_id or self._head_started_at is None:
            return
        head = self.fed.popleft()
        self._held.pop(task_id, None)
        run_s = self._loop.time() - self._head_started_at
        if task_id in self._cancel_requested:
            self._cancel_requested.discard(task_id)
            status, error = Outcome.CANCELLED, "cancelled while running; its processes were killed"
            reason = f"killed to cancel task {task_id}"
        else:
            status = Outcome.TIMEOUT
            error = f"timed out after {head.timeout:g} s; its processes were killed"
            reason = f"killed task {task_id} at its {head.timeout:g} s timeout"
        self._lost_process(f"slot {self.index} worker process {reason}")  # before the outcome
        self._events.task_finished(self._outcome(head, status, error, run_s))
        self._detach_process()
        self._requeue_fed()
        self._announce_restart(reason)
        self._spawn()

    # -- death and restart ----------------------------------------------------------------

    def _on_process_exit(self) -> None:
        proc = self._proc
        if proc is None:
            return
        # Before it was ready its stderr says why it could not start (EMFILE, an import error);
        # after, only a fatal signal's dump comes there (the slot writes to the agent's stderr
        # itself by then): the error and where, or "".
        said = self._close_stderr()
        said = f"; its last line on stderr: {said}" if said and not self._ready else f"; {said}" if said else ""
        self._detach_process()
        try:
            returncode = proc.wait(timeout=1.0)  # it is dead or was just SIGKILLed
            how = (
                "left after a sticky CUDA error (its CUDA context was lost; the agent's log says which)"
                if returncode == EXIT_CONTEXT_LOST
                else describe_exit(returncode)
            )
            if returncode == -signal.SIGKILL:  # not ours (a timeout's or cancel's kill is said elsewhere)
                how += ": out of memory on the host (the kernel's OOM killer), if no one killed it"
        except subprocess.TimeoutExpired:
            how = "stopped responding"
        reason = f"slot {self.index} worker process (pid {proc.pid}) {how}{said}"
        self._lost_process(reason)  # the objects it held are reported before any outcome
        head_running = bool(self.fed) and self._head_started_at is not None
        if head_running:
            head = self.fed.popleft()
            self._held.pop(head.task_id, None)
            assert self._head_started_at is not None
            run_s = self._loop.time() - self._head_started_at
            if head.task_id in self._cancel_requested:
                self._cancel_requested.discard(head.task_id)
                outcome = self._outcome(head, Outcome.CANCELLED, f"cancelled; {reason}", run_s)
            else:
                outcome = self._outcome(head, Outcome.CRASHED, f"{reason} while running it", run_s)
            self._events.task_finished(outcome)
        if not head_running:
            # Died before it was ready, or while idle: a failed start, which backs off.
            self._failed_starts += 1
        self._after_death(reason)

    def _lost_process(self, reason: str) -> None:
        """The current process goes: what it held goes with it; the agent hears first."""
        self._values.held = set()
        self.gpu_cache = None  # its device memory is freed with it
        if self._keeper is not None:
            self._keeper.process_lost(self.index, reason)

    def _after_death(self, reason: str) -> None:
        self._requeue_fed()
        if self._failed_starts >= MAX_FAILED_STARTS:
            self._give_up(reason)
            return
        self._announce_restart(reason)
        delay = RESTART_BACKOFF_S[max(0, self._failed_starts - 1)]
        if delay == 0.0:
            self._spawn()
        else:
            self._restart_timer = self._loop.call_later(delay, self._spawn)

    def _requeue_fed(self) -> None:
        """Fed tasks that never started go back to the front of the queue, in order;
        those with a pending cancel are answered now instead."""
        self._cancel_deadline()
        self._head_started_at = None
        back = list(self.fed)
        self.fed.clear()
        for request in reversed(back):
            if request.task_id in self._cancel_requested:
                self._cancel_requested.discard(request.task_id)
                self._held.pop(request.task_id, None)
                self._events.task_finished(
                    self._outcome(request, Outcome.CANCELLED, "cancelled before it started", 0.0)
                )
            else:
                self.queue.appendleft(request)

    def _announce_restart(self, reason: str) -> None:
        self._announce_up = True
        if self.state != SLOT_RESTARTING:
            self.state = SLOT_RESTARTING
            self._events.slot_changed(SlotChanged(slot=self.index, state=SLOT_RESTARTING, reason=reason))

    def _give_up(self, reason: str) -> None:
        self.state = SLOT_DOWN
        self._announce_up = False
        self.queue.clear()
        self._held.clear()
        self._cancel_requested.clear()
        self._events.slot_changed(
            SlotChanged(
                slot=self.index,
                state=SLOT_DOWN,
                reason=f"gave up after {self._failed_starts} failed starts: {reason}",
            )
        )

    def _outcome(self, request: TaskRequest, status: Outcome, error: str, run_s: float) -> TaskOutcome:
        return TaskOutcome(
            task_id=request.task_id,
            slot=request.slot,
            attempt=request.attempt,
            status=status,
            error=error,
            run_s=max(0.0, run_s),
        )
