"""Numba, imported on first use: `jit` is ``numba.njit`` deferred to a function's first call,
and `prange` is ``range`` until then.

numba costs about 0.75 s to import and more to compile, and this package is imported by every
host agent and by the coordinator, most of which never run a numba variant. Kernel modules
import `jit` and `prange` from here (or from `registry`, which re-exports them).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["LazyJit", "jit", "prange"]

log = logging.getLogger(__name__)


def prange(*args: int) -> range:
    """``range`` in plain Python; `jit` swaps it for ``numba.prange`` when it compiles.

    Import it from here in kernel modules so they need not import numba at import time.
    """
    return range(*args)


_JIT_LOCK = threading.RLock()


class LazyJit:
    """A function that becomes ``numba.njit(**options)(py_func)`` on its first call.

    When it resolves, it also rebinds, in the function's module: the module-level name of the
    function itself to the numba dispatcher (later calls skip this proxy), every `LazyJit` the
    function refers to by a global name (so jitted helpers can call jitted helpers), and
    `prange` to ``numba.prange``. Helpers must therefore be module-level names, not attributes.

    ``cache=True`` stores machine code next to the source (or in ``NUMBA_CACHE_DIR``, or the
    user cache dir) so a restarted worker loads instead of recompiling; where no cache dir is
    writable, the function is compiled without a cache instead of failing.

    Two LazyJits must not wrap the same Python function with different options: numba's cache
    key does not include options such as ``parallel``, so they would share cache entries.
    """

    def __init__(self, py_func: Callable[..., Any], options: dict[str, Any]) -> None:
        self.py_func = py_func
        self.options = options
        self.dispatcher: Any = None  # the numba dispatcher, once resolved
        self.__name__ = py_func.__name__
        self.__qualname__ = py_func.__qualname__
        self.__doc__ = py_func.__doc__
        self.__wrapped__ = py_func

    def __call__(self, *args: Any) -> Any:
        dispatcher = self.dispatcher
        if dispatcher is None:
            dispatcher = self.resolve()
        return dispatcher(*args)

    def __repr__(self) -> str:
        state = "resolved" if self.dispatcher is not None else "not yet compiled"
        return f"<LazyJit {self.__qualname__} ({state})>"

    def resolve(self) -> Any:
        """Import numba and wrap the function (numba compiles per signature on first call)."""
        with _JIT_LOCK:
            if self.dispatcher is not None:
                return self.dispatcher
            import numba

            module_globals = self.py_func.__globals__
            for global_name in self.py_func.__code__.co_names:
                value = module_globals.get(global_name)
                if isinstance(value, LazyJit):
                    module_globals[global_name] = value.resolve()
                elif value is prange:
                    module_globals[global_name] = numba.prange
            self.dispatcher = _njit(numba, self.py_func, self.options)
            if module_globals.get(self.py_func.__name__) is self:
                module_globals[self.py_func.__name__] = self.dispatcher
            return self.dispatcher


def _njit(numba: Any, py_func: Callable[..., Any], options: dict[str, Any]) -> Any:
    if not options.get("cache"):
        return numba.njit(**options)(py_func)
    try:
        return numba.njit(**options)(py_func)
    except RuntimeError as exc:  # "cannot cache function ...: no locator available"
        log.info("compiling %s without a cache: %s", py_func.__qualname__, exc)
        return numba.njit(**{**options, "cache": False})(py_func)


def jit(**options: Any) -> Callable[[Callable[..., Any]], LazyJit]:
    """Decorator: like ``numba.njit(**options)``, but numba is imported on the first call.

    Defaults to ``cache=True``. Use `prange` from this module for parallel loops.
    """
    options.setdefault("cache", True)

    def wrap(py_func: Callable[..., Any]) -> LazyJit:
        return LazyJit(py_func, dict(options))

    return wrap
