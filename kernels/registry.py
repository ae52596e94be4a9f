"""The kernel registry: named numerical kernels, each with a reference and optional variants.

A kernel is registered by decorating its NumPy/pure-Python *reference* implementation, which
is the correctness oracle and also the ``"scalar"`` backend. Faster variants are attached to
the returned `KernelDef` with decorators::

    @kernel("vadd", description="Elementwise a + b of two 1-D float arrays.")
    def vadd(a, b):
        return a + b

    @vadd.validator              # checks and normalises the args before any backend runs
    def _(a, b): ...

    @jit(parallel=True, cache=True)  # numba.njit, but numba is imported on first call
    def _vadd_loop(a, b): ...

    vadd.cpu(_vadd_loop)         # or use @vadd.cpu on a Python wrapper function

The agent calls `run(name, backend, args)`; the wire carries only the name (no pickle), so
every host must have the same kernels registered: built-ins come with the package and user
modules are loaded with `load_module("pkg.mod")`, or implicitly by naming a kernel
``"pkg.mod:name"``.

Why lazy: numba costs about 0.75 s to import and more to compile, and this package is imported
by every host agent and by the coordinator. So this module never imports numba; `jit` (in
`lazyjit.py`, re-exported here) defers ``numba.njit`` to the first call, and ``noop``/``spin``
(the scheduler's throughput and imbalance probes) run as a dict lookup and a plain Python call.

This folder is the bottom layer: it must not import batuta (or tui), and must import without
CUDA. Its errors therefore have their own small root, `KernelCallError`, which the agent maps
onto batuta's error tree.
"""

from __future__ import annotations

import importlib
import math
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np

from .lazyjit import LazyJit, jit, prange

__all__ = [
    "BACKENDS",
    "COMPLEXITIES",
    "FLOAT_DTYPES",
    "KernelCallError",
    "KernelDef",
    "KernelDefinitionError",
    "KernelInfo",
    "KernelInputError",
    "KernelModuleError",
    "LazyJit",
    "UnknownKernelError",
    "UnsupportedBackendError",
    "as_count",
    "as_real",
    "device_results_wanted",
    "float_array",
    "float_vectors",
    "forget_modules",
    "info",
    "is_device_array",
    "jit",
    "kernel",
    "load_module",
    "lookup",
    "module_of",
    "names",
    "prange",
    "reference",
    "run",
    "same_dtype_and_shape",
    "to_host",
    "unregister",
]


BACKENDS: tuple[str, ...] = ("scalar", "cpu", "gpu")
"""Backends a kernel can run on. ``"auto"`` is not one: the coordinator resolves it first."""

FLOAT_DTYPES: tuple[np.dtype[Any], ...] = (np.dtype(np.float32), np.dtype(np.float64))

COMPLEXITIES: tuple[str, ...] = ("linear", "quadratic", "cubic")
"""How a kernel's work grows with its input size, for the coordinator's ``auto`` backend choice
(the seed's table sends O(n^2) and heavier work to the GPU sooner than streaming work)."""

F = TypeVar("F", bound=Callable[..., Any])

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")
_CO_VARARGS = 0x04  # inspect.CO_VARARGS, without importing inspect


# -- errors -------------------------------------------------------------------------------


class KernelCallError(Exception):
    """A kernel call could not start: unknown name, bad backend or bad inputs.

    These are the caller's fault and are never worth retrying, unlike an exception raised
    from inside a running kernel.
    """


class UnknownKernelError(KernelCallError, LookupError):
    """No kernel is registered under the requested name."""


class ContestedKernelError(UnknownKernelError):
    """Two modules define the requested name: it runs under neither (`contest`)."""


class KernelInputError(KernelCallError, ValueError):
    """Bad arguments: wrong count, dtype, shape, contiguity or value. Names kernel, argument, fix."""


class UnsupportedBackendError(KernelInputError):
    """The backend is not one of `BACKENDS`, or the kernel has no variant for it."""


class KernelModuleError(KernelCallError, ImportError):
    """A user kernel module could not be imported."""


class KernelDefinitionError(ValueError):
    """A kernel was defined wrongly (bad or duplicate name, variant attached twice).

    `clash`: for a name another module registered already, (name, that kernel, this one),
    for a host importing shipped code to `contest` the name."""

    def __init__(self, message: str, clash: tuple[str, KernelDef, KernelDef] | None = None) -> None:
        super().__init__(message)
        self.clash = clash


