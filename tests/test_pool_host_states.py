"""What a user reads about a host and its slots, on a real local agent: `Pool.hosts()` for a
host drained by request, and the reason a slot that died mid-run gives."""

from __future__ import annotations

import asyncio
import os

import pytest

from batuta import Pool, Task, TaskStatus
from batuta.agent.slot_stderr import fault
from batuta.observers.metrics import MetricsExporter
from batuta.runtime import events as pe
from batuta.runtime.builder import PoolConfig, local_host
from tests.test_metrics import parse, value
from tests.test_pool import REPO, TEST_KERNELS, make_pool

WAIT_S = 60.0


async def test_pool_hosts_says_draining_then_drained_as_the_events_do_and_up_after_the_undo() -> None:
    """`pool.hosts()` said "up" (the agent's liveness) for a host drained by request, while
    the log and the dashboard said "draining" and "drained": a script draining hosts could not
    tell when one was done."""
    said: list[tuple[str, str]] = []
    async with asyncio.timeout(WAIT_S), make_pool(slots=1) as pool:
        pool.subscribe(lambda e: said.append((e.state, e.reason)) if isinstance(e, pe.HostStateChanged) else None)
        started = asyncio.Event()
        pool.subscribe(lambda e: started.set() if isinstance(e, pe.TaskStarted) else None)
        running = await pool.submit(Task.kernel("spin", 30.0))
        await started.wait()
        pool.drain("local")
        assert [(v.name, v.state) for v in pool.hosts()] == [("local", "draining")]
        assert running.cancel()
        assert (await running).status is TaskStatus.CANCELLED
        async with asyncio.timeout(WAIT_S):
            while said[-1][0] != "drained":
                await asyncio.sleep(0.01)  # a bounded poll while the loop serves the agent
        assert [(v.name, v.state) for v in pool.hosts()] == [("local", "drained")]
        families = parse(MetricsExporter(pool).render())  # its agent is up: drained is no host down
        assert value(families, "batuta_host_up", host="local") == 1
        assert value(families, "batuta_host_state", host="local", state="drained") == 1
        pool.drain("local", undo=True)
        assert [(v.name, v.state) for v in pool.hosts()] == [("local", "up")]
        assert (await pool.run(Task.kernel("noop", 3))).value == 3
    assert [state for state, _ in said] == ["draining", "drained", "up"]


@pytest.mark.parametrize("spawn", ["fork", "exec"])
async def test_a_slot_that_segfaults_mid_run_names_the_fatal_error_and_the_kernels_frame(spawn: str) -> None:
    """A slot that died of a segfault in native code after it was ready said only "killed by
    signal 11 (SIGSEGV) while running it": its stderr pipe was read only while it started."""
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "BATUTA_SLOT_SPAWN": spawn}
    host = local_host(1, gpus="none", kernel_modules=[TEST_KERNELS], env=env)
    async with asyncio.timeout(WAIT_S), Pool([host], PoolConfig()) as pool:
        crashed = await pool.run(Task.kernel("test_segfault", max_attempts=1))
        assert (await pool.run(Task.kernel("noop", 4))).value == 4  # its slot was started again
    assert crashed.status is TaskStatus.LOST
    assert "killed by signal 11 (SIGSEGV); Fatal Python error: Segmentation fault (in string_at at " in (
        crashed.error or ""
    ), crashed.error
    assert "called from test_segfault at misbehaving_kernels.py:" in (crashed.error or ""), crashed.error


def test_a_fault_dump_is_summarised_as_its_error_and_innermost_frames_and_anything_else_as_nothing() -> None:
    dump = (
        "noise from before\n"
        "Fatal Python error: Aborted\n\n"
        "Current thread 0x00007f (most recent call first):\n"
        '  File "/x/lib/native.py", line 7 in boom\n'
        '  File "/y/mod.py", line 12 in kern\n'
        '  File "/z/slot.py", line 400 in run\n\n'
        "Extension modules: numpy.core (total: 1)\n"
    )
    assert fault(dump) == "Fatal Python error: Aborted (in boom at native.py:7, called from kern at mod.py:12)"
    assert fault("Fatal Python error: Segmentation fault\n") == "Fatal Python error: Segmentation fault"
    assert fault("a warning read late, from before the slot was ready\n") == ""


async def test_an_undrain_that_lifts_an_unfit_mark_says_so() -> None:
    """`Pool.drain(host, undo=True)` on an unfit host said only "undrained", of a host never drained."""
    from batuta.core import hostfit

    said: list[tuple[str, str]] = []
    why = "host local could not hold put value 1 in memory: 8 bytes; run it on a host with more free memory"
    async with asyncio.timeout(WAIT_S), make_pool(slots=1) as pool:
        pool.subscribe(lambda e: said.append((e.state, e.reason)) if isinstance(e, pe.HostStateChanged) else None)
        hostfit.mark(pool._scheduler, "local", why)  # as a refused task would (test_scheduler_hostfit.py)
        pool._handle([])
        assert [(v.name, v.state) for v in pool.hosts()] == [("local", "unfit")]
        pool.drain("local", undo=True)
        assert [(v.name, v.state) for v in pool.hosts()] == [("local", "up")]
        assert (await pool.run(Task.kernel("noop", 5))).value == 5
    assert [state for state, _ in said] == ["unfit", "up"]
    assert said[-1][1] == f"no longer unfit ({why}): undrained"


