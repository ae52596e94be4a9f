"""The pool's hosts: launching, watching and relaunching their sessions.

`HostSupervisor` is the thin driver of `batuta.core.liveness`: it feeds the state machine
what the sessions report (ready, heard, closed, launch failed) with the time of the loop's
one clock, and carries out what comes back: it publishes state changes through the pool,
abandons a lost host's stream, relaunches the agent on `Relaunch`, and tells the pool when
a host is lost or retired so that the scheduler requeues or fails its work. It holds no
policy of its own: silence thresholds, backoff and retirement are the core's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from batuta.core import liveness as lv
from batuta.errors import AgentError, HostConfigError, TransportError
from batuta.protocol import messages as m
from batuta.runtime import collector
from batuta.runtime import events as pe
from batuta.runtime.datalink import DataLinks
from batuta.runtime.session import HostSession, HostSpec, SendBudget
from batuta.runtime.turns import LoopTurns
from batuta.runtime.views import HostView
from batuta.runtime.wakeup import WakeupTimer

if TYPE_CHECKING:
    from batuta.runtime.builder import PoolConfig

log = logging.getLogger("batuta.runtime.hosts")

STRAGGLER_NOTE_S = 2.0
"""Once a host is up, how long start-up waits for the others before saying which it waits for
(or, where `start_wait` is shorter, before it goes on without them)."""

START_UNWIND_S = 5.0
"""How long a cancelled start-up waits for its hosts' launches to end (a launch cancelled
while it starts a process kills and reaps it) before it lets the cancellation through."""


class PoolSide(Protocol):
    """What the supervisor tells the pool. Every call happens on the event loop."""

    def host_ready(self, session: HostSession) -> None: ...
    def host_messages(self, session: HostSession, messages: list[m.Message]) -> None: ...
    def host_writable(self, session: HostSession) -> None: ...
    def host_state_changed(self, host: str, state: str, reason: str) -> None: ...
    def host_suspected(self, host: str, *, suspected: bool) -> None: ...
    def host_lost(self, host: str, reason: str, *, retired: bool) -> None: ...


class HostSupervisor:
    """Every host session of one pool, and their liveness."""

    def __init__(
        self,
        specs: Sequence[HostSpec],
        pool: PoolSide,
        config: PoolConfig,
        *,
        send_budget: SendBudget,
        turns: LoopTurns,
        clock: Callable[[], float],
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._start_wait = config.start_wait
        self._liveness = lv.HostLiveness(
            lv.LivenessConfig(
                suspect_after=config.suspect_after,
                lost_after=config.lost_after,
                max_relaunches=config.max_relaunches,
                relaunch_backoff=config.relaunch_backoff,
            )
        )
        self.sessions: dict[str, HostSession] = {
            spec.name: HostSession(
                spec=spec,
                listener=self,
                heartbeat_interval=config.heartbeat_interval,
                silence_limit=config.agent_silence_limit,
                handshake_timeout=config.start_timeout,
                high_water=config.send_high_water,
                budget=send_budget,
                turns=turns,
            )
            for spec in specs
        }
        self._launches: dict[str, asyncio.Task[Any]] = {}
        # At most this many (re)launches at once: SSH connections are opened in parallel,
        # within a bound. Hosts that join later wait for their node, not for a turn here.
        self._start_turns = asyncio.Semaphore(max(1, config.max_parallel_starts))
        self._timer = WakeupTimer(lambda: self._handle(lv.ClockTicked()))
        self._closed = False
        self._holds_collector = False  # the server collector policy, held while up (collector.py)
        self.data_links = DataLinks()  # listens only if a host's spec asks for a data link

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Launch every host concurrently; returns once one is up and the others have answered,
        failed, or had `start_wait` seconds more (they join when they answer). Hosts that
        failed are relaunched in the background; raises the first error if none is up.

        Hosts that join later (an allocation's nodes) are launched in the background and not
        waited for, unless there is no other host: then until the first of them is up."""
        now = self._clock()
        for name in self.sessions:
            self._liveness.handle(lv.HostAdded(host_id=name), now)
        sessions = [s for s in self.sessions.values() if not s.spec.joins_later]
        joining = [self._join(s) for s in self.sessions.values() if s.spec.joins_later]
        if not sessions:
            await self._first_joined(joining)
        else:
            starts = [asyncio.create_task(self._bounded_start(s), name=f"start-{s.name}") for s in sessions]
            try:
                await _await_starts(sessions, starts, self._start_wait)
            except asyncio.CancelledError:
                for start in starts:
                    start.cancel()
                # Let them end before we do: one cancelled inside its agent's launch kills and
                # reaps the process as it unwinds. Raising at once, the caller's loop (Ctrl-C
                # under asyncio.run) could close first, leaving the agent running past it and
                # asyncio's child watcher logging "Loop ... that handles pid N is closed".
                await asyncio.wait(starts, timeout=START_UNWIND_S)
                raise
            ended = [(s, f) for s, f in zip(sessions, starts, strict=True) if f.done()]
            errors = [e for _, f in ended if (e := f.exception()) is not None]
            if len(errors) == len(sessions):
                for session, start in ended:  # each host's own reason, for the run's summary (the error names one)
                    self._pool.host_state_changed(session.name, "unreachable", str(start.exception()))
                # A configuration error (a key file missing here) is raised only if every host
                # failed so: then the fix is in the cluster file, not on the hosts.
                first = next((e for e in errors if not isinstance(e, HostConfigError)), errors[0])
                if isinstance(first, AgentError | TransportError):
                    raise first
                raise AgentError(f"no host could be started: {first!r}") from first
            for session, start in zip(sessions, starts, strict=True):
                if start.done():
                    self._start_ended(session, start)
                else:  # past start_wait: it joins when it answers, as a relaunched host does
                    self._launches[session.name] = start
                    start.add_done_callback(functools.partial(self._late_start_ended, session))
            late = [s.name for s, f in zip(sessions, starts, strict=True) if not f.done()]
            if late:
                up = len(sessions) - len(late) - len(errors)
                log.warning(
                    "start-up goes on with %d of %d hosts up; %s %s (start_wait in [pool])",
                    up,
                    len(sessions),
                    ", ".join(late),
                    "joins when it answers" if len(late) == 1 else "join when they answer",
                )
                for name in late:
                    why = f"did not answer within start_wait ({self._start_wait:g} s); tasks started without it"
                    self._pool.host_state_changed(name, "starting", why)
        if not self._closed and not self._holds_collector:  # start-up's heap is made: freeze it
            self._holds_collector = True
            collector.POLICY.hold()

    def _start_ended(self, session: HostSession, start: asyncio.Future[None]) -> None:
        """A first start's outcome: a failed one is relaunched in the background."""
        error = start.exception()
        if error is None:
            return
        if not (isinstance(error, TransportError) and not error.retryable):
            log.warning(
                "host %s failed to start: %s; retrying in the background",
                session.name,
                error,
                extra={"host": session.name},
            )
        self._launch_failed(session, error)

    def _late_start_ended(self, session: HostSession, start: asyncio.Future[None]) -> None:
        if self._launches.get(session.name) is start:
            del self._launches[session.name]
        if not start.cancelled() and not self._closed:
            self._start_ended(session, start)

    async def _bounded_start(self, session: HostSession) -> None:
        async with self._start_turns:
            await session.start()

    def _join(self, session: HostSession) -> asyncio.Task[BaseException | None]:
        """Launch a host that joins later, in the background; the task returns its error."""

        async def join() -> BaseException | None:
            try:
                await session.start()
                return None
            except (AgentError, TransportError, OSError) as exc:
                if not (isinstance(exc, TransportError) and not exc.retryable):
                    log.warning("host %s failed to join: %s; retrying", session.name, exc, extra={"host": session.name})
                self._launch_failed(session, exc)
                return exc
            finally:
                self._launches.pop(session.name, None)

        task = asyncio.create_task(join(), name=f"join-{session.name}")
        self._launches[session.name] = task
        return task

    async def _first_joined(self, joining: list[asyncio.Task[BaseException | None]]) -> None:
        """Until one of `joining` is up; raises the first error if none came up."""
        errors: list[BaseException] = []
        pending = set(joining)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.result()
                if error is None:
                    return
                errors.append(error)
        first = errors[0]
        if isinstance(first, AgentError | TransportError):
            raise first
        raise AgentError(f"no host could be started: {first!r}") from first

    async def close(self) -> None:
        """Stop liveness and every session (Shutdown, EOF, then the transport's escalation),
        once the bootstrap installs under way have ended."""
        try:
            await self._installs_ended()
        finally:  # even when Ctrl-C stops that wait
            await self._close()

    async def _installs_ended(self) -> None:
        """Wait for the hosts installing batuta (bootstrap = true) whose start went on past
        start-up: a run that ended first stopped the install, and every next short run found
        the host without batuta again."""
        if self._closed:
            return
        installing = {
            name: task
            for name, task in self._launches.items()
            if name in self.sessions and _installing(self.sessions[name])
        }
        if installing:
            log.warning(
                "the run has ended; waiting for batuta to finish installing on %s, so that the next run finds it "
                "there (Ctrl-C stops the install)",
                ", ".join(installing),
            )
            await asyncio.wait(installing.values())

    async def _close(self) -> None:
        self._closed = True
        self._liveness.handle(lv.PoolClosed(), self._clock())
        self._timer.close()
        launches = list(self._launches.values())
        for task in launches:
            task.cancel()
        await asyncio.gather(*(s.close() for s in self.sessions.values()), return_exceptions=True)
        for task in launches:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.data_links.close()
        if self._holds_collector:
            self._holds_collector = False
            collector.POLICY.release()

    # -- views ------------------------------------------------------------------------------

    def views(self) -> list[HostView]:
        now = self._clock()
        views = []
        for session in self.sessions.values():
            hello = session.hello
            views.append(
                HostView(
                    name=session.name,
                    state=self._liveness.said(session.name),
                    description=session.description,
                    slots=len(hello.slots) if hello else 0,
                    gpus=tuple(g.name for g in hello.gpus) if hello else (),
                    cpu_count=hello.cpu_count if hello else 0,
                    last_heard_s=self._liveness.silent_for(session.name, now),
                )
            )
        return views

    # -- HostListener (what the sessions report) ----------------------------------------------

    def host_ready(self, session: HostSession) -> None:
        self._handle(lv.HostReady(host_id=session.name))
        self.data_links.offer(session)
        self._pool.host_ready(session)

    def host_messages(self, session: HostSession, messages: list[m.Message]) -> None:
        if self._closed:  # what hosts say while they are shut down changes nothing
            return
        # Hearing from a host never brings a wake-up closer: no timer to re-arm here.
        out = self._liveness.handle(lv.MessagesHeard(host_id=session.name), self._clock())
        if out:
            self._execute(out)
        self._pool.host_messages(session, messages)

    def host_closed(self, session: HostSession, reason: str) -> None:
        if not self._closed:
            self._handle(lv.StreamEnded(host_id=session.name, reason=reason))

    def host_writable(self, session: HostSession) -> None:
        self._pool.host_writable(session)

    # -- driving the state machine ----------------------------------------------------------

    def _handle(self, event: lv.Event) -> None:
        self._execute(self._liveness.handle(event, self._clock()))
        self._timer.arm(self._liveness.next_wakeup())

    def _execute(self, instructions: list[lv.Instruction]) -> None:
        for ins in instructions:
            if isinstance(ins, lv.MarkSuspected):
                self._pool.host_state_changed(ins.host_id, "suspected", ins.reason)
                self._pool.host_suspected(ins.host_id, suspected=True)
            elif isinstance(ins, lv.MarkUp):
                if ins.reason.startswith("relaunched"):
                    log.info("host %s %s", ins.host_id, ins.reason, extra={"host": ins.host_id})
                self._pool.host_state_changed(ins.host_id, "up", ins.reason)
                self._pool.host_suspected(ins.host_id, suspected=False)
            elif isinstance(ins, lv.MarkLost):
                log.warning("host %s lost: %s", ins.host_id, ins.reason, extra={"host": ins.host_id})
                self.sessions[ins.host_id].abandon()
                self._pool.host_lost(ins.host_id, ins.reason, retired=False)
            elif isinstance(ins, lv.Relaunch):
                self._relaunch(self.sessions[ins.host_id], ins.attempt)
            elif isinstance(ins, lv.Retire):
                log.error("host %s cannot be used: %s", ins.host_id, ins.reason, extra={"host": ins.host_id})
                self._pool.host_lost(ins.host_id, ins.reason, retired=True)
            elif isinstance(ins, lv.Stalled):
                log.warning(
                    "the coordinator stood still for %.0f s (a suspended machine, SIGSTOP, a blocked loop): "
                    "the hosts' silence meanwhile is not held against them",
                    ins.seconds,
                )

    def _relaunch(self, session: HostSession, attempt: int) -> None:
        async def launch() -> None:
            try:
                if session.spec.joins_later:
                    await session.start()
                else:
                    await self._bounded_start(session)
            except (AgentError, TransportError, OSError) as exc:
                # not retryable: the retirement says it next ("cannot be used: WHY"), as for a first start;
                # an allocation's ended job was said twice per node, the one "relaunch failed" line each
                if not (isinstance(exc, TransportError) and not exc.retryable):
                    log.warning(
                        "host %s relaunch %d failed: %s", session.name, attempt, exc, extra={"host": session.name}
                    )
                self._launch_failed(session, exc)
            finally:
                self._launches.pop(session.name, None)

        self._launches[session.name] = asyncio.create_task(launch(), name=f"relaunch-{session.name}")

    def _launch_failed(self, session: HostSession, exc: BaseException) -> None:
        retryable = not (isinstance(exc, TransportError) and not exc.retryable)
        reason = str(exc) or repr(exc)
        if retryable:  # observers hear why (a retired host is announced by Retire instead), in
            # `Pool.hosts()`'s word: still "lost" once up (a relaunch failed), else "unreachable"
            said = self._liveness.relaunch_failed(session.name, reason)
            self._pool.host_state_changed(session.name, self._liveness.away(session.name), said)
        self._handle(lv.LaunchFailed(host_id=session.name, reason=reason, retryable=retryable))


