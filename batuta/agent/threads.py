"""Per-slot thread budgets: a host's cores are shared by its slots, not multiplied by them.

Each CPU slot is already one worker per core's share. Left alone, numba's parallel loops
and NumPy's BLAS (OpenBLAS, MKL) would each start a thread per core *in every slot*: 16
slots on a 16-core host running `matmul` become 256 runnable threads fighting for 16 cores.
So every CPU slot gets `cores // cpu_slots` threads for both, the way Dask's nanny sets
`OMP_NUM_THREADS` for its workers. A budget the user set in the agent's environment (any
of the variables below) is kept as it is.

Environment variables cover an exec-started slot (it loads BLAS after they are set) and the
programs that binary tasks start. A forked slot inherits a BLAS that the agent already
loaded with a thread per core, so the agent also sets the loaded libraries' limit through
threadpoolctl before forking: the value lives in the library's memory, and the children
inherit it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

NUMBA_THREADS_ENV = "NUMBA_NUM_THREADS"
BLAS_THREADS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a cpuset or `taskset` narrows it)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def slot_share(cpu_slots: int, cores: int | None = None) -> int:
    """Threads per CPU slot: the cores divided among the slots, at least one."""
    total = cores if cores is not None else (os.cpu_count() or 1)
    return max(1, total // max(1, cpu_slots))


def budget_env(base: Mapping[str, str], share: int) -> dict[str, str]:
    """The variables to add to a CPU slot's environment (none that `base` already sets)."""
    added: dict[str, str] = {}
    if NUMBA_THREADS_ENV not in base:
        added[NUMBA_THREADS_ENV] = str(share)
    if not any(name in base for name in BLAS_THREADS_ENV):
        added.update({name: str(share) for name in BLAS_THREADS_ENV})
    return added


def cap_loaded_numba(environ: Mapping[str, str]) -> None:
    """In a forked slot: numba, when the agent imported it already (a user's module that uses
    it), read `NUMBA_NUM_THREADS` then, in the agent's environment, so every slot's parallel
    loops ran a thread per core. Its thread count is set again from the slot's environment
    before its thread pool starts (it starts at the first parallel loop)."""
    import sys

    config = sys.modules.get("numba.core.config")
    wanted = environ.get(NUMBA_THREADS_ENV, "")
    if config is None or not wanted.isdigit() or int(wanted) < 1:
        return
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    if parallel is not None and getattr(parallel, "_is_initialized", False):
        return  # launched in the agent: too late (numba warns of a fork after that)
    with contextlib.suppress(Exception):
        setattr(config, "NUMBA_NUM_THREADS", int(wanted))  # noqa: B010 - modules mypy cannot see into
        if parallel is not None:
            setattr(parallel, "NUM_THREADS", int(wanted))  # noqa: B010


def limit_loaded_blas(threads: int) -> bool:
    """Cap the BLAS libraries already loaded in this process at `threads`; False if
    threadpoolctl is missing or cannot (the slots then run with the library's default)."""
    with contextlib.suppress(Exception):  # a broken BLAS introspection must not stop the agent
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads, user_api="blas")
        return True
    return False
