"""Scheduler cost per task as the cluster grows: the pure core with fake agents, 8 to 4,096 slots.

Only `Scheduler.handle_many` is timed, in CPU seconds of this thread (`time.thread_time`
around each call, so that other processes on a shared machine do not count); the fake
agents, the simulated clock and the bookkeeping of this script are not. The workload is
the same at every size:

* hosts of up to 64 slots each (8 slots = 1 host; 4,096 slots = 64 hosts);
* 40,000 tasks submitted as the runtime submits them, in batches of up to 1,024 events per
  call, the first half up front and the rest in bursts while the cluster runs;
* run times drawn from a seeded lognormal (median 10 ms of simulated time, sigma 1), so
  slots finish out of step and work stealing (deque steals and steal-backs) happens;
* every agent answers a steal-back at once, and reports starts and outcomes in order.

The simulation is event-driven on simulated time: the next slot to finish is taken from a
heap, so the script's own cost does not grow with the number of slots either.

Target (issue 17): `growth_4096_over_8` (cost per task at 4,096 slots over that at 8) <= 1.5.
The last line is one JSON object with `us_per_task_<slots>` for every size, `growth_4096_over_8`
the counts of steals and steal-backs at each size (to show the stealing paths ran), and the
simulated makespan over its lower bound at each size (to show the balance did not get worse).
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import time

from batuta.core import events as ev
from batuta.core.scheduler import Scheduler
from batuta.core.task import Outcome

SIZES = (8, 64, 512, 2048, 4096)
SLOTS_PER_HOST = 64
BATCH = 1024


class TimedCluster:
    """Fake agents around one Scheduler; accumulates the seconds spent inside it."""

    def __init__(self, slots: int, seed: int) -> None:
        self.sched = Scheduler(seed=seed)
        self.rng = random.Random(seed)
        self.now = 0.0
        self.inside_s = 0.0
        self.queue: dict[str, list[tuple[int, int]]] = {}
        self.running: dict[str, tuple[int, int]] = {}
        self.finishing: list[tuple[float, int, str]] = []  # (finish time, tiebreak, slot)
        self.resolved = 0
        self.busy_s = 0.0  # simulated run time handed out, for the makespan's lower bound
        self.longest_s = 0.0
        self._tiebreak = 0
        joins: list[ev.Event] = []
        for i in range(slots):
            slot_id = f"h{i // SLOTS_PER_HOST}/{i % SLOTS_PER_HOST}"
            self.queue[slot_id] = []
            joins.append(
                ev.SlotJoined(slot_id=slot_id, host_id=f"h{i // SLOTS_PER_HOST}", capabilities=frozenset({"cpu"}))
            )
        self.feed(joins)

    def feed(self, events: list[ev.Event]) -> None:
        pending = events
        for _ in range(1_000_000):  # bounded: each round answers what the last one asked
            if not pending:
                return
            t0 = time.thread_time()
            out = self.sched.handle_many(pending, self.now)
            self.inside_s += time.thread_time() - t0
            pending = self.apply(out)
        raise AssertionError("scheduler and fake agents did not settle")

    def apply(self, out: list[ev.Instruction]) -> list[ev.Event]:
        """Carry out instructions as agents would; return the events they answer with now."""
        replies: list[ev.Event] = []
        for ins in out:
            if isinstance(ins, ev.SendTasks):
                self.queue[ins.slot_id].extend(zip(ins.task_ids, ins.attempts, strict=True))
                replies += self.start(ins.slot_id)
            elif isinstance(ins, ev.RequestStealBack):
                queue = self.queue[ins.slot_id]
                queued = {tid for tid, _ in queue}
                returned = tuple(t for t in ins.task_ids if t in queued)
                refused = tuple(t for t in ins.task_ids if t not in queued)
                self.queue[ins.slot_id] = [(t, a) for t, a in queue if t not in returned]
                replies.append(ev.StealBackAnswered(slot_id=ins.slot_id, returned=returned, refused=refused))
            elif isinstance(ins, ev.ResolveTask):
                self.resolved += 1
        return replies

    def start(self, slot_id: str) -> list[ev.Event]:
        if slot_id in self.running or not self.queue[slot_id]:
            return []
        task_id, attempt = self.queue[slot_id].pop(0)
        self.running[slot_id] = (task_id, attempt)
        run_s = 0.010 * self.rng.lognormvariate(0.0, 1.0)
        self.busy_s += run_s
        self.longest_s = max(self.longest_s, run_s)
        self._tiebreak += 1
        heapq.heappush(self.finishing, (self.now + run_s, self._tiebreak, slot_id))
        return [ev.TaskStartReported(task_id=task_id, slot_id=slot_id)]

    def finish_next(self) -> bool:
        if not self.finishing:
            return False
        finish_at, _, slot_id = heapq.heappop(self.finishing)
        self.now = max(self.now, finish_at)
        task_id, attempt = self.running.pop(slot_id)
        events: list[ev.Event] = [
            ev.TaskOutcomeReported(task_id=task_id, slot_id=slot_id, attempt=attempt, outcome=Outcome.OK, run_s=0.01)
        ]
        events += self.start(slot_id)
        self.feed(events)
        return True


def measure(slots: int, tasks: int, seed: int) -> dict[str, float]:
    cluster = TimedCluster(slots, seed)
    cluster.inside_s = 0.0  # joining is not per-task cost
    submitted = 0

    def submit(count: int) -> None:
        nonlocal submitted
        for start in range(0, count, BATCH):
            n = min(BATCH, count - start)
            cluster.feed(
                [
                    ev.TaskSubmitted(
                        task_id=submitted + i, priority=1, requires=frozenset({"cpu"}), timeout=None, max_attempts=3
                    )
                    for i in range(n)
                ]
            )
            submitted += n

    submit(tasks // 2)
    burst = max(tasks // 40, 1)
    for _ in range(tasks * 4):  # bounded: every step finishes one task
        if submitted < tasks and cluster.resolved >= submitted - tasks // 4:
            submit(min(burst, tasks - submitted))
        if not cluster.finish_next() and submitted >= tasks:
            break
    assert cluster.resolved == tasks, f"{cluster.resolved} of {tasks} resolved at {slots} slots"
    cluster.sched.validate()
    stats = cluster.sched.stats
    return {
        "us_per_task": cluster.inside_s / tasks * 1e6,
        # simulated makespan over max(work / slots, longest task): the balance the cost bought
        "makespan_over_bound": cluster.now / max(cluster.busy_s / slots, cluster.longest_s),
        "steals": stats.steals,
        "steal_backs": stats.steal_backs_requested,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeat", type=int, default=3, help="runs per size; the fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result: dict[str, float] = {}
    for slots in args.sizes:
        runs = [measure(slots, args.tasks, args.seed) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["us_per_task"])
        print(
            f"{slots:>5} slots: {best['us_per_task']:7.1f} us/task "
            f"({int(best['steals'])} deque steals, {int(best['steal_backs'])} steal-backs, "
            f"simulated makespan {best['makespan_over_bound']:.3f} of the lower bound)",
            flush=True,
        )
        result[f"us_per_task_{slots}"] = round(best["us_per_task"], 2)
        result[f"steals_{slots}"] = best["steals"]
        result[f"steal_backs_{slots}"] = best["steal_backs"]
        result[f"makespan_over_bound_{slots}"] = round(best["makespan_over_bound"], 3)
    low, high = min(args.sizes), max(args.sizes)
    result[f"growth_{high}_over_{low}"] = round(result[f"us_per_task_{high}"] / result[f"us_per_task_{low}"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