# -- the registry -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelInfo:
    """What a kernel is, for listings, the TUI palette and backend selection."""

    name: str
    description: str
    backends: tuple[str, ...]
    params: tuple[str, ...]
    module: str
    complexity: str = "linear"
    """One of `COMPLEXITIES`: how the work grows with the input size."""
    pure: bool = False
    """Whether equal arguments always give an equal result (no clock, no unseeded randomness):
    a job journal may then reuse one result for every task with the same arguments."""
    gpu_min_elements: int | None = None
    """Elements (over the array arguments) from which the GPU variant beats the CPU one, for
    the ``auto`` backend choice; None: the complexity rule (O(n^2) and worse go to a GPU above
    the cluster's ``gpu_above``, linear work stays on CPUs)."""


class KernelDef:
    """One registered kernel: its reference, optional cpu/gpu variants and a validator.

    ``kdef.reference`` is the reference function and calling ``kdef(...)`` runs it, so the
    decorated name still behaves like the function it decorated. ``@kdef.cpu``,
    ``@kdef.gpu`` and ``@kdef.validator`` attach the rest; `variant` reads them back.
    """

    def __init__(
        self,
        name: str,
        reference: Callable[..., Any],
        description: str,
        complexity: str = "linear",
        *,
        pure: bool = False,
        gpu_min_elements: int | None = None,
    ) -> None:
        code = getattr(reference, "__code__", None)
        if code is None:
            raise KernelDefinitionError(f"kernel {name!r}: the reference must be a Python function, not {reference!r}")
        if code.co_kwonlyargcount > len(getattr(reference, "__kwdefaults__", None) or {}):
            raise KernelDefinitionError(
                f"kernel {name!r}: keyword-only parameters need defaults (calls pass args only)"
            )
        if complexity not in COMPLEXITIES:
            raise KernelDefinitionError(
                f"kernel {name!r}: complexity {complexity!r} is not one of {', '.join(COMPLEXITIES)}"
            )
        if gpu_min_elements is not None and (type(gpu_min_elements) is not int or gpu_min_elements < 0):
            raise KernelDefinitionError(
                f"kernel {name!r}: gpu_min_elements must be an int >= 0 or None, not {gpu_min_elements!r}"
            )
        self.name = name
        self.reference = reference
        self.complexity = complexity
        self.gpu_min_elements = gpu_min_elements
        self.pure = bool(pure)
        self.description = description or (reference.__doc__ or "").strip().split("\n")[0]
        self.module: str = reference.__module__
        varargs = bool(code.co_flags & _CO_VARARGS)
        self.params: tuple[str, ...] = code.co_varnames[: code.co_argcount]
        if varargs:
            self.params += ("*" + code.co_varnames[code.co_argcount + code.co_kwonlyargcount],)
        self._min_args = code.co_argcount - len(reference.__defaults__ or ())
        self._max_args: int | None = None if varargs else code.co_argcount
        self._validator: Callable[..., tuple[Any, ...] | None] | None = None
        self._sample: Callable[[np.random.Generator], tuple[Any, ...]] | None = None
        self._runners: dict[str, Callable[..., Any]] = {"scalar": reference}
        self._check: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = self._build_check()

    def __repr__(self) -> str:
        return f"<kernel {self.name!r} backends={self.backends} from {self.module}>"

    def __call__(self, *args: Any) -> Any:
        return self.reference(*args)

    # -- attaching variants -------------------------------------------------------------

    def cpu(self, fn: F) -> F:
        """Attach the numba CPU variant (a `LazyJit`, or a Python wrapper that calls one)."""
        return self._attach("cpu", fn)

    def gpu(self, fn: F) -> F:
        """Attach the CUDA variant. It must import numba.cuda lazily (hosts without CUDA)."""
        return self._attach("gpu", fn)

    def validator(self, fn: F) -> F:
        """Attach the input check: called with the kernel's args after the arity check.

        It raises `KernelInputError` for bad input and returns the args to run with (for
        example with a scalar converted to the arrays' dtype), or None to keep them.
        """
        if self._validator is not None:
            raise KernelDefinitionError(f"kernel {self.name!r} already has a validator")
        self._validator = fn
        self._check = self._build_check()
        return fn

    def sample(self, fn: F) -> F:
        """Attach a sample input for `batuta stack gate`: called with a seeded
        ``numpy.random.Generator``, it returns the args of one small call. The gate runs the
        kernel with them on every backend of every node and compares each answer with the
        reference's on the coordinator; a kernel without a sample is skipped there."""
        if self._sample is not None:
            raise KernelDefinitionError(f"kernel {self.name!r} already has a sample")
        if not callable(fn):
            raise KernelDefinitionError(f"kernel {self.name!r}: the sample must be callable")
        self._sample = fn
        return fn

    def sample_args(self, rng: np.random.Generator) -> tuple[Any, ...] | None:
        """The args of the attached sample (None without one)."""
        return None if self._sample is None else tuple(self._sample(rng))

    def _attach(self, backend: str, fn: F) -> F:
        if backend in self._runners:
            raise KernelDefinitionError(f"kernel {self.name!r} already has a {backend!r} variant")
        if not callable(fn):
            raise KernelDefinitionError(f"kernel {self.name!r}: {backend} variant must be callable")
        self._runners[backend] = fn
        return fn

    # -- reading back -------------------------------------------------------------------

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends this kernel can run on, in `BACKENDS` order."""
        return tuple(b for b in BACKENDS if b in self._runners)

    def variant(self, backend: str) -> Callable[..., Any] | None:
        """The callable for `backend` ("scalar" is the reference), or None if absent."""
        return self._runners.get(backend)

    def info(self) -> KernelInfo:
        return KernelInfo(
            name=self.name,
            description=self.description,
            backends=self.backends,
            params=self.params,
            module=self.module,
            complexity=self.complexity,
            pure=self.pure,
            gpu_min_elements=self.gpu_min_elements,
        )

    # -- calling ------------------------------------------------------------------------

    def validate(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Check `args` (count, then the validator); return the args to run with."""
        return args if self._check is None else self._check(args)

    def call(self, backend: str, args: tuple[Any, ...], *, device_results: bool = False) -> Any:
        """Validate `args`, then run the `backend` variant on them.

        A GPU variant may return device arrays (see `run`): unless `device_results`, they are
        copied to host NumPy arrays here, so a caller gets host arrays whatever the variant did.
        """
        runner = self._runners.get(backend)
        if runner is None:
            raise self._backend_error(backend)
        if self._check is not None:
            args = self._check(args)
        if backend != "gpu":
            return runner(*args)
        if not device_results:
            return to_host(runner(*args))
        previous = device_results_wanted()
        _RESULTS.device = True
        try:
            return runner(*args)
        finally:
            _RESULTS.device = previous

    def _build_check(self) -> Callable[[tuple[Any, ...]], tuple[Any, ...]] | None:
        """The per-call check, or None when there is nothing to check (noop's thin path)."""
        low, high, validator = self._min_args, self._max_args, self._validator
        if validator is None and low == 0 and high is None:
            return None

        def check(args: tuple[Any, ...]) -> tuple[Any, ...]:
            count = len(args)
            if count < low or (high is not None and count > high):
                raise self._arity_error(count)
            if validator is None:
                return args
            checked = validator(*args)
            return args if checked is None else checked

        return check

    def _arity_error(self, count: int) -> KernelInputError:
        if self._max_args is None:
            wanted = f"at least {self._min_args}"
        elif self._min_args == self._max_args:
            wanted = str(self._max_args)
        else:
            wanted = f"{self._min_args} to {self._max_args}"
        signature = f"{self.name}({', '.join(self.params)})"
        return KernelInputError(f"kernel {self.name!r} takes {wanted} argument(s), got {count}; call it as {signature}")

    def _backend_error(self, backend: object) -> UnsupportedBackendError:
        available = ", ".join(self.backends)
        if backend in BACKENDS:
            return UnsupportedBackendError(f"kernel {self.name!r} has no {backend!r} variant; it runs on: {available}")
        if backend == "auto":
            return UnsupportedBackendError(
                f"kernel {self.name!r}: backend 'auto' must be resolved by the coordinator "
                f"before run(); pass one of: {available}"
            )
        return UnsupportedBackendError(f"kernel {self.name!r}: unknown backend {backend!r}; pass one of: {available}")


