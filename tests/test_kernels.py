"""Kernels against their NumPy references, input validation, the registry and its laziness.

Every CPU variant is checked on both float dtypes and on sizes around the points where the
code changes path (empty, one element, the serial/parallel switch, odd remainders).
"""

from __future__ import annotations

import ast
import enum
import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from batuta.kernels import (
    KernelCallError,
    KernelDefinitionError,
    KernelInputError,
    KernelModuleError,
    UnknownKernelError,
    UnsupportedBackendError,
    basic,
)

from batuta import kernels

KERNELS_DIR = Path(kernels.__file__).parent
BUILTINS = ["burn", "mc_pi", "noop", "saxpy", "spin", "sum", "vadd"]
DTYPES = [np.float32, np.float64]
BACKENDS = ["scalar", "cpu"]
# Empty, tiny, around the serial/parallel switch, and a size no chunk size divides.
SIZES = [0, 1, 2, 7, basic.PARALLEL_MIN_SIZE - 1, basic.PARALLEL_MIN_SIZE, 3 * basic.PARALLEL_MIN_SIZE + 5]
PI_STANDARD_ERROR_1 = 4 * math.sqrt(math.pi / 4 * (1 - math.pi / 4))  # times 1/sqrt(samples)


def _vectors(n: int, dtype: type, count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(n) * 10).astype(dtype) for _ in range(count)]


def _run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


# -- the registry -------------------------------------------------------------------------


def test_builtins_are_registered_with_scalar_and_cpu_backends() -> None:
    assert set(BUILTINS) <= set(kernels.names())
    for name in BUILTINS:
        found = kernels.info(name)
        assert found.name == name
        cpu_only = name in ("noop", "spin", "burn")  # scheduler probes: nothing to gain on a GPU
        assert found.backends == (("scalar", "cpu") if cpu_only else ("scalar", "cpu", "gpu"))
        assert found.description
        assert found.module == "batuta.kernels.basic"
    assert kernels.info("saxpy").params == ("alpha", "x", "y")
    assert kernels.info("noop").params == ("*args",)


def test_unknown_kernel_lists_known_names_and_how_to_add_one() -> None:
    with pytest.raises(UnknownKernelError) as caught:
        kernels.run("vad", "cpu", ())
    message = str(caught.value)
    assert "'vad'" in message
    assert "did you mean 'vadd'" in message
    for name in BUILTINS:
        assert name in message
    assert "kernel_modules" in message and "from batuta.kernels import kernel" in message
    assert isinstance(caught.value, LookupError)
    assert isinstance(caught.value, KernelCallError)
    with pytest.raises(UnknownKernelError):
        kernels.lookup("nope")
    with pytest.raises(UnknownKernelError):
        kernels.info("nope")


@pytest.mark.parametrize(
    ("backend", "expected"),
    [("gpu", "no 'gpu' variant; it runs on: scalar, cpu"), ("auto", "coordinator"), ("tpu", "unknown backend")],
)
def test_unsupported_backend_names_the_backends_that_exist(backend: str, expected: str) -> None:
    with pytest.raises(UnsupportedBackendError, match=expected) as caught:
        kernels.run("spin", backend, (0.0,))
    assert isinstance(caught.value, KernelInputError)


def test_backend_may_be_an_enum_whose_value_is_the_name() -> None:
    class Backend(enum.Enum):
        CPU = "cpu"

    a, b = _vectors(5, np.float32, 2)
    np.testing.assert_array_equal(kernels.run("vadd", Backend.CPU, (a, b)), a + b)


def test_calling_a_kernel_def_runs_the_reference() -> None:
    a, b = _vectors(4, np.float64, 2)
    np.testing.assert_array_equal(basic.vadd(a, b), a + b)
    assert basic.spin.variant("gpu") is None
    assert basic.vadd.variant("scalar") is basic.vadd.reference


def test_invalid_and_duplicate_definitions_are_refused() -> None:
    with pytest.raises(KernelDefinitionError, match="invalid kernel name"):
        kernels.kernel("mod:thing")
    with pytest.raises(KernelDefinitionError, match=r"'vadd' is one of batuta's built-in kernels \(batuta"):

        @kernels.kernel("vadd")
        def other_vadd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return a - b

    def first() -> int:
        return 1

    def second() -> int:
        return 2

    kernels.kernel("tk_mine")(first)
    try:
        with pytest.raises(KernelDefinitionError, match=r"'tk_mine' is already registered by .*first; pick another"):
            kernels.kernel("tk_mine")(second)
    finally:
        kernels.unregister("tk_mine")

    with pytest.raises(KernelDefinitionError, match="already has a 'cpu' variant"):
        basic.vadd.cpu(lambda a, b: a + b)
    assert kernels.lookup("vadd") is basic.vadd


