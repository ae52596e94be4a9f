"""`bench/multi_gpu.py` (issue 19) on a node whose `CUDA_VISIBLE_DEVICES` gives it some of the
GPUs: it is run by hand on a real machine of 2-8 GPUs, often a shared one, so it must use the
cards the pool itself takes there, and sample only those."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _smoke(*, fake_gpus: int, visible: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`bench/multi_gpu.py --smoke` on `fake_gpus` simulated GPUs, `CUDA_VISIBLE_DEVICES=visible`."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "BATUTA_FAKE_GPUS")}
    env.update(NUMBA_ENABLE_CUDASIM="1", BATUTA_FAKE_GPUS=str(fake_gpus), CUDA_VISIBLE_DEVICES=visible)
    return subprocess.run(
        [sys.executable, "bench/multi_gpu.py", "--smoke"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.timeout(300)
def test_the_multi_gpu_benchmark_uses_the_gpus_cuda_visible_devices_gives_it() -> None:
    """With CUDA_VISIBLE_DEVICES=3,1,2 of four GPUs, its one-GPU run asked for GPU 0 (not among
    them: the agent refused it, and the script died) and it counted four cards."""
    done = _smoke(fake_gpus=4, visible="3,1,2", timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert (found["gpus"], found["cards"]) == (3, [3, 1, 2])
    assert found["mc_tasks"] == 2 * 3  # so many per card: on 8 cards, 8 in all left one card a ninth
    assert found["mc_pi_speedup"] > 0 and found["kmeans_speedup"] > 0  # simulated timings mean nothing


def test_the_multi_gpu_benchmark_says_why_it_has_no_gpu() -> None:
    """A CUDA_VISIBLE_DEVICES naming no GPU of the node: one line saying so, exit 1."""
    done = _smoke(fake_gpus=2, visible="", timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == "multi_gpu.py: no GPU for a GPU slot here (CUDA_VISIBLE_DEVICES='')"
