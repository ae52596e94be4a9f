"""Building a pool: `PoolConfig`, the seed's fluent `PoolBuilder`, and `local_host`.

pool = Pool.builder().cpu_workers(4).gpu_workers("none").seed(7).build()
"""

from __future__ import annotations

import errno
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from batuta.core.backend import BackendThresholds
from batuta.core.scheduler import SchedulerConfig
from batuta.core.task import CAP_CPU, MAX_SLOTS
from batuta.errors import HostConfigError, TransportError, UsageError
from batuta.runtime.code import MAX_CODE_MB, CodeSpec
from batuta.runtime.session import HostSpec
from batuta.runtime.toml_fields import MODULE_NAME, FieldReader
from batuta.transport.local import agent_command, open_local_agent

if TYPE_CHECKING:
    from batuta.runtime.pool import Pool


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfig:
    """Everything a pool needs besides its hosts. Built by `PoolBuilder`."""

    seed: int = 0
    heartbeat_interval: float = 1.0
    suspect_after: float = 3.0  # seconds of silence before a host is suspected
    lost_after: float = 8.0  # seconds of silence before it is lost and its work requeued
    max_relaunches: int = 10  # consecutive failed relaunches before a host is retired: about 2.5 min, a reboot
    relaunch_backoff: float = 0.5  # first delay; doubles each time, capped at 30 s
    start_timeout: float = 60.0
    # Once one host is up, how long start-up waits for the others before tasks start on the
    # hosts that are up; the rest join when they answer (work stealing gives them their share).
    # An unreachable address otherwise held the first task for connect_timeout, a bootstrap for
    # its install. math.inf: wait for every host (each still gives up after its timeouts).
    start_wait: float = 5.0
    # A host's agent exits after this long without a word from the coordinator (it sends a
    # keepalive when idle): a host cut off by a network partition does not keep its agent and
    # slots running for ever. Long, since a job that blocks the coordinator's loop (a long
    # computation in `main`) is silent too. 0: never.
    agent_silence_limit: float = 300.0
    # Hosts launched at once (SSH connections opened in parallel); the rest wait their turn,
    # so starting hundreds of hosts does not open hundreds of connections in one burst.
    max_parallel_starts: int = 64
    # Flow control: a session writes at most `send_high_water` bytes before it waits for its
    # host to take them; submissions wait while hosts hold more than `send_budget` unread.
    send_high_water: int = 16 * 2**20
    send_budget: int = 256 * 2**20
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    thresholds: BackendThresholds = field(default_factory=BackendThresholds)
    code: CodeSpec = field(default_factory=CodeSpec)  # the user's code to ship (runtime/code.py)

    def __post_init__(self) -> None:
        # Made by hand as well as by the builder: a heartbeat of -1 went to the agent, which
        # refused its Welcome, and the pool relaunched it forever.
        for name in ("heartbeat_interval", "suspect_after", "lost_after", "relaunch_backoff", "start_timeout"):
            positive_seconds("PoolConfig", getattr(self, name), name)
        _whole("PoolConfig", self.max_relaunches, "max_relaunches", least=0, what="a number of relaunches >= 0")
        wait = self.start_wait
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= math.inf:
            raise UsageError(
                f"PoolConfig(start_wait={wait!r}): give a number of seconds >= 0, or math.inf to wait for every host"
            )
        limit = self.agent_silence_limit
        if isinstance(limit, bool) or not isinstance(limit, int | float) or not 0 <= limit < math.inf:
            raise UsageError(f"PoolConfig(agent_silence_limit={limit!r}): give a number of seconds, or 0 for never")
        for name in ("max_parallel_starts", "send_high_water", "send_budget"):
            _whole("PoolConfig", getattr(self, name), name, least=1, what="a positive whole number")


