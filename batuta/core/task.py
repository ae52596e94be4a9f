"""The task model: what a user submits (`Task`) and what comes back (`TaskResult`).

Pure data, no I/O. Kernel tasks name a registered kernel and carry NumPy arrays and scalars;
binary tasks carry a path, arguments, environment and working directory, as in the seed's
`Task::builder().binary("./process").arg(...)`. Nothing here is pickled: every field is a
plain value the wire codec knows how to encode.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import PurePath
from typing import Any, Never, Self

from batuta.errors import NoCapableSlotError, TaskFailedError, TaskUsageError

# Task.kernel's keyword-only options, named by the error for kernel arguments given by name
# (tests/test_task.py keeps the two in step)
_KERNEL_OPTIONS = ("backend", "priority", "timeout", "max_attempts", "requires", "key", "label", "retry")


def _named_kernel_args(name: str, named: Mapping[str, object]) -> str:
    given = ", ".join(f"{key}=..." for key in named)
    return (
        f"Task.kernel({name!r}, {given}): a kernel's arguments go by position, in the order its function "
        f"takes them (Task.kernel({name!r}, a, b, ...)); Task.kernel's own keywords are {', '.join(_KERNEL_OPTIONS)}"
    )


class Backend(enum.Enum):
    """Where a kernel runs. `AUTO` lets batuta pick from the input size (the seed's table)."""

    SCALAR = "scalar"
    CPU = "cpu"
    GPU = "gpu"
    AUTO = "auto"


class Priority(enum.IntEnum):
    """Higher runs first. Within one priority, tasks run in submission order.

    A task's `priority` may also be given by name, in any case ("high"), or by value (0 to 3).
    """

    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3


_PRIORITY_NAMES = {member.name.lower(): member for member in Priority}


def _priority(value: object) -> Priority:
    """`value` as a Priority: a member, its name in any case, or its value 0 to 3."""
    if type(value) is Priority:  # the common case, first: a million queued tasks pass here
        return value
    if isinstance(value, str):
        found = _PRIORITY_NAMES.get(value.strip().lower())
        if found is not None:
            return found
    elif isinstance(value, int) and not isinstance(value, bool):  # True is no priority
        with contextlib.suppress(ValueError):
            return Priority(value)
    names = ", ".join(repr(name) for name in _PRIORITY_NAMES)
    raise TaskUsageError(
        f"priority {value!r}: expected Priority.LOW, Priority.NORMAL, Priority.HIGH or Priority.CRITICAL "
        f"(or a name, any case: {names}; or 0 to 3)"
    )


def _backend(value: object) -> Backend:
    """`value` as a Backend: a member, or its value in any case ("gpu" is as clear as Backend.GPU)."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return Backend(value.strip().lower())
    if not isinstance(value, Backend):
        raise TaskUsageError(
            f"backend {value!r}: expected Backend.CPU, Backend.GPU, Backend.SCALAR or Backend.AUTO "
            "(or 'cpu', 'gpu', 'scalar', 'auto')"
        )
    return value


class TaskStatus(enum.Enum):
    """How a task ended. Every task ends in exactly one of these, exactly once."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the kernel raised, or the binary exited non-zero
    TIMED_OUT = "timed_out"  # ran past its timeout; the work was killed
    CANCELLED = "cancelled"
    LOST = "lost"  # its worker or host died on every attempt
    UNSCHEDULABLE = "unschedulable"  # no slot can ever run it (e.g. GPU task, no GPU)


class Outcome(enum.Enum):
    """How one attempt of a task ended on its slot, as the host agent reports it.

    The agent sends its value on the wire (`TaskOutcome.status`) and the scheduler decides
    the task's `TaskStatus` from it. An outcome is per attempt, a status per task (LOST and
    UNSCHEDULABLE are no attempt's outcome): `final_status` is the one map between them.
    """

    OK = "ok"
    ERROR = "error"  # kernel raised, binary exited non-zero, unknown kernel, bad input
    TIMEOUT = "timeout"  # the agent killed it at its timeout
    CANCELLED = "cancelled"
    CRASHED = "crashed"  # the worker process died under it (counts as a lost attempt)
    UNFIT = "unfit"  # the host cannot run it (its memory, its disk): not run, not counted (core/hostfit.py)

    def final_status(self) -> TaskStatus | None:
        """The task's status when this attempt ends it; None for CRASHED, which ends only the
        attempt (the scheduler runs the task again, or resolves it LOST after `max_attempts`),
        and for UNFIT, which ends no attempt (the task goes to another host, `hostfit.py`)."""
        return _FINAL_STATUS.get(self._value_)  # by value: a str hashes faster than a member


_FINAL_STATUS: dict[str, TaskStatus] = {
    Outcome.OK.value: TaskStatus.SUCCEEDED,
    Outcome.ERROR.value: TaskStatus.FAILED,
    Outcome.TIMEOUT.value: TaskStatus.TIMED_OUT,
    Outcome.CANCELLED.value: TaskStatus.CANCELLED,
}


# Capabilities a slot offers and a task requires. Tags from the cluster file add more.
CAP_CPU = "cpu"
CAP_GPU = "gpu"


def host_tag_problem(tag: object) -> str | None:
    """Why `tag` cannot be a host's tag (the cluster file's `tags`, `HostSpec.tags`), with the
    fix; None when it can. One check for both, so neither lets through what the other refuses."""
    if not isinstance(tag, str):
        return f"tag {tag!r} is not a string; give tags as strings, e.g. 'avx512'"
    if any(c.isspace() for c in tag):
        return f"tag {tag!r} must not contain spaces"
    if tag in (CAP_CPU, CAP_GPU) or tag.startswith(f"{CAP_GPU}:"):
        # A tag goes to every slot of its host: "gpu" let CPU slots take GPU tasks,
        # "gpu:3" made GPU slots name two GPUs, "cpu" let GPU slots take CPU tasks.
        return (
            f"tag {tag!r} is a capability batuta sets itself (CPU slots offer {CAP_CPU!r}, GPU slots "
            f"{CAP_GPU!r} and {CAP_GPU}:N for their GPU N); remove it (GPU slots come from the host's gpus "
            f"setting) or name yours otherwise, e.g. {tag.replace(':', '-') + '-box'!r}"
        )
    return None


def gpu_capability(index: int) -> str:
    """The capability a host's GPU slot for its GPU `index` offers besides "gpu": "gpu:0", ...

    With several GPUs in a host, `requires=[gpu_capability(1)]` runs a task on GPU 1's slot
    (the stack's per-GPU checks do); the index is the host's (NVML's) GPU number.
    """
    return f"{CAP_GPU}:{index}"


def _names_a_gpu(capability: str) -> bool:
    return capability.startswith(f"{CAP_GPU}:") and capability[len(CAP_GPU) + 1 :].isdigit()


def requires_gpu_slot(requires: Collection[str]) -> bool:
    """Whether a task's `requires` asks for a GPU slot ("gpu", "gpu:1"): such a kernel runs its
    GPU variant, such a binary on that GPU's slot (which sets its CUDA_VISIBLE_DEVICES)."""
    return any(tag == CAP_GPU or tag.startswith(f"{CAP_GPU}:") for tag in requires)


def gpu_index_of(capabilities: Collection[str]) -> int | None:
    """The GPU a GPU slot runs on, read back from its capabilities (`gpu_capability`'s
    inverse); None for a CPU slot, or where they name no single GPU (a host tagged "gpu:3")."""
    if CAP_GPU not in capabilities:
        return None
    found = [c for c in capabilities if _names_a_gpu(c)]
    return int(found[0][len(CAP_GPU) + 1 :]) if len(found) == 1 else None


def slot_kind(capabilities: frozenset[str]) -> frozenset[str]:
    """A slot's capabilities less the one naming its GPU: the slots of a host's GPUs are of one
    kind, as its CPU slots are (the scheduler's tail rule counts slots alike by it)."""
    if CAP_GPU not in capabilities:
        return capabilities
    return frozenset(c for c in capabilities if not _names_a_gpu(c))


MAX_SLOTS = 1024  # slots one agent runs (a process each); the builder, cluster file, CLI and agent check it
DEFAULT_MAX_ATTEMPTS = 3
_NO_TAGS: frozenset[str] = frozenset()  # shared: a million queued tasks need not own one each


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelCall:
    """Run the registered kernel `name` with positional `args` (arrays and scalars)."""

    name: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class BinaryCall:
    """Run the executable at `path` with `args`, extra `env` and `cwd`, on the host."""

    path: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None


Call = KernelCall | BinaryCall


@dataclass(frozen=True, slots=True, kw_only=True)
class Task:
    """One unit of work. Build with `Task.kernel(...)`, `Task.binary(...)` or `Task.builder()`.

    `max_attempts` counts attempts lost to infrastructure (a worker or host that died under
    the task); a kernel that raises, or a binary that exits non-zero, is not retried.
    Execution is at least once: a task whose host is lost mid-run runs again elsewhere,
    though its caller sees one result. `max_attempts=1` (`retry=False` in the constructors)
    marks a task not safe to repeat: a loss then fails it as LOST, even when the host may
    only have queued it, instead of running it a second time.
    `timeout` is run time in seconds, not counting time in queues; the work is killed when it
    runs out. `requires` adds capability tags (from the cluster file) a slot must offer.
    """

    call: Call
    backend: Backend = Backend.AUTO
    priority: Priority = Priority.NORMAL
    timeout: float | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    name: str = ""
    requires: frozenset[str] = _NO_TAGS
    key: str | None = None  # a stable key chosen by the caller (journals, resume)

    def __post_init__(self) -> None:
        if isinstance(self.call, KernelCall):
            if not self.call.name or not isinstance(self.call.name, str):
                raise TaskUsageError("kernel task needs a kernel name: Task.kernel('vadd', a, b)")
        elif isinstance(self.call, BinaryCall):
            if not self.call.path or not isinstance(self.call.path, str):
                raise TaskUsageError(f"binary task needs a path, not {self.call.path!r}: Task.binary('./process', ...)")
            for i, arg in enumerate(self.call.args):
                if not isinstance(arg, str):
                    hint = (
                        f"give each argument on its own: Task.binary({self.call.path!r}, '-c', 'cmd'), not a list"
                        if isinstance(arg, (list, tuple))
                        else f"pass str({arg!r})"
                    )
                    raise TaskUsageError(
                        f"binary task {self.call.path!r}: argument {i + 1} ({arg!r}) is not a str; {hint}"
                    )
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.call.env.items()):
                raise TaskUsageError(f"binary task {self.call.path!r}: env keys and values must be str")
            if self.call.cwd is not None and not isinstance(self.call.cwd, str):
                raise TaskUsageError(f"binary task {self.call.path!r}: cwd must be a str path, not {self.call.cwd!r}")
            texts = [("path", self.call.path), *((f"argument {i + 1}", a) for i, a in enumerate(self.call.args))]
            texts += [(f"env {k!r}", f"{k}={v}") for k, v in self.call.env.items()]
            texts += [("cwd", self.call.cwd or "")]
            for what, text in texts:
                problem = _not_utf8(text)
                if problem:
                    raise TaskUsageError(
                        f"binary task {self.call.path!r}: {what} ({text!r}) {problem}; batuta sends text as UTF-8: "
                        "rename the file, or reach it another way (a glob under 'sh -c')"
                    )
        else:
            raise TaskUsageError(f"task call must be KernelCall or BinaryCall, not {type(self.call).__name__}")
        if type(self.backend) is not Backend:
            object.__setattr__(self, "backend", _backend(self.backend))
        timeout = self.timeout
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf
        ):
            raise TaskUsageError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise TaskUsageError(f"max_attempts must be an int >= 1, not {self.max_attempts!r}")
        if not isinstance(self.name, str):
            raise TaskUsageError(f"label must be a str (the task's name in results and logs), not {self.name!r}")
        if self.key is not None and not isinstance(self.key, str):
            raise TaskUsageError(f"key must be a str (a stable key of your choosing) or None, not {self.key!r}")
        if not (self.name.isascii() and (self.key is None or self.key.isascii())):  # the usual case: no more
            for what, text in (("label", self.name), ("key", self.key or "")):
                problem = _not_utf8(text)
                if problem:
                    raise TaskUsageError(f"{what} {text!r} {problem}; give one that is valid text")
        if not self.name:
            label = self.call.name if isinstance(self.call, KernelCall) else _basename(self.call.path)
            object.__setattr__(self, "name", label)
        if type(self.priority) is not Priority:
            object.__setattr__(self, "priority", _priority(self.priority))
        if self.requires is not _NO_TAGS:
            object.__setattr__(self, "requires", _tags(self.requires))
        if isinstance(self.call, BinaryCall) and self.backend not in (Backend.CPU, Backend.AUTO):
            # A binary's slot is chosen by `requires` (README; the builder refuses this too):
            # backend=GPU alone ran it on a CPU slot, silently.
            raise TaskUsageError(
                f"binary task {self.call.path!r}: backend must be CPU, not {self.backend.name}; "
                "to run it on a GPU slot, with that GPU visible, pass requires=['gpu'] (or 'gpu:N')"
            )

    # -- constructors -------------------------------------------------------------------

    @classmethod
    def kernel(
        cls,
        name: str,
        *args: Any,
        backend: Backend = Backend.AUTO,
        priority: Priority = Priority.NORMAL,
        timeout: float | None = None,
        max_attempts: int | None = None,
        requires: Iterable[str] = _NO_TAGS,
        key: str | None = None,
        label: str = "",
        retry: bool = True,
        **named: Never,
    ) -> Task:
        """A task that runs the registered kernel `name` on `args`; `retry=False`: never run it twice.
        The kernel's arguments go by position: the keywords are the task's options."""
        if named:
            raise TaskUsageError(_named_kernel_args(name, named))
        return cls(
            call=KernelCall(name=name, args=tuple(args)),
            backend=backend,
            priority=priority,
            timeout=timeout,
            max_attempts=_attempts(max_attempts, retry),
            requires=_tags(requires),
            key=key,
            name=label,
        )

    @classmethod
    def binary(
        cls,
        path: str,
        *args: str | PurePath,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        priority: Priority = Priority.NORMAL,
        timeout: float | None = None,
        max_attempts: int | None = None,
        requires: Iterable[str] = _NO_TAGS,
        key: str | None = None,
        label: str = "",
        retry: bool = True,
    ) -> Task:
        """A task that runs the executable `path` with `args` on a host; `retry=False`: never run it twice."""
        return cls(
            call=BinaryCall(
                path=_path_text(path), args=tuple(_path_text(a) for a in args), env=dict(env or {}), cwd=_path_text(cwd)
            ),
            backend=Backend.CPU,
            priority=priority,
            timeout=timeout,
            max_attempts=_attempts(max_attempts, retry),
            requires=_tags(requires),
            key=key,
            name=label,
        )

    @staticmethod
    def builder() -> TaskBuilder:
        """The seed's builder: `Task.builder().binary("./process").arg("-v").build()`."""
        return TaskBuilder()

    def with_options(self, **changes: Any) -> Task:
        """A copy with some fields changed (`backend`, `priority`, `timeout`, ...)."""
        return replace(self, **changes)

    @property
    def is_kernel(self) -> bool:
        return isinstance(self.call, KernelCall)

    @property
    def retry(self) -> bool:
        """Whether a loss may run the task again: False for `retry=False` (`max_attempts=1`)."""
        return self.max_attempts > 1


