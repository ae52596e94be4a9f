"""batuta's exception tree: one root, one subclass per area.

Messages name the thing that is wrong and the fix, in one line, because they end up in a
terminal, a log line or a TUI notification.
"""

from __future__ import annotations

import errno


class BatutaError(Exception):
    """Root of every error batuta raises on purpose."""


class UsageError(BatutaError):
    """The caller passed something invalid (bad argument, bad task, bad job file). Exit code 2."""


class ConfigError(UsageError):
    """A configuration file or option is invalid. Exit code 2."""


class TaskError(BatutaError):
    """A task could not be built or did not succeed."""


class TaskUsageError(TaskError, UsageError):
    """A task built from an invalid argument: a TaskError, as every task check has raised, and a
    UsageError, since the caller's fix is to pass something else (`batuta run` exits 2)."""


class TaskFailedError(TaskError):
    """Raised by `TaskResult.unwrap()` and `Pool.map` when a task did not succeed."""

    def __init__(self, message: str, result: object | None = None) -> None:
        super().__init__(message)
        self.result = result


class ObjectLostError(TaskError):
    """A kept value (`keep=True`) can no longer be had: its producer failed, or the hosts
    holding it were lost more often than its producer's `max_attempts` allows."""


class PoolClosedError(BatutaError):
    """The pool was used after it was closed, or closed while the call waited."""


class NoCapableSlotError(TaskFailedError):
    """Raised by `TaskResult.unwrap()` for an UNSCHEDULABLE task: no slot in the cluster can
    run it (for example a GPU task and no GPU), so changing the cluster or the task is the fix."""


class TransportError(BatutaError):
    """A byte stream to a host agent could not be opened, or broke.

    `retryable` is False when trying again cannot help (a refused host key, a rejected
    login): the pool then retires the host at once instead of relaunching it with backoff.
    """

    retryable = True


class HostConfigError(TransportError):
    """This machine cannot use what the cluster file says of a host: a key, certificate or CA
    file it names is missing or unreadable here, or an ssh setting is invalid. Fixed here, not
    on the host, so never retried; `batuta run` exits 2 (a configuration error) when every host
    failed so."""

    retryable = False


class HostUnusableError(TransportError):
    """A host's agent cannot start there until something on the host changes (its Python is
    too old): never retried, the host is retired at once."""

    retryable = False


class AgentError(BatutaError):
    """A host agent refused the session or failed to start."""


class InstallError(AgentError):
    """batuta could not be installed on a host (`batuta cluster install`, or `bootstrap = true`
    on connect), so no agent can start there."""


class ServeError(BatutaError):
    """A served coordinator (`batuta run --serve`) could not be reached, listened on, or
    spoke out of turn to a viewer (`batuta tui --attach`, `batuta ps`, `batuta stop`)."""


class ViewerProtocolError(ServeError):
    """A frame between a coordinator and a viewer was malformed; names the field."""


def write_fix(exc: OSError, *, runner: str, elsewhere: str) -> str:
    """What to do about a write that failed with `exc`, then `elsewhere`: the way around it.
    Shared by the agent's cache and the coordinator's own files (here, not in either, so that
    every layer may say it). "Free space" is the fix for a full disk (or quota) only: a
    read-only folder has room and needs a folder that can be written, a file where a folder
    goes (or a folder where a file goes) needs moving aside; a file size limit (`ulimit -f`)
    needs raising, not room: `runner` is what runs under it. No errno is numpy's write that
    stopped short ("8000 requested and 4096 written"): most often the disk filled."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, None):
        fix = "free space there"
    elif exc.errno == errno.EFBIG:
        fix = f"raise the file size limit (ulimit -f) {runner} runs under"
    elif exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST):  # writable, with room: blocked
        fix = "move aside what is in the way (a folder where a file goes, or a file where a folder goes)"
    else:
        fix = "make it writable"
    return f"{fix}, or {elsewhere}"
