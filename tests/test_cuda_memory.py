"""The pooled device allocator (kernels/cuda_memory.py): named right here, exercised on a GPU.

The allocator only runs against a real CUDA driver (numba's simulator has no device memory
to pool), so its checks run with ``BATUTA_REAL_GPU=1``, in a subprocess that selects it the
way a GPU slot does, through ``NUMBA_CUDA_MEMORY_MANAGER``:

    BATUTA_REAL_GPU=1 .venv/bin/python -m pytest -q tests/test_cuda_memory.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from batuta.agent.main import MEMORY_MANAGER, POOLED_MEMORY_MANAGER

REPO_ROOT = Path(__file__).resolve().parent.parent
REAL_GPU = os.environ.get("BATUTA_REAL_GPU") == "1"


def test_the_name_gpu_slots_are_given_is_the_allocator_module() -> None:
    assert MEMORY_MANAGER == "NUMBA_CUDA_MEMORY_MANAGER"
    spec = importlib.util.find_spec(POOLED_MEMORY_MANAGER)
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).resolve() == (REPO_ROOT / "kernels" / "cuda_memory.py").resolve()


CHECKS = textwrap.dedent(
    """
    import json, threading
    import numpy as np
    from numba import cuda
    from batuta.kernels import registry
    from batuta.kernels.cuda_memory import PooledMemoryManager, pool_stats

    out = {}
    ctx = cuda.current_context()
    out["manager"] = type(ctx.memory_manager).__name__
    total = ctx.get_memory_info().total
    free_before = ctx.get_memory_info().free

    # a chain of device-resident stages, each allocating its result: the pool serves them
    n = 64 << 20  # 256 MiB of float32 per array
    host = np.arange(n, dtype=np.float32) % 1000
    x = cuda.to_device(host)
    for _ in range(10):
        x = registry.run("vadd", "gpu", (x, x), device_results=True)
    cuda.synchronize()
    expected = (host * 1024).astype(np.float32)
    out["chain_ok"] = bool(np.array_equal(x.copy_to_host(), expected))
    del x
    cuda.synchronize()
    out["free_after_frees_over_before"] = ctx.get_memory_info().free / free_before

    # an uploader thread allocating and copying while the main thread's kernels run on theirs
    results = {}
    def upload(i):
        results[i] = cuda.to_device(np.full(1 << 20, i, dtype=np.float32))
        cuda.default_stream().synchronize()
    y = cuda.to_device(np.ones(1 << 24, dtype=np.float32))
    for i in range(20):
        t = threading.Thread(target=upload, args=(i,))
        t.start()
        y = registry.run("vadd", "gpu", (y, y), device_results=True)
        t.join()
    out["threads_ok"] = all(float(results[i].copy_to_host()[7]) == i for i in range(20)) and float(
        y.copy_to_host()[3]
    ) == 2.0 ** 20
    del y, results

    # more than the card can hold at once, one after the other: freed memory the pool keeps
    # must not make the second allocation fail (it is trimmed back to the driver and retried)
    big = int(ctx.get_memory_info().free * 0.6) // 4 * 4
    a = cuda.device_array(big // 4, dtype=np.float32)
    del a
    b = cuda.device_array(big // 4 + (1 << 20), dtype=np.float32)
    out["second_big_ok"] = b.size == big // 4 + (1 << 20)
    del b
    cuda.synchronize()
    out["stats"] = pool_stats()
    out["total"] = total
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not REAL_GPU, reason="needs a real GPU (BATUTA_REAL_GPU=1)")
def test_pooled_allocator_on_a_real_gpu() -> None:
    env = {**os.environ, MEMORY_MANAGER: POOLED_MEMORY_MANAGER, "CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM": "1"}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    done = subprocess.run(
        [sys.executable, "-c", CHECKS], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["manager"] == "PooledMemoryManager"
    assert out["chain_ok"] and out["threads_ok"] and out["second_big_ok"]
    stats = out["stats"]
    assert stats["fallback"] == 0
    assert stats["allocations"] >= 10 and stats["frees"] >= 10
    # what the pool holds after the frees counts as free for a slot sizing its cache
    assert out["free_after_frees_over_before"] > 0.95
