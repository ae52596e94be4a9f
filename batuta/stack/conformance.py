"""Kernel conformance: every registered kernel, on every backend of a node, against NumPy.

Each built-in kernel has a small seeded sample here (`SAMPLES`): inputs a few hundred
elements big (small enough for numba's CUDA simulator, big enough to cross a block or two)
and a comparison. The reference result is computed on the coordinator, so a node whose
NumPy, numba or GPU disagrees with it shows up, on the "scalar" backend (the node's NumPy)
as well as "cpu" (numba) and "gpu" (numba-cuda). GPU backends are skipped on nodes without
GPU slots, and kernels without a sample are skipped, both saying so. A user's kernel gives
its sample with ``@<kernel>.sample`` (`kernels/registry.py`): a function of a seeded NumPy
generator that returns the args of one small call.

Tolerances: integer results must be equal; floating-point results within a relative 1e-6
(summation order differs between backends; the inputs are float64); `mc_pi`, whose backends
use different random generators by design, within six standard errors of pi.
"""

from __future__ import annotations

import asyncio
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from batuta.core.task import Backend, Task, TaskStatus, gpu_capability
from batuta.stack.model import KernelResult, backend_order
from batuta.stack.nodes import NodeSession, result_error

RTOL = 1e-6
ATOL = 1e-9
TIMED_OUT = "timed out after"  # how a kernel's result detail begins when it ran past --timeout
_SEED = 20261128
_MC_PI_SAMPLES = 20_000

Compare = Callable[[Any, Any], str]  # (got, want) -> "" when they agree, else why not


def _close(got: Any, want: Any, where: str = "result") -> str:
    """ "" when `got` equals `want` within the tolerances (recursively), else the first difference."""
    if isinstance(want, tuple | list):
        if not isinstance(got, tuple | list) or len(got) != len(want):
            return f"{where}: expected a sequence of {len(want)}, got {type(got).__name__}"
        for index, (g, w) in enumerate(zip(got, want, strict=True)):
            problem = _close(g, w, f"{where}[{index}]")
            if problem:
                return problem
        return ""
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return f"{where}: expected keys {sorted(want)}"
        return next((p for k in want if (p := _close(got[k], want[k], f"{where}[{k!r}]"))), "")
    if isinstance(want, np.ndarray) or isinstance(got, np.ndarray):
        g, w = np.asarray(got), np.asarray(want)
        if g.shape != w.shape:
            return f"{where}: shape {g.shape}, expected {w.shape}"
        if w.dtype.kind in "biu" and g.dtype.kind in "biu":
            wrong = int(np.count_nonzero(g != w))
            return f"{where}: {wrong} of {w.size} values differ" if wrong else ""
        if g.dtype.kind not in "biuf" or w.dtype.kind not in "biuf":
            return "" if np.array_equal(g, w) else f"{where}: values differ"
        g64, w64 = g.astype(np.float64), w.astype(np.float64)
        scale = float(np.max(np.abs(w64))) if w64.size else 0.0
        if np.allclose(g64, w64, rtol=RTOL, atol=ATOL * max(1.0, scale), equal_nan=True):
            return ""
        error = float(np.max(np.abs(g64 - w64)))
        return f"{where}: max abs error {error:.3g} (scale {scale:.3g}, rtol {RTOL:g})"
    if isinstance(want, bool | int | np.integer) and isinstance(got, bool | int | np.integer):
        return "" if int(got) == int(want) else f"{where}: {got}, expected {want}"
    if isinstance(want, float | np.floating) and isinstance(got, float | int | np.floating | np.integer):
        if math.isclose(float(got), float(want), rel_tol=RTOL, abs_tol=ATOL) or (
            math.isnan(float(got)) and math.isnan(float(want))
        ):
            return ""
        return f"{where}: {float(got)!r}, expected {float(want)!r}"
    return "" if got == want else f"{where}: {got!r}, expected {want!r}"


def _near_pi(samples: int) -> Compare:
    bound = 6 * 1.64 / math.sqrt(samples)

    def compare(got: Any, want: Any) -> str:
        if not isinstance(got, float | np.floating):
            return f"result: expected a float, got {type(got).__name__}"
        if abs(float(got) - math.pi) > bound:
            return f"estimate {float(got):.5f} is more than {bound:.3f} from pi (reference {float(want):.5f})"
        return ""

    return compare


