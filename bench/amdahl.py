"""The seed's Amdahl table, measured: the four ML workloads on 1, 2, 4 and 8 worker slots.

The seed claims these 8-node speedups from assumed parallel fractions P:

    | algorithm         | P    | 8-node speedup (seed's table) | 1 / ((1 - P) + P / 8) |
    | Random Forest     | 0.95 | 5.9x                          | 5.93x                 |
    | K-Means           | 0.85 | 4.4x                          | 3.90x                 |
    | Linear Regression | 0.90 | 5.0x                          | 4.71x                 |
    | Neural Network    | 0.92 | 5.4x                          | 5.13x                 |

(only the Random Forest row follows from its own P; the target here is the table's figure).
Each workload runs as the built-in job does (`batuta.jobs.kmeans`, `linreg`, `forest`, `mlp`:
seeded data generated on the workers, coarse chunks, a reduction on the coordinator) on a
local pool of p CPU slots, and we report the measured speedup S = T(1) / T(p), the
Karp-Flatt serial fraction e = (1/S - 1/p) / (1 - 1/p), and the seed's figures side by side.

Method. Every slot process is pinned to one thread (NUMBA_NUM_THREADS, OMP/OpenBLAS/MKL
threads = 1, set before anything starts), so p slots use p cores and T(1) is one core's
time, not a multithreaded one. Each pool is warmed first (every slot has loaded numba and
the compiled kernels before timing). Chunks are fixed across slot counts (4 per slot of the
largest count), so every slot count computes the same numbers: the script checks that the
results are identical in every bit across slot counts. T(p) is the best of `--repeats` runs.
Diagnostics: "kernel" is the summed run time of the tasks; "work x" is that over its value on
one slot (above 1 when the same tasks ran slower: cores shared with other processes, memory
bandwidth, lower clocks with more cores busy), and "overhead" is ``time - kernel / p``, what
the coordinator, the link, stragglers and idle slots add.

    .venv/bin/python bench/amdahl.py                        # 1, 2, 4, 8 slots (16+ cores)
    .venv/bin/python bench/amdahl.py --max-slots 2 --quick  # a 2-core machine, about a minute

The last line is one JSON object: per workload speedup_8, seed_speedup_8, karp_flatt_8 and
meets_seed (at the largest slot count measured when that is below 8, against the seed's P).
"""

from __future__ import annotations

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy or any agent starts: one slot, one core

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from batuta import Backend, Pool, Task  # noqa: E402
from batuta.jobs import forest, kmeans, linreg, mlp  # noqa: E402
from batuta.jobs._data import make_blobs, make_regression, make_teacher  # noqa: E402
from batuta.runtime.events import TaskFinished  # noqa: E402


@dataclass(frozen=True, slots=True)
class Seed:
    name: str
    parallel_fraction: float
    table_speedup_8: float

    def amdahl(self, p: int) -> float:
        return 1.0 / ((1.0 - self.parallel_fraction) + self.parallel_fraction / p)


SEED = {
    "forest": Seed("Random Forest", 0.95, 5.9),
    "kmeans": Seed("K-Means", 0.85, 4.4),
    "linreg": Seed("Linear Regression", 0.90, 5.0),
    "mlp": Seed("Neural Network", 0.92, 5.4),
}

# Sizes: about 4-5 s at one slot on a current server core ("full"); an eighth of that ("quick").
FULL = {
    "kmeans": {"n": 2_000_000, "d": 16, "k": 64, "iterations": 8},
    "linreg": {"n": 600_000, "d": 256},
    "forest": {"n_train": 20_000, "n_test": 5_000, "d": 16, "classes": 4, "trees": 32, "max_depth": 14, "mtry": 8},
    "mlp": {"n": 60_000, "d": 32, "hidden": 256, "classes": 8, "steps": 8},
}
QUICK = {
    "kmeans": {"n": 250_000, "d": 16, "k": 64, "iterations": 8},
    "linreg": {"n": 75_000, "d": 256},
    "forest": {"n_train": 20_000, "n_test": 5_000, "d": 16, "classes": 4, "trees": 8, "max_depth": 14, "mtry": 8},
    "mlp": {"n": 8_000, "d": 32, "hidden": 256, "classes": 8, "steps": 8},
}
TASKS_PER_SLOT = 4
CONTENDED = 1.15  # "work x" above this: the same tasks took 15% more CPU time than on one slot
MLP_TASKS_PER_SLOT = 2  # each MLP task carries the weights both ways: fewer, larger ones


def fingerprint(value: Any) -> bytes:
    """The bytes of a result's arrays and numbers, to compare runs bit for bit."""
    if isinstance(value, np.ndarray):
        return value.tobytes()
    if isinstance(value, list | tuple):
        return b"|".join(fingerprint(v) for v in value)
    return repr(value).encode()