def _attempts(max_attempts: int | None, retry: bool) -> int:
    """`max_attempts` from the constructors' two spellings of one setting."""
    if not isinstance(retry, bool):  # retry="no" would be true
        raise TaskUsageError(f"retry must be True or False, not {retry!r}")
    if retry:
        return DEFAULT_MAX_ATTEMPTS if max_attempts is None else max_attempts
    if max_attempts not in (None, 1):
        raise TaskUsageError(f"retry=False means one attempt; drop max_attempts={max_attempts!r} or keep retry=True")
    return 1


def _tags(requires: object) -> frozenset[str]:
    """`requires` as a frozenset of capability tags. A str is refused: taken as an iterable it
    would require each of its letters, a task no slot can run."""
    if isinstance(requires, str | bytes):
        raise TaskUsageError(f"requires={requires!r}: pass a list of capability tags, e.g. requires=[{requires!r}]")
    if not isinstance(requires, Iterable):
        raise TaskUsageError(f"requires={requires!r}: pass a list of capability tags, e.g. requires=['gpu']")
    tags = requires if isinstance(requires, frozenset) else tuple(requires)
    if not all(isinstance(tag, str) for tag in tags):
        raise TaskUsageError(f"requires={requires!r}: each capability tag must be a str, like 'gpu' or 'gpu:0'")
    if isinstance(tags, frozenset):
        return tags
    return frozenset(tags) if tags else _NO_TAGS


