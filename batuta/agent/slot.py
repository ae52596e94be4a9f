"""A slot's worker process: forked from the agent, or `python -m batuta.agent.slot ...`.

`spawn.py` decides how it starts; either way it ends up in `serve()`.

It reads frames from its stdin and writes frames to its stdout, with the same codec and
message classes as the coordinator link (no pickle):

    agent -> slot:  Run(tasks)         queue these, run them in order
                    Cancel(task_ids)   drop these if not started yet (answered "cancelled")
                    Put(id, value)     hold this object for tasks that name it
                    Drop(ids)          forget these objects
                    Fetch(id, lend)    send object `id` back (answered Put, or Drop if not held;
                                       with `lend`, large arrays by address: lend.py)
                    Shutdown()         exit now (EOF on stdin does the same)
    slot -> agent:  SlotChanged(up)      sent once, when the loop is ready to take tasks;
                                       the agent infers the first task's start from it
                    Done((outcome,))   one frame per finished task, several per write
                    Put / Drop         the answer to a Fetch
                    GpuCache(...)      a GPU slot's device cache, after a batch that changed it

On a GPU slot, GPU tasks get device copies of the values their refs name, uploaded once and
kept on the card (`device_values.py`), and a kept GPU result stays there as a device array.

A task sent with `keep` leaves its result here, in `_objects`: the slot's next tasks read it
in place, and the outcome carries only `(ObjectRef, nbytes, shape, dtype)`, the descriptor
the coordinator hears. The bytes cross the pipe only when the agent asks (`Fetch`): for a
`pool.get`, a consumer on another slot, another host, or a spill (see `objects.py`).

Tasks run one at a time on the main thread. Results are batched: after a task, the slot
looks (without waiting) for more input; while tasks are waiting it keeps finished results
and writes them together once it holds at least as many results as tasks remain, 64
results, or 1 ms has passed since the oldest one. Results are also written before any task
that is not obviously as quick as the last one (the same kernel, under 50 us), so they
never wait behind a long task. That keeps trivial tasks at tens of thousands per second
without delaying a lone result.

Every task names the digest of the user's code it must run with (`TaskRequest.code`, see
`batuta/agent/code.py`); a slot whose code has another digest answers it "error" and runs
nothing: the agent replaces a slot whose code changed, so this is the last guard against
stale code, not the usual path.

Each result is encoded on its own as soon as it exists, so a value the codec cannot encode
(or one over the frame limit) turns into an "error" outcome for that task alone.

Hygiene: the frame stream moves to private fds at start; fd 1 then points at stderr and
fd 0 at /dev/null, so kernels that print or read stdin cannot touch the stream. The slot is
a session leader (the agent starts it that way); binaries it runs share its process group,
so the agent's `killpg` on timeout, cancel or shutdown reaches them and their children. If
the agent dies without cleaning up (SIGKILL), Linux's parent-death signal sends the slot
SIGTERM, whose handler kills the slot's whole process group.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import select
import signal
import sys
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import replace
from types import FrameType
from typing import Any

import numpy as np

from batuta.agent.code import SlotCode, stale_error
from batuta.agent.device_values import DeviceValues, device_nbytes
from batuta.agent.execute import (
    EXIT_CONTEXT_LOST,
    KernelRunner,
    describe_exception,
    one_line,
    run_binary,
)
from batuta.agent.heap import IDLE_TRIM_S, keep_freed_memory, release_freed_memory
from batuta.agent.lend import lend_locator
from batuta.agent.main import AGENT_SET_ENV
from batuta.agent.shm import SharedReader
from batuta.core.objects import ObjectRef, refs_in, replace_refs
from batuta.core.task import KernelCall, Outcome
from batuta.kernels.registry import is_device_array, to_host
from batuta.protocol.chunks import OutgoingStreams
from batuta.protocol.codec import (
    FrameDecoder,
    check_value,
    encode_message,
    encode_message_parts,
    encode_streamed_parts,
)
from batuta.protocol.errors import LocalProtocolError
from batuta.protocol.messages import (
    Cancel,
    Done,
    Drop,
    Fetch,
    GpuCache,
    Put,
    Run,
    Shutdown,
    SlotChanged,
    TaskOutcome,
    TaskRequest,
)


def _unsendable(outcome: TaskOutcome, exc: Exception) -> str:
    """Why an outcome cannot be sent: for a value the codec refuses, in the kernel's words
    ('the value it returned[2]: ...') rather than its message field's."""
    if outcome.status is Outcome.OK:
        try:
            check_value(outcome.value, "the value it returned", or_put=False)  # a kernel cannot pool.put
        except LocalProtocolError as refused:
            return str(refused)
    return describe_exception(exc)