class PoolBuilder:
    """Fluent construction mirroring the seed's `Pool::builder().cpu_workers(n).build()`."""

    # Pool.local's keywords besides cpu_workers, gpu_workers and seed: the methods that take one
    # value and fit a pool of this machine only (the others take keywords, none, or hosts)
    LOCAL_OPTIONS: ClassVar[tuple[str, ...]] = (
        "kernel_modules",
        "modules",
        "job_file",
        "code_limit",
        "python",
        "heartbeat_interval",
        "max_queued",
        "scheduler",
    )

    def __init__(self) -> None:
        self._cpu_workers: int | None = None
        self._gpu_workers = "auto"
        self._kernel_modules: list[str] = []
        self._hosts: list[HostSpec] = []
        self._config = PoolConfig()
        self._scheduler = SchedulerConfig()
        self._python: str | None = None
        self._local = True

    def cpu_workers(self, count: int | None) -> PoolBuilder:
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
            raise UsageError(f"cpu_workers must be a positive int, not {count!r}")
        if count is not None and count > MAX_SLOTS:
            raise UsageError(f"cpu_workers({count}): one agent runs at most {MAX_SLOTS} slots")
        self._cpu_workers = count
        return self

    def gpu_workers(self, which: str | Sequence[int]) -> PoolBuilder:
        """'auto' (one slot per visible GPU), 'none', or GPU indices: "0,1" or [0, 1], as the
        cluster file's `gpus` takes them. A bare count (3) is refused: it could mean GPU 3 or
        three GPUs."""
        if isinstance(which, int) and not isinstance(which, bool):
            raise UsageError(f'gpu_workers({which}) is ambiguous: give GPU indices ("0,1" or [0, 1]), "auto" or "none"')
        # The cluster file's rule, so that a value means the same here as in cluster.toml.
        given = list(which) if isinstance(which, Sequence) and not isinstance(which, str | bytes) else which
        self._gpu_workers = _ARGUMENTS._gpus(("gpu_workers",), given)
        return self

    def kernel_modules(self, modules: Iterable[str]) -> PoolBuilder:
        """Modules the agents import so that their `@kernel` functions are registered: a list of
        dotted names. Those that are the user's own files here (not installed) travel to every host."""
        names = _items("kernel_modules", modules, "module names")
        for name in names:
            if not isinstance(name, str) or not MODULE_NAME.match(name):
                raise UsageError(f"kernel_modules: {name!r} is not a dotted module name like mypkg.kernels")
        self._kernel_modules = names
        return self

    def modules(self, paths: Iterable[str | Path]) -> PoolBuilder:
        """The user's code to ship to every host and import there: a list of .py files and
        package folders (with what they import from their folders); see batuta/runtime/code.py."""
        code = self._config.code
        added = tuple(_path("modules", p) for p in _items("modules", paths, "paths"))
        self._config = replace(self._config, code=replace(code, modules=code.modules + added))
        return self

    def job_file(self, path: str | Path) -> PoolBuilder:
        """Ship the modules of `path`'s folder that this job file imports (what `batuta run`
        does for its job)."""
        code = self._config.code
        self._config = replace(self._config, code=replace(code, job_files=(*code.job_files, _path("job_file", path))))
        return self

    def code_limit(self, nbytes: int) -> PoolBuilder:
        """The most bytes of the user's code one host may be sent (default 16 MiB)."""
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or not 1 <= nbytes <= MAX_CODE_MB * 2**20:
            raise UsageError(f"code_limit({nbytes!r}): give a number of bytes from 1 to {MAX_CODE_MB} MiB")
        self._config = replace(self._config, code=replace(self._config.code, max_bytes=nbytes))
        return self

    def host(self, spec: HostSpec) -> PoolBuilder:
        self._hosts.append(_host_spec("host", spec))
        return self

    def hosts(self, specs: Iterable[HostSpec]) -> PoolBuilder:
        given = [_host_spec("hosts", spec) for spec in _items("hosts", specs, "HostSpecs", "local_host(2)")]
        self._hosts.extend(given)  # all checked before any is added
        return self

    def no_local(self) -> PoolBuilder:
        """Do not add this machine's agent (only the hosts given)."""
        self._local = False
        return self

    def python(self, executable: str) -> PoolBuilder:
        """The Python that runs the local agent (default: this one)."""
        _path("python", executable)  # a str or a Path
        # kept as given, not made a Path: "./python" must keep its "./", or exec searches PATH
        given = os.fspath(executable)
        if not given:  # else the agent would quietly run with this Python
            raise UsageError("python(''): give the path of a Python interpreter, or leave python() out")
        self._python = given
        return self

    def seed(self, seed: int) -> PoolBuilder:
        self._config = replace(self._config, seed=_whole("seed", seed, what="a whole number"))
        return self

    def heartbeat_interval(self, seconds: float) -> PoolBuilder:
        """Seconds between a host's heartbeats; below `liveness(suspect_after=...)` (default 3)."""
        self._config = replace(self._config, heartbeat_interval=positive_seconds("heartbeat_interval", seconds))
        return self

    def liveness(self, *, suspect_after: float, lost_after: float) -> PoolBuilder:
        suspect_after = positive_seconds("liveness", suspect_after, "suspect_after")
        lost_after = positive_seconds("liveness", lost_after, "lost_after")
        if suspect_after > lost_after:
            raise UsageError(
                f"liveness(suspect_after={suspect_after:g}, lost_after={lost_after:g}): "
                "a host is suspected before it is lost; give suspect_after <= lost_after"
            )
        self._config = replace(self._config, suspect_after=suspect_after, lost_after=lost_after)
        return self

    def relaunch(self, *, max_relaunches: int, backoff: float) -> PoolBuilder:
        """How often a lost host is relaunched before it is retired (0: never), and the first
        delay in seconds (it doubles each time, up to 30 s)."""
        count = _whole("relaunch", max_relaunches, "max_relaunches", least=0, what="a whole number of relaunches >= 0")
        delay = positive_seconds("relaunch", backoff, "backoff")
        self._config = replace(self._config, max_relaunches=count, relaunch_backoff=delay)
        return self

    def start_wait(self, seconds: float) -> PoolBuilder:
        """Once one host is up, seconds to wait for the others before tasks start (they join
        when they answer); 0: at once; math.inf: wait for every host. Default 5."""
        self._config = replace(self._config, start_wait=seconds)  # PoolConfig checks it
        return self

    def flow_control(self, *, high_water: int | None = None, budget: int | None = None) -> PoolBuilder:
        """Bytes a host may hold unread before its session waits (`high_water`, per host), and
        before submissions wait (`budget`, over all hosts)."""
        for name, value in (("high_water", high_water), ("budget", budget)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UsageError(f"flow_control({name}={value!r}): give a positive number of bytes")
        if high_water is not None:
            self._config = replace(self._config, send_high_water=high_water)
        if budget is not None:
            self._config = replace(self._config, send_budget=budget)
        return self

    def max_queued(self, count: int) -> PoolBuilder:
        """The most tasks queued before `submit` waits for room (backpressure)."""
        self._scheduler = replace(
            self._scheduler, max_queued=_whole("max_queued", count, least=1, what="a positive number of tasks")
        )
        return self

    def window(self, *, min_window: int | None = None, max_window: int | None = None) -> PoolBuilder:
        """Bounds of the tasks in flight per slot (the window is sized between them to hide the
        round trip; SchedulerConfig's defaults say why)."""
        for name, value in (("min_window", min_window), ("max_window", max_window)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UsageError(f"window({name}={value!r}): give a positive number of tasks")
        low = self._scheduler.min_window if min_window is None else min_window
        high = self._scheduler.max_window if max_window is None else max_window
        if low > high:
            raise UsageError(f"window(min_window={low}, max_window={high}): min_window must not exceed max_window")
        if min_window is not None:
            self._scheduler = replace(self._scheduler, min_window=min_window)
        if max_window is not None:
            self._scheduler = replace(self._scheduler, max_window=max_window)
        return self

    def scheduler(self, config: SchedulerConfig) -> PoolBuilder:
        if not isinstance(config, SchedulerConfig):
            raise UsageError(f"scheduler({config!r}): give a batuta.core.scheduler.SchedulerConfig")
        self._scheduler = config
        return self

    def build(self) -> Pool:
        config = self._config
        if config.heartbeat_interval >= config.suspect_after:  # as the cluster file's [pool] check says
            raise UsageError(
                f"heartbeat_interval({config.heartbeat_interval:g}) is not below liveness(suspect_after="
                f"{config.suspect_after:g}): every host would be suspected between heartbeats; shorten it "
                "or raise suspect_after"
            )
        hosts = list(self._hosts)
        if self._local and not any(h.name == "local" for h in hosts):
            hosts.insert(
                0,
                local_host(
                    self._cpu_workers, gpus=self._gpu_workers, kernel_modules=self._kernel_modules, python=self._python
                ),
            )
        from batuta.runtime.pool import Pool  # the pool imports this module

        return Pool(hosts, replace(self._config, scheduler=self._scheduler))


# The cluster file's checks, for the arguments that the cluster file takes too: its errors
# (a ConfigError, a UsageError) read "Pool.builder(): gpu_workers: <the problem and the fix>".
_ARGUMENTS = FieldReader("", "Pool.builder()", Path())


def _shown(method: str, value: object, keyword: str = "") -> str:
    """The call as the caller wrote it: `heartbeat_interval(-1)`, `relaunch(backoff=-1)`."""
    return f"{method}({keyword}={value!r})" if keyword else f"{method}({value!r})"


def positive_seconds(method: str, value: object, keyword: str = "") -> float:
    """`value` as a positive, finite number of seconds (not a bool, not a str); RemoteExecutor's
    builder checks its timeouts with it too."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise UsageError(f"{_shown(method, value, keyword)}: give a positive number of seconds")
    return float(value)


def _whole(method: str, value: object, keyword: str = "", *, least: int | None = None, what: str) -> int:
    """`value` as an int of at least `least` (a bool is no int here: True is no count)."""
    if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
        raise UsageError(f"{_shown(method, value, keyword)}: give {what}")
    return value


def _items(method: str, values: object, what: str, example: str = "") -> list[Any]:
    """`values` as a list. A str or a path is refused: taken as an iterable it would be read
    one character (or one path part) at a time. The fix shows `example` in a list, or without
    one, the str or path given."""
    if isinstance(values, str | bytes | os.PathLike) and not example:
        example = repr(os.fsdecode(values))
    if isinstance(values, str | bytes | os.PathLike) or not isinstance(values, Iterable):
        raise UsageError(f"{_shown(method, values)}: pass a list of {what}, e.g. {method}([{example or '...'}])")
    return list(values)


def _host_spec(method: str, spec: object) -> HostSpec:
    if not isinstance(spec, HostSpec):
        raise UsageError(f"{method}: {spec!r} is not a HostSpec; make one with local_host(...) or ssh_host(...)")
    return spec


def _path(method: str, value: object) -> Path:
    # "" is let through, as Path makes it ".": runtime/code.py says what is wrong with that folder
    if isinstance(value, str | os.PathLike):
        return Path(value)
    raise UsageError(f"{method}: {value!r} is not a path; give a str or a pathlib.Path")


# What exec says of a path that is no program here (missing, not executable, not a binary).
_NOT_RUNNABLE = frozenset({errno.ENOENT, errno.EACCES, errno.ENOTDIR, errno.ENOEXEC, errno.ELOOP})


def local_host(
    cpu_workers: int | None = None,
    *,
    gpus: str = "auto",
    kernel_modules: Sequence[str] = (),
    python: str | None = None,
    name: str = "local",
    env: dict[str, str] | None = None,
    python_from: str = "Pool.builder().python()",
) -> HostSpec:
    """A host agent on this machine, started as a subprocess (the embedded default).
    `python_from` says where a `python` was given, for the error when it cannot be run here."""
    argv = agent_command(slots=cpu_workers, gpus=gpus, kernel_modules=kernel_modules, python=python, name=name)

    async def launch() -> Any:
        try:
            return await open_local_agent(argv, env=env, name=name)
        except TransportError as exc:
            cause = exc.__cause__
            if python is None or not isinstance(cause, OSError) or cause.errno not in _NOT_RUNNABLE:
                raise  # out of processes or file descriptors, say: not the setting's fault
            # The interpreter named cannot be run on this machine: a setting to fix here, as a
            # missing key file is (exit 2), not a host that failed to come up (3).
            raise HostConfigError(
                f"host {name}: cannot run its python {python!r} here: {cause.strerror or cause}; "
                f"fix {python_from}, or leave it out to run the agent with this Python ({sys.executable})"
            ) from exc

    return HostSpec(
        name=name,
        launch=launch,
        expected_capabilities=(frozenset({CAP_CPU}),),
        kernel_modules=tuple(kernel_modules),
        python=python or sys.executable,
    )
