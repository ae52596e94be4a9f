"""Micro-benchmark of the wire codec: microseconds per task to encode and decode.

Measures a Run of 256 small kernel TaskRequests (kernel "noop", args (1,)) and a Done of 256
TaskOutcomes (value 1), each encoded to a frame and decoded back through a FrameDecoder;
also a Connection pair passing the same frames, which adds the state-machine checks.
The last line printed is a JSON object with the figures.

    python bench/protocol_codec.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

from batuta.core.task import KernelCall, Outcome
from batuta.protocol import (
    PROTOCOL_VERSION,
    Connection,
    Done,
    FrameDecoder,
    Hello,
    Role,
    Run,
    SlotInfo,
    TaskOutcome,
    TaskRequest,
    Welcome,
    encode_message,
)

BATCH = 256


def best_of(fn: Callable[[], object], repeat: int, number: int) -> float:
    """Best seconds per call of `fn` over `repeat` rounds of `number` calls."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def decode_one(frame: bytes) -> Callable[[], object]:
    decoder = FrameDecoder()

    def run() -> object:
        decoder.feed(frame)
        return decoder.next_message()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=200)
    opts = parser.parse_args()

    run = Run(
        tasks=tuple(
            TaskRequest(task_id=i, slot=i % 2, attempt=1, call=KernelCall(name="noop", args=(1,))) for i in range(BATCH)
        )
    )
    done = Done(
        results=tuple(
            TaskOutcome(task_id=i, slot=i % 2, attempt=1, status=Outcome.OK, value=1, run_s=1e-5) for i in range(BATCH)
        )
    )
    run_frame = encode_message(run)
    done_frame = encode_message(done)
    assert decode_one(run_frame)() == run and decode_one(done_frame)() == done

    agent = Connection(Role.AGENT)
    coordinator = Connection(Role.COORDINATOR)
    hello = Hello(
        protocol=PROTOCOL_VERSION,
        batuta_version="bench",
        python_version=platform.python_version(),
        hostname="bench",
        pid=1,
        cpu_count=2,
        slots=(SlotInfo(slot=0, capabilities=("cpu",)),),
    )
    coordinator.receive_data(agent.send(hello))
    coordinator.next_event()
    agent.receive_data(coordinator.send(Welcome(protocol=PROTOCOL_VERSION, heartbeat_interval=1.0)))
    agent.next_event()

    def round_trip() -> object:
        agent.receive_data(coordinator.send(run))
        agent.next_event()
        coordinator.receive_data(agent.send(done))
        return coordinator.next_event()

    r, n = opts.repeat, opts.number
    per_task = {
        "run_encode_us": best_of(lambda: encode_message(run), r, n) / BATCH * 1e6,
        "run_decode_us": best_of(decode_one(run_frame), r, n) / BATCH * 1e6,
        "done_encode_us": best_of(lambda: encode_message(done), r, n) / BATCH * 1e6,
        "done_decode_us": best_of(decode_one(done_frame), r, n) / BATCH * 1e6,
        "connection_round_trip_us": best_of(round_trip, r, n) / BATCH * 1e6,
    }
    for key, value in per_task.items():
        print(f"{key:>26}: {value:6.3f} us/task")
    print(
        json.dumps(
            {
                "batch": BATCH,
                "run_frame_bytes": len(run_frame),
                "done_frame_bytes": len(done_frame),
                **{key: round(value, 3) for key, value in per_task.items()},
                "python": platform.python_version(),
                "machine": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