_BATCH_MAX_RESULTS = 64
_BATCH_MAX_AGE_S = 0.001
_QUICK_S = 50e-6  # a task this short may run while results wait to be batched
_READ_CHUNK = 256 * 1024
_IOV_MAX = 1024  # buffers one writev takes on Linux


def _claim_stdio() -> tuple[int, int]:
    """Move the frame pipes to private fds; point fd 0 at /dev/null and fd 1 at stderr."""
    frames_in = os.dup(0)
    frames_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return frames_in, frames_out


def _kill_own_group(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (also the parent-death signal): take every process of this slot down."""
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(128 + signum)


def _arm_parent_death(agent_pid: int) -> None:
    """Ask Linux to SIGTERM this process when the agent dies, then close the race where the
    agent died before the request was made."""
    signal.signal(signal.SIGTERM, _kill_own_group)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        except Exception:  # without prctl we still exit on EOF of our input pipe
            pass
    if agent_pid and os.getppid() != agent_pid:
        os._exit(1)


def binary_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment a binary task starts with: the slot's (a GPU slot's CUDA_VISIBLE_DEVICES
    included), less what the agent set for its own numba kernels where the user had not
    (`AGENT_SET_ENV`): the CUDA memory manager, which a numba program run as a binary imports
    by name (its Python need not have batuta), and the per-thread default stream, which
    changes how a CUDA program's work on the default stream is ordered."""
    env = dict(environ)
    for name in env.pop(AGENT_SET_ENV, "").split(","):
        env.pop(name, None)
    return env


def _restore_stderr(agent_stderr: int | None) -> None:
    """Once ready, write straight to the agent's stderr (fd 1 too), no longer through the pipe
    the agent reads while the slot starts (`slot_stderr.py`): a kernel printing a lot then
    slows itself, as before, not the agent's loop, which would pass every line on. A fatal
    signal's dump (faulthandler: a segfault in native code, an abort) still goes to the pipe,
    so that the agent's reason for the slot's death names it and the kernel's line."""
    if agent_stderr is None:
        return
    with contextlib.suppress(OSError):
        faulthandler.enable(file=os.dup(2), all_threads=False)  # a dup: fd 2 changes below
    with contextlib.suppress(OSError):
        os.dup2(agent_stderr, 2)
        os.dup2(2, 1)
    with contextlib.suppress(OSError):
        os.close(agent_stderr)


class SlotWorker:
    """The slot's loop: read tasks, run them in order, write results in batches."""

    def __init__(
        self,
        *,
        slot: int,
        frames_in: int,
        frames_out: int,
        kernel_modules: tuple[str, ...],
        code: SlotCode | None = None,
        agent_pid: int = 0,
        agent_stderr: int | None = None,
    ) -> None:
        self._slot = slot
        self._agent_stderr = agent_stderr  # the agent's stderr, to write to once ready
        self._code = code if code is not None else SlotCode()
        self._in = frames_in
        self._out = frames_out
        # task arguments in the agent's shared memory are read from there, not from the pipe (shm.py)
        self._decoder = FrameDecoder(shared=SharedReader(agent_pid).array if agent_pid else None)
        self._waiting: deque[TaskRequest] = deque()  # TaskRequests received, not yet run
        self._results: list[Any] = []  # buffers of encoded Done frames not yet written (arrays not copied)
        self._result_count = 0  # results in `_results`
        self._streams = OutgoingStreams()  # large result arrays go as chunks right behind their frame
        self._oldest_result_at = 0.0
        self._eof = False
        self._poller = select.poll()
        self._poller.register(frames_in, select.POLLIN)
        self._kernels = KernelRunner(kernel_modules, self._code, report=slot == 0)
        self._last_kernel = ""  # name and run time of the last task, for `_likely_quick`
        self._last_run_s = 0.0
        self._env = binary_env(os.environ)
        self._objects: dict[int, object] = {}  # values the agent sent this slot, and results kept here
        self._device: DeviceValues | None = None  # their copies on this slot's GPU, made by its first GPU task
        self._trim_due = False  # a task ran, or a held value was forgotten, since the heap was last trimmed

    # -- input --------------------------------------------------------------------------

    def _read(self, *, wait: bool) -> None:
        """Read what is there (or block for it when `wait`), then take in every whole frame."""
        if not wait and not self._poller.poll(0):
            return
        into = self._decoder.receive_buffer()  # a large frame or a streamed array: read straight into it
        if into is not None:
            try:
                count = os.readv(self._in, [into])
            except InterruptedError:
                return
            except OSError:
                count = 0
            if not count:
                self._eof = True
                return
            self._decoder.received(count)
            self._take_messages()
            return
        try:
            data = os.read(self._in, _READ_CHUNK)
        except InterruptedError:
            return
        except OSError:
            data = b""
        if not data:
            self._eof = True
            return
        self._decoder.feed(data)
        self._take_messages()

    def _take_messages(self) -> None:
        while (message := self._decoder.next_message()) is not None:
            if isinstance(message, Run):
                self._waiting.extend(message.tasks)
            elif isinstance(message, Cancel):
                self._cancel(message.task_ids)
            elif isinstance(message, Put):
                self._forget(message.object_id)
                self._objects[message.object_id] = message.value
            elif isinstance(message, Drop):
                for object_id in message.object_ids:
                    self._forget(object_id)
            elif isinstance(message, Fetch):
                self._send_object(message.object_id, lend=message.lend)
            elif isinstance(message, Shutdown):
                self._eof = True
                return
            else:
                raise RuntimeError(f"slot {self._slot}: unexpected {type(message).__name__} from agent")

    def _cancel(self, task_ids: tuple[int, ...]) -> None:
        wanted = set(task_ids)
        kept: deque[TaskRequest] = deque()
        for request in self._waiting:
            if request.task_id in wanted:
                self._add_result(
                    TaskOutcome(
                        task_id=request.task_id,
                        slot=request.slot,
                        attempt=request.attempt,
                        status=Outcome.CANCELLED,
                        error="cancelled before it started",
                    )
                )
            else:
                kept.append(request)
        self._waiting = kept

    # -- output -------------------------------------------------------------------------

    def _send_object(self, object_id: int, *, lend: bool = False) -> None:
        """Answer the agent's Fetch: the value as a Put, or a Drop when this slot lacks it.
        It goes behind the results already held (their streams were numbered first). A value
        that lives only on this slot's GPU is copied back to host once, here. With `lend`,
        a host value's large arrays go as references to this process's memory, which the
        agent reads while it forwards them (`lend.py`): the value stays here as it is."""
        if object_id in self._objects:
            value = self._device.for_host(object_id) if self._device is not None else self._objects[object_id]
            locate = lend_locator(value, self._streams.stream_min_bytes) if lend and self._device is None else None
            try:
                parts = encode_streamed_parts(Put(object_id=object_id, value=value), self._streams, locate=locate)
            except Exception as exc:  # answered as not held (lost: made again), not by ending the slot and all it holds
                print(f"slot {self._slot}: cannot send object {object_id}: {describe_exception(exc)}", file=sys.stderr)
                self._forget(object_id)
                parts = [encode_message(Drop(object_ids=(object_id,)))]
            self._results += parts
        else:
            self._results.append(encode_message(Drop(object_ids=(object_id,))))
        self._flush()

    def _forget(self, object_id: int) -> None:
        if self._objects.pop(object_id, None) is not None:
            # Its memory went back to the heap, not to the system: an idle slot trims it (a
            # dropped kept result of gigabytes stayed resident until the slot's next task).
            self._trim_due = True
        if self._device is not None:
            self._device.drop(object_id)

    # -- the GPU's copies -----------------------------------------------------------------

    def _gpu(self) -> DeviceValues:
        """The device cache, made on the first GPU task (numba.cuda is imported then, and
        only in GPU slots)."""
        if self._device is None:
            from batuta.agent import device_values
            from batuta.kernels.cuda_support import cuda, simulated

            numba_cuda = cuda()

            def read_cap() -> int:
                free = 0
                if not simulated():
                    free = int(numba_cuda.current_context().get_memory_info().free)
                return device_values.default_cap(free, simulated())

            self._device = DeviceValues(
                self._objects,
                upload=lambda host: device_values.upload(numba_cuda, host),
                to_host=lambda device: device.copy_to_host(),
                read_cap=read_cap,
            )
        return self._device

    def _prefetch(self, request: TaskRequest) -> None:
        """Start the uploads of the next GPU task's values, so they overlap the task about to run."""
        call = request.call
        if request.backend == "gpu" and isinstance(call, KernelCall) and request.code == self._code.digest:
            refs = refs_in(call.args)
            if refs:
                assert self._device is not None
                self._device.prefetch(ref.object_id for ref in refs if ref.object_id in self._objects)

    def _ref_values(self, refs: list[ObjectRef], backend: str) -> dict[int, object]:
        """What each ref stands for in this task: device copies for a GPU task (uploaded once
        and cached), host values for any other (a GPU-only value copied back once)."""
        if backend == "gpu":
            device = self._gpu()
            return {ref.object_id: device.for_gpu(ref.object_id) for ref in refs}
        if self._device is not None:
            device = self._device
            return {ref.object_id: device.for_host(ref.object_id) for ref in refs}
        return self._objects

    def _add_result(self, outcome: TaskOutcome) -> None:
        try:
            frame = encode_streamed_parts(Done(results=(outcome,)), self._streams)
        except Exception as exc:
            what = "result" if outcome.status is Outcome.OK else "outcome"
            replacement = TaskOutcome(
                task_id=outcome.task_id,
                slot=outcome.slot,
                attempt=outcome.attempt,
                status=Outcome.ERROR,
                error=one_line(f"the task's {what} cannot be sent to the coordinator: {_unsendable(outcome, exc)}"),
                run_s=outcome.run_s,
            )
            frame = encode_streamed_parts(Done(results=(replacement,)), self._streams)
        if not self._results:
            self._oldest_result_at = time.perf_counter()
        self._results += frame
        self._result_count += 1

    def _send(self, parts: list[Any]) -> None:
        """Write the buffers in order with vectored writes, from where they lie (a result's
        arrays are not joined into one bytes object first)."""
        views = [memoryview(part).cast("B") for part in parts if len(part)]
        while views:
            try:
                written = os.writev(self._out, views[:_IOV_MAX])
            except InterruptedError:
                continue
            except OSError:
                # The agent is gone; nothing left to do for anyone.
                self._eof = True
                return
            done = 0
            while done < len(views) and written >= len(views[done]):
                written -= len(views[done])
                done += 1
            del views[:done]
            if views and written:
                views[0] = views[0][written:]

    def _flush(self) -> None:
        device = self._device
        if device is not None and device.changed:  # the agent reports it per GPU in heartbeats
            device.changed = False
            self._results.append(
                encode_message(GpuCache(slot=self._slot, values=len(device), nbytes=device.nbytes, cap=device.cap))
            )
        if self._results:
            parts, self._results = self._results, []
            self._result_count = 0
            self._send(parts)

    def _should_flush(self) -> bool:
        count = self._result_count
        return (
            count >= len(self._waiting)
            or count >= _BATCH_MAX_RESULTS
            or time.perf_counter() - self._oldest_result_at >= _BATCH_MAX_AGE_S
        )

    # -- the loop -----------------------------------------------------------------------

    def _likely_quick(self, request: TaskRequest) -> bool:
        """Whether `request` is probably as trivial as the task before it: the same kernel,
        which took under `_QUICK_S`. Only then may finished results wait behind it."""
        call = request.call
        return isinstance(call, KernelCall) and call.name == self._last_kernel and self._last_run_s < _QUICK_S

    def _stale(self, request: TaskRequest) -> TaskOutcome:
        code = self._code
        return TaskOutcome(
            task_id=request.task_id,
            slot=request.slot,
            attempt=request.attempt,
            status=Outcome.ERROR,
            error=stale_error(request, code, f"slot {self._slot} on host {code.host or '?'} has"),
        )

    def _run_one(self, request: TaskRequest) -> TaskOutcome:
        call = request.call
        if request.code != self._code.digest:
            return self._stale(request)
        try:
            if isinstance(call, KernelCall):
                refs = refs_in(call.args)
                if refs:  # values this slot holds stand in for their refs
                    missing = sorted({r.object_id for r in refs if r.object_id not in self._objects})
                    if missing:
                        return TaskOutcome(
                            task_id=request.task_id,
                            slot=request.slot,
                            attempt=request.attempt,
                            status=Outcome.ERROR,
                            error=f"slot {self._slot} was not sent object(s) {', '.join(map(str, missing))}",
                        )
                    values = self._ref_values(refs, request.backend)
                    call = KernelCall(name=call.name, args=replace_refs(call.args, values))
                # A kept GPU result stays on the card (see `_keep`); any other comes back to host.
                on_device = bool(request.keep) and request.backend == "gpu"
                outcome = self._kernels.run(request, call, device_results=on_device)
                self._last_kernel, self._last_run_s = call.name, outcome.run_s
                if request.keep and outcome.status is Outcome.OK:  # it stays here; the agent hears what it is
                    return self._keep(request.keep, outcome)
                return outcome
            self._last_kernel = ""
            return run_binary(request, call, self._env)
        except BaseException as exc:  # a bug here must cost one task, not the slot
            return TaskOutcome(
                task_id=request.task_id,
                slot=request.slot,
                attempt=request.attempt,
                status=Outcome.ERROR,
                error=f"slot {self._slot} failed to run the task: {describe_exception(exc)}",
            )

    def _keep(self, object_id: int, outcome: TaskOutcome) -> TaskOutcome:
        """Hold a kept result here; its outcome carries `(ObjectRef, nbytes, shape, dtype)`.
        A value that could never be sent on (fetched, relayed, spilled) is an error now,
        as it would have been when results always crossed the pipe."""
        value = outcome.value
        if is_device_array(value):  # a GPU result: it stays on this slot's GPU
            try:
                self._gpu().hold(object_id, value)
            except Exception as exc:
                return _unkept(outcome, f"the task's result cannot be kept on the GPU: {describe_exception(exc)}")
            shape = tuple(int(n) for n in value.shape)
            descriptor = (ObjectRef(object_id), device_nbytes(value), shape, np.dtype(value.dtype).str)
            return replace(outcome, value=descriptor)
        if isinstance(value, (tuple, list)) and any(is_device_array(item) for item in value):
            value = to_host(value)  # only a whole array stays on the device
        try:
            # as the coordinator would check it: a value kept here that could never be fetched
            # failed only at its pool.get, which took the slot (and its other kept values) down
            check_value(value, "the value it returned", or_put=False)
            if isinstance(value, np.ndarray):
                nbytes = int(value.nbytes)
            else:
                parts = encode_message_parts(Put(object_id=object_id, value=value), max_frame_bytes=1 << 62)
                nbytes = sum(memoryview(part).nbytes for part in parts)
        except LocalProtocolError as exc:  # the codec's words name the part: "the value it returned[0]: ..."
            return _unkept(outcome, f"the task's result cannot be kept: {exc}")
        except Exception as exc:
            return _unkept(outcome, f"the task's result cannot be kept: {describe_exception(exc)}")
        self._objects[object_id] = value
        shape = tuple(int(n) for n in getattr(value, "shape", ()))
        dtype = str(getattr(getattr(value, "dtype", None), "str", "") or "")
        return replace(outcome, value=(ObjectRef(object_id), nbytes, shape, dtype))

    def run(self) -> int:
        self._send([encode_message(SlotChanged(slot=self._slot, state="up"))])
        _restore_stderr(self._agent_stderr)
        while not self._eof:
            if not self._waiting:
                self._flush()
                if self._trim_due and not self._poller.poll(int(IDLE_TRIM_S * 1000)):
                    release_freed_memory()  # idle: what its tasks freed goes back (heap.py)
                    self._trim_due = False
                self._read(wait=True)
                continue
            request = self._waiting.popleft()
            if self._results and not self._likely_quick(request):
                # Held results must not wait behind a task that may run for long.
                self._flush()
            if request.keep:  # it makes this object (again): nothing behind it may read an old one
                self._forget(request.keep)
            if self._device is not None and self._waiting:
                self._prefetch(self._waiting[0])
            self._add_result(self._run_one(request))
            if self._kernels.context_lost:  # this process can use its GPU no more: answer, then go
                self._flush()
                print(
                    f"slot {self._slot}: its CUDA context is lost ({self._kernels.context_lost}); the slot restarts",
                    file=sys.stderr,
                    flush=True,
                )
                return EXIT_CONTEXT_LOST
            self._trim_due = True
            self._read(wait=False)  # new tasks, and Cancels for tasks we have not begun
            if self._should_flush():
                self._flush()
        return 0


def _unkept(outcome: TaskOutcome, error: str) -> TaskOutcome:
    """`outcome` turned into the error of a result that could not be kept."""
    return replace(outcome, status=Outcome.ERROR, value=None, error=one_line(error))


def _parse(argv: list[str]) -> tuple[int, int, tuple[str, ...], SlotCode, int | None]:
    slot, agent_pid, modules = -1, 0, []
    agent_stderr: int | None = None
    digest, directory, code_modules, host, unwritten = "", None, [], "", ""
    args = iter(argv)
    for arg in args:
        if arg == "--slot":
            slot = int(next(args))
        elif arg == "--agent-pid":
            agent_pid = int(next(args))
        elif arg == "--kernel-module":
            modules.append(next(args))
        elif arg == "--code-digest":
            digest = next(args)
        elif arg == "--code-dir":
            directory = next(args)
        elif arg == "--code-module":
            code_modules.append(next(args))
        elif arg == "--code-unwritten":  # why the agent could not write the code (each module's error)
            unwritten = next(args)
        elif arg == "--host":
            host = next(args)
        elif arg == "--agent-stderr":
            agent_stderr = int(next(args))
        else:
            raise SystemExit(f"batuta slot: unknown argument {arg!r}")
    if slot < 0:
        raise SystemExit("batuta slot: --slot N is required")
    errors = dict.fromkeys(code_modules, unwritten) if unwritten else {}
    code = SlotCode(digest=digest, directory=directory, modules=tuple(code_modules), errors=errors, host=host)
    return slot, agent_pid, tuple(modules), code, agent_stderr


def _name_process(slot: int) -> None:
    """Show up as "batuta-slot-N" in ps/top (and to tests looking for a slot's PID)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            pr_set_name = 15
            ctypes.CDLL(None).prctl(pr_set_name, f"batuta-slot-{slot}".encode()[:15], 0, 0, 0)
        except Exception:
            pass


def serve(
    *,
    slot: int,
    frames_in: int,
    frames_out: int,
    kernel_modules: tuple[str, ...],
    agent_pid: int,
    code: SlotCode | None = None,
    agent_stderr: int | None = None,
) -> int:
    """Run slot `slot` on the given frame fds until EOF; shared by the fork and exec paths.
    Until it is ready its stderr is a pipe the agent reads; then `agent_stderr` (`_restore_stderr`)."""
    _name_process(slot)
    _arm_parent_death(agent_pid)
    keep_freed_memory()
    worker = SlotWorker(
        slot=slot,
        frames_in=frames_in,
        frames_out=frames_out,
        kernel_modules=kernel_modules,
        code=code,
        agent_pid=agent_pid,
        agent_stderr=agent_stderr,
    )
    return worker.run()


def main(argv: list[str]) -> int:
    """Entry point of an exec-started slot process; started by the agent, not by people."""
    slot, agent_pid, modules, code, agent_stderr = _parse(argv)
    frames_in, frames_out = _claim_stdio()
    return serve(
        slot=slot,
        frames_in=frames_in,
        frames_out=frames_out,
        kernel_modules=modules,
        agent_pid=agent_pid,
        code=code,
        agent_stderr=agent_stderr,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