async def _await_starts(sessions: Sequence[HostSession], starts: Sequence[asyncio.Future[None]], wait: float) -> None:
    """Until one host is up (or every start has ended), then up to `wait` seconds for the rest,
    and for as long as it takes for those installing batuta (bootstrap = true).

    Say which hosts it still waits for, `STRAGGLER_NOTE_S` after one is up: an address that
    does not answer waits out connect_timeout and a bootstrap installs batuta, and a pause with
    nothing said looks like a hang. Work stealing gives a host that joins late its share, so
    the first tasks need not wait for the slowest host."""
    pending: set[asyncio.Future[None]] = set(starts)
    while pending:  # until one is up (or all failed: then the errors speak)
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if any(not start.cancelled() and start.exception() is None for start in done):
            break
    if not pending:
        return
    note = min(STRAGGLER_NOTE_S, wait)
    if note > 0:
        _, pending = await asyncio.wait(pending, timeout=note)
    if pending and wait > note:
        _note_stragglers(sessions, starts, pending, wait - note)
        _, pending = await asyncio.wait(pending, timeout=None if math.isinf(wait) else wait - note)
    installing = [f for s, f in zip(sessions, starts, strict=True) if f in pending and _installing(s)]
    if installing:  # a run that ended first stopped the install: the next found no batuta there again
        names = [s.name for s, f in zip(sessions, starts, strict=True) if f in installing]
        log.warning("start-up waits for %s while batuta installs there (bootstrap = true)", ", ".join(names))
        await asyncio.wait(installing)