_KERNELS: dict[str, KernelDef] = {}
# a name two modules registered (`register`): the one that held it first, and the other
_CONTESTED: dict[str, tuple[KernelDef, KernelDef]] = {}


def kernel(
    name: str,
    *,
    description: str = "",
    complexity: str = "linear",
    pure: bool = False,
    gpu_min_elements: int | None = None,
) -> Callable[[Callable[..., Any]], KernelDef]:
    """Decorator: register the decorated reference function as kernel `name`.

    Returns the `KernelDef`, on which ``@<kdef>.cpu``, ``@<kdef>.gpu`` and
    ``@<kdef>.validator`` attach the rest. The description defaults to the docstring's first
    line. `complexity` ("linear", "quadratic" or "cubic" in the input size) feeds the
    coordinator's automatic backend choice. `pure=True` declares that equal arguments always
    give an equal result (no clock, no unseeded randomness, no host facts): a job journal then
    keys the kernel's tasks by their arguments alone, so equal tasks share one result, where
    it otherwise keys each task by its place in the job. `gpu_min_elements`: from how many
    elements (over the array arguments) the GPU variant beats the CPU one, which the
    coordinator's ``auto`` choice then uses instead of the complexity rule. Re-registering a
    name from the same module (a reload) replaces it; from another module it is an error,
    because hosts must agree on what a name means.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise KernelDefinitionError(
            f"invalid kernel name {name!r}: use letters, digits, '_', '.' or '-' (no ':', "
            "which separates a module from a kernel name)"
        )

    def register(reference: Callable[..., Any]) -> KernelDef:
        kdef = KernelDef(name, reference, description, complexity, pure=pure, gpu_min_elements=gpu_min_elements)
        contested = _CONTESTED.get(name)
        if contested is not None:
            raise KernelDefinitionError(f"{_contested_words(name, *contested)}; pick another name")
        existing = _KERNELS.get(name)
        if existing is not None and (
            existing.module != kdef.module or existing.reference.__qualname__ != reference.__qualname__
        ):
            holder = f"{existing.module}.{existing.reference.__qualname__}"
            taken = (
                f"one of batuta's built-in kernels ({holder})"
                if _built_in(existing)
                else f"already registered by {holder}"
            )
            raise KernelDefinitionError(
                f"kernel {name!r} is {taken}; pick another name",
                clash=(name, existing, kdef) if existing.module != kdef.module else None,
            )
        _KERNELS[name] = kdef
        return kdef

    return register


def contest(name: str, first: KernelDef, second: KernelDef) -> None:
    """Two modules of the user's shipped code register `name`: neither may run under it. The
    first to import would win otherwise, and which that is depends on the order a host
    imports them in: a wrong answer with nothing to show for it. Tasks of `name` fail naming
    both, until `forget_modules` drops the code (the coordinator's own registry, where a job
    importing both fails at once, never contests)."""
    if _KERNELS.get(name) is first:
        del _KERNELS[name]
    _CONTESTED[name] = (first, second)


def unregister(name: str) -> None:
    """Remove kernel `name` (for tests and interactive reloads). Unknown names are ignored."""
    _KERNELS.pop(name, None)
    _CONTESTED.pop(name, None)


def forget_modules(modules: Iterable[str]) -> list[str]:
    """Unregister every kernel that these modules registered, and return their names: the
    agent calls this when it replaces the user's code, so that a kernel deleted from a module
    is unknown afterwards instead of running from the old copy. A name they contested goes
    back to the module that held it first, if that one stays."""
    gone = set(modules)
    names = sorted(name for name, kdef in _KERNELS.items() if kdef.module in gone)
    for name in names:
        del _KERNELS[name]
    for name, (first, second) in list(_CONTESTED.items()):
        if first.module in gone or second.module in gone:
            del _CONTESTED[name]
            if first.module not in gone:
                _KERNELS[name] = first
    return names


def _built_in(kdef: KernelDef) -> bool:
    return kdef.module.split(".", 1)[0] == "batuta"


def _contested_words(name: str, first: KernelDef, second: KernelDef) -> str:
    one = f"{first.module}.{first.reference.__qualname__}"
    other = f"{second.module}.{second.reference.__qualname__}"
    if _built_in(first):  # the user's module cannot take a built-in's name
        return f"kernel {name!r} is built into batuta ({one}) and defined again by {other}, so neither runs"
    return f"kernel {name!r} is defined by two modules, {one} and {other}, so neither runs under that name"


def _rename(first: KernelDef, second: KernelDef) -> str:
    return f"rename {second.module}.{second.reference.__qualname__}" if _built_in(first) else "rename one of them"


def lookup(name: str) -> KernelDef:
    """The kernel registered as `name`, or as ``"module:name"`` (importing the module)."""
    kdef = _KERNELS.get(name)
    if kdef is not None:
        return kdef
    contested = _CONTESTED.get(name)
    if contested is not None:
        raise ContestedKernelError(f"{_contested_words(name, *contested)}; {_rename(*contested)}")
    if isinstance(name, str) and ":" in name:
        module, _, short = name.rpartition(":")
        load_module(module)
        kdef = _KERNELS.get(short)
        if kdef is not None and kdef.module == module:
            return kdef
        from_module = sorted(k.name for k in _KERNELS.values() if k.module == module)
        raise UnknownKernelError(
            f"module {module!r} registers no kernel {short!r}; it registers: {', '.join(from_module) or 'none'}"
        )
    raise UnknownKernelError(_unknown_message(name))


def _unknown_message(name: object) -> str:
    known = names()
    hint = ""
    if isinstance(name, str):
        import difflib

        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (
        f"unknown kernel {name!r}{hint}; known: {', '.join(known)}; to add one, decorate a "
        f"function with @kernel({name!r}) (from batuta.kernels import kernel) in a module the "
        "job file imports from its folder (batuta run sends it to every host), or one named with "
        "--module PATH, kernel_modules in the cluster file or Pool.builder().modules([...]), "
        "or name it 'module:kernel'"
    )


def known(name: str) -> KernelInfo | None:
    """`info(name)` of a kernel registered here, or None; imports nothing, unlike `info` (a
    ``"module:name"`` whose module is not loaded here is unknown). The coordinator asks this:
    `info` imported a ``"module:name"``'s module there at submit, running its top level in the
    coordinator's process and blocking its event loop for the import."""
    kdef = _KERNELS.get(name) if name not in _CONTESTED else None
    if kdef is None and isinstance(name, str) and ":" in name:
        module, _, short = name.rpartition(":")
        kdef = _KERNELS.get(short)
        if kdef is not None and kdef.module != module:
            kdef = None
    return kdef.info() if kdef is not None else None


