"""Host liveness as a pure state machine: events and times in, exact instructions out."""

from __future__ import annotations

import pytest

from batuta.core.liveness import (
    ClockTicked,
    HostAdded,
    HostLiveness,
    HostReady,
    LaunchFailed,
    Liveness,
    LivenessConfig,
    MarkLost,
    MarkSuspected,
    MarkUp,
    MessagesHeard,
    PoolClosed,
    Relaunch,
    Retire,
    Stalled,
    StreamEnded,
)

CONFIG = LivenessConfig(suspect_after=3.0, lost_after=8.0, max_relaunches=3, relaunch_backoff=0.5)


def up_host(now: float = 0.0) -> HostLiveness:
    machine = HostLiveness(CONFIG)
    assert machine.handle(HostAdded(host_id="a"), now) == []
    assert machine.handle(HostReady(host_id="a"), now) == []
    assert machine.state("a") is Liveness.UP
    return machine


def test_silence_suspects_then_loses_and_a_heartbeat_clears_suspicion() -> None:
    machine = up_host()
    assert machine.next_wakeup() == 3.0
    assert machine.handle(ClockTicked(), 2.9) == []
    assert machine.handle(ClockTicked(), 3.5) == [MarkSuspected(host_id="a", reason="no heartbeat for 3.5s")]
    assert machine.state("a") is Liveness.SUSPECTED
    assert machine.next_wakeup() == 8.0
    assert machine.handle(MessagesHeard(host_id="a"), 4.0) == [MarkUp(host_id="a", reason="heard from again")]
    assert machine.next_wakeup() == 7.0
    assert machine.handle(ClockTicked(), 7.5) == [MarkSuspected(host_id="a", reason="no heartbeat for 3.5s")]
    lost = machine.handle(ClockTicked(), 12.5)
    assert lost == [MarkLost(host_id="a", reason="no heartbeat for 8.5s (lost after 8s)", relaunch_at=13.0)]
    assert machine.state("a") is Liveness.LOST


def test_a_tick_far_past_its_time_is_the_coordinators_own_stall_not_the_hosts_silence() -> None:
    """A coordinator stopped for 20 s (a suspended laptop, SIGSTOP) woke to its timer before it
    read the heartbeats waiting in its sockets, and lost every host at once."""
    machine = up_host()
    machine.handle(HostAdded(host_id="b"), 0.0)
    machine.handle(HostReady(host_id="b"), 0.0)
    machine.handle(MessagesHeard(host_id="b"), 2.0)
    assert machine.next_wakeup() == 3.0  # "a" suspected then, if still silent
    assert machine.handle(ClockTicked(), 23.0) == [Stalled(seconds=20.0)]  # 20 s late: we stood still
    assert machine.state("a") is Liveness.UP and machine.state("b") is Liveness.UP
    assert machine.handle(MessagesHeard(host_id="a"), 23.1) == []  # the waiting heartbeats are read
    assert machine.handle(MessagesHeard(host_id="b"), 23.1) == []
    # a host that stays silent after the stall is judged on the time since: suspected at 3 s
    assert machine.handle(MessagesHeard(host_id="b"), 25.0) == []
    assert machine.next_wakeup() == pytest.approx(26.1)
    assert machine.handle(ClockTicked(), 26.2) == [MarkSuspected(host_id="a", reason="no heartbeat for 3.1s")]


def test_a_stall_of_a_few_seconds_suspects_no_host_and_a_dead_one_is_suspected_after_it() -> None:
    """A job's main computing 4.5 s in the loop (making a 1 GiB array) woke the timer 2 s past
    its time, before the readers had read the heartbeats that waited: every host was said
    suspected. A stall shorter than `suspect_after` is not warned of, but is not held against
    the hosts either; only once, so a loop late at every tick still suspects a dead host."""
    machine = up_host()
    machine.handle(HostAdded(host_id="b"), 0.0)
    machine.handle(HostReady(host_id="b"), 0.0)
    machine.handle(MessagesHeard(host_id="b"), 1.0)
    assert machine.next_wakeup() == 3.0
    assert machine.handle(ClockTicked(), 5.0) == []  # 2 s late: no warning, no suspicion
    assert machine.state("a") is Liveness.UP and machine.state("b") is Liveness.UP
    assert machine.handle(MessagesHeard(host_id="b"), 5.01) == []  # b's waiting heartbeat is read
    # "a" is dead: its silence, less the stall and the readers' moment, reaches suspect_after
    assert machine.next_wakeup() == pytest.approx(5.25)
    assert machine.handle(ClockTicked(), 6.0) == [MarkSuspected(host_id="a", reason="no heartbeat for 3.8s")]
    assert machine.state("b") is Liveness.UP
    assert machine.next_wakeup() == pytest.approx(8.01)


