"""Kernels that misbehave on purpose, loaded into agents with --kernel-module for tests."""

from __future__ import annotations

import os
import signal
import sys
import threading

from batuta.kernels import kernel


@kernel("test_crash", description="Kill the worker process running it (a poison task).")
def test_crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


test_crash.cpu(test_crash.reference)


@kernel("test_segfault", description="Read address 0 through ctypes: a segfault in native code.")
def test_segfault() -> None:
    import ctypes

    ctypes.string_at(0)


test_segfault.cpu(test_segfault.reference)


@kernel("test_raise", description="Raise ValueError with the given message.")
def test_raise(message: str) -> None:
    raise ValueError(message)


test_raise.cpu(test_raise.reference)


@kernel("test_print", description="Print to stdout and stderr, then return the argument.")
def test_print(value: int) -> int:
    print("noise on stdout", value)
    print("noise on stderr", value, file=sys.stderr)
    sys.stdout.flush()
    return value


test_print.cpu(test_print.reference)


@kernel("test_fail_loudly", description="Print, then raise ValueError with the given message.")
def test_fail_loudly(message: str) -> None:
    print("about to fail on", message)
    raise ValueError(message)


@kernel("test_pid", description="Return the worker process's pid.")
def test_pid() -> int:
    return os.getpid()


test_pid.cpu(test_pid.reference)


@kernel("test_crash_once", description="Kill the worker the first time for a given marker file.")
def test_crash_once(marker: str) -> str:
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("crashed once\n")
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"


test_crash_once.cpu(test_crash_once.reference)


@kernel("test_env", description="Return an environment variable of the worker process.")
def test_env(name: str) -> str | None:
    return os.environ.get(name)


test_env.cpu(test_env.reference)


@kernel("test_echo_after", description="Sleep (without burning CPU), then return the value.")
def test_echo_after(value: int, seconds: float) -> int:
    import time

    time.sleep(seconds)
    return value


test_echo_after.cpu(test_echo_after.reference)


@kernel("test_threads", description="The thread budgets this slot runs with: numba's setting and BLAS's.")
def test_threads() -> tuple[str, int]:
    from threadpoolctl import threadpool_info

    blas = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    return os.environ.get("NUMBA_NUM_THREADS", ""), min(blas) if blas else -1


test_threads.cpu(test_threads.reference)


@kernel("test_heap", description="Whether a new 64 MiB array lands in this process's heap (not a mapping of its own).")
def test_heap() -> bool:
    import numpy as np

    from tests.support.heap import in_heap

    return in_heap(np.empty(64 << 20, dtype=np.uint8))


test_heap.cpu(test_heap.reference)


@kernel(
    "test_fill_after_scratch",
    description="`n` float64 values made after a scratch array of as many, freed on return (a heap hole).",
)
def test_fill_after_scratch(n: int) -> object:
    import numpy as np

    scratch = np.ones(int(n))  # below the result in the heap: its pages go back at the idle trim
    return np.full(int(n), float(scratch.sum()))


test_fill_after_scratch.cpu(test_fill_after_scratch.reference)


@kernel("test_fill", description="An array of `n` float64 values, all `value` (a producer for pipelines).")
def test_fill(n: int, value: float) -> object:
    import numpy as np

    return np.full(int(n), float(value))


test_fill.cpu(test_fill.reference)


@kernel("test_stage", description="`x * k + 1`, a new array (one stage of a pipeline); extra args are ignored.")
def test_stage(x: object, k: float, *_ignored: object) -> object:
    import numpy as np

    return np.asarray(x) * float(k) + 1.0


test_stage.cpu(test_stage.reference)


@kernel("test_gate", description="Wait (at most `limit` seconds) until the file `path` exists, then return `value`.")
def test_gate(path: str, value: int, limit: float = 60.0) -> int:
    import time

    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {limit}s")
        time.sleep(0.01)
    return value


test_gate.cpu(test_gate.reference)


@kernel(
    "test_unsendable",
    description="A value the wire cannot carry (`kind`: datetime, record or matrix); `ok`: a plain one.",
)
def test_unsendable(kind: str) -> object:
    import numpy as np

    if kind == "datetime":
        return np.arange(3).astype("datetime64[s]")
    if kind == "matrix":  # would arrive an ndarray, where * means something else
        return np.eye(2).view(np.matrix)
    if kind == "record":
        return (np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]), 1)
    return np.arange(4.0)


test_unsendable.cpu(test_unsendable.reference)


_LEFT_GO = threading.Event()  # test_print_later's thread prints once this is set...
_LEFT_DONE = threading.Event()  # ...and sets this when it has


@kernel("test_print_later", description="Leave a daemon thread that prints when test_let_it_print says.")
def test_print_later(value: int) -> int:
    def later() -> None:
        _LEFT_GO.wait(60)
        print("left behind by", value)
        _LEFT_DONE.set()

    _LEFT_GO.clear()
    _LEFT_DONE.clear()
    threading.Thread(target=later, daemon=True).start()
    return value


test_print_later.cpu(test_print_later.reference)


@kernel("test_let_it_print", description="Let test_print_later's thread print while this runs; print too.")
def test_let_it_print(value: int) -> bool:
    _LEFT_GO.set()
    printed = _LEFT_DONE.wait(60)
    print("my own", value)
    return printed


test_let_it_print.cpu(test_let_it_print.reference)
