"""The end of a run, simulated: the real scheduler core with agents that feed as the real ones do.

`bench/imbalance.py` compares makespans on a real pool, where a 1% difference is within the
noise of one run on a shared machine. This replays the same seeded lognormal tasks through
`batuta.core.scheduler.Scheduler` with simulated time: a coordinator round trip of `--rtt`
seconds, agents that keep a short task fed behind the running one (`agent/supervisor.py`'s
depth rule; a fed task cannot be stolen back) and start an unfed one after `--handoff`
seconds; against a shared queue with no per-task cost at all (which favours it). Each
makespan is divided by max(total work / workers, longest task), averaged over `--seeds`.

    python scripts/tail_sim.py [--workers 2] [--tasks 300] [--seeds 20] [--rtt 0.0004]
                               [--workload lognormal|growing] [--tail-tasks-per-slot 2]
                               [--tail-unfed-tasks-per-slot 4]  (0: no tail tasks, as before)
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import statistics
from dataclasses import dataclass, field

import numpy as np

from batuta.core import events as ev
from batuta.core.scheduler import Scheduler, SchedulerConfig
from batuta.core.task import Outcome

Fed = tuple[int, int]  # (task id, attempt)


@dataclass
class Agent:
    """One slot as its agent sees it: received tasks, the ones fed to the slot process."""

    slot_id: str
    queue: list[Fed] = field(default_factory=list)
    tail: set[int] = field(default_factory=set)  # queued tail tasks: fed only to an idle slot
    fed: list[Fed] = field(default_factory=list)
    mean_run_s: float | None = None
    running: bool = False

    def depth(self) -> int:
        """`SlotSupervisor.depth`: 1 until a run time is known, 2 for tasks under 20 ms."""
        if self.mean_run_s is None:
            return 1
        ahead = int(0.001 / self.mean_run_s)
        if self.mean_run_s < 0.02:
            ahead = max(ahead, 1)
        return 1 + min(31, ahead)


def lognormal(count: int, seed: int, median: float = 0.004, sigma: float = 1.0) -> list[float]:
    rng = np.random.default_rng(seed)  # as bench/imbalance.py draws them
    return [float(x) for x in median * rng.lognormal(0.0, sigma, count)]


def growing(count: int, seed: int, median: float = 0.004) -> list[float]:
    """Cost proportional to the index, as bench/imbalance.py's growing workload draws it."""
    rng = np.random.default_rng(seed)
    base = np.arange(1, count + 1, dtype=float)
    base *= median * count / base.sum()
    return [float(x) for x in base * rng.uniform(0.9, 1.1, count)]


