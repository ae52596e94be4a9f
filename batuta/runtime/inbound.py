"""What host agents say, translated: their messages as scheduler events, and the scheduler's
resolutions as futures resolved with what the agents sent.

Apart from `pool.py` so that the pool holds submission, instructions and views, and this
module the reading of each message kind. The functions are the pool's friends: they read
its tables (pending futures, slots, event bus) as `stealing.py` reads the scheduler's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from batuta.core import events as ev
from batuta.core.objects import ObjectRef
from batuta.core.task import CAP_GPU, Outcome, TaskStatus, gpu_capability
from batuta.protocol import messages as m
from batuta.runtime import events as pe
from batuta.runtime.code_paths import loaded_in_user_files
from batuta.runtime.hosts import telemetry_event
from batuta.runtime.session import HostSession

if TYPE_CHECKING:
    from batuta.core.scheduler import Scheduler
    from batuta.runtime.pool import Pool
    from batuta.runtime.views import HostView

log = logging.getLogger("batuta.runtime.pool")


def joined_events(pool: Pool, session: HostSession) -> list[ev.Event]:
    """The slots of a host that said hello, as scheduler events; `HostUp` on the way."""
    hello = session.hello
    assert hello is not None
    joined: list[ev.Event] = []
    for info in hello.slots:
        slot_id = f"{session.name}/{info.slot}"
        pool._slot_of[slot_id] = (session, info.slot)
        capabilities = frozenset(info.capabilities) | session.spec.tags
        if info.gpu_index is not None:  # each GPU's slot can be asked for by name
            capabilities |= {gpu_capability(info.gpu_index)}
        joined.append(ev.SlotJoined(slot_id=slot_id, host_id=session.name, capabilities=capabilities))
        if CAP_GPU in info.capabilities:
            gpu = next((g for g in hello.gpus if g.index == info.gpu_index), None)
            if gpu is not None:
                # the seed's GpuExecutor: device name and capacity (compute units); on a host of
                # several GPUs, which one too (its eight H100s all have the one name)
                which = f", GPU {gpu.index}" if len(hello.gpus) > 1 else ""
                pool._device_of[slot_id] = f"{gpu.name} ({gpu.compute_units} SMs{which})"
    # From now on the host is expected back with what it has, not with what its configuration
    # said (`slots = 0` on a machine without a GPU, a GPU index it does not have): tasks that
    # only it was to run fail as unschedulable instead of waiting for slots that never come.
    offered = tuple(j.capabilities for j in joined if isinstance(j, ev.SlotJoined))
    joined.append(ev.HostExpected(host_id=session.name, slot_capabilities=offered))
    if pool.events.active:
        pool.events.publish(
            pe.HostUp(
                host=session.name,
                slots=tuple(f"{session.name}/{i.slot}" for i in hello.slots),
                gpus=tuple(g.name for g in hello.gpus),
                cpu_count=hello.cpu_count,
                batuta_version=hello.batuta_version,
                python_version=hello.python_version,
                at=pool._now(),
            )
        )
    return joined


def events_from(pool: Pool, session: HostSession, messages: list[m.Message]) -> list[ev.Event]:
    """The scheduler events in what `session`'s agent said; telemetry and logs on the way."""
    events: list[ev.Event] = []
    publish = pool.events.active
    now = pool._now()
    host = session.name
    for msg in messages:
        if isinstance(msg, m.Done):
            for outcome in msg.results:
                if pool._data.is_fetch(outcome.task_id):  # a Fetch answered like a task result
                    pool._data.fetched(outcome)
                    continue
                pending = pool._pending.get(outcome.task_id)
                if pending is None:
                    _drop_unclaimed(pool, session, outcome)
                elif pending.sent_at is not None:
                    round_trip = session.round_trip.sample(pending.sent_at, now, outcome.run_s)
                    if round_trip is not None:  # windows are sized to hide it
                        events.append(ev.RoundTripMeasured(host_id=host, seconds=round_trip))
                events.append(
                    ev.TaskOutcomeReported(
                        task_id=outcome.task_id,
                        slot_id=f"{host}/{outcome.slot}",
                        attempt=outcome.attempt,
                        outcome=outcome.status,
                        run_s=outcome.run_s,
                        reason=outcome.error or "",
                        payload=outcome,
                        kept_bytes=_kept_bytes(outcome),
                    )
                )
        elif isinstance(msg, m.Started):
            events.extend(started_events(pool, host, msg.task_ids, now, publish))
        elif isinstance(msg, m.StealBackReply):
            events.append(
                ev.StealBackAnswered(
                    slot_id=f"{host}/{msg.slot}", returned=tuple(msg.returned), refused=tuple(msg.refused)
                )
            )
        elif isinstance(msg, m.Heartbeat):
            if publish:
                pool.events.publish(telemetry_event(session, msg, now))
        elif isinstance(msg, m.SlotChanged):
            events.extend(slot_state_events(pool, session, msg, now))
        elif isinstance(msg, m.ObjectsLost):  # kept in a slot process that died: made again
            pool._objects.slot_lost(host, msg.object_ids)
            log.info("host %s lost kept object(s) %s: %s", host, list(msg.object_ids), msg.reason, extra={"host": host})
            events.append(ev.KeptObjectsLost(host_id=host, object_ids=tuple(msg.object_ids), reason=msg.reason))
        elif isinstance(msg, m.CodeStored):
            pool._acks.stored(host, msg)
        elif isinstance(msg, m.CodeLoaded):
            loaded = loaded_in_user_files(msg)  # the user's paths in its errors, not the bundle's
            pool._acks.loaded(host, loaded)
            for module, error in loaded.errors.items():  # its tasks fail saying so; the rest run
                log.warning("host %s: importing %s failed: %s", host, module, error, extra={"host": host})
        elif isinstance(msg, m.Bye):
            log.info("host %s says bye: %s", host, msg.reason, extra={"host": host})
        elif isinstance(msg, m.Error):
            log.error("host %s reports a protocol error: %s", host, msg.message, extra={"host": host})
    return events