async def test_a_host_whose_agent_was_killed_is_lost_on_every_surface_until_it_is_back_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kill -9 of a host's agent: the dashboard said "unreachable" once a relaunch failed, while
    `pool.hosts()` and the metrics said "lost" or "relaunching", and the run's summary "lost once,
    back up". Each is asked while the host is away: at each event and in the relaunch itself."""
    from batuta.errors import AgentError
    from batuta.jobs._summary import RunTracker
    from tests.test_pool import agent_pids
    from tui.model import DashboardModel

    model, tracker = DashboardModel(), RunTracker()
    said: list[tuple[str, ...]] = []
    reasons: list[str] = []
    fates: list[str] = []
    async with asyncio.timeout(WAIT_S), make_pool(slots=1, relaunch_backoff=0.05) as pool:
        session = pool._hosts.sessions["local"]
        back = asyncio.Event()

        def surfaces(event: str) -> tuple[str, ...]:
            families = parse(MetricsExporter(pool).render())
            metric = [s.labels["state"] for s in families["batuta_host_state"] if s.value == 1]
            return (event, pool.hosts()[0].state, *metric, model.hosts["local"].state)

        async def refused_once() -> None:  # the first relaunch meets a host not back yet
            monkeypatch.undo()  # the next relaunch is the real one
            said.append(surfaces("relaunching"))
            raise AgentError("host local: connection refused")

        def heard(event: pe.PoolEvent) -> None:
            model.apply(event)
            if isinstance(event, pe.HostDown):
                tracker.host_down(event.host, event.reason)
            elif isinstance(event, pe.HostStateChanged):
                tracker.host_state_changed(event.host, event.state, event.reason)
                if event.state == "lost":  # the run's summary of the host while it was away
                    [away] = tracker.summary(job="j", wall_s=1.0, result=None, error=None).hosts
                    fates.append(away.fate())
            if isinstance(event, pe.HostDown | pe.HostStateChanged):
                said.append(surfaces(type(event).__name__))
                reasons.append(event.reason)
                if isinstance(event, pe.HostStateChanged) and event.state == "up":
                    back.set()

        tracker.host_up("local")
        pool.subscribe(heard)
        monkeypatch.setattr(session, "start", refused_once)
        [agent] = agent_pids()
        agent.kill()
        await back.wait()
        assert (await pool.run(Task.kernel("noop", 2))).value == 2
    assert reasons[0].startswith("the agent was killed by signal 9 (SIGKILL)"), reasons
    refused = f"{reasons[0]}; relaunch 1 failed: host local: connection refused"
    assert reasons[1] == refused, reasons  # the loss's cause, not only the failure
    assert said == [
        ("HostDown", "lost", "lost", "lost"),
        ("relaunching", "lost", "lost", "lost"),
        ("HostStateChanged", "lost", "lost", "lost"),  # the relaunch failed: still lost, saying why
        ("HostStateChanged", "up", "up", "up"),
    ]
    assert fates == [f"lost: {refused}"]
    [host] = tracker.summary(job="j", wall_s=1.0, result=None, error=None).hosts
    assert host.fate().startswith("lost once, back up: the agent was killed by signal 9 (SIGKILL)")


async def test_an_undrained_host_with_a_retired_slot_is_said_unfit_as_pool_hosts_says_it() -> None:
    """A slot its agent gave up (it could not start) is retired, and `pool.hosts()` says the host
    "unfit"; `Pool.drain(host, undo=True)` announced it "up", which no undrain makes it, and
    then said it unfit without why its slot was given up."""
    from batuta.protocol import messages as m

    said: list[tuple[str, str]] = []
    async with asyncio.timeout(WAIT_S), make_pool(slots=2) as pool:
        pool.subscribe(lambda e: said.append((e.state, e.reason)) if isinstance(e, pe.HostStateChanged) else None)
        session = pool._hosts.sessions["local"]
        pool.host_messages(session, [m.SlotChanged(slot=1, state=m.SLOT_DOWN, reason="gave up after 6 failed starts")])
        assert [(v.name, v.state) for v in pool.hosts()] == [("local", "unfit")]
        pool.drain("local")
        pool.drain("local", undo=True)
        assert [(v.name, v.state) for v in pool.hosts()] == [("local", "unfit")]
        assert (await pool.run(Task.kernel("noop", 6))).value == 6  # its other slot takes work
    assert [state for state, _ in said] == ["unfit", "draining", "drained", "unfit"]
    assert said[-1][1] == (  # why the slot was given up, as its SlotChanged said
        "undrained; still unfit: 1 of its 2 slots cannot start (its agent gave it up: gave up after 6 failed starts)"
    )