Runner = Callable[[Pool], Awaitable[tuple[bytes, str]]]


def runners(sizes: dict[str, dict[str, int]], max_slots: int) -> dict[str, Runner]:
    """Per workload: run it once on a pool; return (result fingerprint, one-line check)."""
    chunks = TASKS_PER_SLOT * max_slots

    async def run_kmeans(pool: Pool) -> tuple[bytes, str]:
        s = sizes["kmeans"]
        r = await kmeans.run_kmeans(pool, n=s["n"], d=s["d"], k=s["k"], iterations=s["iterations"], chunks=chunks)
        return fingerprint([r.centroids, r.inertia]), f"inertia {r.inertia[0]:.4g} -> {r.inertia[-1]:.4g}"

    async def run_linreg(pool: Pool) -> tuple[bytes, str]:
        s = sizes["linreg"]
        r = await linreg.run_linreg(pool, n=s["n"], d=s["d"], chunks=chunks)
        assert r.data is not None
        return fingerprint(r.coef), f"max |coef - generating coef| {np.abs(r.coef - r.data.coef).max():.2g}"

    async def run_forest(pool: Pool) -> tuple[bytes, str]:
        s = sizes["forest"]
        r = await forest.run_forest(
            pool,
            n_train=s["n_train"],
            n_test=s["n_test"],
            d=s["d"],
            classes=s["classes"],
            trees=s["trees"],
            max_depth=s["max_depth"],
            features_per_split=s["mtry"],
        )
        return fingerprint([list(t) for t in r.trees]), f"test accuracy {r.accuracy:.4f}"

    async def run_mlp(pool: Pool) -> tuple[bytes, str]:
        s = sizes["mlp"]
        r = await mlp.run_mlp(
            pool,
            n=s["n"],
            d=s["d"],
            hidden=s["hidden"],
            classes=s["classes"],
            steps=s["steps"],
            chunks=MLP_TASKS_PER_SLOT * max_slots,
        )
        return fingerprint([list(r.params), r.losses]), f"loss {r.losses[0]:.4f} -> {r.losses[-1]:.4f}"

    return {"forest": run_forest, "kmeans": run_kmeans, "linreg": run_linreg, "mlp": run_mlp}


def warm_tasks() -> list[Task]:
    """One small task of each kernel the workloads run, so every slot loads them before timing."""
    blobs = make_blobs(0, 1_000, 4, 3)
    regression = make_regression(0, 1_000, 5)
    teacher = make_teacher(0, 1_000, 4, 3)
    w1, b1, w2, b2 = mlp.initial_params(0, 4, 8, 3)
    cpu = Backend.CPU
    return [
        Task.kernel("kmeans_partial_synth", *blobs.recipe(0, 500), np.zeros((3, 4)), backend=cpu),
        Task.kernel("linreg_partial_synth", *regression.recipe(0, 500), backend=cpu),
        Task.kernel("tree_fit_synth", teacher.seed, 500, 100, teacher.weights, 0.5, 1, 4, 2, backend=cpu),
        Task.kernel("mlp_grad_synth", w1, b1, w2, b2, *teacher.recipe(0, 500), backend=cpu),
    ]


async def warm(pool: Pool, slots: int) -> None:
    """Run the warm-up tasks until every CPU slot has run each of them (at most 20 rounds)."""
    for task in warm_tasks():
        seen: set[str] = set()
        for _ in range(20):
            futures = [await pool.submit(task) for _ in range(2 * slots)]
            for future in futures:
                result = await future
                if not result.is_success():
                    raise RuntimeError(f"warm-up task {task.name} failed: {result.error}")
                seen.add(result.slot or "")
            if len(seen) >= slots:
                break
        else:
            print(f"warning: only {len(seen)} of {slots} slots ran {task.name} while warming up", file=sys.stderr)


@dataclass(slots=True)
class Measurement:
    times: list[float] = field(default_factory=list)
    kernel_s: list[float] = field(default_factory=list)
    fingerprint: bytes = b""
    check: str = ""


