"""Running one task inside a slot process: a registered kernel or an executable.

Every way a task can end becomes a `TaskOutcome`; nothing here raises to the slot's loop.
Kernel exceptions give status "error" with a one-line `error` ("ValueError: ...") and the
traceback in `stderr`. A binary's stdout and stderr are captured up to `OUTPUT_CAP` bytes
each (the rest is read and dropped, and a marker line says how much), a non-zero exit is an
"error" naming the code or signal.

The kernel registry (`batuta.kernels.registry`) is imported on the first kernel task, not at
slot start: importing it may pull in numba (about 0.75 s), and a host that only runs binaries,
or an SSH start-up benchmark, should not pay that on every slot.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from batuta.agent.numba_errors import argument_hint, from_numba, numba_error
from batuta.core.task import BinaryCall, KernelCall, Outcome
from batuta.protocol.messages import (
    TaskOutcome,
    TaskRequest,
)
from batuta.transport.base import describe_exit, printed_prefix

if TYPE_CHECKING:
    from batuta.agent.code import SlotCode

OUTPUT_CAP = 1024 * 1024  # bytes kept of a binary's stdout, and of its stderr
KERNEL_OUTPUT_CAP = 64 * 1024  # of what a kernel prints, per stream: a result, not a log file
_ERROR_TEXT_CAP = 1000  # characters of an error line


def one_line(text: str, limit: int = _ERROR_TEXT_CAP) -> str:
    """`text` squeezed to one line of at most `limit` characters, cut in the middle: an error's
    type comes first and its hint ("..., or name it 'module:kernel'") last, and both matter."""
    line = " ".join(text.split())
    if len(line) <= limit:
        return line
    marker = " … "
    head = (limit - len(marker)) // 2
    tail = limit - len(marker) - head
    return line[:head] + marker + line[-tail:]


def describe_exception(exc: BaseException) -> str:
    """ "ValueError: n must be positive" -- the form every error line takes."""
    try:
        message = str(exc)
    except Exception as failed:  # a user's __str__ that raises: the type is still worth saying
        message = f"(its str() raised {failed!r})"
    return one_line(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


EXIT_CONTEXT_LOST = 75  # a slot's exit after a sticky CUDA error (`KernelRunner.context_lost`)


class KernelRunner:
    """Runs kernels through the registry, importing it, the user's shipped modules (`code`,
    see `batuta/agent/code.py`) and the `--kernel-module`s on first use."""

    def __init__(
        self, kernel_modules: tuple[str, ...] = (), code: SlotCode | None = None, *, report: bool = True
    ) -> None:
        self._kernel_modules = kernel_modules
        self._code = code
        # Whether a `--kernel-module` that fails to import prints its traceback (to the agent's
        # log): one slot of a host does, not each of them, the same traceback N times.
        self._report = report
        self._registry: Any = None
        self._registry_error: str | None = None
        self._module_errors: list[str] = []
        self._code_errors: list[str] = []  # "importing mymod failed: SyntaxError: ... (at mymod.py line 3)"
        self._cpu_backend: dict[str, str] = {}  # kernel -> what a "cpu" request runs (`_cpu_or_reference`)
        self._out = _TaskOutput()
        self._err = _TaskOutput()
        # The sticky CUDA error a task met ("" when none): the process's CUDA context is unusable,
        # so the slot exits once it has answered (kernels/cuda_support.py, `lost_context`).
        self.context_lost = ""

    def _load(self) -> Any:
        if self._registry is not None or self._registry_error is not None:
            return self._registry
        try:
            from batuta.kernels import registry
        except Exception as exc:
            self._registry_error = f"kernel registry unavailable: {describe_exception(exc)}"
            traceback.print_exc()
            return None
        shipped = self._import_code()
        for module in self._kernel_modules:
            if module in shipped:
                continue
            try:
                registry.load_module(module)
            except Exception as exc:
                # The slot keeps working (other kernels may be fine); the failure is named
                # in the error of every task that asks for a kernel the registry lacks.
                self._module_errors.append(f"--kernel-module {module}: {describe_exception(exc)}")
                if self._report:  # one line for the host's log (a traceback's tail read as several)
                    cause = exc.__cause__ or exc
                    frames = [f for f in traceback.extract_tb(cause.__traceback__) if not f.filename.startswith("<")]
                    where = f" (at {frames[-1].filename} line {frames[-1].lineno})" if frames else ""
                    print(one_line(f"{exc}{where}"), file=sys.stderr, flush=True)
        self._registry = registry
        return registry

    def _import_code(self) -> tuple[str, ...]:
        """Import the shipped modules (a forked slot has them from the agent already: then this
        only notes the agent's failures); returns their names."""
        code = self._code
        if code is None or not code.modules:
            return ()
        from batuta.agent.code import contest_clash, describe_import_failure, use_bundle

        if code.directory is not None and code.directory not in sys.path:
            use_bundle(code.directory)  # an exec'd slot (it finds the agent's pycs); a forked one has the agent's path
        for module in code.modules:
            error = code.errors.get(module)
            if error is None:
                try:
                    importlib.import_module(module)
                except (Exception, SystemExit) as exc:  # the user's module must not end the slot
                    error = describe_import_failure(exc, code.directory)
                    contest_clash(exc)
            if error is not None:
                self._code_errors.append(f"importing {module} failed: {error}")
        return code.modules

    def run(self, request: TaskRequest, call: KernelCall, *, device_results: bool = False) -> TaskOutcome:
        """Run `call`; with `device_results` a GPU variant's array result stays a device array
        (the slot keeps it on the card), else it comes back to host inside the timed run."""
        registry = self._load()
        started = time.perf_counter()
        if registry is None:
            return _outcome(request, Outcome.ERROR, error=self._registry_error, run_s=0.0)
        backend = request.backend
        if backend == "cpu":
            backend = self._cpu_or_reference(registry, call.name)
        out, err = self._out, self._err
        out.begin(sys.stdout, request.task_id)
        err.begin(sys.stderr, request.task_id)
        sys.stdout, sys.stderr = out, err  # what the kernel prints is its result's too
        try:
            value = registry.run(call.name, backend, call.args, device_results=device_results)
        except registry.UnknownKernelError as exc:
            text = describe_exception(exc)
            if repr(call.name) not in text and call.name not in text:
                text = f"unknown kernel {call.name!r}: {text}"
            if isinstance(exc, registry.ContestedKernelError):  # it says which modules; the imports say where
                text = one_line(f"{exc} ({'; '.join(self._code_errors)})" if self._code_errors else str(exc))
            elif self._code_errors:  # the likely cause, said first and whole
                host = self._code.host if self._code is not None and self._code.host else "this host"
                text = f"kernel {call.name!r} is unknown on host {host}: {'; '.join(self._code_errors)}"
                text = one_line(f"{text} ({'; '.join(self._module_errors)})" if self._module_errors else text)
            elif self._module_errors:
                text = one_line(f"{text} ({'; '.join(self._module_errors)})")
            # code this host could not write (a full disk): its failure, not the task's (core/hostfit.py)
            status = Outcome.UNFIT if self._code is not None and self._code.unwritten else Outcome.ERROR
            return _outcome(request, status, error=text, run_s=time.perf_counter() - started)
        except BaseException as exc:  # SystemExit in a kernel must not end the slot
            run_s = time.perf_counter() - started
            if request.backend == "gpu":
                from batuta.kernels.cuda_support import lost_context

                self.context_lost = lost_context(exc)
            printed = err.end()
            directory = self._code.directory if self._code is not None else None
            error = numba_error(exc, directory) or describe_exception(exc)
            if from_numba(exc):
                error += argument_hint(call.args, backend)
            return _outcome(
                request,
                Outcome.ERROR,
                error=error,
                stdout=out.end(),
                stderr=printed + _kernel_traceback(exc, registry).encode("utf-8", "replace"),
                run_s=run_s,
            )
        finally:
            sys.stdout, sys.stderr = out.echo, err.echo
        run_s = time.perf_counter() - started
        return _outcome(request, Outcome.OK, value=value, stdout=out.end(), stderr=err.end(), run_s=run_s)

    def _cpu_or_reference(self, registry: Any, name: str) -> str:
        """ "cpu", or "scalar" for a kernel that has only its reference function: plain Python
        runs on a CPU slot as well, and `auto` picks "cpu" for large inputs without knowing the
        variants of a kernel the coordinator never imported (a user's, shipped to the hosts)."""
        found = self._cpu_backend.get(name)
        if found is None:
            try:
                backends = registry.info(name).backends
            except Exception:  # unknown here: running it says so, with the reason
                return "cpu"
            found = "scalar" if "cpu" not in backends and "scalar" in backends else "cpu"
            self._cpu_backend[name] = found
        return found


def _kernel_traceback(exc: BaseException, registry: Any) -> str:
    """`exc`'s traceback from the kernel's own frames on: the frames of this runner and of the
    registry that called the kernel come first in every one, and are none of the user's."""
    ours = {os.path.normcase(__file__), os.path.normcase(getattr(registry, "__file__", "") or "")}
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and os.path.normcase(tb.tb_frame.f_code.co_filename) in ours:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


class _TaskOutput:
    """Stands in for `sys.stdout` or `sys.stderr` while a kernel runs: keeps the first
    `KERNEL_OUTPUT_CAP` bytes of what it prints for the task's result (`TaskResult.stdout`,
    `.stderr`) and passes all of it on to the real stream, line by line, each marked with its
    task (`printed_prefix`), so that the host's log shows it live as before. Python-level
    output only: a numba `print` writes to the file descriptor. One per runner, reused: a
    task that prints nothing costs a few assignments.

    A thread a task leaves running (a daemon that goes on printing) is no part of the tasks
    after it: what it prints while a later task runs goes to the log only, marked with the
    task it was left by (`task 3 printed: [after it ended] ...`), never into the later task's
    result. A thread is a task's if it was first seen alive at that task's end; the one that
    runs the tasks, and those started by the task now running, print for it."""

    def __init__(self) -> None:
        self.echo: Any = None
        self._kept: _CappedBuffer | None = None
        self._task_id = 0
        self._partial = ""  # echoed once its line ends (or the task does)
        self._runner: threading.Thread | None = None  # the thread running the task
        # a thread -> the task at whose end it was running (objects, not idents: an ident is reused)
        self._left_by: dict[threading.Thread, int] = {}
        self._left_partial: dict[threading.Thread, str] = {}  # a left thread's unfinished line

    def begin(self, echo: Any, task_id: int) -> None:
        self.echo = echo
        self._kept = None
        self._task_id = task_id  # its prefix is made only if it prints
        self._partial = ""
        self._runner = threading.current_thread()

    def end(self) -> bytes:
        if self._partial and self.echo is not None:
            self.echo.write(f"{printed_prefix(self._task_id)}{self._partial}\n")
        self._partial = ""
        if threading.active_count() > 1 or self._left_by:  # threads still running: whose they are
            alive = [thread for thread in threading.enumerate() if thread is not self._runner]
            self._left_by = {thread: self._left_by.get(thread, self._task_id) for thread in alive}
            self._left_partial = {t: text for t, text in self._left_partial.items() if t in self._left_by}
        kept, self._kept = self._kept, None
        return kept.value("output") if kept is not None else b""

    def write(self, text: str) -> int:
        if self._left_by:
            left_by = self._left_by.get(threading.current_thread())
            if left_by is not None:
                self._write_left(left_by, text)
                return len(text)
        kept = self._kept
        if kept is None:
            kept = self._kept = _CappedBuffer(KERNEL_OUTPUT_CAP)
        kept.add(text.encode("utf-8", "replace"))
        if self.echo is not None:
            *lines, self._partial = (self._partial + text).split("\n")
            if lines:
                prefix = printed_prefix(self._task_id)
                self.echo.write("".join(f"{prefix}{line}\n" for line in lines))
        return len(text)

    def _write_left(self, task_id: int, text: str) -> None:
        """A line from a thread that task `task_id` left running: to the log, marked so."""
        thread = threading.current_thread()
        *lines, self._left_partial[thread] = (self._left_partial.get(thread, "") + text).split("\n")
        if lines and self.echo is not None:
            prefix = f"{printed_prefix(task_id)}[after it ended] "
            self.echo.write("".join(f"{prefix}{line}\n" for line in lines))

    def flush(self) -> None:
        if self.echo is not None:
            self.echo.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, isatty...: the real stream's
        return getattr(self.echo, name)


def _outcome(request: TaskRequest, status: Outcome, run_s: float, **fields: Any) -> TaskOutcome:
    return TaskOutcome(
        task_id=request.task_id,
        slot=request.slot,
        attempt=request.attempt,
        status=status,
        run_s=run_s,
        **fields,
    )


class _CappedBuffer:
    """Keeps the first `cap` bytes written to it and counts the rest."""

    __slots__ = ("cap", "chunks", "dropped", "kept")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.chunks: list[bytes] = []
        self.kept = 0
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self.cap - self.kept
        if room >= len(data):
            self.chunks.append(data)
            self.kept += len(data)
            return
        if room > 0:
            self.chunks.append(data[:room])
            self.kept += room
        self.dropped += len(data) - max(room, 0)

    def value(self, stream: str) -> bytes:
        data = b"".join(self.chunks)
        if self.dropped:
            data += f"\n[batuta: {stream} truncated, {self.dropped} more bytes dropped]\n".encode()
        return data


def run_binary(request: TaskRequest, call: BinaryCall, base_env: Mapping[str, str]) -> TaskOutcome:
    """Run an executable to completion, capturing capped stdout/stderr and its exit code.

    The child stays in the slot's process group on purpose: the agent enforces timeouts and
    cancels by killing that group, which takes the binary and anything it started with it.
    """
    env = dict(base_env)
    env.update(call.env)
    started = time.perf_counter()
    try:
        proc = subprocess.Popen(
            [call.path, *call.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=call.cwd,
            close_fds=True,
        )
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return _outcome(
            request,
            Outcome.ERROR,
            error=f"cannot start {call.path!r}: {describe_exception(exc)}",
            run_s=time.perf_counter() - started,
        )
    assert proc.stdout is not None and proc.stderr is not None
    buffers = {proc.stdout.fileno(): _CappedBuffer(OUTPUT_CAP), proc.stderr.fileno(): _CappedBuffer(OUTPUT_CAP)}
    stdout_fd, stderr_fd = proc.stdout.fileno(), proc.stderr.fileno()
    poller = select.poll()
    for fd in buffers:
        poller.register(fd, select.POLLIN)
    open_fds = set(buffers)
    exited_at: float | None = None
    while open_fds:
        # After the process exits, a background child may still hold the pipes open; read
        # what is there for a moment, then stop rather than wait for that child.
        if exited_at is None and proc.poll() is not None:
            exited_at = time.monotonic()
        if exited_at is not None and time.monotonic() - exited_at > 0.2:
            break
        events = poller.poll(50)
        for fd, _ in events:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if data:
                buffers[fd].add(data)
            else:
                poller.unregister(fd)
                open_fds.discard(fd)
    returncode = proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    run_s = time.perf_counter() - started
    stdout = buffers[stdout_fd].value("stdout")
    stderr = buffers[stderr_fd].value("stderr")
    if returncode == 0:
        return _outcome(request, Outcome.OK, stdout=stdout, stderr=stderr, exit_code=0, run_s=run_s)
    return _outcome(
        request,
        Outcome.ERROR,
        stdout=stdout,
        stderr=stderr,
        exit_code=returncode,
        error=f"{call.path} {describe_exit(returncode)}",
        run_s=run_s,
    )


def print_error(message: str) -> None:
    """A line on stderr (the agent's stderr, which the coordinator logs).

    Never raises: a coordinator killed mid-frame leaves a broken pipe there, and whoever is
    reporting must still go on to shut down cleanly.
    """
    with contextlib.suppress(OSError, ValueError):
        print(message, file=sys.stderr, flush=True)