def module_of(name: str) -> str | None:
    """The module that registered kernel `name` here, or None if none did. Imports nothing,
    unlike `lookup` (a ``"module:name"`` stays unknown until its module is loaded)."""
    kdef = _KERNELS.get(name)
    return kdef.module if kdef is not None else None


def names() -> list[str]:
    """Names of all registered kernels, sorted."""
    return sorted(_KERNELS)


def info(name: str) -> KernelInfo:
    """Name, description, backends, parameters and module of kernel `name`."""
    return lookup(name).info()


def run(name: str, backend: str, args: tuple[Any, ...], *, device_results: bool = False) -> Any:
    """Validate `args` and run kernel `name` on `backend` ("scalar", "cpu" or "gpu").

    On "gpu", array arguments may be host NumPy arrays or CUDA device arrays (see
    `is_device_array`); a device argument is never copied to the host. The GPU variant's
    array results (also inside tuple results) are returned as device arrays when
    `device_results` is true (a GPU slot keeping a result on its card), and as host NumPy
    arrays otherwise, the default: host in, host out. Scalars are Python numbers either way.
    """
    kdef = _KERNELS.get(name)
    if kdef is None:
        kdef = lookup(name)
    if type(backend) is not str:  # e.g. an enum whose value is the backend name
        backend = getattr(backend, "value", backend)
    return kdef.call(backend, args, device_results=device_results)