def _drop_unclaimed(pool: Pool, session: HostSession, outcome: m.TaskOutcome) -> None:
    """A result for a task already resolved (cancelled as it finished, a duplicate) is dropped
    by the scheduler; a value its host kept for it would stay there, with no ref anywhere to
    drop it by, until the pool closes: drop it there now, unless it is the one the task's
    accepted result named on that host (then the host holds the value the refs point to)."""
    value = outcome.value
    if outcome.status is not Outcome.OK or not (type(value) is tuple and len(value) == 4):
        return
    ref = value[0]
    if type(ref) is ObjectRef and session.name not in pool._objects.holders(ref.object_id):
        session.send(m.Drop(object_ids=(ref.object_id,)))


def _kept_bytes(outcome: m.TaskOutcome) -> int:
    """The bytes a kept result holds on its host, from the agent's `(ref, nbytes, shape, dtype)`."""
    value = outcome.value
    if type(value) is tuple and len(value) == 4 and type(value[1]) is int:
        return value[1]
    return 0


def started_events(pool: Pool, host: str, task_ids: Iterable[int], now: float, publish: bool) -> list[ev.Event]:
    events: list[ev.Event] = []
    for task_id in task_ids:
        pending = pool._pending.get(task_id)
        if pending is None or pending.slot_id is None or not pending.slot_id.startswith(host + "/"):
            continue
        pending.started_at = now
        events.append(ev.TaskStartReported(task_id=task_id, slot_id=pending.slot_id))
        if publish:
            pool.events.publish(
                pe.TaskStarted(
                    task_id=task_id,
                    name=pending.task.name,
                    host=host,
                    slot=pending.slot_id,
                    attempt=pool._scheduler.attempts(task_id),
                    at=now,
                    job=pending.job,
                )
            )
    return events