def batuta_makespan(
    durations: list[float], workers: int, rtt: float, handoff: float, config: SchedulerConfig, honour_tail: bool = True
) -> float:
    sched = Scheduler(config, seed=0)
    agents = {f"s{i}": Agent(f"s{i}") for i in range(workers)}
    timeline: list[tuple[float, int, str, tuple[object, ...]]] = []
    order = itertools.count()

    def at(t: float, kind: str, *args: object) -> None:
        heapq.heappush(timeline, (t, next(order), kind, args))

    def carry_out(instructions: list[ev.Instruction], t: float) -> None:
        for ins in instructions:
            if isinstance(ins, ev.SendTasks):
                sent = tuple(zip(ins.task_ids, ins.attempts, strict=True))
                at(t + rtt / 2, "run", ins.slot_id, sent, ins.tail if honour_tail else ())
            elif isinstance(ins, ev.RequestStealBack):
                at(t + rtt / 2, "steal", ins.slot_id, ins.task_ids)

    def start_head(agent: Agent, t: float) -> None:
        agent.running = True
        task_id = agent.fed[0][0]
        at(t + rtt / 2, "event", ev.TaskStartReported(task_id=task_id, slot_id=agent.slot_id))
        at(t + durations[task_id], "done", agent.slot_id)

    def feed(agent: Agent, t: float) -> None:
        while agent.queue and len(agent.fed) < agent.depth():
            if agent.fed and agent.queue[0][0] in agent.tail:
                break  # a tail task waits, stealable, until the slot is idle
            agent.fed.append(agent.queue.pop(0))
        if agent.fed and not agent.running:
            start_head(agent, t + handoff)

    for slot_id in agents:
        carry_out(sched.handle(ev.SlotJoined(slot_id=slot_id, host_id="h", capabilities=frozenset({"cpu"})), 0.0), 0.0)
    sched.handle(ev.RoundTripMeasured(host_id="h", seconds=rtt), 0.0)  # as the runtime measures it
    carry_out(sched.handle_many([ev.TaskSubmitted(task_id=i) for i in range(len(durations))], 0.0), 0.0)
    end = 0.0
    while timeline:
        t, _, kind, args = heapq.heappop(timeline)
        if kind == "event":
            carry_out(sched.handle(args[0], t), t)  # type: ignore[arg-type]  # events are queued as objects
            continue
        agent = agents[str(args[0])]
        if kind == "run":
            agent.queue.extend(args[1])  # type: ignore[arg-type]
            agent.tail.update(args[2])  # type: ignore[arg-type]
            feed(agent, t)
        elif kind == "steal":
            queued = {task_id for task_id, _ in agent.queue}
            asked: tuple[int, ...] = args[1]  # type: ignore[assignment]
            returned = tuple(i for i in asked if i in queued)
            agent.queue = [item for item in agent.queue if item[0] not in returned]
            refused = tuple(i for i in asked if i not in queued)
            answer = ev.StealBackAnswered(slot_id=agent.slot_id, returned=returned, refused=refused)
            at(t + rtt / 2, "event", answer)
        else:  # done: the next fed task starts at once, an unfed one after the hand-off
            task_id, attempt = agent.fed.pop(0)
            run_s = durations[task_id]
            agent.mean_run_s = run_s if agent.mean_run_s is None else 0.8 * agent.mean_run_s + 0.2 * run_s
            agent.running = False
            end = max(end, t)
            outcome = ev.TaskOutcomeReported(
                task_id=task_id, slot_id=agent.slot_id, attempt=attempt, outcome=Outcome.OK, run_s=run_s
            )
            at(t + rtt / 2, "event", outcome)
            if agent.fed:
                start_head(agent, t)
            feed(agent, t)
    sched.validate()
    return end


def shared_queue_makespan(durations: list[float], workers: int) -> float:
    free = [0.0] * workers
    for duration in durations:
        free[free.index(min(free))] += duration
    return max(free)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--rtt", type=float, default=0.0004, help="coordinator round trip, seconds")
    parser.add_argument("--handoff", type=float, default=0.00005, help="agent to slot, for an unfed task")
    parser.add_argument("--workload", choices=("lognormal", "growing"), default="lognormal")
    parser.add_argument("--tail-tasks-per-slot", type=int, default=SchedulerConfig().tail_tasks_per_slot)
    parser.add_argument("--tail-unfed-tasks-per-slot", type=int, default=SchedulerConfig().tail_unfed_tasks_per_slot)
    args = parser.parse_args()
    config = SchedulerConfig(
        tail_tasks_per_slot=args.tail_tasks_per_slot, tail_unfed_tasks_per_slot=args.tail_unfed_tasks_per_slot
    )
    batuta, shared = [], []
    for seed in range(args.seeds):
        durations = lognormal(args.tasks, seed) if args.workload == "lognormal" else growing(args.tasks, seed)
        bound = max(sum(durations) / args.workers, max(durations))
        batuta.append(batuta_makespan(durations, args.workers, args.rtt, args.handoff, config) / bound)
        shared.append(shared_queue_makespan(durations, args.workers) / bound)
    print(
        json.dumps(
            {
                "workload": args.workload,
                "workers": args.workers,
                "tasks": args.tasks,
                "seeds": args.seeds,
                "rtt": args.rtt,
                "tail_tasks_per_slot": args.tail_tasks_per_slot,
                "tail_unfed_tasks_per_slot": args.tail_unfed_tasks_per_slot,
                "batuta_over_lower_bound": round(statistics.fmean(batuta), 4),
                "shared_queue_over_lower_bound": round(statistics.fmean(shared), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
