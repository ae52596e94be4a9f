"""Random forest over the pool: one task per tree, then a majority vote on the coordinator.

Each task grows one classification tree (`tree_fit`: Gini splits on a bootstrap sample, a
random subset of features per split) from its own seed and predicts the test rows with it;
the coordinator takes the majority of the trees' votes (lowest class on ties). The data are
the seeded `_data.Teacher` rows, generated where each task runs (`tree_fit_synth`: rows
[0, n_train) to train, the next n_test to test), or the caller's arrays, shipped
(`tree_fit`, then `tree_predict`).

The trees are exact functions of their seeds (integer split scores, a counter-based
generator), so the check grows a reference forest in this process with the same kernels and
seeds and expects the same trees, node for node, and the same accuracy.

`batuta run forest` runs the default problem and prints that check.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from batuta import Backend
from batuta.errors import UsageError
from batuta.jobs._data import Teacher, job_backend, make_teacher, positive, sub_seed
from batuta.kernels import registry

if TYPE_CHECKING:
    from batuta import Pool
    from batuta.kernels.ml import Tree

N_TRAIN, N_TEST, D, CLASSES, TREES, MAX_DEPTH, SEED = 20_000, 5_000, 16, 4, 16, 12, 0
"""The default problem: about 1 s of kernel time on one core."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ForestResult:
    trees: tuple[Tree, ...]
    predictions: np.ndarray
    """(trees, n_test) float64: each tree's predicted class for each test row."""
    votes: np.ndarray
    """(n_test,) int64: the forest's prediction (majority of the trees, lowest class on ties)."""
    accuracy: float
    tree_seeds: tuple[int, ...]
    wall_s: float
    tasks: int
    data: Teacher | None
    """The generated data set, or None when the caller passed the arrays."""


def tree_seeds(seed: int, trees: int) -> tuple[int, ...]:
    return tuple(sub_seed(seed, 1000 + i) for i in range(trees))


def vote(predictions: np.ndarray, classes: int) -> np.ndarray:
    """Majority over axis 0 of integer-valued `predictions`; ties go to the lowest class."""
    labels = predictions.astype(np.int64)
    counts = np.stack([(labels == c).sum(axis=0) for c in range(classes)])
    return counts.argmax(axis=0)


async def run_forest(
    pool: Pool,
    *,
    n_train: int = N_TRAIN,
    n_test: int = N_TEST,
    d: int = D,
    classes: int = CLASSES,
    trees: int = TREES,
    max_depth: int = MAX_DEPTH,
    features_per_split: int | None = None,
    seed: int = SEED,
    noise: float = 0.5,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    backend: Backend = Backend.CPU,
) -> ForestResult:
    """Grow `trees` trees over the pool and score the forest on the test rows.

    Without arrays, the data are seeded teacher rows with `d` features and `classes` classes.
    With them, `x`/`y` train (float rows, integer labels 0..C-1) and `x_test`/`y_test` test.
    `features_per_split` defaults to round(sqrt(d)).
    """
    started = time.perf_counter()
    positive("trees", trees)
    seeds = tree_seeds(seed, trees)
    given = [a is not None for a in (x, y, x_test, y_test)]
    data: Teacher | None = None
    if any(given):
        if not all(given):
            raise UsageError("pass all of x, y, x_test and y_test, or none (for the seeded data set)")
        assert x is not None and y is not None and x_test is not None and y_test is not None
        d = x.shape[1]
        mtry = features_per_split or max(1, round(math.sqrt(d)))
        classes = int(max(y.max(), y_test.max())) + 1
        grown = await pool.map("tree_fit", [(x, y, s, max_depth, mtry) for s in seeds], backend=backend)
        fitted = [tuple(t) for t in grown]
        predicted = await pool.map("tree_predict", [(*t, x_test) for t in fitted], backend=backend)
        labels = y_test
        tasks = 2 * trees
    else:
        data = make_teacher(seed, positive("n_train", n_train) + positive("n_test", n_test), d, classes, noise)
        mtry = features_per_split or max(1, round(math.sqrt(d)))
        items = [(data.seed, n_train, n_test, data.weights, data.noise, s, max_depth, mtry) for s in seeds]
        grown = await pool.map("tree_fit_synth", items, backend=backend)
        fitted = [tuple(t[:5]) for t in grown]
        predicted = [t[5] for t in grown]
        labels = data.rows(n_train, n_test)[1]
        tasks = trees
    predictions = np.stack(predicted)
    votes = vote(predictions, classes)
    return ForestResult(
        trees=tuple(fitted),
        predictions=predictions,
        votes=votes,
        accuracy=float((votes == labels).mean()),
        tree_seeds=seeds,
        wall_s=time.perf_counter() - started,
        tasks=tasks,
        data=data,
    )


def reference_forest(
    result: ForestResult, *, max_depth: int, features_per_split: int, trees: int | None = None
) -> list[Any]:
    """Grow (the first `trees` of) the same forest in this process with the CPU kernels."""
    data = result.data
    if data is None:
        raise UsageError("reference_forest rebuilds the seeded data set only")
    n_test = result.predictions.shape[1]
    n_train = data.n - n_test
    return [
        registry.run(
            "tree_fit_synth",
            "cpu",
            (data.seed, n_train, n_test, data.weights, data.noise, s, max_depth, features_per_split),
        )
        for s in result.tree_seeds[:trees]
    ]


def same_trees(a: Tree, b: Tree) -> bool:
    return all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))


async def main(pool: Pool) -> str:
    result = await run_forest(pool)
    mtry = max(1, round(math.sqrt(D)))
    reference = await asyncio.to_thread(reference_forest, result, max_depth=MAX_DEPTH, features_per_split=mtry)
    identical = all(same_trees(t, tuple(r[:5])) for t, r in zip(result.trees, reference, strict=True))
    assert result.data is not None
    labels = result.data.rows(N_TRAIN, N_TEST)[1]
    reference_accuracy = float((vote(np.stack([r[5] for r in reference]), CLASSES) == labels).mean())
    single = float((result.predictions[0] == labels).mean())
    print(
        f"random forest check: {TREES} trees {'identical to' if identical else 'DIFFERENT from'} the in-process "
        f"forest; accuracy {result.accuracy:.4f} (reference {reference_accuracy:.4f}; one tree {single:.4f})"
    )
    if not identical or result.accuracy != reference_accuracy:
        raise AssertionError("the forest differs from the in-process reference forest")
    nodes = sum(len(t[0]) for t in result.trees)
    # --backend gpu is not refused: the other built-in jobs take it, and this one says where it ran
    where = " (on the CPU slots: the tree kernels have no GPU variant)" if job_backend() is Backend.GPU else ""
    return (
        f"random forest: {TREES} trees ({nodes:,} nodes) on {N_TRAIN:,} x {D} rows in {result.wall_s:.2f} s"
        f"{where}; test accuracy {result.accuracy:.4f}, equal to the in-process forest"
    )