USER_MODULE = """
from __future__ import annotations

import numpy as np

from batuta.kernels import float_array, jit, kernel, prange


@kernel("{name}")
def scale(x, factor=2.0):
    '''Multiply x by factor.'''
    return x * x.dtype.type(factor)


@scale.validator
def _check(x, factor=2.0):
    return (float_array("{name}", "x", x), float(factor))


@scale.cpu
@jit(parallel=True)
def _scale_loop(x, factor):
    out = np.empty_like(x)
    for i in prange(x.size):
        out[i] = x[i] * factor
    return out
"""


def test_load_module_registers_user_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module, name = "batuta_test_user_kernels", "user_scale"
    (tmp_path / f"{module}.py").write_text(USER_MODULE.format(name=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert name not in kernels.names()
        kernels.load_module(module)
        kernels.load_module(module)  # already imported: a no-op, not a duplicate
        assert name in kernels.names()
        found = kernels.info(name)
        assert found.backends == ("scalar", "cpu")
        assert found.params == ("x", "factor")
        assert found.description == "Multiply x by factor."
        assert found.module == module
        x = np.arange(5, dtype=np.float64)
        np.testing.assert_array_equal(kernels.run(name, "cpu", (x,)), x * 2)
        np.testing.assert_array_equal(kernels.run(name, "cpu", (x, 3.0)), x * 3)
        np.testing.assert_array_equal(kernels.reference(name, (x, 3.0)), x * 3)
        with pytest.raises(KernelInputError, match=f"kernel '{name}' takes 1 to 2 argument"):
            kernels.run(name, "cpu", ())
        # "module:name" resolves too (and would import the module on a fresh host).
        assert kernels.lookup(f"{module}:{name}") is kernels.lookup(name)
        with pytest.raises(UnknownKernelError, match=f"registers: {name}"):
            kernels.lookup(f"{module}:missing")
        # Reloading the module replaces its kernels instead of failing as a duplicate.
        importlib.reload(sys.modules[module])
        np.testing.assert_array_equal(kernels.run(name, "cpu", (x,)), x * 2)
    finally:
        kernels.unregister(name)
        sys.modules.pop(module, None)


def test_qualified_name_imports_the_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module, name = "batuta_test_qualified_kernels", "user_scale_q"
    (tmp_path / f"{module}.py").write_text(USER_MODULE.format(name=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        x = np.ones(3, dtype=np.float32)
        np.testing.assert_array_equal(kernels.run(f"{module}:{name}", "scalar", (x,)), x * 2)
        assert module in sys.modules
    finally:
        kernels.unregister(name)
        sys.modules.pop(module, None)


def test_load_module_failure_is_a_clear_import_error() -> None:
    with pytest.raises(KernelModuleError, match="cannot load kernel module 'no_such_kernel_mod'") as caught:
        kernels.load_module("no_such_kernel_mod")
    assert isinstance(caught.value, ImportError)
    # a file of the user's beside the job that the job does not import does not ship: say so
    assert "have the job import it (`import no_such_kernel_mod`" in str(caught.value)
    with pytest.raises(KernelModuleError):
        kernels.run("no_such_kernel_mod:thing", "cpu", ())


# -- kernels against their references -----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_vadd(backend: str, dtype: type, n: int) -> None:
    a, b = _vectors(n, dtype, 2)
    result = kernels.run("vadd", backend, (a, b))
    assert result.dtype == dtype
    assert result.shape == (n,)
    np.testing.assert_array_equal(result, kernels.reference("vadd", (a, b)))  # one rounding: exact


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_saxpy(backend: str, dtype: type, n: int) -> None:
    x, y = _vectors(n, dtype, 2)
    alpha = 1.7
    result = kernels.run("saxpy", backend, (alpha, x, y))
    expected = kernels.reference("saxpy", (alpha, x, y))
    assert result.dtype == dtype  # alpha takes the arrays' dtype: no promotion
    # Two roundings (or one, if a compiler fuses them): 2 ulp of the operands' magnitude.
    bound = 2 * np.finfo(dtype).eps * (np.abs(dtype(alpha) * x) + np.abs(y))
    assert np.all(np.abs(result - expected) <= bound)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_sum_within_documented_tolerance(backend: str, dtype: type, n: int) -> None:
    (x,) = _vectors(n, dtype, 1)
    x += 3  # a nonzero mean, so the sum is not only cancellation
    result = kernels.run("sum", backend, (x,))
    expected = kernels.reference("sum", (x,))
    assert type(result) is float
    bound = 2 * max(n - 1, 0) * 2.0**-53 * float(np.sum(np.abs(x), dtype=np.float64))
    assert abs(result - expected) <= bound
    assert abs(result - math.fsum(x.tolist())) <= bound  # and against an exactly rounded sum


@pytest.mark.parametrize("n", [5, 3 * basic.PARALLEL_MIN_SIZE + 5])
def test_sum_propagates_nan_and_inf(n: int) -> None:
    x = np.ones(n, dtype=np.float32)
    x[n // 2] = np.nan
    assert math.isnan(kernels.run("sum", "cpu", (x,)))
    x[n // 2] = np.inf
    assert kernels.run("sum", "cpu", (x,)) == math.inf


def test_read_only_arrays_from_the_wire_are_accepted() -> None:
    a, b = _vectors(basic.PARALLEL_MIN_SIZE + 3, np.float32, 2)
    a_ro = np.frombuffer(a.tobytes(), dtype=np.float32)
    b_ro = np.frombuffer(b.tobytes(), dtype=np.float32)
    assert not a_ro.flags.writeable
    np.testing.assert_array_equal(kernels.run("vadd", "cpu", (a_ro, b_ro)), a + b)
    np.testing.assert_array_equal(kernels.run("saxpy", "cpu", (2.0, a_ro, b_ro)), np.float32(2) * a + b)
    assert kernels.run("sum", "cpu", (a_ro,)) == kernels.run("sum", "cpu", (a,))


def test_noop_returns_its_first_argument() -> None:
    marker = object()
    for backend in BACKENDS:
        assert kernels.run("noop", backend, ()) is None
        assert kernels.run("noop", backend, (marker,)) is marker
        assert kernels.run("noop", backend, (1, 2, 3)) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_spin_burns_cpu_for_the_requested_time(backend: str) -> None:
    requested = 0.2
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    spun = kernels.run("spin", backend, (requested,))
    cpu_used, wall = time.process_time() - cpu_before, time.perf_counter() - wall_before
    assert spun >= requested
    assert wall >= requested
    # it burnt CPU rather than sleeping (a sleep uses ~0); loose, since a busy host may
    # deschedule us for much of the wall time
    assert cpu_used >= 0.1 * requested
    assert kernels.run("spin", backend, (0,)) >= 0.0
    assert kernels.run("spin", backend, (np.float32(0.001),)) >= 0.001 - 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_burn_counts_its_own_cpu_time_not_the_wall_clock(backend: str) -> None:
    # Two threads burning 0.1 s each take turns on the GIL, so together they need at least
    # 0.2 s of wall time; spin, which waits on the wall clock, would end both at about 0.1 s.
    # This is what makes burn charge a task for CPU another process takes from it.
    requested = 0.1
    used: list[float] = []
    threads = [
        threading.Thread(target=lambda: used.append(kernels.run("burn", backend, (requested,)))) for _ in range(2)
    ]
    wall_before = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    wall = time.perf_counter() - wall_before
    assert len(used) == 2 and all(u >= requested for u in used)
    assert wall >= 2 * requested * 0.95
    assert kernels.run("burn", backend, (0,)) >= 0.0


def _splitmix64_stream(seed: int, count: int) -> list[int]:
    """SplitMix64 in plain Python: the generator the CPU variant of mc_pi is specified to use."""
    mask, state, out = (1 << 64) - 1, seed, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


def test_splitmix64_model_matches_the_published_sequence() -> None:
    assert _splitmix64_stream(1234567, 3) == [6457827717110365317, 3203168211198807973, 9817491932198370423]


@pytest.mark.parametrize("seed", [0, 42, 2**64 - 1])
def test_mc_pi_cpu_is_exactly_splitmix64_whatever_the_chunking(seed: int) -> None:
    samples = basic._MC_CHUNK + 3  # two chunks, the last one partial
    stream = _splitmix64_stream(seed, 2 * samples)
    unit = [(z >> 11) * 2.0**-53 for z in stream]
    hits = sum(1 for x, y in zip(unit[0::2], unit[1::2], strict=True) if x * x + y * y < 1.0)
    assert kernels.run("mc_pi", "cpu", (samples, seed)) == 4.0 * hits / samples


def test_mc_pi_cpu_does_not_depend_on_the_thread_count() -> None:
    import numba

    samples, seed = 8 * basic._MC_CHUNK + 11, 7
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one_thread = kernels.run("mc_pi", "cpu", (samples, seed))
    finally:
        numba.set_num_threads(before)
    assert kernels.run("mc_pi", "cpu", (samples, seed)) == one_thread


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("samples", [1, 2, 1000, 2 * basic._MC_CHUNK + 3, 300_001])
def test_mc_pi_is_deterministic_and_close_to_pi(backend: str, samples: int) -> None:
    seed = 20261128
    estimate = kernels.run("mc_pi", backend, (samples, seed))
    assert estimate == kernels.run("mc_pi", backend, (samples, seed))
    assert 0.0 <= estimate <= 4.0
    assert abs(estimate - math.pi) <= 5 * PI_STANDARD_ERROR_1 / math.sqrt(samples)


def test_mc_pi_seeds_give_different_streams() -> None:
    estimates = {kernels.run("mc_pi", "cpu", (10_000, seed)) for seed in range(5)}
    assert len(estimates) > 1


# -- validation ---------------------------------------------------------------------------

F32, F64 = np.ones(4, np.float32), np.ones(4, np.float64)

BAD_CALLS = [
    ("vadd", (F64,), "'vadd' takes 2 argument(s), got 1; call it as vadd(a, b)"),
    ("vadd", (F64, F64, F64), "got 3"),
    ("vadd", (np.arange(4), F64), "argument 'a' has dtype int64; pass float32 or float64"),
    ("vadd", (F32, F64), "argument 'b' is float64 but 'a' is float32; cast one"),
    ("vadd", (F64, np.ones(5)), "argument 'b' has shape (5,) but 'a' has (4,)"),
    ("vadd", (np.ones((2, 2)), np.ones((2, 2))), "argument 'a' is 2-D (shape (2, 2)); pass 1-D, e.g. a.ravel()"),
    ("sum", (np.ones(()),), "argument 'x' is 0-D (shape ()); pass 1-D, e.g. x.reshape(1)"),
    ("vadd", (np.ones(8)[::2], F64), "argument 'a' is not contiguous"),
    ("vadd", ([1.0, 2.0, 3.0, 4.0], F64), "argument 'a' is a list, not a NumPy array"),
    ("vadd", (F64.astype(">f8"), F64), "argument 'a' has dtype >f8"),
    ("saxpy", ("2", F64, F64), "argument 'alpha' must be a real number"),
    ("saxpy", (True, F64, F64), "argument 'alpha' must be a real number"),
    ("saxpy", (1j, F64, F64), "argument 'alpha' must be a real number"),
    ("saxpy", (2.0, F64, F32), "argument 'y' is float32 but 'x' is float64"),
    ("sum", (np.ones(3, np.float16),), "argument 'x' has dtype float16"),
    ("sum", (), "'sum' takes 1 argument(s), got 0"),
    ("spin", (-1.0,), "argument 'seconds' must be >= 0"),
    ("spin", (math.nan,), "argument 'seconds' must be finite"),
    ("spin", (math.inf,), "argument 'seconds' must be finite"),
    ("spin", ("1",), "argument 'seconds' must be a real number"),
    ("burn", (-1.0,), "argument 'seconds' must be >= 0"),
    ("burn", (math.inf,), "argument 'seconds' must be finite"),
    ("mc_pi", (0, 1), "argument 'samples' must be >= 1"),
    ("mc_pi", (1000.0, 1), "argument 'samples' must be an int"),
    ("mc_pi", (1000, -1), "argument 'seed' must be >= 0"),
    ("mc_pi", (1000, 2**64), "argument 'seed' must be >= 0 and <= 18446744073709551615"),
    ("mc_pi", (1000,), "'mc_pi' takes 2 argument(s), got 1"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "args", "expected"), BAD_CALLS)
def test_bad_inputs_raise_one_line_errors_naming_kernel_and_argument(
    backend: str, name: str, args: tuple[object, ...], expected: str
) -> None:
    with pytest.raises(KernelInputError) as caught:
        kernels.run(name, backend, args)
    message = str(caught.value)
    assert expected in message
    assert f"'{name}'" in message
    assert "\n" not in message
    assert isinstance(caught.value, ValueError)


def test_numpy_scalars_are_accepted_where_python_numbers_are() -> None:
    x, y = _vectors(3, np.float32, 2)
    np.testing.assert_array_equal(
        kernels.run("saxpy", "cpu", (np.float64(2.0), x, y)), kernels.run("saxpy", "cpu", (2, x, y))
    )
    assert kernels.run("mc_pi", "cpu", (np.int64(100), np.uint64(5))) == kernels.run("mc_pi", "cpu", (100, 5))


# -- laziness, layering and the compile cache ---------------------------------------------


def test_importing_kernels_and_running_the_probes_does_not_import_numba() -> None:
    done = _run_python(
        """
        import sys
        import numpy as np
        from batuta import kernels
        assert "numba" not in sys.modules, "import"
        kernels.run("noop", "cpu", (1,))
        kernels.run("spin", "cpu", (0.001,))
        kernels.run("vadd", "scalar", (np.ones(3), np.ones(3)))
        kernels.names(), kernels.info("vadd")
        assert "numba" not in sys.modules, "probes"
        kernels.run("vadd", "cpu", (np.ones(3), np.ones(3)))
        assert "numba" in sys.modules, "cpu variant"
        """
    )
    assert done.returncode == 0, done.stderr


def test_kernels_folder_imports_nothing_above_it() -> None:
    """The bottom layer: no batuta/tui imports, only relative ones, and no numba at import time
    (but in cuda_memory.py, the allocator plugin that only numba imports, when it makes a GPU
    slot's CUDA context: nothing of batuta imports it)."""
    for path in KERNELS_DIR.glob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert top not in {"batuta", "tui", "kernels"}, f"{path.name}: imports {module}"
                if top == "numba" and path.name != "cuda_memory.py":
                    assert node not in tree.body, f"{path.name}: imports numba at import time"


def test_only_numba_imports_the_allocator_plugin() -> None:
    """kernels/cuda_memory.py imports numba's driver: the agent names it in a GPU slot's
    NUMBA_CUDA_MEMORY_MANAGER, and no module of batuta imports it."""
    for folder in ("batuta", "tui", "kernels"):
        for path in (KERNELS_DIR.parent / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import | ast.ImportFrom) else []
                module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
                assert not any("cuda_memory" in n for n in [module, *names]), f"{path}: imports cuda_memory"


CACHE_PROBE = textwrap.dedent(
    """
    import json
    import numpy as np
    from batuta import kernels
    from batuta.kernels import basic
    a = np.ones(10, np.float32)
    kernels.run("vadd", "cpu", (a, a))
    stats = basic._vadd_loop.stats
    print(json.dumps({"hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values()),
                      "path": stats.cache_path}))
    """
)


def test_compiled_variants_are_cached_across_processes(tmp_path: Path) -> None:
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    first = _run_python(CACHE_PROBE, env)
    assert first.returncode == 0, first.stderr
    second = _run_python(CACHE_PROBE, env)
    assert second.returncode == 0, second.stderr
    first_stats, second_stats = json.loads(first.stdout), json.loads(second.stdout)
    assert first_stats["misses"] == 1
    assert second_stats == {"hits": 1, "misses": 0, "path": first_stats["path"]}
    assert first_stats["path"].startswith(str(tmp_path))


def test_unwritable_cache_compiles_without_cache(tmp_path: Path) -> None:
    # As root, file modes do not stop writes, so make numba's writability probe fail instead:
    # every cache location then looks read-only, as on a read-only install with no user cache.
    patch = """
        import tempfile
        def read_only(*args, **kwargs):
            raise PermissionError(13, "Permission denied (simulated read-only cache dir)")
        tempfile.TemporaryFile = read_only
    """
    done = _run_python(
        textwrap.dedent(patch) + CACHE_PROBE,
        {"NUMBA_CACHE_DIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["hits"] == 0
    assert stats["path"] is None
    assert not list(tmp_path.rglob("*.nb[ic]"))  # numba may create the folder, but writes nothing


def test_uncacheable_function_falls_back_to_no_cache() -> None:
    namespace: dict[str, object] = {"jit": kernels.jit}
    source = "@jit(cache=True)\ndef plus_one(x):\n    return x + 1\n"
    exec(compile(source, "<no source file>", "exec"), namespace)  # numba finds no cache locator
    plus_one = namespace["plus_one"]
    assert isinstance(plus_one, kernels.LazyJit)
    assert plus_one(41) == 42
    assert namespace["plus_one"] is plus_one.dispatcher  # the module name now skips the proxy