def resolve(pool: Pool, ins: ev.ResolveTask) -> None:
    """Resolve the task's future as the scheduler decided, with the value its agent sent, if any."""
    outcome = ins.payload
    if isinstance(outcome, m.TaskOutcome):  # decided by the agent's report: it carries the value
        pool._finish(
            ins.task_id,
            ins.status,
            reason=outcome.error or ins.reason or None,
            slot_id=ins.slot_id,
            attempts=ins.attempts,
            value=outcome.value,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            exit_code=outcome.exit_code,
            run_s=outcome.run_s,
        )
    else:
        reason = ins.reason
        if ins.status is TaskStatus.UNSCHEDULABLE and reason.startswith("no slot offers gpu"):
            reason += _why_no_gpu(pool)
        pool._finish(ins.task_id, ins.status, reason=reason or None, slot_id=ins.slot_id, attempts=ins.attempts)


def _why_no_gpu(pool: Pool) -> str:
    """For a GPU task no slot can run, where no host has a GPU at all: how to find out why
    and how to try GPU code without one. It said only "the cluster offers: cpu"."""
    sessions = pool._hosts.sessions.values()
    if any(session.hello is not None and session.hello.gpus for session in sessions):
        return ""  # GPUs are there, none offered (gpus = "none", CUDA_VISIBLE_DEVICES): the file's to fix
    return (
        "; no host here has a GPU ('batuta stack check' says why); to try GPU code without one, run under "
        "numba's simulator with fake GPUs: NUMBA_ENABLE_CUDASIM=1 BATUTA_FAKE_GPUS=2 (slow)"
    )


def slot_state_events(pool: Pool, session: HostSession, msg: m.SlotChanged, now: float) -> list[ev.Event]:
    slot_id = f"{session.name}/{msg.slot}"
    if pool.events.active:
        pool.events.publish(
            pe.SlotStateChanged(host=session.name, slot=slot_id, state=msg.state, reason=msg.reason, at=now)
        )
    if slot_id not in pool._slot_of:
        return []
    if msg.state == m.SLOT_DOWN:
        return slot_down(pool, session, slot_id, msg.reason or "worker process gave up")
    if msg.state == m.SLOT_UP:
        views = {v.slot_id: v for v in pool._scheduler.slots()}
        view = views.get(slot_id)
        if view is not None and view.state in ("lost", "retired"):
            return [ev.SlotJoined(slot_id=slot_id, host_id=session.name, capabilities=view.capabilities)]
    return []


def requeued(pool: Pool, ins: ev.AnnounceRequeue) -> None:
    """The scheduler put a task back in its queue: it is running nowhere now; observers hear why."""
    pending = pool._pending.get(ins.task_id)
    if pending is not None:
        pending.slot_id = None
        pool._acks.check()
        pending.started_at = None
        if pool.events.active:
            pool.events.publish(
                pe.TaskRequeued(
                    task_id=ins.task_id,
                    name=pending.task.name,
                    slot=ins.slot_id,
                    attempts=ins.attempts,
                    reason=ins.reason,
                    at=pool._now(),
                    job=pending.job,
                )
            )


def slot_down(pool: Pool, session: HostSession, slot_id: str, reason: str) -> list[ev.Event]:
    """The agent gave a slot up (it failed to start again and again: a limit on the host, say).
    That is final for this agent's life, so the slot is retired, not lost: the tasks it handed
    back are not counted as lost there (they never started: a running one was answered before,
    agent/supervisor.py), not even those that may not run twice, and the host is expected back with
    its other slots alone, so that a task only this slot could run fails, saying why, instead of
    waiting for ever (a relaunched agent says what it offers again). The host is said unfit."""
    host = session.name
    session.given_up[slot_id] = reason
    others = [v for v in pool._scheduler.slots() if v.host_id == host and v.slot_id != slot_id]
    # not the scheduler's state alone: a slot given up in the same batch is not retired there yet,
    # and the host was expected back with its capabilities (tasks only it could run waited for ever)
    offered = tuple(v.capabilities for v in others if v.state != "retired" and v.slot_id not in session.given_up)
    down = len(others) - len(offered) + 1
    which = "none of its slots can" if not offered else f"{down} of its {len(others) + 1} slots cannot"
    pool.host_state_changed(
        host,
        HOST_UNFIT,
        f"{which} start ({reason}): its agent's lines in the log say why, such as a limit on the host (open "
        "files: ulimit -n, processes: ulimit -u) or its memory; fix that, then run again",
    )
    return [
        ev.SlotLost(slot_id=slot_id, reason=reason, retired=True, handed_back=True),
        ev.HostExpected(host_id=host, slot_capabilities=offered),
    ]


