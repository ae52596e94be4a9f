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

Each host answers twice. `CodeStored`: the files are written under its cache and checked
against the digest, and it runs that digest from now on; `ship` returns once every host it sent
the code to has said so, or was lost meanwhile (liveness bounds how long a silent host is waited
for). Then, before it reads anything else, the host imports the code (compiling it: most of
the work, 80-100 ms of CPU per 200 KB of source) and answers `CodeLoaded` with the modules that
failed; `CodeShipped.import_errors()` waits for those answers. A task sent meanwhile waits on
the host for the import, so `ship` returning early costs a task nothing and never lets one
meet the old code (agent/agent.py `_on_code`). `CodeAcks` keeps both waits.
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
    those sent new code that stored it, in order; `unchanged`: the code was what the hosts had,
    nothing was sent. `imports`: each of `hosts`' answer once it imported the code (its
    modules that failed, and why; None if it was lost first): see `import_errors`."""

    digest: str
    hosts: tuple[str, ...] = ()
    unchanged: bool = False
    imports: Mapping[str, asyncio.Future[Mapping[str, str] | None]] = field(
        default_factory=dict, repr=False, compare=False
    )

    async def import_errors(self) -> dict[str, dict[str, str]]:
        """Per host, the modules that failed to import there and why (their kernels' tasks fail
        with that line, the others run; the log says it too), once every host in `hosts` has
        imported the code or was lost. Empty: every module imported everywhere."""
        answers = await asyncio.gather(*self.imports.values())
        return {host: dict(errors) for host, errors in zip(self.imports, answers, strict=True) if errors}


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


@dataclass(frozen=True, slots=True, kw_only=True)
class CodeAnswers:
    """A host's two answers to one `Code` (module docstring): `stored` is True on its
    `CodeStored`, `loaded` its import errors on its `CodeLoaded`; False and None when it was
    lost before."""

    stored: asyncio.Future[bool]
    loaded: asyncio.Future[Mapping[str, str] | None]


class CodeAcks:
    """Hosts whose answers to a `Code` someone waits for, by host and digest. A host answers
    each Code, in order, so a ship's import errors still come when the next ship has sent
    other code meanwhile (ships go one at a time, each once the previous one's code is stored,
    so one digest is never awaited twice from a host)."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[str, str], CodeAnswers] = {}
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

    def expect(self, host: str, digest: str) -> CodeAnswers:
        """Futures for `host`'s answers to the Code of `digest`."""
        loop = asyncio.get_running_loop()
        answers = CodeAnswers(stored=loop.create_future(), loaded=loop.create_future())
        self._resolve(self._waiting.pop((host, digest), None))
        self._waiting[host, digest] = answers
        return answers

    async def send(self, sessions: Mapping[str, HostSession], before: Mapping[str, str], digest: str) -> CodeShipped:
        """Send each open session its code where its digest is not the one in `before` (all
        sent before any answer is awaited, so the hosts write and import it side by side), and
        wait until each has stored it; `digest` is the pool's, for the report."""
        waits: dict[str, CodeAnswers] = {}
        for name, session in sessions.items():
            code = session.code
            if code is not None and code.digest != before.get(name) and session.is_open:
                waits[name] = self.expect(name, code.digest)
                session.send(code, sum(len(f.data) for f in code.files))
        stored = await asyncio.gather(*(answers.stored for answers in waits.values()))
        hosts = tuple(name for name, ok in zip(waits, stored, strict=True) if ok)
        return CodeShipped(
            digest=digest, hosts=hosts, unchanged=not waits, imports={name: waits[name].loaded for name in hosts}
        )

    def stored(self, host: str, message: m.CodeStored) -> None:
        answers = self._waiting.get((host, message.digest))
        if answers is not None and not answers.stored.done():
            answers.stored.set_result(True)

    def loaded(self, host: str, message: m.CodeLoaded) -> None:
        answers = self._waiting.pop((host, message.digest), None)
        if answers is not None:
            if not answers.stored.done():
                answers.stored.set_result(True)
            if not answers.loaded.done():
                answers.loaded.set_result(dict(message.errors))

    def gone(self, host: str) -> None:
        """`host` will not answer (lost, or the pool closed): stop waiting for it."""
        for key in [key for key in self._waiting if key[0] == host]:
            self._resolve(self._waiting.pop(key))

    @staticmethod
    def _resolve(answers: CodeAnswers | None) -> None:
        """Answers that will not come: not stored, not loaded."""
        if answers is not None:
            if not answers.stored.done():
                answers.stored.set_result(False)
            if not answers.loaded.done():
                answers.loaded.set_result(None)

    def close(self) -> None:
        for host in {host for host, _ in self._waiting}:
            self.gone(host)
        for _, future in self._idle:
            if not future.done():
                future.set_result(None)
        self._idle = []
