"""A neural network trained data-parallel over the pool: full-batch gradient descent.

The model is a one-hidden-layer MLP (tanh, softmax cross-entropy). Each step maps `mlp_grad`
over the chunks with the current weights; every task returns its chunk's loss and gradients
summed over its rows, the coordinator adds them in chunk order, divides by the row count and
takes a gradient step ``w -= lr * g``. That is exactly full-batch gradient descent, so the
check runs the same schedule in one process on all rows (`mlp_reference`) and expects the
same loss curve and weights within rounding: the two sum the gradients in different orders,
nothing else. The data are the seeded `_data.Teacher` rows, generated where each task runs
(`mlp_grad_synth`), or the caller's x and y, shipped in chunks (`mlp_grad`).

With a checkpoint manager (`batuta run mlp --journal DIR`) the weights are saved after every
step and a resumed run continues from the last one.

`batuta run mlp` runs the default problem and prints that check.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from batuta import Backend, ObjectRef
from batuta.errors import UsageError
from batuta.jobs._data import Bounds, Teacher, job_backend, make_teacher, positive, resolve_chunks, sub_seed
from batuta.kernels import registry

if TYPE_CHECKING:
    from batuta import Pool
    from batuta.observers.checkpoint import CheckpointManager

N, D, HIDDEN, CLASSES, STEPS, LR, SEED = 10_000, 32, 64, 4, 25, 0.5, 0
"""The default problem: about half a second of kernel time on one core."""

Params = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""(w1 (d, hidden), b1 (hidden,), w2 (hidden, classes), b2 (classes,)), float64."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MLPResult:
    params: Params
    """The weights after the last step."""
    losses: tuple[float, ...]
    """Mean cross-entropy over all rows at the start of each step."""
    initial: Params
    bounds: Bounds
    wall_s: float
    tasks: int
    data: Teacher | None
    resumed_from: int | None = None


def initial_params(seed: int, d: int, hidden: int, classes: int) -> Params:
    """Seeded weights scaled by 1/sqrt(fan-in), zero biases."""
    rng = np.random.default_rng(sub_seed(seed, 5))
    return (
        rng.standard_normal((d, hidden)) / np.sqrt(d),
        np.zeros(hidden),
        rng.standard_normal((hidden, classes)) / np.sqrt(hidden),
        np.zeros(classes),
    )


def step(params: Params, partials: list[Any], n: int, lr: float) -> tuple[Params, float]:
    """Add the chunks' (loss, gradients) in order, average over `n` rows, take one step."""
    loss = float(partials[0][0])
    grads = [g.copy() for g in partials[0][1:]]
    for part in partials[1:]:
        loss += float(part[0])
        for total, g in zip(grads, part[1:], strict=True):
            total += g
    w1, b1, w2, b2 = (w - lr * (g / n) for w, g in zip(params, grads, strict=True))
    return (w1, b1, w2, b2), loss / n