def reference(name: str, args: tuple[Any, ...]) -> Any:
    """Validate `args` and return the reference (NumPy) result of kernel `name`."""
    return lookup(name).call("scalar", args)


def load_module(module: str) -> None:
    """Import `module` so that its ``@kernel`` decorators register its kernels.

    Importing an already imported module does nothing, so calling this once per task is cheap.
    """
    try:
        importlib.import_module(module)
    except Exception as exc:
        raise KernelModuleError(
            f"cannot load kernel module {module!r}: {type(exc).__name__}: {exc}; make it "
            "importable on this host (on PYTHONPATH or installed in the agent's environment), or, "
            f"if it is your own file, have the job import it (`import {module.partition('.')[0]}`: "
            "what the job imports from its folder ships) or pass it with --module"
        ) from exc


# -- device arrays ------------------------------------------------------------------------

_RESULTS = threading.local()
"""``device``: whether the GPU variant running on this thread may leave its results on the device."""


def device_results_wanted() -> bool:
    """True while a GPU variant runs for ``run(..., device_results=True)`` on this thread.

    A variant need not look: `run` copies device results to the host when they are not
    wanted. The built-in variants look so that host-in, host-out calls can take a cheaper
    path (reused staging buffers, one synchronisation) than device results copied afterwards.
    """
    return bool(getattr(_RESULTS, "device", False))


