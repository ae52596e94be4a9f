"""Building a pool: `PoolConfig`, the seed's fluent `PoolBuilder`, and `local_host`.

pool = Pool.builder().cpu_workers(4).gpu_workers("none").seed(7).build()
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batuta.core.backend import BackendThresholds
from batuta.core.scheduler import SchedulerConfig
from batuta.core.task import CAP_CPU, MAX_SLOTS
from batuta.errors import HostConfigError, TransportError, UsageError
from batuta.runtime.code import MAX_CODE_MB, CodeSpec
from batuta.runtime.session import HostSpec
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
    max_relaunches: int = 5  # consecutive failed relaunches before a host is retired
    relaunch_backoff: float = 0.5  # first delay; doubles each time, capped at 30 s
    start_timeout: float = 60.0
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


class PoolBuilder:
    """Fluent construction mirroring the seed's `Pool::builder().cpu_workers(n).build()`."""

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

    def gpu_workers(self, which: str) -> PoolBuilder:
        """'auto' (one slot per visible GPU), 'none', or a comma list of GPU indices."""
        self._gpu_workers = which
        return self

    def kernel_modules(self, modules: Iterable[str]) -> PoolBuilder:
        """Modules the agents import so that their `@kernel` functions are registered. Those
        that are the user's own files here (not installed) travel to every host."""
        self._kernel_modules = list(modules)
        return self

    def modules(self, paths: Iterable[str | Path]) -> PoolBuilder:
        """The user's code to ship to every host and import there: .py files and package
        folders (with what they import from their folders); see batuta/runtime/code.py."""
        code = self._config.code
        added = tuple(Path(p) for p in paths)
        self._config = replace(self._config, code=replace(code, modules=code.modules + added))
        return self

    def job_file(self, path: str | Path) -> PoolBuilder:
        """Ship the modules of `path`'s folder that this job file imports (what `batuta run`
        does for its job)."""
        code = self._config.code
        self._config = replace(self._config, code=replace(code, job_files=(*code.job_files, Path(path))))
        return self

    def code_limit(self, nbytes: int) -> PoolBuilder:
        """The most bytes of the user's code one host may be sent (default 16 MiB)."""
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or not 1 <= nbytes <= MAX_CODE_MB * 2**20:
            raise UsageError(f"code_limit({nbytes!r}): give a number of bytes from 1 to {MAX_CODE_MB} MiB")
        self._config = replace(self._config, code=replace(self._config.code, max_bytes=nbytes))
        return self

    def host(self, spec: HostSpec) -> PoolBuilder:
        self._hosts.append(spec)
        return self

    def hosts(self, specs: Iterable[HostSpec]) -> PoolBuilder:
        self._hosts.extend(specs)
        return self

    def no_local(self) -> PoolBuilder:
        """Do not add this machine's agent (only the hosts given)."""
        self._local = False
        return self

    def python(self, executable: str) -> PoolBuilder:
        self._python = executable
        return self

    def seed(self, seed: int) -> PoolBuilder:
        self._config = replace(self._config, seed=seed)
        return self

    def heartbeat_interval(self, seconds: float) -> PoolBuilder:
        self._config = replace(self._config, heartbeat_interval=seconds)
        return self

    def liveness(self, *, suspect_after: float, lost_after: float) -> PoolBuilder:
        if not 0 < suspect_after <= lost_after:
            raise UsageError("liveness needs 0 < suspect_after <= lost_after")
        self._config = replace(self._config, suspect_after=suspect_after, lost_after=lost_after)
        return self

    def relaunch(self, *, max_relaunches: int, backoff: float) -> PoolBuilder:
        self._config = replace(self._config, max_relaunches=max_relaunches, relaunch_backoff=backoff)
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
        self._scheduler = replace(self._scheduler, max_queued=count)
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
        self._scheduler = config
        return self

    def build(self) -> Pool:
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
