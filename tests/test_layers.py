"""The import direction of README.md's layer table (rules and checker: tests/support/layers.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.layers import LAYER_OF_PATH, crossings_in


def test_imports_point_down(repo_root: Path) -> None:
    crossings = crossings_in(repo_root)
    assert not crossings, "imports cross README.md's layers:\n" + "\n".join(map(str, crossings))


def test_the_layer_table_names_no_gone_paths(repo_root: Path) -> None:
    """A moved or deleted module leaves no stale rule behind (unmapped files are crossings above)."""
    stale = [pattern for pattern, _ in LAYER_OF_PATH if not (repo_root / pattern).exists()]
    assert not stale, f"LAYER_OF_PATH names paths that are gone: {stale}"


def test_the_check_sees_a_planted_crossing(tmp_path: Path) -> None:
    """The checker itself works: plant one of each kind of violation in a fake tree."""
    files = {
        "batuta/__init__.py": (
            "_LAZY = {\n"
            '    "Task": "batuta.core.task",\n'
            '    "Pool": "batuta.runtime.pool",\n'
            '    "App": "batuta.tui.app",\n'
            "}\n"
        ),
        "batuta/core/bad.py": "import time\nfrom batuta.runtime.pool import Pool\nx = random.random()\n",
        "batuta/protocol/bad.py": "from ..agent import main\n",
        "batuta/agent/bad.py": "def f():\n    from textual.app import App\n",
        "batuta/runtime/bad.py": "from batuta.observers.metrics import MetricsExporter\n",
        "batuta/observers/bad.py": "from batuta.runtime.pool import Pool\nfrom batuta.tui import model\n",
        "batuta/jobs/bad.py": "from batuta import Pool, Task\nfrom batuta.cli import main\n",
        "batuta/errors.py": "from batuta.runtime import events\n",
        "batuta/loose.py": "X = 1\n",
        "kernels/bad.py": "from batuta.errors import BatutaError\n",
        "tui/bad.py": "from batuta.core.task import Task\nfrom batuta import Pool\nfrom batuta import Task\n",
        "batuta/core/good.py": "import random\nrng = random.Random(0)\nfrom batuta.errors import TaskError\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = {str(c) for c in crossings_in(tmp_path)}
    assert found == {
        "batuta/__init__.py:4: facade imports batuta.tui.app (tui)",
        "batuta/core/bad.py:1: core is sans-I/O but imports time",
        "batuta/core/bad.py:2: core imports batuta.runtime.pool (runtime)",
        "batuta/core/bad.py:3: core uses the global generator random.random; pass a random.Random(seed)",
        "batuta/protocol/bad.py:1: protocol imports batuta.agent (agent)",
        "batuta/agent/bad.py:2: agent imports textual.app (textual)",
        "batuta/runtime/bad.py:1: runtime imports batuta.observers.metrics (observers)",
        "batuta/observers/bad.py:2: observers imports batuta.tui (tui)",
        "batuta/jobs/bad.py:2: jobs imports batuta.cli (cli)",
        "batuta/errors.py:1: base imports batuta.runtime (runtime)",
        "batuta/loose.py: maps to no layer; give it one in LAYER_OF_PATH (tests/support/layers.py)",
        "kernels/bad.py:1: kernels imports batuta.errors (base)",
        "tui/bad.py:1: tui imports batuta.core.task (core)",
        "tui/bad.py:3: tui imports batuta.Task through batuta's facade (batuta.core.task) (core)",
    }


def test_the_command_line_reports_and_fails(tmp_path: Path, repo_root: Path) -> None:
    """`python -m tests.support.layers ROOT` prints each crossing and exits 1; a clean tree exits 0."""
    (tmp_path / "batuta" / "core").mkdir(parents=True)
    (tmp_path / "batuta" / "core" / "bad.py").write_text("import asyncio\n")
    command = [sys.executable, "-m", "tests.support.layers", str(tmp_path)]
    done = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (1, "batuta/core/bad.py:1: core is sans-I/O but imports asyncio\n")
    (tmp_path / "batuta" / "core" / "bad.py").write_text("import heapq\n")
    done = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "")
