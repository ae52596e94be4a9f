"""A numba compile error in one line a person reads (batuta/agent/numba_errors.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from batuta import Backend, Pool, Task
from batuta.agent.numba_errors import numba_error

KERNEL = """\
import numba
from batuta import kernel


@numba.njit
def _inner(x):
    return x + "a"


@kernel("ne_typing")
def ne_typing(x):
    return _inner(x)
"""


def test_a_typing_error_keeps_its_cause_and_the_users_line_not_the_candidates() -> None:
    numba = pytest.importorskip("numba")
    bundle = "/root/.cache/batuta/code/" + "ab" * 32
    text = (
        "Failed in nopython mode pipeline (step: nopython frontend)\n"
        "No implementation of function Function(<built-in function add>) found for signature:\n \n"
        " >>> add(array(float64, 1d, C), Literal[str](a))\n \nThere are 20 candidate implementations:\n"
        " - Of which 18 did not match due to:\n Overload of function 'add': File: <numerous>: Line N/A.\n\n"
        f"During: typing of intrinsic-call at {bundle}/mymod.py (5)\n\n"
        f'File "../..{bundle}/mymod.py", line 5:\ndef _inner(x):\n    return x + "a"\n    ^\n\n'
        "During: Pass nopython_type_inference"
    )
    said = numba_error(numba.core.errors.TypingError(text))
    assert said == (
        "TypingError: No implementation of function Function(<built-in function add>) found for signature: "
        '>>> add(array(float64, 1d, C), Literal[str](a)) (at mymod.py line 5: return x + "a")'
    )
    assert numba_error(ValueError("not numba's")) is None


async def test_a_kernel_that_does_not_compile_fails_in_one_short_line(tmp_path: Path) -> None:
    """It was one line of 1,000 characters: every candidate overload, and the code cache's path."""
    (tmp_path / "ne_kernels.py").write_text(KERNEL)
    async with Pool.local(1, gpu_workers="none", modules=[tmp_path / "ne_kernels.py"]) as pool:
        result = await pool.run(Task.kernel("ne_typing", np.ones(3)))
    assert result.error == (  # the user's file, as editors open it, not the copy the host compiled
        "TypingError: No implementation of function Function(<built-in function add>) found for signature: "
        f'>>> add(array(float64, 1d, C), Literal[str](a)) (at {tmp_path / "ne_kernels.py"}:7: return x + "a")'
    )
    assert b"There are " in result.stderr  # the whole of numba's words stay in the traceback


SUMMING = """\
import numba
from batuta import kernel


@numba.njit
def _total(x):
    s = 0.0
    for v in x.flat:
        s += v
    return s


@kernel("ne_total")
def ne_total(x):
    return float(x.sum())


ne_total.cpu(_total)
"""


async def test_an_argument_numba_cannot_take_is_named_with_the_fix(tmp_path: Path) -> None:
    """A big-endian array (read from a file in network order) travels as it is, and numba said
    only "non-precise type pyobject"; a float16 one, "NotImplementedError: float16"."""
    (tmp_path / "ne_summing.py").write_text(SUMMING)
    values = np.arange(6.0)
    async with Pool.local(1, gpu_workers="none", modules=[tmp_path / "ne_summing.py"]) as pool:
        results = [
            await pool.run(Task.kernel("ne_total", x, backend=Backend.CPU))
            for x in (values.astype(">f8"), values.astype(np.float16), values, values.astype(">f8").astype("=f8"))
        ]
    assert results[0].error is not None and results[0].error.endswith(
        "(numba compiles for native byte order only, and argument 0 is '>f8': send x.astype(x.dtype.newbyteorder('=')))"
    ), results[0].error
    assert results[1].error == (
        "NotImplementedError: float16 (numba has no float16 on the CPU, and argument 0 is one: "
        "send x.astype(np.float32))"
    )
    assert [result.value for result in results[2:]] == [15.0, 15.0]  # the fix, followed