def is_device_array(value: object) -> bool:
    """Whether `value` is a CUDA device array: numba's (also the simulator's fake ones) or
    anything with ``__cuda_array_interface__`` (CuPy, PyTorch). Imports nothing."""
    cls = type(value)
    if cls is np.ndarray:
        return False
    return bool(getattr(cls, "__cuda_ndarray__", False)) or hasattr(cls, "__cuda_array_interface__")


def to_host(value: Any) -> Any:
    """`value` with every device array in it copied to a host NumPy array.

    Goes through tuples and lists (a named tuple keeps its type); anything else is returned
    as it is. numba's device arrays (and the simulator's) are copied with their
    ``copy_to_host``; other ``__cuda_array_interface__`` objects through a numba view of them.
    A numba array bound to a stream (made with ``stream=``) copies on that stream without
    waiting: that stream is synchronised before the copy is returned.
    """
    cls = type(value)
    if cls is np.ndarray or cls is float or cls is int or value is None:
        return value
    if cls is tuple or cls is list or isinstance(value, (tuple, list)):
        items = [to_host(item) for item in value]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        if isinstance(value, list):
            return items
        return cls(*items) if hasattr(value, "_fields") else cls(items)
    if not is_device_array(value):
        return value
    copy = getattr(value, "copy_to_host", None)
    if copy is None:
        from .cuda_support import cuda  # only a foreign device array gets here: numba is wanted

        copy = cuda().as_cuda_array(value).copy_to_host
    host = copy()
    stream: Any = getattr(value, "stream", 0)
    if stream:
        stream.synchronize()
    return host


def _device_float_array(kernel: str, arg: str, value: Any, ndim: int) -> Any:
    """The checks of `float_array` for a device array, read from its interface (no copy)."""
    if getattr(value, "copy_to_host", None) is None:  # CuPy, PyTorch: a zero-copy numba view
        from .cuda_support import cuda

        try:
            value = cuda().as_cuda_array(value)
        except Exception as exc:
            raise KernelInputError(
                f"kernel {kernel!r}: argument {arg!r} is a {type(value).__name__} whose CUDA array interface "
                f"numba cannot read ({type(exc).__name__}: {' '.join(str(exc).split())}); pass a numba device array"
            ) from exc
    dtype = np.dtype(value.dtype)
    if dtype not in FLOAT_DTYPES:
        raise KernelInputError(
            f"kernel {kernel!r}: argument {arg!r} is a {dtype} device array; pass a float32 or float64 one "
            "(device arrays are never converted silently: convert it on the device first)"
        )
    if value.ndim != ndim:
        raise KernelInputError(
            f"kernel {kernel!r}: argument {arg!r} is a {value.ndim}-D device array (shape {tuple(value.shape)}); "
            f"pass {_dims(ndim)}, e.g. {_reshaped(arg, tuple(value.shape), ndim)} (on the device)"
        )
    if not value.is_c_contiguous():
        raise KernelInputError(
            f"kernel {kernel!r}: argument {arg!r} is a strided device array view; pass a C-contiguous one "
            "(copy it to a contiguous device array first)"
        )
    return value


# -- validation helpers for kernel authors ------------------------------------------------


