"""Host liveness as a pure state machine: what was heard and when, in; marks and relaunches, out.

Everything that decides whether a host is up, suspected, lost, being relaunched or retired
lives here, in the manner of the scheduler: the runtime feeds events with the time it
read from its one clock (`now`), and carries out the instructions that come back. There is
no I/O, no clock and no event loop, so every rule is tested by feeding events.

    starting --HostReady--> up --silent > suspect_after--> suspected --silent > lost_after--> lost
       ^                     ^<-------------- MessagesHeard ---------------'                      |
       |                                                                                      StreamEnded
       '-- Relaunch (at lost_at + backoff, doubling, capped) <-- lost <----------------------------'
    lost --LaunchFailed (not retryable, or max_relaunches reached)--> retired (final)

The runtime learns of a lost host from `MarkLost` (then it kills the stream and tells the
scheduler), launches again on `Relaunch`, and reports the outcome as `HostReady` or
`LaunchFailed`. `Retire` is final: the host's work fails over to others or as unschedulable.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

HostId = str

RELAUNCH_BACKOFF_CAP_S = 30.0
HOST_LOST = "lost"  # `said`: up once, away now (waiting for or in a relaunch)
HOST_UNREACHABLE = "unreachable"  # `said`: never up, a launch failed (tried again)
# A tick this late (a fraction of `suspect_after`: 1 s by default, where the loop's lag under
# load is tens of ms) is this process's own stall, not the hosts' silence (`_on_tick`).
STALL_FRACTION = 1 / 3
STALL_GRACE_S = 0.25  # after a stall, the time the loop has to read the heartbeats that waited


class Liveness(enum.Enum):
    STARTING = "starting"
    UP = "up"
    SUSPECTED = "suspected"
    LOST = "lost"  # waiting for its relaunch
    RELAUNCHING = "relaunching"  # the runtime is launching it again
    RETIRED = "retired"  # will not come back
    CLOSED = "closed"  # the pool closed


@dataclass(frozen=True, slots=True, kw_only=True)
class LivenessConfig:
    suspect_after: float = 3.0  # seconds of silence before a host is suspected
    lost_after: float = 8.0  # seconds of silence before it is lost and its work requeued
    max_relaunches: int = 10  # consecutive failed relaunches before a host is retired: about 2.5 min, a reboot
    relaunch_backoff: float = 0.5  # first delay; doubles with each failure, capped

    def __post_init__(self) -> None:
        if not 0 < self.suspect_after <= self.lost_after:
            raise ValueError(f"liveness needs 0 < suspect_after <= lost_after, got {self}")
        if self.max_relaunches < 0 or self.relaunch_backoff < 0:
            raise ValueError(f"liveness needs max_relaunches >= 0 and relaunch_backoff >= 0, got {self}")


# -- events (facts, past tense) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HostAdded:
    """A configured host is being launched for the first time."""

    host_id: HostId


@dataclass(frozen=True, slots=True, kw_only=True)
class HostReady:
    """The host's agent completed its handshake (first launch or relaunch)."""

    host_id: HostId


@dataclass(frozen=True, slots=True, kw_only=True)
class MessagesHeard:
    """Something arrived from the host (heartbeats guarantee this at least every interval)."""

    host_id: HostId


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamEnded:
    """The host's stream closed or broke (EOF, protocol error, agent exit)."""

    host_id: HostId
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchFailed:
    """A launch or relaunch failed. `retryable`: False when trying again cannot help
    (a refused host key, a rejected login)."""

    host_id: HostId
    reason: str
    retryable: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class ClockTicked:
    """Time passed: the runtime calls this at `next_wakeup()` (or more often; it is idempotent)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolClosed:
    """The pool is closing: no more marks or relaunches."""


Event = HostAdded | HostReady | MessagesHeard | StreamEnded | LaunchFailed | ClockTicked | PoolClosed


# -- instructions (imperative) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MarkSuspected:
    host_id: HostId
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Stalled:
    """This process stood still for `seconds` (its timer came that late): the hosts' silence
    of that time is not counted against them."""

    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class MarkUp:
    """A suspected host was heard from again, or a relaunched host is ready."""

    host_id: HostId
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MarkLost:
    """Kill the host's stream and requeue its work. `relaunch_at`: when it will be relaunched."""

    host_id: HostId
    reason: str
    relaunch_at: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Relaunch:
    """Launch the host's agent again now (attempt counts consecutive relaunches, from 1)."""

    host_id: HostId
    attempt: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Retire:
    """The host will not come back: fail what only it could run."""

    host_id: HostId
    reason: str


Instruction = MarkSuspected | MarkUp | MarkLost | Relaunch | Retire | Stalled