_SPIN_SLACK_S = 5.0  # a busy node may deschedule the spinning slot; longer than this is a fault


def _spun(seconds: float) -> Compare:
    """`spin` and `burn` return the time (wall or CPU) their own loop compared with `seconds`:
    never less, exactly."""

    def compare(got: Any, want: Any) -> str:
        if not isinstance(got, float | np.floating) or not seconds <= float(got) < seconds + _SPIN_SLACK_S:
            return f"ran {got!r} s, expected at least {seconds} s and under {seconds + _SPIN_SLACK_S:g} s"
        return ""

    return compare


@dataclass(frozen=True, slots=True)
class Sample:
    """Inputs for one kernel, and how to compare a backend's answer with the reference's."""

    args: tuple[Any, ...]
    compare: Compare = _close


def _vectors(rng: np.random.Generator, n: int, count: int) -> list[np.ndarray]:
    return [rng.standard_normal(n) * 10 for _ in range(count)]


def _rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return rng.standard_normal((n, d)) * 3 + rng.integers(-5, 5, (n, 1))


def _labelled(rng: np.random.Generator, n: int, d: int, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((n, d))
    y = ((x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5)) % classes
    return x, y


def _mlp_params(rng: np.random.Generator, d: int, h: int, c: int) -> tuple[np.ndarray, ...]:
    return (
        rng.standard_normal((d, h)) * 0.4,
        rng.standard_normal(h) * 0.1,
        rng.standard_normal((h, c)) * 0.4,
        rng.standard_normal(c) * 0.1,
    )


def _tree_predict(rng: np.random.Generator) -> Sample:
    from batuta.kernels import registry

    x, y = _labelled(rng, 150, 4)
    tree = registry.reference("tree_fit", (x, y, 5, 5, 2))
    return Sample((*tree, x))


_BUILDERS: dict[str, Callable[[np.random.Generator], Sample]] = {
    "noop": lambda rng: Sample((42,)),
    "spin": lambda rng: Sample((0.002,), _spun(0.002)),
    "burn": lambda rng: Sample((0.002,), _spun(0.002)),
    "vadd": lambda rng: Sample(tuple(_vectors(rng, 1000, 2))),
    "saxpy": lambda rng: Sample((1.5, *_vectors(rng, 1000, 2))),
    "sum": lambda rng: Sample(tuple(_vectors(rng, 1000, 1))),
    "dot": lambda rng: Sample(tuple(_vectors(rng, 1000, 2))),
    "histogram": lambda rng: Sample((rng.standard_normal(1000), 16, -3.0, 3.0)),
    "mc_pi": lambda rng: Sample((_MC_PI_SAMPLES, 7), _near_pi(_MC_PI_SAMPLES)),
    "matmul": lambda rng: Sample((rng.standard_normal((24, 16)), rng.standard_normal((16, 20)))),
    "pairwise_distances": lambda rng: Sample((rng.standard_normal((20, 5)), rng.standard_normal((15, 5)))),
    "kmeans_partial": lambda rng: Sample((_rows(rng, 200, 4), _rows(rng, 3, 4))),
    "linreg_partial": lambda rng: Sample((rng.standard_normal((200, 4)), rng.standard_normal(200))),
    "tree_fit": lambda rng: Sample((*_labelled(rng, 150, 4), 5, 5, 2)),
    "tree_predict": _tree_predict,
    "mlp_grad": lambda rng: Sample((*_mlp_params(rng, 4, 5, 3), *_labelled(rng, 60, 4))),
    "kmeans_partial_synth": lambda rng: Sample(
        (11, 100, 300, rng.standard_normal((3, 4)) * 4, 1.0, rng.standard_normal((3, 4)))
    ),
    "linreg_partial_synth": lambda rng: Sample((11, 5, 300, rng.standard_normal(5), 0.1)),
    "tree_fit_synth": lambda rng: Sample((11, 200, 50, rng.standard_normal((6, 3)), 0.3, 99, 6, 3)),
    "mlp_grad_synth": lambda rng: Sample((*_mlp_params(rng, 6, 5, 3), 11, 3, 200, rng.standard_normal((6, 3)), 0.3)),
}


def sample(name: str) -> Sample | None:
    """The seeded sample of kernel `name` (the same on every call), or None if it has none:
    a built-in's from `_BUILDERS`, a user kernel's from its ``@<kernel>.sample`` function.
    Raises what that function raised."""
    rng = np.random.default_rng(_SEED + zlib.crc32(name.encode()))
    build = _BUILDERS.get(name)
    if build is not None:
        return build(rng)
    from batuta.kernels import registry

    args = registry.lookup(name).sample_args(rng)
    return Sample(args) if args is not None else None


def kernels_to_check() -> list[tuple[str, tuple[str, ...]]]:
    """(name, backends) of every kernel registered on the coordinator, the stack's own excluded."""
    from batuta import kernels

    found = []
    for name in kernels.names():
        info = kernels.info(name)
        if not info.module.startswith("batuta.stack"):
            found.append((name, info.backends))
    return found


@dataclass(frozen=True, slots=True)
class _Planned:
    name: str
    backend: str  # "scalar", "cpu", "gpu", or "gpu:N" on a node of several GPUs (each is checked)
    sample: Sample
    want: Any


def _gpu_labels(session: NodeSession) -> list[str]:
    """The GPU backends to check on `session`'s node: "gpu", or one "gpu:N" per GPU where it has several."""
    indices = session.gpu_indices
    return [gpu_capability(i) for i in indices] if len(indices) > 1 else ["gpu"]


async def run_conformance(session: NodeSession, *, timeout: float) -> list[KernelResult]:
    """Every kernel on every backend of `session`'s node, compared with the coordinator's reference."""
    node = session.target.name
    results: list[KernelResult] = []
    planned: list[_Planned] = []
    for name, backends in kernels_to_check():
        try:
            found = sample(name)
        except Exception as exc:  # the user's sample function failed: say so, run nothing
            detail = f"its sample failed on the coordinator: {type(exc).__name__}: {exc}"
            results.extend(
                KernelResult(node=node, kernel=name, backend=b, status="error", detail=detail) for b in backends
            )
            continue
        if found is None:
            detail = "no sample inputs (a function of a seeded rng returning its args, decorated @<kernel>.sample)"
            results.extend(
                KernelResult(node=node, kernel=name, backend=b, status="skip", detail=detail) for b in backends
            )
            continue
        try:
            from batuta.kernels import registry

            want = registry.reference(name, found.args)
        except Exception as exc:  # the coordinator's own reference failed: say so, run nothing
            detail = f"reference failed on the coordinator: {type(exc).__name__}: {exc}"
            results.extend(
                KernelResult(node=node, kernel=name, backend=b, status="error", detail=detail) for b in backends
            )
            continue
        for backend in backends:
            if backend == "gpu" and session.gpu_slots == 0:
                results.append(
                    KernelResult(
                        node=node, kernel=name, backend=backend, status="skip", detail="no GPU slots on this node"
                    )
                )
                continue
            if backend == "gpu":
                planned.extend(_Planned(name, label, found, want) for label in _gpu_labels(session))
            else:
                planned.append(_Planned(name, backend, found, want))

    async def run_one(plan: _Planned) -> KernelResult:
        started = time.perf_counter()
        backend, _, index = plan.backend.partition(":")
        requires = [plan.backend] if index else []  # "gpu:N": that GPU's slot
        task = Task.kernel(
            plan.name, *plan.sample.args, backend=Backend(backend), requires=requires, label=f"stack:{plan.name}"
        )
        result = await session.run(task, timeout=timeout)
        seconds = result.duration or (time.perf_counter() - started)
        if result.status is not TaskStatus.SUCCEEDED:
            detail = result_error(result)
            if result.status is TaskStatus.TIMED_OUT and not detail.startswith(TIMED_OUT):
                detail = f"{TIMED_OUT} {timeout:g} s: {detail}"
            return KernelResult(
                node=node,
                kernel=plan.name,
                backend=plan.backend,
                status="error",
                detail=detail,
                seconds=seconds,
            )
        try:
            problem = plan.sample.compare(result.value, plan.want)
        except Exception as exc:  # a comparison that cannot even be made is a difference
            problem = f"cannot compare: {type(exc).__name__}: {exc}"
        return KernelResult(
            node=node,
            kernel=plan.name,
            backend=plan.backend,
            status="fail" if problem else "pass",
            detail=problem,
            seconds=seconds,
        )

    results.extend(await asyncio.gather(*(run_one(p) for p in planned)))
    order = {name: i for i, (name, _) in enumerate(kernels_to_check())}
    results.sort(key=lambda r: (order.get(r.kernel, len(order)), backend_order(r.backend)))
    return results
