"""Starting a slot process: fork the agent (Linux, the default) or exec a fresh interpreter.

Why fork: a fresh `python -m batuta.agent.slot` spends about 150 ms of CPU importing the
codec and NumPy before it can take a task. Eight slots on each of four hosts sharing two
cores is then seconds of start-up, and every restart after a timeout or cancel pays it
again. The agent has already imported all of that, never touches CUDA, and runs no threads,
so a forked child is ready in about a millisecond and shares those pages copy-on-write.

What a forked child does before it serves (`_forked_child`): freeze the garbage collector
over the agent's objects (so no finaliser of theirs runs here), start a new session (its
own process group, as the exec path gets from `start_new_session`), drop every inherited fd
but its two pipes, 0/1/2 and a copy of the agent's stderr (its own stderr is a pipe the agent
reads until it is ready: `slot_stderr.py`), restore default signal handling and drop the agent loop's
wakeup fd, install the slot's environment (`CUDA_VISIBLE_DEVICES` for GPU slots, set
before any CUDA library loads), reseed NumPy's legacy global RNG (Python's `random` reseeds
itself at fork; without this, every slot would draw the same "random" numbers), then run
the same `serve()` as the exec path. It never returns into the agent's stack: it leaves by
`os._exit`.

`BATUTA_SLOT_SPAWN=exec` selects the exec path (also the only path off Linux). GPU slots
always take it (`agent.py`): the agent reads NVML for its heartbeats, and CUDA in a child
forked after that crashed (SIGSEGV) on an out-of-memory error instead of raising it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING

from batuta.agent.threads import cap_loaded_numba
from batuta.transport.fdio import widen_pipe

if TYPE_CHECKING:
    from batuta.agent.code import SlotCode

SPAWN_ENV = "BATUTA_SLOT_SPAWN"


def spawn_mode(environ: Mapping[str, str] | None = None) -> str:
    """ "fork" or "exec"."""
    env = os.environ if environ is None else environ
    wanted = env.get(SPAWN_ENV, "").strip().lower()
    if wanted in ("fork", "exec"):
        return wanted if sys.platform.startswith("linux") or wanted == "exec" else "exec"
    return "fork" if sys.platform.startswith("linux") else "exec"


def preload_for_fork() -> None:
    """Import, once in the agent, what every forked slot would import on its own: the slot
    loop and the kernel registry (about 10 ms each time, no numba). A registry that fails
    to import is left for the slots to report on their first kernel task."""
    import batuta.agent.slot

    with contextlib.suppress(Exception):
        import batuta.kernels  # noqa: F401


class ForkedProcess:
    """The parts of `subprocess.Popen` the supervisor uses, for a child made by `os.fork`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -signal.SIGKILL  # reaped elsewhere; it is gone
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            if self.returncode is None:
                try:
                    _, status = os.waitpid(self.pid, 0)
                    self.returncode = os.waitstatus_to_exitcode(status)
                except ChildProcessError:
                    self.returncode = -signal.SIGKILL
            return self.returncode
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while (code := self.poll()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired([f"slot pid {self.pid}"], timeout)
            time.sleep(min(delay, remaining))  # only after SIGKILL, so only a moment
            delay = min(delay * 2, 0.05)
        return code


SlotProcess = subprocess.Popen[bytes] | ForkedProcess


def spawn_slot(
    *,
    slot: int,
    env: dict[str, str],
    kernel_modules: tuple[str, ...],
    mode: str,
    code: SlotCode,
) -> tuple[SlotProcess, int, int, int]:
    """Start slot `slot` to run the user's `code`; returns (process, fd to write frames to, fd
    to read frames from, fd to read its stderr from: `slot_stderr.py`). A forked slot inherits
    the agent's imports of that code; an exec'd one is told where it is and imports it itself.

    Raises OSError if no process could be started.
    """
    fds: list[int] = []
    try:
        for _ in range(3):
            fds.extend(os.pipe2(os.O_CLOEXEC))
    except BaseException:  # out of file descriptors, say: none of them leaks
        for fd in fds:
            os.close(fd)
        raise
    child_in, to_child, from_child, child_out, from_err, child_err = fds
    widen_pipe(to_child)  # arrays move in one wake-up per MiB, not per 64 KiB
    widen_pipe(from_child)
    try:
        if mode == "fork":
            proc: SlotProcess = _fork(slot, env, kernel_modules, code, child_in, child_out, child_err)
        else:
            proc = _exec(slot, env, kernel_modules, code, child_in, child_out, child_err)
    except BaseException:
        os.close(to_child)
        os.close(from_child)
        os.close(from_err)
        raise
    finally:
        os.close(child_in)
        os.close(child_out)
        os.close(child_err)
    return proc, to_child, from_child, from_err


def _exec(
    slot: int,
    env: dict[str, str],
    kernel_modules: tuple[str, ...],
    code: SlotCode,
    child_in: int,
    child_out: int,
    child_err: int,
) -> subprocess.Popen[bytes]:

    command = [
        sys.executable,
        "-m",
        "batuta.agent.slot",
        "--slot",
        str(slot),
        "--agent-pid",
        str(os.getpid()),
    ]
    for module in kernel_modules:
        command += ["--kernel-module", module]
    command += code.arguments()
    agent_stderr = _dup_stderr()
    if agent_stderr is not None:
        command += ["--agent-stderr", str(agent_stderr)]
    try:
        return subprocess.Popen(
            command,
            stdin=child_in,
            stdout=child_out,
            stderr=child_err,
            env=env,
            close_fds=True,
            pass_fds=() if agent_stderr is None else (agent_stderr,),
            # Its own session and process group: killpg reaches binaries it starts, and a
            # terminal's Ctrl-C or SIGHUP to the agent's group does not.
            start_new_session=True,
        )
    finally:
        if agent_stderr is not None:
            os.close(agent_stderr)


def _dup_stderr() -> int | None:
    """A copy of the agent's stderr, for a slot to write to once it is ready (until then its
    stderr is a pipe the agent reads, `slot_stderr.py`); None where the agent has none."""
    try:
        return os.dup(2)
    except OSError:
        return None


def _fork(
    slot: int,
    env: dict[str, str],
    kernel_modules: tuple[str, ...],
    code: SlotCode,
    child_in: int,
    child_out: int,
    child_err: int,
) -> ForkedProcess:
    agent_pid = os.getpid()
    # Buffered text would otherwise be written twice, once by each process.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which leaves by os._exit
        exit_code = 70
        try:
            agent_stderr = _dup_stderr()
            os.dup2(child_err, 2)  # first: why it could not start goes to the agent (slot_stderr.py)
            exit_code = _forked_child(slot, env, kernel_modules, code, child_in, child_out, agent_pid, agent_stderr)
        except BaseException:
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stderr.flush()
            os._exit(exit_code)
    return ForkedProcess(pid)


def _forked_child(
    slot: int,
    env: dict[str, str],
    kernel_modules: tuple[str, ...],
    code: SlotCode,
    child_in: int,
    child_out: int,
    agent_pid: int,
    agent_stderr: int | None,
) -> int:
    # Objects that were garbage at the fork (the agent's, in reference cycles) must never be
    # finalised here: a finaliser closing "its" fd could close one of ours by number.
    gc.freeze()
    os.setsid()
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    # Frames travel on two fds of our own, inheritable by nothing we start.
    frames_in = os.dup(child_in)
    frames_out = os.dup(child_out)
    keep = {0, 1, 2, frames_in, frames_out}
    if agent_stderr is not None:
        keep.add(agent_stderr)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    # fd 0 reads nothing, fd 1 is stderr: as in the agent, kernels cannot touch frames.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    os.environ.clear()
    os.environ.update(env)
    cap_loaded_numba(env)  # the agent's numba, if it imported one, counted the agent's threads
    # Only a generator that already exists needs fresh entropy; touching numpy.random here
    # would import it in every slot (7-33 ms each) for tasks that may never use it.
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()

    from batuta.agent.slot import serve

    return serve(
        slot=slot,
        frames_in=frames_in,
        frames_out=frames_out,
        kernel_modules=kernel_modules,
        agent_pid=agent_pid,
        code=code,
        agent_stderr=agent_stderr,
    )
