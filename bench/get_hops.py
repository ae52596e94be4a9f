"""What one `pool.get` of a kept result is made of, on one SSH namespace host with a data link.

Each round makes a fresh kept result of `--mib` MiB on the host (`saxpy` of a put array,
`keep=True`: it stays in the slot's process) and fetches it twice:

- `first_s`: the get that asks the slot for it: lent by the slot, read from its memory by the
  agent while the data link sends it (`agent/lend.py`; before, slot to agent down the slot's
  pipe, then agent to coordinator, overlapped: `agent/forward.py`); the coordinator's
  receiver counts it in `growing_streams`;
- `second_s`: the same get again. Until 2026-12-04 the agent kept a fetched value in its own
  store, so this was the data link hop alone; now it keeps none (the host would hold the
  value twice), and the second get asks the slot again: a repeat of the first, with the
  memory the first one freed.

Medians over `--rounds`; the last line is one JSON object.

`--encryption none` makes the link plain TCP (`[ssh] data_link_encryption = "none"`).

    python bench/get_hops.py [--mib 256] [--rounds 5] [--encryption tls|none]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.objects import cluster_text, wait_for_links  # noqa: E402
from bench.ssh_startup import quiet_logs  # noqa: E402
from tests.support.hosts import TestHosts  # noqa: E402

RUN_TIMEOUT_S = 600.0


async def measure(hosts: TestHosts, mib: int, rounds: int, encrypted: bool = True) -> dict[str, Any]:
    from batuta import Task
    from batuta.runtime.cluster import build_pool, parse_cluster

    text = cluster_text(hosts, data_link=True, encrypted=encrypted)
    pool = build_pool(parse_cluster(text, source="bench/get_hops.py"))
    first: list[float] = []
    second: list[float] = []
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            await pool.start()
            await wait_for_links(pool, 1)
            source = np.random.default_rng(0).random(mib * 2**20 // 4, dtype=np.float32)
            ref = pool.put(source)
            for _ in range(rounds):
                kept = (await (await pool.submit(Task.kernel("saxpy", 2.0, ref, ref), keep=True))).unwrap()
                start = time.perf_counter()
                back = await pool.get(kept)
                first.append(time.perf_counter() - start)
                del back
                start = time.perf_counter()
                back = await pool.get(kept)
                second.append(time.perf_counter() - start)
                if not np.array_equal(back[: 1 << 16], 3.0 * source[: 1 << 16]):
                    raise RuntimeError("batuta fetched a wrong array")
                del back
                pool.drop(kept)
            (session,) = pool._hosts.sessions.values()
            receiver = session.data_link._receiver  # type: ignore[union-attr]  # bench-only peek at the link
            growing = receiver.growing_streams
    finally:
        await pool.close()
    return {
        "mib": mib,
        "rounds": rounds,
        "first_s": round(statistics.median(first), 3),
        "second_s": round(statistics.median(second), 3),
        "first_gbps": round(mib * 2**20 / statistics.median(first) / 1e9, 3),
        "second_gbps": round(mib * 2**20 / statistics.median(second) / 1e9, 3),
        "growing_streams": growing,
        "encryption": "tls" if encrypted else "none",
        "load_at_start": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--encryption", choices=("tls", "none"), default="tls")
    args = parser.parse_args()
    quiet_logs()
    with TestHosts(1) as hosts:
        print(json.dumps(asyncio.run(measure(hosts, args.mib, args.rounds, args.encryption == "tls"))))


if __name__ == "__main__":
    main()