async def run_mlp(
    pool: Pool,
    *,
    n: int = N,
    d: int = D,
    hidden: int = HIDDEN,
    classes: int = CLASSES,
    steps: int = STEPS,
    lr: float = LR,
    seed: int = SEED,
    noise: float = 0.5,
    chunks: int | None = None,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    backend: Backend | None = None,
    checkpoints: CheckpointManager | None = None,
) -> MLPResult:
    """`steps` of full-batch gradient descent with learning rate `lr`, data-parallel over the pool.

    Without x and y the data are `n` seeded teacher rows (`d` features, `classes` classes);
    with them (float rows, integer labels 0..classes-1) the rows are put in the pool in
    chunks, once. `backend` defaults to the job backend (`--backend`, CPU); on GPU the chunks
    (one per GPU slot by default) are put once and stay on the cards across steps, so a
    step moves only the weights.
    """
    backend = backend if backend is not None else job_backend()
    positive("hidden", hidden)
    positive("steps", steps, minimum=0)
    if (x is None) != (y is None):
        raise UsageError("pass both x and y, or neither (for the seeded data set)")
    data: Teacher | None = None
    if x is not None and y is not None:
        n, d = x.shape
        classes = max(classes, int(y.max()) + 1)
    else:
        data = make_teacher(seed, positive("n", n), positive("d", d), positive("classes", classes, 2), noise)
    bounds = resolve_chunks(pool, n, chunks, backend)
    initial = initial_params(seed, d, hidden, classes)
    params, losses, first = initial, [], 0
    settings = {"n": n, "d": d, "hidden": hidden, "classes": classes, "lr": lr, "seed": seed}
    if checkpoints is not None and (last := await checkpoints.latest()) is not None:
        if last.state.get("settings") != settings:
            raise UsageError(
                f"checkpoint {last.name!r} was saved by an MLP run with other settings; resume with the same "
                "ones, or start afresh without --resume"
            )
        w1, b1, w2, b2 = (np.asarray(w, dtype=np.float64) for w in last.state["params"])
        params = (w1, b1, w2, b2)
        losses, first = [float(v) for v in last.state["losses"]], int(last.state["step"]) + 1
    started = time.perf_counter()
    tasks = 0
    resident: list[tuple[ObjectRef, ObjectRef]] = []  # (x, y) chunks put once
    if x is not None and y is not None:
        resident = [(pool.put(x[s : s + c]), pool.put(y[s : s + c])) for s, c in bounds]
    elif data is not None and backend is Backend.GPU and first < steps:
        resident = [(pool.put(xs), pool.put(ys)) for xs, ys in (data.rows(s, c) for s, c in bounds)]
    try:
        for index in range(first, steps):
            if resident:
                items = [(*params, xs, ys) for xs, ys in resident]
                partials = await pool.map("mlp_grad", items, backend=backend)
            else:
                assert data is not None
                items = [(*params, *data.recipe(s, c)) for s, c in bounds]
                partials = await pool.map("mlp_grad_synth", items, backend=backend)
            tasks += len(items)
            params, loss = step(params, partials, n, lr)
            losses.append(loss)
            if checkpoints is not None:
                state = {"step": index, "params": list(params), "losses": losses, "settings": settings}
                await checkpoints.save(f"mlp_{index:06d}", state)
    finally:
        for pair in resident:
            for ref in pair:
                pool.drop(ref)
    return MLPResult(
        params=params,
        losses=tuple(losses),
        initial=initial,
        bounds=bounds,
        wall_s=time.perf_counter() - started,
        tasks=tasks,
        data=data,
        resumed_from=first or None,
    )


def mlp_reference(x: np.ndarray, y: np.ndarray, initial: Params, steps: int, lr: float) -> tuple[Params, tuple]:
    """The same schedule in one process on all rows at once, with the NumPy reference kernel."""
    params, losses = initial, []
    for _ in range(steps):
        params, loss = step(params, [registry.reference("mlp_grad", (*params, x, y))], x.shape[0], lr)
        losses.append(loss)
    return params, tuple(losses)


def accuracy(params: Params, x: np.ndarray, y: np.ndarray) -> float:
    w1, b1, w2, b2 = params
    return float(((np.tanh(x @ w1 + b1) @ w2 + b2).argmax(axis=1) == y).mean())


GPU_TOLERANCE = 1e-6
"""On GPUs the gradients are summed in another order than NumPy's (blocks, then atomics or a
tree): the check allows this much absolute difference in losses and weights."""


async def main(pool: Pool) -> str:
    from batuta.observers.checkpoint import job_checkpoints

    result = await run_mlp(pool, checkpoints=job_checkpoints())
    assert result.data is not None
    x, y = result.data.rows(0, N)
    params, losses = await asyncio.to_thread(mlp_reference, x, y, result.initial, STEPS, LR)
    loss_diff = max(abs(a - b) for a, b in zip(result.losses, losses, strict=True))
    weight_diff = max(float(np.abs(a - b).max()) for a, b in zip(result.params, params, strict=True))
    print(
        f"MLP check: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; vs the single-process full-batch "
        f"reference: max |loss diff| {loss_diff:.2g}, max |weight diff| {weight_diff:.2g}"
    )
    tolerance = GPU_TOLERANCE if job_backend() is Backend.GPU else 1e-9
    if not (loss_diff <= tolerance and weight_diff <= tolerance):
        raise AssertionError("data-parallel training differs from the single-process reference")
    return (
        f"MLP {D}-{HIDDEN}-{CLASSES}: {STEPS} full-batch steps on {N:,} rows in {len(result.bounds)} chunks "
        f"({result.wall_s:.2f} s); train accuracy {accuracy(result.params, x, y):.3f}; matches the reference"
    )
