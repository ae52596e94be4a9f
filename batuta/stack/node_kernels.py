"""Kernels the stack commands run on every node, and the facts they read there.

These run inside a worker slot of the node's agent, which imports this module on the first
task that names one of them (``"batuta.stack.node_kernels:stack_node_info"``): nothing has to
be configured on the hosts, and a host whose batuta lacks this module answers with a clear
"unknown kernel" error. The coordinator calls the same functions in process for its own
column of `batuta stack versions`.

What they may import, and when: only the standard library and the kernel registry at import
time (a slot must not pay for more); psutil, NVML (`pynvml`), numba and numba.cuda inside the
function that needs them, each failure caught and reported as text, never raised, except
where the failure *is* the finding (numba not importing, CUDA not working).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any

from batuta.kernels.registry import jit, kernel

MODULE = __name__
NODE_INFO = f"{MODULE}:stack_node_info"
NUMBA_SMOKE = f"{MODULE}:stack_numba_smoke"
CUDA_SMOKE = f"{MODULE}:stack_cuda_smoke"

FAKE_GPUS_ENV = "BATUTA_FAKE_GPUS"  # the agent's test GPUs (batuta.agent.telemetry)
CUDASIM_ENV = "NUMBA_ENABLE_CUDASIM"
_ENV_SHOWN = (CUDASIM_ENV, FAKE_GPUS_ENV, "CUDA_VISIBLE_DEVICES", "NUMBA_CACHE_DIR", "NUMBA_NUM_THREADS")


# -- facts, callable anywhere -------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _short_error(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def nvml_facts() -> dict[str, Any]:
    """NVIDIA driver, CUDA driver version and GPU models as NVML reports them.

    ``{"status": "ok" | "fake" | "no NVIDIA driver" | "...error...", "driver": str | None,
    "cuda_driver": "12.4" | None, "gpus": [names]}``. Fake GPUs (`BATUTA_FAKE_GPUS`) are
    reported as such: NVML is not asked, because the agent does not ask it either.

    NVML that fails to start here, with a driver present, is asked again from a fresh
    interpreter: NVML refused the CPU slot this runs in ("The operating system has blocked
    the request", on an H100 host, while the agent's NVML and a fresh process's worked; the
    slot is forked from the agent, which has NVML open for its heartbeats), so on every GPU
    host `stack check` said NVML did not work while it did.
    """
    facts = _nvml_facts_here()
    if facts["status"].startswith("NVML failed to start") and not os.environ.get(_FRESH_ENV):
        fresh = _nvml_facts_fresh()
        if fresh is not None and fresh["status"] == "ok":
            return fresh
    return facts


_FRESH_ENV = "BATUTA_NVML_FRESH"  # set in the fresh interpreter: it does not ask a third


def _nvml_facts_fresh() -> dict[str, Any] | None:
    """`nvml_facts()` from a new Python process (not forked from one that opened NVML), or
    None if that fails too: the caller keeps its own answer, which names the first error."""
    import json
    import subprocess

    code = "import json; from batuta.stack.node_kernels import nvml_facts; print(json.dumps(nvml_facts()))"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # where batuta is
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, _FRESH_ENV: "1", "PYTHONPATH": path}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, check=False
        )
        answer = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return answer if isinstance(answer, dict) and isinstance(answer.get("status"), str) else None


def _nvml_facts_here() -> dict[str, Any]:
    """`nvml_facts()`' answer, read in this process."""
    facts: dict[str, Any] = {"status": "", "driver": None, "cuda_driver": None, "gpus": []}
    fake = os.environ.get(FAKE_GPUS_ENV, "").strip()
    if fake:
        facts["status"] = "fake"
        facts["gpus"] = [f"Fake GPU {i}" for i in range(int(fake))] if fake.isdigit() else []
        return facts
    try:
        import pynvml
    except ImportError:
        facts["status"] = "nvidia-ml-py not installed"
        return facts
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        code = getattr(exc, "value", None)
        missing = (
            getattr(pynvml, "NVML_ERROR_LIBRARY_NOT_FOUND", -1),
            getattr(pynvml, "NVML_ERROR_DRIVER_NOT_LOADED", -1),
        )
        facts["status"] = "no NVIDIA driver" if code in missing else f"NVML failed to start: {_short_error(exc)}"
        return facts
    try:
        facts["driver"] = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())
        facts["cuda_driver"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
        names = []
        for index in range(int(pynvml.nvmlDeviceGetCount())):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            names.append(_text(pynvml.nvmlDeviceGetName(handle)))
        facts["gpus"] = names
        facts["status"] = "ok"
    except Exception as exc:
        facts["status"] = f"NVML error: {_short_error(exc)}"
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return facts


def _disks() -> list[dict[str, Any]]:
    """Free space where a node writes: the temp folder, the home folder (numba's cache) and
    batuta's cache (the user's code, objects spilled past the store's memory): a full one
    there passed the check, and every task then failed to import the shipped code."""
    from batuta.agent.code import cache_root

    cache = cache_root()
    while not cache.exists() and cache.parent != cache:  # not made yet: the disk it will be on
        cache = cache.parent
    seen: set[int] = set()
    found: list[dict[str, Any]] = []
    for label, path in (("temp", tempfile.gettempdir()), ("home", os.path.expanduser("~")), ("cache", str(cache))):
        try:
            device = os.stat(path).st_dev
            usage = shutil.disk_usage(path)
        except OSError as exc:
            found.append({"label": label, "path": path, "error": _short_error(exc)})
            continue
        if device in seen:
            continue
        seen.add(device)
        found.append({"label": label, "path": path, "free": int(usage.free), "total": int(usage.total)})
    return found


def _memory() -> dict[str, Any]:
    try:
        import psutil

        memory = psutil.virtual_memory()
        return {"available": int(memory.available), "total": int(memory.total)}
    except Exception:
        pass
    try:  # without psutil: /proc/meminfo (Linux)
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo if line.count(":") == 1}
        return {"available": fields["MemAvailable"], "total": fields["MemTotal"]}
    except (OSError, KeyError, ValueError, IndexError) as exc:
        return {"error": _short_error(exc)}