def test_ticks_are_idempotent_and_heard_hosts_stay_quiet() -> None:
    machine = up_host()
    for second in range(1, 50):
        assert machine.handle(MessagesHeard(host_id="a"), float(second)) == []
        assert machine.handle(ClockTicked(), second + 0.5) == []
        assert machine.handle(ClockTicked(), second + 0.5) == []


def test_a_lost_host_is_relaunched_with_doubling_backoff_then_retired() -> None:
    machine = up_host()
    assert machine.handle(StreamEnded(host_id="a", reason="agent exited"), 10.0) == [
        MarkLost(host_id="a", reason="agent exited", relaunch_at=10.5)
    ]
    assert machine.handle(ClockTicked(), 10.4) == []
    assert machine.handle(ClockTicked(), 10.5) == [Relaunch(host_id="a", attempt=1, reason="agent exited")]
    assert machine.state("a") is Liveness.RELAUNCHING
    assert machine.next_wakeup() is None  # the runtime is launching; nothing is due
    assert machine.handle(LaunchFailed(host_id="a", reason="refused"), 11.0) == []
    assert machine.next_wakeup() == 12.0  # 0.5 * 2
    assert machine.handle(ClockTicked(), 12.0) == [Relaunch(host_id="a", attempt=2, reason="refused")]
    assert machine.handle(LaunchFailed(host_id="a", reason="refused"), 12.1) == []
    assert machine.next_wakeup() == pytest.approx(14.1)  # 0.5 * 4
    assert machine.handle(ClockTicked(), 14.1) == [Relaunch(host_id="a", attempt=3, reason="refused")]
    assert machine.handle(LaunchFailed(host_id="a", reason="refused"), 14.2) == [
        Retire(host_id="a", reason="gave up after 3 relaunches: agent exited; relaunch 3 failed: refused")
    ]
    assert machine.state("a") is Liveness.RETIRED
    assert machine.handle(ClockTicked(), 1000.0) == []
    assert machine.handle(MessagesHeard(host_id="a"), 1000.0) == []


def test_a_failed_relaunch_is_said_with_the_loss_it_follows() -> None:
    """A host whose relaunches kept failing was said (dashboard, summary, retirement) with only its
    last failure ("connection refused"): why it was lost in the first place was gone."""
    machine = up_host()
    machine.handle(StreamEnded(host_id="a", reason="killed by signal 9"), 1.0)
    machine.handle(ClockTicked(), 1.5)
    assert machine.relaunch_failed("a", "refused") == "killed by signal 9; relaunch 1 failed: refused"
    machine.handle(LaunchFailed(host_id="a", reason="refused"), 1.6)
    machine.handle(ClockTicked(), 2.6)
    assert machine.relaunch_failed("a", "no route") == "killed by signal 9; relaunch 2 failed: no route"
    assert machine.handle(LaunchFailed(host_id="a", reason="key changed", retryable=False), 2.7) == [
        Retire(host_id="a", reason="killed by signal 9; relaunch 2 failed: key changed")
    ]
    never_up = HostLiveness(CONFIG)  # a first start's failure follows no loss: said as it is
    never_up.handle(HostAdded(host_id="b"), 0.0)
    assert never_up.relaunch_failed("b", "timeout") == "timeout"
    never_up.handle(LaunchFailed(host_id="b", reason="timeout"), 0.0)
    never_up.handle(ClockTicked(), 0.5)
    assert never_up.relaunch_failed("b", "timeout") == "timeout"


def test_a_successful_relaunch_marks_up_and_resets_the_backoff() -> None:
    machine = up_host()
    machine.handle(StreamEnded(host_id="a", reason="kill -9"), 1.0)
    assert machine.handle(ClockTicked(), 1.5) == [Relaunch(host_id="a", attempt=1, reason="kill -9")]
    machine.handle(LaunchFailed(host_id="a", reason="no route"), 1.6)
    assert machine.handle(ClockTicked(), 2.6) == [Relaunch(host_id="a", attempt=2, reason="no route")]
    assert machine.handle(HostReady(host_id="a"), 2.7) == [
        MarkUp(host_id="a", reason="relaunched after: kill -9 (1 failed relaunch first, the last: no route)")
    ]
    assert machine.state("a") is Liveness.UP
    assert machine.handle(StreamEnded(host_id="a", reason="again"), 5.0) == [
        MarkLost(host_id="a", reason="again", relaunch_at=5.5)  # first delay again, not 2.0
    ]
    assert machine.handle(ClockTicked(), 5.5) == [Relaunch(host_id="a", attempt=1, reason="again")]
    assert machine.handle(HostReady(host_id="a"), 5.6) == [MarkUp(host_id="a", reason="relaunched after: again")]