def float_array(kernel: str, arg: str, value: object, *, ndim: int = 1) -> np.ndarray:
    """`value` as a C-contiguous float32/float64 array of `ndim` dims, or KernelInputError.

    Non-contiguous arrays are rejected, not copied: a silent copy would hide a cost the caller
    can see and avoid, and arrays that come over the wire are contiguous anyway. Read-only
    arrays (as decoded from the wire without a copy) are accepted.

    A CUDA device array (see `is_device_array`; only GPU variants get them) is checked the
    same way from its array interface, without a copy, and returned as a numba device array
    (a zero-copy view where it was another library's); it has the ``dtype``, ``shape``,
    ``ndim`` and ``size`` of a NumPy array, but its data cannot be read on the host.
    """
    if type(value) is not np.ndarray:
        if is_device_array(value):
            return cast(np.ndarray, _device_float_array(kernel, arg, value, ndim))
        if not isinstance(value, np.ndarray):
            raise KernelInputError(
                f"kernel {kernel!r}: argument {arg!r} is a {type(value).__name__}, not a NumPy "
                f"array; pass np.asarray({arg}, dtype=np.float64)"
            )
        value = value.view(np.ndarray)
    if value.dtype not in FLOAT_DTYPES:
        raise KernelInputError(
            f"kernel {kernel!r}: argument {arg!r} has dtype {value.dtype}; pass float32 or "
            f"float64 (native byte order), e.g. {arg}.astype(np.float64)"
        )
    if value.ndim != ndim:
        raise KernelInputError(
            f"kernel {kernel!r}: argument {arg!r} is {value.ndim}-D (shape {value.shape}); "
            f"pass {_dims(ndim)}, e.g. {_reshaped(arg, value.shape, ndim)}"
        )
    if not value.flags.c_contiguous:
        raise KernelInputError(
            f"kernel {kernel!r}: argument {arg!r} is not contiguous (a strided view); pass np.ascontiguousarray({arg})"
        )
    return value


def _dims(ndim: int) -> str:
    return "2-D (rows, columns)" if ndim == 2 else f"{ndim}-D"


def _reshaped(arg: str, shape: tuple[int, ...], ndim: int) -> str:
    """A concrete way to make an array of `shape` `ndim`-D, for an error: `x.reshape(-1, 4)
    for 6 rows of 4`, keeping its last axes (a stack of rows) or adding axes of one."""
    if ndim == 1:
        return f"{arg}.ravel()" if shape else f"{arg}.reshape(1)"
    if len(shape) > ndim:
        kept = shape[len(shape) - ndim + 1 :]
        rows = math.prod(shape[: len(shape) - ndim + 1])
        fix = f"{arg}.reshape(-1, {', '.join(map(str, kept))})"
        return f"{fix} for {rows} rows of {math.prod(kept)}" if ndim == 2 else fix
    if ndim == 2 and len(shape) == 1:
        n = shape[0]
        return f"{arg}.reshape(-1, 1) for {n} rows of 1, or {arg}.reshape(1, -1) for 1 row of {n}"
    return f"{arg}.reshape{(1,) * (ndim - len(shape)) + tuple(shape)}"


def same_dtype_and_shape(kernel: str, args: dict[str, np.ndarray]) -> None:
    """Raise KernelInputError unless every array in `args` (name -> array) matches the first."""
    (first_name, first), *rest = args.items()
    for name, array in rest:
        if array.dtype != first.dtype:
            raise KernelInputError(
                f"kernel {kernel!r}: argument {name!r} is {array.dtype} but {first_name!r} is "
                f"{first.dtype}; cast one, e.g. {name}.astype(np.{first.dtype})"
            )
        if array.shape != first.shape:
            raise KernelInputError(
                f"kernel {kernel!r}: argument {name!r} has shape {array.shape} but "
                f"{first_name!r} has {first.shape}; pass arrays of equal length"
            )


def float_vectors(kernel: str, **arrays: object) -> tuple[np.ndarray, ...]:
    """Each keyword argument checked by `float_array` (1-D), all of one dtype and length."""
    checked = {name: float_array(kernel, name, value) for name, value in arrays.items()}
    same_dtype_and_shape(kernel, checked)
    return tuple(checked.values())


def as_real(kernel: str, arg: str, value: object, *, finite: bool = False) -> float:
    """`value` (int, float or NumPy real scalar, not bool) as a float, or KernelInputError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise KernelInputError(
            f"kernel {kernel!r}: argument {arg!r} must be a real number, not "
            f"{type(value).__name__} {value!r}; pass a float"
        )
    result = float(value)
    if finite and not math.isfinite(result):
        raise KernelInputError(f"kernel {kernel!r}: argument {arg!r} must be finite, not {result!r}")
    return result


def as_count(kernel: str, arg: str, value: object, *, minimum: int = 0, maximum: int | None = None) -> int:
    """`value` (int or NumPy integer, not bool) as an int in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise KernelInputError(
            f"kernel {kernel!r}: argument {arg!r} must be an int, not {type(value).__name__} {value!r}; pass int({arg})"
        )
    result = int(value)
    if result < minimum or (maximum is not None and result > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise KernelInputError(f"kernel {kernel!r}: argument {arg!r} must be >= {minimum}{upper}, got {result}")
    return result
