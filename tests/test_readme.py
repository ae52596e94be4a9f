"""The README's Python examples run as written (a newcomer copies them first)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def python_blocks() -> list[str]:
    return PYTHON_BLOCK.findall((REPO / "README.md").read_text())


def block_with(marker: str) -> str:
    found = [block for block in python_blocks() if marker in block]
    assert len(found) == 1, f"expected one README python block with {marker!r}, found {len(found)}"
    return found[0]


def run(source: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", source], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_python_api_example_runs(tmp_path: Path) -> None:
    done = run(block_with("asyncio.run(main())"), tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line]  # echo's own newline, then print's
    assert lines[0].startswith("TaskStatus.SUCCEEDED [2. 2. 2.] local local/0")
    assert lines[1] == "--data=chunk-0"
    estimate, total = lines[2].split()
    assert abs(float(estimate) - 3.14159) < 0.01 and float(total) == sum(range(1_000_000))


def test_the_own_kernel_example_registers_a_kernel_the_agents_run(tmp_path: Path) -> None:
    (tmp_path / "mykernels.py").write_text(block_with("# mykernels.py"))
    driver = (
        "import asyncio, numpy as np\n"
        "from batuta import Pool, Task\n"
        "async def main():\n"
        "    async with Pool.builder().cpu_workers(1).kernel_modules(['mykernels']).build() as pool:\n"
        "        by_module = await pool.run(Task.kernel('clip_sum', np.arange(10.0), 2.0, 5.0))\n"
        "        by_name = await pool.run(Task.kernel('mykernels:clip_sum', np.arange(10.0), 2.0, 5.0))\n"
        "        print(by_module.value, by_name.value, by_module.error, by_name.error)\n"
        "asyncio.run(main())\n"
    )
    done = run(driver, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] == ["38.0", "38.0"], done.stdout


def test_the_own_kernels_walkthrough_runs_and_an_edit_gives_new_results(tmp_path: Path) -> None:
    """The walkthrough of "Your own kernels on a cluster", on the local agent: the module beside
    the job is sent to it, and after an edit the same command gives the new result from new code."""
    (tmp_path / "mykernels.py").write_text(block_with("# mykernels.py"))
    (tmp_path / "my_job.py").write_text(block_with("# my_job.py"))
    elsewhere = tmp_path / "elsewhere"  # not the job's folder: nothing is found through the working directory
    elsewhere.mkdir()

    def batuta_run() -> str:
        command = [sys.executable, "-m", "batuta", "run", str(tmp_path / "my_job.py"), "--workers", "1", "-q"]
        done = subprocess.run(command, cwd=elsewhere, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    first = batuta_run()
    assert re.fullmatch(r"total 499874805\.0, code [0-9a-f]{12}", first), first
    source = (tmp_path / "mykernels.py").read_text()
    (tmp_path / "mykernels.py").write_text(source.replace("np.clip(x, lo, hi)", "np.clip(x, lo, hi - 100)"))
    second = batuta_run()
    assert re.fullmatch(r"total 399919855\.0, code [0-9a-f]{12}", second), second
    assert second[-12:] != first[-12:]