def _note_stragglers(
    sessions: Sequence[HostSession],
    starts: Sequence[asyncio.Future[None]],
    pending: set[asyncio.Future[None]],
    more: float,
) -> None:
    waiting = [session.name for session, start in zip(sessions, starts, strict=True) if start in pending]
    up = sum(1 for start in starts if start.done() and not start.cancelled() and start.exception() is None)
    them = "it" if len(waiting) == 1 else "them"
    then = f", {more:g} s more at most: then tasks start without {them} (start_wait in [pool])"
    log.warning(
        "start-up waits for %s (%d of %d hosts up): until %s or gives up (connect_timeout in [ssh], "
        "start_timeout in [pool])%s",
        ", ".join(waiting),
        up,
        len(starts),
        "it answers" if len(waiting) == 1 else "each answers",
        "" if math.isinf(more) else then,
    )


def _installing(session: HostSession) -> bool:
    installing = session.spec.installing
    return installing is not None and installing()


def telemetry_event(session: HostSession, hb: m.Heartbeat, now: float) -> pe.HostTelemetry:
    """A heartbeat as the public telemetry event, GPUs named as the host introduced them."""
    names = {g.index: g.name for g in session.hello.gpus} if session.hello else {}
    return pe.HostTelemetry(
        host=session.name,
        cpu_percent=hb.cpu_percent,
        memory_used=hb.memory_used,
        memory_total=hb.memory_total,
        gpus=tuple(
            pe.GpuReading(
                index=g.index,
                name=names.get(g.index, f"GPU {g.index}"),
                utilization=g.utilization,
                memory_used=g.memory_used,
                memory_total=g.memory_total,
                temperature=g.temperature,
                power=g.power,
                cached_values=g.cached_values,
                cached_bytes=g.cached_bytes,
                cache_cap=g.cache_cap,
            )
            for g in hb.gpus
        ),
        gpu_status=hb.gpu_status,
        at=now,
        objects=hb.objects,
        object_bytes=hb.object_bytes,
        spilled_bytes=hb.spilled_bytes,
        slot_object_bytes=hb.slot_object_bytes,
    )
