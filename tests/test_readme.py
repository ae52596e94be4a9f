"""The README's examples run as written (a newcomer copies them first): its Python blocks,
its cluster-file tables, and the options of the `batuta` command lines it shows."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
TOML_BLOCK = re.compile(r"```toml\n(.*?)```", re.DOTALL)


def readme() -> str:
    return (REPO / "README.md").read_text()


def python_blocks() -> list[str]:
    return PYTHON_BLOCK.findall(readme())


def fenced_blocks(info: str) -> list[str]:
    """The README's fenced blocks whose info string is `info` ("" for none), fence by fence."""
    blocks: list[str] = []
    current: list[str] | None = None  # the lines of an open block of that kind
    inside = False
    for line in readme().splitlines():
        if not line.strip().startswith("```"):
            if current is not None:
                current.append(line)
        elif not inside:
            inside, current = True, [] if line.strip()[3:] == info else None
        else:
            if current is not None:
                blocks.append("\n".join(current))
            inside, current = False, None
    return blocks


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


def test_the_first_job_file_example_runs(tmp_path: Path) -> None:
    (tmp_path / "my_job.py").write_text(block_with("tasks succeeded"))
    command = [sys.executable, "-m", "batuta", "run", "my_job.py", "--workers", "2", "-q"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "100 of 100 tasks succeeded"


def test_the_gate_example_kernel_gives_the_gate_its_sample(tmp_path: Path) -> None:
    """`batuta stack gate` runs a user kernel that has a `@<kernel>.sample` against its reference;
    the README's `scale` registers one the gate finds (the gate itself: tests/test_stack.py)."""
    (tmp_path / "scalemod.py").write_text(block_with("@scale.sample"))
    check = (
        "import numpy as np, scalemod\n"
        "from batuta.kernels import registry\n"
        "from batuta.stack.conformance import kernels_to_check, sample\n"
        "(x,) = sample('scale').args\n"
        "assert x.shape == (64,) and np.array_equal(registry.reference('scale', (x,)), x * 2.0)\n"
        "print(dict(kernels_to_check())['scale'])\n"
    )
    done = run(check, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "('scalar',)"


async def test_the_remote_executor_example_runs_on_a_worker_made_with_the_certs_command(tmp_path: Path) -> None:
    """`batuta certs init`, a worker with its files, and the README's RemoteExecutor block on
    loopback: the block's names and builder calls, as written, run a task."""
    import numpy as np

    from batuta.agent.daemon import WorkerDaemon, WorkerOptions
    from batuta.cli import main

    certs = tmp_path / "certs"
    assert main(["certs", "init", str(certs)]) == 0  # for localhost and 127.0.0.1, the default names
    options = WorkerOptions(
        cert=certs / "server.pem", key=certs / "server.key", ca=certs / "ca.pem", port=0, slots=1, gpus="none"
    )
    async with WorkerDaemon(options) as worker:
        address = f"127.0.0.1:{worker.address[1]}"
        source = block_with("RemoteExecutor.builder()").replace("10.0.0.12:9443", address)
        source = source.replace("~/.batuta/certs", str(certs))
        scope: dict[str, object] = {"a": np.arange(4.0), "b": np.ones(4)}
        exec("async def example():\n" + textwrap.indent(source, "    ") + "    return result\n", scope)
        result = await scope["example"]()  # type: ignore[operator]
        assert result.status.value == "succeeded" and result.value.tolist() == [1.0, 2.0, 3.0, 4.0]
        assert await worker.wait_idle(20.0)


def test_every_cluster_file_example_loads(tmp_path: Path) -> None:
    """Each TOML block is a cluster file as shown (a `[policy]` table alone is given a host)."""
    from batuta.runtime.cluster import load_cluster

    blocks = TOML_BLOCK.findall(readme())
    assert len(blocks) >= 5
    for number, block in enumerate(blocks):
        path = tmp_path / f"cluster{number}.toml"
        path.write_text(block if "[[hosts]]" in block or "[[allocations]]" in block else "local = true\n" + block)
        cluster = load_cluster(path)
        assert cluster.hosts or cluster.allocations or cluster.local, block


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(found[0].choices) if found else {}


def readme_commands() -> list[str]:
    """The `batuta ...` command lines of the README: in its shell and synopsis blocks (a
    synopsis line that goes on below is joined to it) and in its inline code."""
    text = readme()
    commands: list[str] = []
    for block in fenced_blocks("") + fenced_blocks("sh"):
        for line in block.splitlines():
            if line[:1].isspace() and commands and line.strip().startswith("["):
                commands[-1] += " " + line.strip()
                continue
            for part in line.split("&&"):
                part = re.sub(r"^\S*/bin/batuta\b", "batuta", part.strip())
                if part.startswith("batuta "):
                    commands.append(part)
    commands += [span for span in re.findall(r"`([^`\n]+)`", text) if span.startswith("batuta ")]
    return commands


def test_the_readmes_command_lines_use_options_their_command_has() -> None:
    """Every `--option` (and `-x`) of a `batuta ...` line in the README is one its subcommand
    takes: a renamed or removed option is caught here, not by a newcomer."""
    from batuta.cli import build_parser

    commands = readme_commands()
    assert len(commands) > 30
    unknown: list[str] = []
    for command in commands:
        line = command.split(" # ")[0].split(" -- ")[0]  # comments; options after -- go to sbatch
        words = line.split()[1:]
        parser = build_parser()
        path = ["batuta"]
        while words and words[0] in _subcommands(parser):
            path.append(words[0])
            parser = _subcommands(parser)[words.pop(0)]
        if path[-1] == "agent":  # handed to the agent's own parser whole
            continue
        options = {option for action in parser._actions for option in action.option_strings}
        for word in re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", " ".join(words)):
            if word not in options:
                unknown.append(f"{' '.join(path)} {word}  (in: {command})")
    assert not unknown, "README options the command does not take:\n" + "\n".join(unknown)


def test_the_kernel_list_and_which_are_pure_match_the_registry() -> None:
    """The README lists the shipped kernels and names those a journal knows by place (not pure)."""
    from batuta.kernels import registry

    text = " ".join(readme().split())
    listed = re.search(r"numba-cuda variant\): (.*?)\. A GPU variant", text)
    assert listed is not None
    shipped = [name for name in registry.names() if (registry.module_of(name) or "").startswith("batuta.kernels.")]
    built_in = [name for name in shipped if not name.endswith("_synth")]  # the ML jobs' own GPU variants
    assert sorted(re.findall(r"`(\w+)`", listed.group(1))) == built_in
    impure = re.search(r"registered `pure=True` \(the listed kernels but (.*?)\)", text)
    assert impure is not None
    assert sorted(re.findall(r"`(\w+)`", impure.group(1))) == [n for n in built_in if not registry.lookup(n).pure]