def test_a_first_launch_that_fails_is_retried_and_one_that_cannot_help_retires_at_once() -> None:
    machine = HostLiveness(CONFIG)
    machine.handle(HostAdded(host_id="a"), 0.0)
    machine.handle(HostAdded(host_id="b"), 0.0)
    assert machine.handle(LaunchFailed(host_id="a", reason="timeout"), 0.0) == []
    assert machine.handle(LaunchFailed(host_id="b", reason="host key changed", retryable=False), 0.0) == [
        Retire(host_id="b", reason="host key changed")
    ]
    assert machine.handle(ClockTicked(), 0.5) == [Relaunch(host_id="a", attempt=1, reason="timeout")]


def test_a_stream_ending_while_starting_is_left_to_the_launch_result() -> None:
    machine = HostLiveness(CONFIG)
    machine.handle(HostAdded(host_id="a"), 0.0)
    assert machine.handle(StreamEnded(host_id="a", reason="exited before hello"), 0.1) == []
    assert machine.state("a") is Liveness.STARTING
    assert machine.next_wakeup() is None


def test_a_lost_host_is_lost_once_and_relaunching_off_retires_it() -> None:
    machine = HostLiveness(LivenessConfig(suspect_after=1.0, lost_after=2.0, max_relaunches=0))
    machine.handle(HostReady(host_id="a"), 0.0)
    assert machine.handle(StreamEnded(host_id="a", reason="eof"), 1.0) == [
        MarkLost(host_id="a", reason="eof", relaunch_at=None),
        Retire(host_id="a", reason="lost, and relaunching is off (max_relaunches=0): eof"),
    ]
    assert machine.handle(StreamEnded(host_id="a", reason="eof"), 1.0) == []
    assert machine.handle(ClockTicked(), 99.0) == []


def test_closing_stops_every_instruction() -> None:
    machine = up_host()
    machine.handle(ClockTicked(), 4.0)
    assert machine.handle(PoolClosed(), 5.0) == []
    assert machine.next_wakeup() is None
    assert machine.handle(ClockTicked(), 100.0) == []
    assert machine.handle(StreamEnded(host_id="a", reason="closing"), 100.0) == []
    assert machine.state("a") is Liveness.CLOSED


def test_backoff_is_capped() -> None:
    machine = HostLiveness(LivenessConfig(max_relaunches=50, relaunch_backoff=1.0))
    machine.handle(HostReady(host_id="a"), 0.0)
    machine.handle(StreamEnded(host_id="a", reason="x"), 0.0)
    now = 0.0
    for _ in range(12):
        wake = machine.next_wakeup()
        assert wake is not None and wake - now <= 30.0
        now = wake
        assert machine.handle(ClockTicked(), now)[0].__class__ is Relaunch
        machine.handle(LaunchFailed(host_id="a", reason="x"), now)
    assert machine.next_wakeup() == now + 30.0


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="suspect_after <= lost_after"):
        LivenessConfig(suspect_after=5.0, lost_after=1.0)


def test_said_names_a_host_away_lost_once_it_was_up_and_unreachable_before() -> None:
    """One word per concept on every surface: `state` keeps waiting and relaunching apart for the
    runtime; `said` calls both "lost" for a host that was up, "unreachable" for one never up."""
    never = HostLiveness(CONFIG)
    never.handle(HostAdded(host_id="b"), 0.0)
    assert never.said("b") == "starting"
    never.handle(LaunchFailed(host_id="b", reason="refused"), 1.0)
    assert (never.state("b"), never.said("b")) == (Liveness.LOST, "unreachable")
    never.handle(ClockTicked(), 2.0)
    assert (never.state("b"), never.said("b")) == (Liveness.RELAUNCHING, "unreachable")
    machine = up_host()
    assert machine.said("a") == "up"
    machine.handle(StreamEnded(host_id="a", reason="agent exited"), 10.0)
    assert machine.said("a") == "lost"
    machine.handle(ClockTicked(), 10.5)
    assert (machine.state("a"), machine.said("a")) == (Liveness.RELAUNCHING, "lost")
    machine.handle(LaunchFailed(host_id="a", reason="refused"), 11.0)
    assert machine.said("a") == "lost"
    machine.handle(ClockTicked(), 12.0)
    machine.handle(HostReady(host_id="a"), 12.5)
    assert machine.said("a") == "up"