def node_facts() -> dict[str, Any]:
    """Everything `stack check` reads about a node besides its agent's Hello."""
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(terse=True),
        "cpu_count": os.cpu_count() or 1,
        "memory": _memory(),
        "disks": _disks(),
        "nvml": nvml_facts(),
        "env": {name: os.environ[name] for name in _ENV_SHOWN if name in os.environ},
    }


# -- the kernels --------------------------------------------------------------------------


@kernel("stack_node_info", description="Facts about this node for `batuta stack` (Python, disk, memory, NVML).")
def stack_node_info() -> dict[str, Any]:
    return node_facts()


def _squares(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


@kernel("stack_numba_smoke", description="Compile and run a small numba function; return the result and timings.")
def stack_numba_smoke(n: int) -> dict[str, Any]:
    return {"value": _squares(n), "numba": None, "compile_run_s": 0.0}


# Compiled afresh in every slot process (no cache): the point is to see numba compile here.
_squares_jit = jit(cache=False)(_squares)


@stack_numba_smoke.cpu
def _numba_smoke_cpu(n: int) -> dict[str, Any]:
    started = time.perf_counter()
    value = int(_squares_jit(n))  # imports numba, then compiles on the first call
    elapsed = time.perf_counter() - started
    import numba

    return {"value": value, "numba": str(numba.__version__), "compile_run_s": elapsed}


@kernel("stack_cuda_smoke", description="Compile and run a small CUDA kernel; return the device and driver facts.")
def stack_cuda_smoke(n: int) -> dict[str, Any]:
    return {"value": float(sum(2.0 * i for i in range(n)))}


# numba.cuda, bound on the first CUDA smoke test: a module global (not a local import), so
# that numba's simulator can swap it for its own while the kernel runs.
cuda: Any = None


def _double(values: Any, out: Any) -> None:  # pragma: no cover - compiled for the device
    i = cuda.grid(1)
    if i < values.size:
        out[i] = 2.0 * values[i]


@stack_cuda_smoke.gpu
def _cuda_smoke_gpu(n: int) -> dict[str, Any]:
    global cuda
    started = time.perf_counter()
    import numpy as np

    from batuta.kernels.cuda_support import cuda as cuda_module

    numba_cuda = cuda_module()  # numba.cuda, or why it cannot work here (fake GPUs, no simulator)
    cuda = numba_cuda
    double = numba_cuda.jit(_double)  # compiled afresh in this process: that is the test
    values = np.arange(n, dtype=np.float64)
    out = numba_cuda.device_array_like(values)
    double[max(1, (n + 127) // 128), 128](numba_cuda.to_device(values), out)
    result = out.copy_to_host()
    elapsed = time.perf_counter() - started
    simulator = os.environ.get(CUDASIM_ENV, "") not in ("", "0")
    facts: dict[str, Any] = {"value": float(result.sum()), "compile_run_s": elapsed, "simulator": simulator}
    try:
        device = numba_cuda.get_current_device()
        facts["device"] = _text(getattr(device, "name", b"CUDA simulator" if simulator else b"?"))
        capability = getattr(device, "compute_capability", None)
        facts["compute_capability"] = ".".join(str(c) for c in capability) if capability else None
    except Exception as exc:
        facts["device_error"] = _short_error(exc)
        return facts
    try:  # a reading of its own: a binding that cannot give the UUID costs the row nothing else
        # Which card it ran on, for `check` to hold against the GPU this slot is pinned to
        uuid = None if simulator else getattr(device, "uuid", None)
        facts["uuid"] = _text(uuid) if uuid else None
    except Exception:
        facts["uuid"] = None
    return facts
