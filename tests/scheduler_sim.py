"""A fake cluster of host agents around the sans-I/O scheduler, for tests (no event loop).

Each fake slot behaves like a real agent would: tasks arrive in order, start oldest first,
and a steal-back is answered transactionally (returned if still queued, refused if not).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from batuta.core import events as ev
from batuta.core.scheduler import Scheduler
from batuta.core.task import Outcome, TaskStatus


@dataclass
class FakeSlot:
    slot_id: str
    host_id: str
    caps: frozenset[str]
    queue: list[tuple[int, int]] = field(default_factory=list)  # (task_id, attempt), not started
    running: tuple[int, int] | None = None
    steal_requests: list[tuple[int, ...]] = field(default_factory=list)
    outbox: list[ev.Event] = field(default_factory=list)  # events the agent has yet to send
    up: bool = True


class Sim:
    """Drives a Scheduler with fake agents; records every resolution."""

    def __init__(self, scheduler: Scheduler | None = None, *, seed: int = 0) -> None:
        self.sched = scheduler or Scheduler(seed=seed)
        self.now = 0.0
        self.slots: dict[str, FakeSlot] = {}
        self.resolved: dict[int, list[ev.ResolveTask]] = {}
        self.instructions: list[ev.Instruction] = []
        self.submitted: list[int] = []
        self.remade: list[ev.RecomputeObject] = []
        self.reads_of: dict[int, tuple[int, ...]] = {}  # lineage re-runs asked for (each submitted at once)
        self._next_id = 0

    # -- feeding the scheduler ----------------------------------------------------------------

    def handle(self, event: ev.Event) -> list[ev.Instruction]:
        self.now += 0.001
        out = self.sched.handle(event, self.now)
        self._apply(out)
        return out

    def _apply(self, out: list[ev.Instruction]) -> None:
        self.instructions.extend(out)
        for ins in out:
            if isinstance(ins, ev.SendTasks):
                slot = self.slots[ins.slot_id]
                assert slot.up, f"sent to lost slot {ins.slot_id}"
                assert set(ins.tail) <= set(ins.task_ids), f"tail tasks {ins.tail} not among those sent"
                slot.queue.extend(zip(ins.task_ids, ins.attempts, strict=True))
            elif isinstance(ins, ev.RequestStealBack):
                self.slots[ins.slot_id].steal_requests.append(ins.task_ids)
            elif isinstance(ins, ev.AbortTasks):
                slot = self.slots[ins.slot_id]
                for task_id in ins.task_ids:
                    self._abort(slot, task_id)
            elif isinstance(ins, ev.ResolveTask):
                self.resolved.setdefault(ins.task_id, []).append(ins)
            elif isinstance(ins, ev.RecomputeObject):  # as the pool does: the recorded task, again
                self.remade.append(ins)
                self.submit(keep_as=ins.object_id, reads=self.reads_of.get(ins.task_id, ()))

    def _abort(self, slot: FakeSlot, task_id: int) -> None:
        for i, (tid, attempt) in enumerate(slot.queue):
            if tid == task_id:
                del slot.queue[i]
                slot.outbox.append(
                    ev.TaskOutcomeReported(
                        task_id=tid, slot_id=slot.slot_id, attempt=attempt, outcome=Outcome.CANCELLED
                    )
                )
                return
        if slot.running and slot.running[0] == task_id:
            tid, attempt = slot.running
            slot.running = None
            slot.outbox.append(
                ev.TaskOutcomeReported(task_id=tid, slot_id=slot.slot_id, attempt=attempt, outcome=Outcome.CANCELLED)
            )

    # -- cluster actions ------------------------------------------------------------------------

    def add_slot(self, slot_id: str, host_id: str = "h0", caps: tuple[str, ...] = ("cpu",)) -> None:
        self.slots[slot_id] = FakeSlot(slot_id, host_id, frozenset(caps))
        self.handle(ev.SlotJoined(slot_id=slot_id, host_id=host_id, capabilities=frozenset(caps)))

    def submit(
        self,
        *,
        priority: int = 1,
        requires: tuple[str, ...] = ("cpu",),
        timeout: float | None = None,
        max_attempts: int = 3,
        after: tuple[int, ...] = (),
        reads: tuple[int, ...] = (),
        keep_as: int = 0,
        puts: tuple[tuple[int, int], ...] = (),
    ) -> int:
        task_id = self._next_id
        self._next_id += 1
        self.submitted.append(task_id)
        self.reads_of[task_id] = reads
        self.handle(
            ev.TaskSubmitted(
                task_id=task_id,
                priority=priority,
                requires=frozenset(requires),
                timeout=timeout,
                max_attempts=max_attempts,
                after=after,
                reads=reads,
                keep_as=keep_as,
                puts=puts,
            )
        )
        return task_id

    def start(self, slot_id: str) -> int | None:
        slot = self.slots[slot_id]
        if not slot.up or slot.running is not None or not slot.queue:
            return None
        slot.running = slot.queue.pop(0)
        slot.outbox.append(ev.TaskStartReported(task_id=slot.running[0], slot_id=slot_id))
        return slot.running[0]

    def finish(
        self, slot_id: str, outcome: Outcome = Outcome.OK, run_s: float = 0.01, kept_bytes: int = 4 << 20
    ) -> int | None:
        slot = self.slots[slot_id]
        if not slot.up or slot.running is None:
            return None
        task_id, attempt = slot.running
        slot.running = None
        slot.outbox.append(
            ev.TaskOutcomeReported(
                task_id=task_id, slot_id=slot_id, attempt=attempt, outcome=outcome, run_s=run_s, kept_bytes=kept_bytes
            )
        )
        return task_id

    def answer_steals(self, slot_id: str) -> None:
        slot = self.slots[slot_id]
        while slot.steal_requests:
            ids = slot.steal_requests.pop(0)
            queued = {tid for tid, _ in slot.queue}
            returned = tuple(t for t in ids if t in queued)
            refused = tuple(t for t in ids if t not in queued)
            slot.queue = [(t, a) for t, a in slot.queue if t not in returned]
            slot.outbox.append(ev.StealBackAnswered(slot_id=slot_id, returned=returned, refused=refused))

    def deliver(self, slot_id: str) -> None:
        """The agent's pending messages reach the coordinator, in order."""
        slot = self.slots[slot_id]
        while slot.outbox:
            self.handle(slot.outbox.pop(0))

    def lose(self, slot_id: str, reason: str = "killed", retired: bool = False) -> None:
        slot = self.slots[slot_id]
        slot.up = False
        slot.queue.clear()
        slot.running = None
        slot.steal_requests.clear()
        slot.outbox.clear()
        self.handle(ev.SlotLost(slot_id=slot_id, reason=reason, retired=retired))

    def lose_host(self, host_id: str, reason: str = "killed") -> None:
        """Every slot of the host stops, and the objects its agent kept are gone with it."""
        for slot in self.slots.values():
            if slot.host_id == host_id:
                slot.up = False
                slot.queue.clear()
                slot.running = None
                slot.steal_requests.clear()
                slot.outbox.clear()
        self.handle(ev.HostLost(host_id=host_id, reason=reason))

    def rejoin(self, slot_id: str) -> None:
        slot = self.slots[slot_id]
        slot.up = True
        self.handle(ev.SlotJoined(slot_id=slot_id, host_id=slot.host_id, capabilities=slot.caps))

    def run_to_completion(self, max_steps: int = 100_000) -> None:
        """Every up slot answers steals, starts and finishes its work until nothing is left."""
        for _ in range(max_steps):
            progressed = False
            for slot_id, slot in self.slots.items():
                if not slot.up:
                    continue
                if slot.steal_requests:
                    self.answer_steals(slot_id)
                    progressed = True
                if slot.outbox:
                    self.deliver(slot_id)
                    progressed = True
                if slot.running is not None:
                    self.finish(slot_id)
                    progressed = True
                elif slot.queue:
                    self.start(slot_id)
                    progressed = True
            if not progressed:
                return
        raise AssertionError("simulation did not settle")

    # -- checks ---------------------------------------------------------------------------------

    def status_of(self, task_id: int) -> TaskStatus:
        [resolution] = self.resolved[task_id]
        return resolution.status

    def assert_each_resolved_once(self) -> None:
        for task_id in self.submitted:
            got = self.resolved.get(task_id, [])
            assert len(got) == 1, f"task {task_id} resolved {len(got)} times: {got}"
        assert set(self.resolved) == set(self.submitted)