HOST_UNFIT = "unfit"  # a host that failed a task for a reason of its own (core/hostfit.py)


def announce_host(pool: Pool, ins: ev.AnnounceDrained | ev.AnnounceUnfit) -> None:
    """What the scheduler decided about a host, as its state for observers."""
    if isinstance(ins, ev.AnnounceDrained):
        pool.host_state_changed(ins.host_id, "drained", "no work left")
    elif ins.lifted:  # what it is now ("up", or drained by request): `Pool.hosts()` says the same
        why = f"no longer unfit ({ins.reason}): it is given work again, as no other host can run what waits"
        pool.host_state_changed(ins.host_id, pool._scheduler.drain_state(ins.host_id) or "up", why)
    else:
        why = f"{ins.reason}; it gets no new work while other hosts can run it (undo: Pool.drain(host, undo=True))"
        pool.host_state_changed(ins.host_id, HOST_UNFIT, why)


def undrained(scheduler: Scheduler, session: HostSession, unfit: str | None) -> tuple[str, str]:
    """What `Pool.drain(host, undo=True)` says the host is, with why (`unfit`: the mark it lifted):
    "up", or "unfit" while a slot of it is retired (`slot_down`), as `host_views` says it, with
    the reason its agent gave it up; an undrain does not bring a slot its agent gave up back."""
    why = "undrained" if unfit is None else f"no longer unfit ({unfit}): undrained"
    slots = [v for v in scheduler.slots() if v.host_id == session.name]
    down = [v.slot_id for v in slots if v.state == "retired"]
    if not down:
        return "up", why
    them = "it" if len(down) == 1 else "them"
    # one reason each, said once: slots given up alike give the same one
    reasons = dict.fromkeys(session.given_up[s] for s in down if s in session.given_up)
    because = f": {'; '.join(reasons)}" if reasons else ""
    return HOST_UNFIT, (
        f"{why}; still unfit: {len(down)} of its {len(slots)} slots cannot start (its agent gave {them} up{because})"
    )


def host_views(views: list[HostView], scheduler: Scheduler) -> list[HostView]:
    """`Pool.hosts()` as the events tell it: a host whose agent is up (its liveness) but that
    the scheduler holds is said what the events said: "draining" or "drained" (`Pool.drain`),
    else "unfit" (given no work for a failure of its own, or a slot of it could not start and
    was retired, `slot_down`). A script draining hosts reads the state there."""
    if not any(v.state == "up" for v in views):
        return views
    retired = {v.host_id for v in scheduler.slots() if v.state == "retired"}
    return [replace(v, state=_held_state(scheduler, v.name, retired)) if v.state == "up" else v for v in views]


def _held_state(scheduler: Scheduler, host: str, retired: set[str]) -> str:
    drain = scheduler.drain_state(host)  # first: asked for by the user, and undone only by the user
    if drain is not None:
        return drain
    return HOST_UNFIT if host in retired or scheduler.unfit_reason(host) is not None else "up"


def still_held(scheduler: Scheduler, host: str, state: str, reason: str) -> tuple[str, str]:
    """A host back "up" (heard from again after a silence, relaunched) that the scheduler still
    holds drained or unfit is said so, with why: said "up", it showed up while it got no work."""
    if state != "up":
        return state, reason
    drain = scheduler.drain_state(host)
    if drain is not None:
        return drain, f"{reason}, still {drain}: it gets no new work (undo: Pool.drain(host, undo=True))"
    unfit = scheduler.unfit_reason(host)
    if unfit is None:
        return state, reason
    return HOST_UNFIT, f"{unfit}; {reason}, still unfit: it gets no new work (undo: Pool.drain(host, undo=True))"