async def measure(slots: int, selected: dict[str, Runner], repeats: int) -> dict[str, Measurement]:
    """Time each workload `repeats` times on one warmed pool of `slots` CPU slots."""
    found: dict[str, Measurement] = {name: Measurement() for name in selected}
    busy: list[float] = [0.0]

    def on_event(event: object) -> None:
        if isinstance(event, TaskFinished):
            busy[0] += event.result.duration

    async with Pool.local(slots, gpu_workers="none") as pool:
        await warm(pool, slots)
        unsubscribe = pool.subscribe(on_event)
        try:
            for _ in range(repeats):
                for name, runner in selected.items():
                    busy[0] = 0.0
                    started = time.perf_counter()
                    print_, check = await runner(pool)
                    elapsed = time.perf_counter() - started
                    m = found[name]
                    if m.fingerprint and m.fingerprint != print_:
                        raise AssertionError(f"{name}: repeated runs on {slots} slots gave different results")
                    m.fingerprint, m.check = print_, check
                    m.times.append(elapsed)
                    m.kernel_s.append(busy[0])
        finally:
            unsubscribe()
    return found


def karp_flatt(speedup: float, p: int) -> float | None:
    return None if p < 2 else (1.0 / speedup - 1.0 / p) / (1.0 - 1.0 / p)


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    import numba

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-slots", type=int, default=8, help="largest slot count (1, 2, 4, 8 up to it)")
    parser.add_argument("--quick", action="store_true", help="an eighth of the work: for small machines")
    parser.add_argument("--repeats", type=int, default=None, help="runs per slot count (best kept); default 3, 1 quick")
    parser.add_argument("--workloads", default="forest,kmeans,linreg,mlp", help="comma list of workloads")
    args = parser.parse_args()
    counts = [p for p in (1, 2, 4, 8, 16, 32) if p <= args.max_slots]
    if args.max_slots not in counts:
        counts.append(args.max_slots)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SEED))
    if unknown or not names:
        parser.error(f"unknown workloads {unknown}; pick from {', '.join(SEED)}")
    if (os.cpu_count() or 1) < max(counts):
        print(f"warning: {max(counts)} slots on {os.cpu_count()} cores: slots will share cores", file=sys.stderr)
    sizes = QUICK if args.quick else FULL
    repeats = args.repeats or (1 if args.quick else 3)
    all_runners = runners(sizes, max(counts))
    selected = {name: all_runners[name] for name in names}

    results: dict[int, dict[str, Measurement]] = {}
    for p in counts:
        results[p] = asyncio.run(measure(p, selected, repeats))

    print(
        f"{'workload':<8} {'slots':>5} {'time s':>8} {'kernel s':>9} {'work x':>7} {'overhead s':>10} "
        f"{'speedup':>8} {'karp-flatt':>10} {'amdahl(seed P)':>14} {'seed table':>10}"
    )
    summary: dict[str, Any] = {}
    top = max(counts)
    for name in names:
        seed = SEED[name]
        base = min(results[1][name].times)
        base_kernel = results[1][name].kernel_s[results[1][name].times.index(base)]
        contended = []
        identical = all(results[p][name].fingerprint == results[1][name].fingerprint for p in counts)
        for p in counts:
            m = results[p][name]
            best = min(m.times)
            kernel = m.kernel_s[m.times.index(best)]
            speedup = base / best
            e = karp_flatt(speedup, p)
            table = f"{seed.table_speedup_8:.1f}" if p == 8 else "-"
            work = kernel / base_kernel  # above 1: the same tasks ran slower (cores shared, memory, clocks)
            if work > CONTENDED:
                contended.append(p)
            print(
                f"{name:<8} {p:>5} {best:>8.3f} {kernel:>9.3f} {work:>7.2f} {best - kernel / p:>10.3f} "
                f"{speedup:>8.2f} {'-' if e is None else f'{e:.4f}':>10} {seed.amdahl(p):>14.2f} {table:>10}"
            )
        final = base / min(results[top][name].times)
        target = seed.table_speedup_8 if top == 8 else seed.amdahl(top)
        print(f"{'':<8} {results[1][name].check}; results identical on every slot count: {identical}")
        if contended:
            print(
                f"{'':<8} note: at {contended} slots the tasks' own run time grew by more than "
                f"{CONTENDED - 1:.0%}: slots competed for cores or memory, so the speedup understates batuta"
            )
        e_top = karp_flatt(final, top)
        summary[name] = {
            "speedup_8": round(final, 3) if top == 8 else None,
            "seed_speedup_8": seed.table_speedup_8,
            "karp_flatt_8": None if top != 8 or e_top is None else round(e_top, 5),
            "meets_seed": bool(final >= target),
            "slots_max": top,
            "speedup_max": round(final, 3),
            "karp_flatt_max": None if e_top is None else round(e_top, 5),
            "target_at_max": round(target, 3),
            "time_1_s": round(base, 4),
            "identical_results": identical,
            "contended_slot_counts": contended,
        }
        if not identical:
            print(f"error: {name} gave different results on different slot counts", file=sys.stderr)
    summary["machine"] = machine()
    summary["sizes"] = {name: sizes[name] for name in names}
    summary["repeats"] = repeats
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
