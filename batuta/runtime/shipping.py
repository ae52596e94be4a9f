"""The user's code into a pool that already runs: `Pool.ship`'s parts.

A pool ships its code to every host right after each `Welcome` (runtime/code.py). `Pool.ship`
adds modules or job files to what the pool ships, collects the bundle again, and sends the
new one at once to every host that is up (a host that is relaunching gets it after its
`Welcome`, like any other). The hosts replace their slots as for any new code (see
batuta/agent/code.py and supervisor.py); tasks submitted after `ship` name the new digest.

New code goes out only once the hosts hold no task of the old code (a task queued there for
the old code would be refused, "error", when the new code arrives: no task runs stale code):
`ship` pauses the scheduling, waits until every task sent to a host has come back (finished,
or handed back and queued here again), ships, and resumes. Tasks not sent yet run with the
new code. So `ship` may wait for a long task that runs when it is called.

`CodeAcks` waits for each host's `CodeLoaded` of the new digest: `ship` returns once every
host it sent the code to has written it and imported its modules, or was lost meanwhile
(liveness bounds how long a silent host is waited for).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from batuta.protocol import messages as m
from batuta.runtime.code import CodeCollector, CodeSpec
from batuta.runtime.session import HostSession, HostSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class CodeShipped:
    """What `Pool.ship` did. `digest`: the pool's code now ("" when nothing ships); `hosts`:
    those sent new code that loaded it, in order; `errors`: per host, the modules that failed
    to import there and why (their kernels' tasks fail with that line, the others run);
    `unchanged`: the code was what the hosts had, nothing was sent."""

    digest: str
    hosts: tuple[str, ...] = ()
    errors: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    unchanged: bool = False


def with_code(spec: CodeSpec, modules: Iterable[str | Path], job_files: Iterable[str | Path]) -> CodeSpec:
    """`spec` shipping also `modules` (.py files, package folders) and `job_files`, each once."""
    known_modules = {Path(p).expanduser().resolve() for p in spec.modules}
    known_jobs = {Path(p).expanduser().resolve() for p in spec.job_files}
    added_modules = [Path(p) for p in modules if Path(p).expanduser().resolve() not in known_modules]
    added_jobs = [Path(p) for p in job_files if Path(p).expanduser().resolve() not in known_jobs]
    return replace(
        spec,
        modules=(*spec.modules, *dict.fromkeys(added_modules)),
        job_files=(*spec.job_files, *dict.fromkeys(added_jobs)),
    )


def collect(code: CodeSpec, hosts: Sequence[HostSpec]) -> dict[str, m.Code | None]:
    """Each host's bundle of `code` (hosts name their own `kernel_modules`); raises CodeError."""
    collector = CodeCollector(code)
    return {spec.name: collector.bundle(spec.kernel_modules) for spec in hosts}


class CodeAcks:
    """Hosts whose `CodeLoaded` of a digest someone waits for (at most one digest per host:
    a newer wait ends the older one, whose code the host no longer runs)."""

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[str, asyncio.Future[Mapping[str, str] | None]]] = {}
        self._idle: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []  # (condition, its waiter)
        self.one_at_a_time = asyncio.Lock()  # ships of one pool, in turn (each pauses and resumes)

    async def until(self, condition: Callable[[], bool]) -> None:
        """Return once `condition()` holds: now, or at a `check()` (the pool calls it whenever
        a task comes back from a host), or when the pool closes."""
        if condition():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle.append((condition, future))
        await future

    def check(self) -> None:
        if self._idle:
            waiting, self._idle = self._idle, []
            for condition, future in waiting:
                if future.done():
                    continue
                if condition():
                    future.set_result(None)
                else:
                    self._idle.append((condition, future))

    def expect(self, host: str, digest: str) -> asyncio.Future[Mapping[str, str] | None]:
        """A future for `host`'s import errors once it loaded `digest`; None if it was lost."""
        self.gone(host)
        future: asyncio.Future[Mapping[str, str] | None] = asyncio.get_running_loop().create_future()
        self._waiting[host] = (digest, future)
        return future

    async def send(self, sessions: Mapping[str, HostSession], before: Mapping[str, str], digest: str) -> CodeShipped:
        """Send each open session its code where its digest is not the one in `before`, and
        wait for their answers; `digest` is the pool's, for the report."""
        waits: dict[str, asyncio.Future[Mapping[str, str] | None]] = {}
        for name, session in sessions.items():
            code = session.code
            if code is not None and code.digest != before.get(name) and session.is_open:
                waits[name] = self.expect(name, code.digest)
                session.send(code, sum(len(f.data) for f in code.files))
        answers = dict(zip(waits, await asyncio.gather(*waits.values()), strict=True))
        loaded = {name: errors for name, errors in answers.items() if errors is not None}
        errors = {name: errors for name, errors in loaded.items() if errors}
        return CodeShipped(digest=digest, hosts=tuple(loaded), errors=errors, unchanged=not waits)

    def loaded(self, host: str, message: m.CodeLoaded) -> None:
        waiting = self._waiting.get(host)
        if waiting is not None and waiting[0] == message.digest:
            del self._waiting[host]
            if not waiting[1].done():
                waiting[1].set_result(dict(message.errors))

    def gone(self, host: str) -> None:
        """`host` will not answer (lost, or the pool closed): stop waiting for it."""
        waiting = self._waiting.pop(host, None)
        if waiting is not None and not waiting[1].done():
            waiting[1].set_result(None)

    def close(self) -> None:
        for host in list(self._waiting):
            self.gone(host)
        for _, future in self._idle:
            if not future.done():
                future.set_result(None)
        self._idle = []