@dataclass(slots=True)
class _Host:
    host_id: HostId
    state: Liveness = Liveness.STARTING
    last_heard: float = 0.0
    failures: int = 0  # consecutive failed (re)launches
    relaunch_at: float | None = None
    why: str = ""  # why it was lost, then why its last relaunch failed: for the retirement message
    lost_why: str = ""  # why it was lost: the reason a successful relaunch gives
    was_up: bool = False  # ready at least once: away, it is "lost", not "unreachable"
    credited: bool = False  # a stall of ours was taken off its silence since it was last heard


class HostLiveness:
    """The liveness of every host of one pool. Feed events with the time; carry out the result."""

    def __init__(self, config: LivenessConfig | None = None) -> None:
        self.config = config or LivenessConfig()
        self._hosts: dict[HostId, _Host] = {}
        self._closed = False
        self._out: list[Instruction] = []
        self._due: float | None = None  # the last `next_wakeup()`: a tick far past it is our own stall

    # -- public API -------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Instruction]:
        """Apply one event at time `now`; return what the driver must do, in order."""
        if self._closed:
            return []
        if isinstance(event, ClockTicked):
            self._on_tick(now)
        elif isinstance(event, MessagesHeard):
            self._on_heard(event.host_id, now)
        elif isinstance(event, HostAdded):
            self._hosts.setdefault(event.host_id, _Host(event.host_id, last_heard=now))
        elif isinstance(event, HostReady):
            self._on_ready(event.host_id, now)
        elif isinstance(event, StreamEnded):
            self._on_stream_ended(event, now)
        elif isinstance(event, LaunchFailed):
            self._on_launch_failed(event, now)
        elif isinstance(event, PoolClosed):
            self._closed = True
            for host in self._hosts.values():
                host.state = Liveness.CLOSED
                host.relaunch_at = None
        out, self._out = self._out, []
        return out

    def state(self, host_id: HostId) -> Liveness:
        """The host's state (STARTING for one not added yet)."""
        host = self._hosts.get(host_id)
        return host.state if host is not None else Liveness.STARTING

    def said(self, host_id: HostId) -> str:
        """The host's state in the words every surface uses (events, `Pool.hosts()`, metrics, the
        dashboard, a run's summary): one away between its launches, waiting or being launched
        again, is "lost" if it was ever up, else "unreachable"; `state` tells those apart."""
        state = self.state(host_id)
        return self.away(host_id) if state in (Liveness.LOST, Liveness.RELAUNCHING) else state.value

    def away(self, host_id: HostId) -> str:
        """What `said` calls the host between its launches: "lost" if it was ever up."""
        host = self._hosts.get(host_id)
        return HOST_LOST if host is not None and host.was_up else HOST_UNREACHABLE

    def relaunch_failed(self, host_id: HostId, reason: str) -> str:
        """A failed (re)launch in the words observers read while the host stays away: after a
        loss, the loss's cause and then this failure, in one line ("agent killed by signal 9;
        relaunch 3 failed: connection refused"), as the failure alone hid why the host went.
        Ask before `LaunchFailed` is handled: that counts the failure."""
        host = self._hosts.get(host_id)
        return self._with_loss(host, reason) if host is not None else reason

    def silent_for(self, host_id: HostId, now: float) -> float:
        """Seconds since the host was last heard from (0 for a host not heard from yet)."""
        host = self._hosts.get(host_id)
        return max(0.0, now - host.last_heard) if host is not None else 0.0

    def next_wakeup(self) -> float | None:
        """When the driver should deliver `ClockTicked` next, if ever."""
        if self._closed:
            return None
        wakes: list[float] = []
        for host in self._hosts.values():
            if host.state is Liveness.UP:
                wakes.append(host.last_heard + self.config.suspect_after)
            elif host.state is Liveness.SUSPECTED:
                wakes.append(host.last_heard + self.config.lost_after)
            elif host.state is Liveness.LOST and host.relaunch_at is not None:
                wakes.append(host.relaunch_at)
        self._due = min(wakes, default=None)
        return self._due

    # -- transitions ------------------------------------------------------------------------

    def _on_heard(self, host_id: HostId, now: float) -> None:
        host = self._hosts.get(host_id)
        if host is None:
            return
        host.last_heard = now
        host.credited = False
        if host.state is Liveness.SUSPECTED:
            host.state = Liveness.UP
            self._out.append(MarkUp(host_id=host_id, reason="heard from again"))

    def _on_ready(self, host_id: HostId, now: float) -> None:
        host = self._hosts.setdefault(host_id, _Host(host_id))
        relaunched = host.state is Liveness.RELAUNCHING
        failed = host.failures
        host.state = Liveness.UP
        host.was_up = True
        host.last_heard = now
        host.credited = False
        host.failures = 0
        host.relaunch_at = None
        if relaunched:
            # The loss is what the user wants to read about; the failed tries between say how
            # long it took (a host that rebooted fails a few relaunches first).
            reason = f"relaunched after: {host.lost_why or host.why}"
            if failed:
                plural = "" if failed == 1 else "es"
                reason += f" ({failed} failed relaunch{plural} first, the last: {host.why})"
            self._out.append(MarkUp(host_id=host_id, reason=reason))

    def _on_tick(self, now: float) -> None:
        config = self.config
        due, self._due = self._due, None
        late = now - due if due is not None else 0.0
        if late >= config.suspect_after * STALL_FRACTION:
            # The tick comes that late when this process itself stood still (a suspended laptop
            # or VM, SIGSTOP, a job's main computing in the loop for seconds): the hosts'
            # heartbeats of that time wait unread in its sockets, and the readers may run after
            # this tick. Judged now, every host was suspected (a stall of a few seconds), or
            # lost at once and its work ran again (a longer one). The stall, and a moment for
            # the readers, is taken off each host's silence, once until it is heard again: a
            # loop late at every tick would otherwise never suspect a host that died.
            for host in self._hosts.values():
                if host.state in (Liveness.UP, Liveness.SUSPECTED) and not host.credited:
                    host.last_heard = min(now, host.last_heard + late + STALL_GRACE_S)
                    host.credited = True
            if late >= config.suspect_after:  # a short stall is not worth a warning
                self._out.append(Stalled(seconds=late))
        for host in self._hosts.values():
            if host.state in (Liveness.UP, Liveness.SUSPECTED):
                silent = now - host.last_heard
                if silent > config.lost_after:
                    self._lose(host, f"no heartbeat for {silent:.1f}s (lost after {config.lost_after:g}s)", now)
                elif silent > config.suspect_after and host.state is Liveness.UP:
                    host.state = Liveness.SUSPECTED
                    self._out.append(MarkSuspected(host_id=host.host_id, reason=f"no heartbeat for {silent:.1f}s"))
            elif host.state is Liveness.LOST and host.relaunch_at is not None and now >= host.relaunch_at:
                host.state = Liveness.RELAUNCHING
                host.relaunch_at = None
                self._out.append(Relaunch(host_id=host.host_id, attempt=host.failures + 1, reason=host.why))

    def _on_stream_ended(self, event: StreamEnded, now: float) -> None:
        host = self._hosts.get(event.host_id)
        if host is not None and host.state in (Liveness.UP, Liveness.SUSPECTED):
            self._lose(host, event.reason, now)

    def _on_launch_failed(self, event: LaunchFailed, now: float) -> None:
        host = self._hosts.setdefault(event.host_id, _Host(event.host_id))
        if host.state in (Liveness.RETIRED, Liveness.CLOSED):
            return
        host.why = event.reason
        said = self._with_loss(host, event.reason)
        if not event.retryable:
            self._retire(host, said)
            return
        if host.state is Liveness.RELAUNCHING:
            host.failures += 1
        if host.failures >= self.config.max_relaunches:
            self._retire(host, f"gave up after {self.config.max_relaunches} relaunches: {said}")
            return
        host.state = Liveness.LOST
        host.relaunch_at = now + self._backoff(host.failures)

    def _lose(self, host: _Host, reason: str, now: float) -> None:
        host.why = host.lost_why = reason
        if self.config.max_relaunches == 0:
            host.state = Liveness.LOST
            self._out.append(MarkLost(host_id=host.host_id, reason=reason, relaunch_at=None))
            self._retire(host, f"lost, and relaunching is off (max_relaunches=0): {reason}")
            return
        host.state = Liveness.LOST
        host.relaunch_at = now + self._backoff(host.failures)
        self._out.append(MarkLost(host_id=host.host_id, reason=reason, relaunch_at=host.relaunch_at))

    def _retire(self, host: _Host, reason: str) -> None:
        host.state = Liveness.RETIRED
        host.relaunch_at = None
        self._out.append(Retire(host_id=host.host_id, reason=reason))

    @staticmethod
    def _with_loss(host: _Host, reason: str) -> str:
        if host.state is not Liveness.RELAUNCHING or not host.lost_why:
            return reason  # a first start's failure, or a host never up: nothing was lost
        return f"{host.lost_why}; relaunch {host.failures + 1} failed: {reason}"

    def _backoff(self, failures: int) -> float:
        return min(self.config.relaunch_backoff * 2**failures, RELAUNCH_BACKOFF_CAP_S)
