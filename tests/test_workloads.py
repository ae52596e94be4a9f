"""The four ML workloads (`batuta.jobs.kmeans`, `linreg`, `forest`, `mlp`) on a real 2-slot pool.

Each runs at a small size and is checked against its single-process reference: K-means and
the forest in every bit, linear regression against `np.linalg.lstsq`, the MLP's loss curve
and weights within rounding. Each also runs on the caller's own arrays (shipped in chunks
rather than generated on the workers) and must give the same result; K-means and the MLP
also resume from their checkpoints to the same bits.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from batuta import Pool
from batuta.errors import UsageError
from batuta.jobs import builtin_job_names, forest, kmeans, linreg, load_job, mlp
from batuta.observers.checkpoint import CheckpointManager

pytestmark = pytest.mark.timeout(90)
in_module_loop = pytest.mark.asyncio(loop_scope="module")  # the async tests share one pool


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool() -> AsyncIterator[Pool]:
    async with Pool.local(2, gpu_workers="none") as p:
        yield p


def test_the_workloads_are_built_in_jobs() -> None:
    assert {"forest", "kmeans", "linreg", "mlp"} <= set(builtin_job_names())
    for name in ("forest", "kmeans", "linreg", "mlp"):
        assert load_job(name).origin == "built-in"


KM = {"n": 20_000, "d": 5, "k": 6, "iterations": 6, "chunks": 5}


@in_module_loop
async def test_kmeans_equals_the_single_process_reference_in_every_bit(pool: Pool) -> None:
    result = await kmeans.run_kmeans(pool, **KM)  # type: ignore[arg-type]
    centroids, inertia = kmeans.reference_of(result)
    np.testing.assert_array_equal(result.centroids, centroids)
    assert result.inertia == inertia
    assert all(b <= a for a, b in itertools.pairwise(inertia))  # Lloyd never increases it
    assert result.tasks == KM["iterations"] * KM["chunks"] and len(result.bounds) == KM["chunks"]
    assert result.counts.sum() == KM["n"]

    assert result.data is not None
    rows = result.data.rows(0, KM["n"])
    shipped = await kmeans.run_kmeans(pool, k=6, iterations=6, chunks=5, x=rows)
    np.testing.assert_array_equal(shipped.centroids, result.centroids)
    assert shipped.inertia == result.inertia


@in_module_loop
async def test_kmeans_resumes_from_its_checkpoint_to_the_same_bits(pool: Pool, tmp_path: Path) -> None:
    straight = await kmeans.run_kmeans(pool, **KM)  # type: ignore[arg-type]
    manager = CheckpointManager(tmp_path / "checkpoints")
    first = await kmeans.run_kmeans(pool, **{**KM, "iterations": 2}, checkpoints=manager)  # type: ignore[arg-type]
    assert first.resumed_from is None and len(first.inertia) == 2
    resumed = await kmeans.run_kmeans(pool, **KM, checkpoints=manager)  # type: ignore[arg-type]
    assert resumed.resumed_from == 2 and resumed.tasks == (KM["iterations"] - 2) * KM["chunks"]
    np.testing.assert_array_equal(resumed.centroids, straight.centroids)
    assert resumed.inertia == straight.inertia
    with pytest.raises(UsageError, match="other parameters"):
        await kmeans.run_kmeans(pool, **{**KM, "k": 7}, checkpoints=manager)  # type: ignore[arg-type]


@in_module_loop
async def test_linreg_matches_lstsq(pool: Pool) -> None:
    result = await linreg.run_linreg(pool, n=30_000, d=12, chunks=7)
    assert result.data is not None
    x, y = result.data.rows(0, 30_000)
    np.testing.assert_allclose(result.coef, linreg.lstsq_reference(x, y), rtol=0, atol=1e-10)
    assert np.abs(result.coef - result.data.coef).max() < 0.01  # recovers the generating coefficients
    shipped = await linreg.run_linreg(pool, x=x, y=y, chunks=7)
    np.testing.assert_array_equal(shipped.coef, result.coef)  # the same rows, the same kernel
    with pytest.raises(UsageError, match="singular"):
        await linreg.run_linreg(pool, x=np.ones((50, 2), np.float32), y=np.ones(50, np.float32))


FOREST = {"n_train": 2_000, "n_test": 600, "d": 6, "classes": 3, "trees": 6, "max_depth": 8}


@in_module_loop
async def test_forest_equals_the_in_process_forest(pool: Pool) -> None:
    result = await forest.run_forest(pool, **FOREST)  # type: ignore[arg-type]
    assert len(result.trees) == FOREST["trees"] and result.predictions.shape == (6, 600)
    reference = forest.reference_forest(result, max_depth=8, features_per_split=2)
    for tree, ref in zip(result.trees, reference, strict=True):
        assert forest.same_trees(tree, tuple(ref[:5]))
    assert result.data is not None
    labels = result.data.rows(2_000, 600)[1]
    ref_votes = forest.vote(np.stack([r[5] for r in reference]), 3)
    assert result.accuracy == float((ref_votes == labels).mean())
    single = max(float((p == labels).mean()) for p in result.predictions)
    assert result.accuracy > 0.6 and result.accuracy >= single - 0.05  # the forest is no worse than its trees

    x, y = result.data.rows(0, 2_000)
    x_test, y_test = result.data.rows(2_000, 600)
    shipped = await forest.run_forest(pool, max_depth=8, trees=6, x=x, y=y, x_test=x_test, y_test=y_test)
    for a, b in zip(shipped.trees, result.trees, strict=True):
        assert forest.same_trees(a, b)
    np.testing.assert_array_equal(shipped.votes, result.votes)


def test_vote_breaks_ties_towards_the_lowest_class() -> None:
    predictions = np.array([[0.0, 2.0, 1.0], [1.0, 2.0, 1.0], [1.0, 0.0, 2.0], [0.0, 0.0, 2.0]])
    np.testing.assert_array_equal(forest.vote(predictions, 3), [0, 0, 1])


MLP = {"n": 3_000, "d": 8, "hidden": 16, "classes": 3, "steps": 8, "chunks": 4}


@in_module_loop
async def test_mlp_matches_full_batch_training_in_one_process(pool: Pool, tmp_path: Path) -> None:
    result = await mlp.run_mlp(pool, **MLP)  # type: ignore[arg-type]
    assert result.data is not None
    x, y = result.data.rows(0, MLP["n"])
    params, losses = mlp.mlp_reference(x, y, result.initial, MLP["steps"], mlp.LR)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-11)
    for got, want in zip(result.params, params, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-11)
    assert result.losses[-1] < result.losses[0]

    shipped = await mlp.run_mlp(pool, hidden=16, steps=8, chunks=4, classes=3, x=x, y=y)
    assert shipped.losses == result.losses

    manager = CheckpointManager(tmp_path / "checkpoints")
    await mlp.run_mlp(pool, **{**MLP, "steps": 3}, checkpoints=manager)  # type: ignore[arg-type]
    resumed = await mlp.run_mlp(pool, **MLP, checkpoints=manager)  # type: ignore[arg-type]
    assert resumed.resumed_from == 3 and resumed.losses == result.losses
