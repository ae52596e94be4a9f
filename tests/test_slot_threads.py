"""Per-slot thread budgets: numba and BLAS get the slot's share of the cores, not all of them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np  # noqa: F401  # BLAS is loaded in this process too, as in a user's
import pytest

from batuta import Pool, Task
from batuta.agent.threads import BLAS_THREADS_ENV, budget_env, slot_share
from tests.test_pool import make_pool

CORES = os.cpu_count() or 1
needs_two_cores = pytest.mark.skipif(CORES < 2, reason="a share differs from the default only with 2+ cores")


def test_the_share_divides_the_cores_and_is_at_least_one() -> None:
    assert slot_share(4, cores=16) == 4
    assert slot_share(3, cores=16) == 5
    assert slot_share(32, cores=16) == 1
    assert slot_share(0, cores=8) == 8


def test_budget_env_keeps_what_the_user_set() -> None:
    assert budget_env({}, 3) == {"NUMBA_NUM_THREADS": "3", **{name: "3" for name in BLAS_THREADS_ENV}}
    assert budget_env({"NUMBA_NUM_THREADS": "8"}, 3) == {name: "3" for name in BLAS_THREADS_ENV}
    assert budget_env({"MKL_NUM_THREADS": "8"}, 3) == {"NUMBA_NUM_THREADS": "3"}


def _clear_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NUMBA_NUM_THREADS", *BLAS_THREADS_ENV):
        monkeypatch.delenv(name, raising=False)


@needs_two_cores
@pytest.mark.parametrize("spawn", ["fork", "exec"])
async def test_each_cpu_slot_gets_its_share_of_the_cores(monkeypatch: pytest.MonkeyPatch, spawn: str) -> None:
    _clear_budgets(monkeypatch)
    monkeypatch.setenv("BATUTA_SLOT_SPAWN", spawn)
    share = CORES // 2
    async with make_pool(slots=2) as pool:
        results = [await pool.run(Task.kernel("test_threads")) for _ in range(4)]
    assert all(r.is_success() for r in results), [r.error for r in results]
    assert {tuple(r.value) for r in results} == {(str(share), share)}


@needs_two_cores
async def test_a_budget_the_user_set_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_budgets(monkeypatch)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", str(CORES))
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")
    async with make_pool(slots=2) as pool:
        result = await pool.run(Task.kernel("test_threads"))
    assert result.is_success(), result.error
    assert tuple(result.value) == ("1", CORES)


NUMBA_AT_IMPORT = """
import numba
from batuta import kernel


@kernel("st_numba_threads")
def st_numba_threads():
    from numba.np.ufunc import parallel

    return [numba.get_num_threads(), parallel.NUM_THREADS]
"""


@needs_two_cores
async def test_a_slot_caps_numba_that_the_agent_imported_with_a_users_module(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A shipped module importing numba made the agent import it before forking its slots:
    numba had read the agent's thread count, and every slot's parallel loops used every core."""
    from batuta.kernels import registry

    _clear_budgets(monkeypatch)
    module = tmp_path / "st_numba_mod.py"
    module.write_text(NUMBA_AT_IMPORT)
    try:
        async with Pool.local(2, gpu_workers="none", modules=[str(module)]) as pool:
            result = await pool.run(Task.kernel("st_numba_threads"))
    finally:
        registry.forget_modules(["st_numba_mod"])
    assert result.is_success(), result.error
    assert result.value == [CORES // 2, CORES // 2]