def _not_utf8(text: str) -> str:
    """Why `text` cannot travel (it holds lone surrogates, as `os.fsdecode` makes of a file
    name that is not UTF-8), or "". Sent, it failed its whole Run and the host session."""
    if text.isascii():
        return ""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid UTF-8 ({exc.reason} at index {exc.start}: a file name in another encoding?)"
    return ""


def _path_text(path: Any) -> Any:
    """A Path as its str; anything else as it is, for Task's checks to name."""
    return str(path) if isinstance(path, PurePath) else path


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] or path


class TaskBuilder:
    """Fluent construction, mirroring the seed's Rust `Task::builder()`."""

    def __init__(self) -> None:
        self._kernel: str | None = None
        self._binary: str | None = None
        self._args: list[Any] = []
        self._env: dict[str, str] = {}
        self._cwd: str | None = None
        self._options: dict[str, Any] = {}

    def kernel(self, name: str) -> Self:
        self._kernel = name
        return self

    def binary(self, path: str) -> Self:
        self._binary = _path_text(path)
        return self

    def arg(self, value: Any) -> Self:
        self._args.append(value)
        return self

    def args(self, values: Iterable[Any]) -> Self:
        if isinstance(values, str | bytes):  # taken as an iterable, one argument per character
            raise TaskUsageError(f"args({values!r}): pass a list of arguments, or .arg({values!r}) for one")
        self._args.extend(values)
        return self

    def env(self, key: str, value: str) -> Self:
        self._env[key] = value
        return self

    def cwd(self, path: str) -> Self:
        self._cwd = _path_text(path)
        return self

    def backend(self, backend: Backend) -> Self:
        self._options["backend"] = backend
        return self

    def priority(self, priority: Priority) -> Self:
        self._options["priority"] = priority
        return self

    def timeout(self, seconds: float) -> Self:
        self._options["timeout"] = seconds
        return self

    def max_attempts(self, attempts: int) -> Self:
        self._options["max_attempts"] = attempts
        return self

    def retry(self, allowed: bool) -> Self:
        """`.retry(False)`: not safe to run twice (one attempt; a lost host fails it)."""
        self._options["max_attempts"] = _attempts(self._options.get("max_attempts"), allowed)
        return self

    def requires(self, *tags: str) -> Self:
        self._options["requires"] = tags  # checked by Task, as Task.kernel's requires= is
        return self

    def name(self, label: str) -> Self:
        self._options["name"] = label
        return self

    def key(self, key: str) -> Self:
        self._options["key"] = key
        return self

    def build(self) -> Task:
        if (self._kernel is None) == (self._binary is None):
            raise TaskUsageError("Task.builder() needs exactly one of .kernel(name) or .binary(path)")
        if self._kernel is not None:
            if self._env or self._cwd is not None:
                raise TaskUsageError(f"kernel task {self._kernel!r}: env and cwd apply to binaries only")
            return Task(call=KernelCall(name=self._kernel, args=tuple(self._args)), **self._options)
        assert self._binary is not None
        options = dict(self._options)
        backend = _backend(options.pop("backend", Backend.CPU))
        if backend not in (Backend.CPU, Backend.AUTO):
            raise TaskUsageError(
                f"binary task {self._binary!r}: backend must be CPU, not {backend.name}; "
                "to run it on a GPU slot, with that GPU visible, use .requires('gpu') (or 'gpu:N')"
            )
        return Task(
            call=BinaryCall(
                path=self._binary,
                args=tuple(str(a) for a in self._args),
                env=dict(self._env),
                cwd=self._cwd,
            ),
            backend=Backend.CPU,
            **options,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskResult:
    """What became of a task. `value` holds the kernel's return (arrays, scalars, tuples).

    `duration` is run time on the host; `queue_wait` is the time from submission until the
    task started; `attempts` counts every start, including those lost with a worker.
    """

    task_id: int
    name: str
    status: TaskStatus
    value: Any = None
    stdout: bytes = b""
    stderr: bytes = b""
    exit_code: int | None = None
    error: str | None = None
    duration: float = 0.0
    queue_wait: float = 0.0
    host: str | None = None
    slot: str | None = None
    attempts: int = 0
    backend: Backend | None = None
    backend_reason: str = ""  # why this backend (AUTO follows the seed's size table)
    job: str = ""  # the job it was submitted under (`Pool.job(name)`), if any
    restored: bool = False  # answered from a result store (a journal), not run again
    # the GPU a GPU slot ran it on, with its capacity: "NVIDIA H200 (132 SMs)"; on a host of
    # several GPUs, which: "NVIDIA H100 80GB HBM3 (132 SMs, GPU 3)"
    device: str = ""
    code: str = ""  # digest of the user's code it ran with (shipped to its host); "" when none

    def is_success(self) -> bool:
        return self.status is TaskStatus.SUCCEEDED

    def unwrap(self) -> Any:
        """The value, or `TaskFailedError` naming the task, where it ran and why it failed
        (`NoCapableSlotError`, a TaskFailedError, when no slot of the cluster can run it)."""
        if self.is_success():
            return self.value
        error = NoCapableSlotError if self.status is TaskStatus.UNSCHEDULABLE else TaskFailedError
        raise error(self.describe_failure(raised=True), result=self)

    def describe_failure(self, *, raised: bool = False) -> str:
        """One line: the task, where it ran, why it failed; `raised`: for the TaskFailedError
        that carries this result, saying where the rest is (a traceback, a binary's stderr)."""
        # slot ids already start with their host ("gpu1/3"); older or hand-made results may not
        slot = self.slot or "?"
        slot = slot if slot.startswith(f"{self.host}/") else f"{self.host}/{slot}"
        where = f" on {slot}" if self.host else ""
        why = self.error or (f"exit code {self.exit_code}" if self.exit_code else self.status.value)
        line = f"task {self.task_id} ({self.name}) {self.status.value}{where} after {self.attempts} attempt(s): {why}"
        if not raised or not self.stderr:
            return line
        if b"Traceback (most recent call last)" in self.stderr:
            return f"{line}; its traceback is in result.stderr (this error's .result)"
        return f"{line}; what it wrote to stderr is in result.stderr (this error's .result)"

    def stderr_str(self) -> str:
        """The seed's `result.stderr_str()`."""
        return self.stderr.decode("utf-8", errors="replace")

    def stdout_str(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")
