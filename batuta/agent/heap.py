"""A slot's freed memory is reused by its next task instead of being handed back and faulted in again.

glibc gives every allocation of 32 MiB or more (a NumPy array of 4M float64s) its own
mapping and unmaps it on free, so a kernel that makes a 50 MB array makes it in fresh pages:
the kernel zeroes each page and, on a virtual machine, the hypervisor backs it first. On the
2-core VM of `bench/RESULTS.md` that was most of a numerical kernel's time (a chain stage of
x * 2 + 1 over 50 MB: 66-125 ms a chain with fresh pages, 50-54 ms reusing freed ones), and a
worker process does little but make such arrays, one task after the next.

So a slot process allocates from its heap only (`M_MMAP_MAX` 0: freed arrays stay there for
the next task) and gives back free memory at the top of its heap past `TRIM_BYTES` at once,
the rest once it has been idle for `IDLE_TRIM_S` (`malloc_trim`): a slot between bursts of
work holds what it holds, not what its biggest task once needed. Threads' arenas still map
what does not fit their heaps. Outside glibc (musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import functools
import sys

TRIM_BYTES = 256 << 20
"""Free memory at the top of a slot's heap beyond this goes back to the system at once."""

IDLE_TRIM_S = 1.0
"""A slot idle this long gives back all the free memory of its heap."""

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library already loaded (no ldconfig run to find it)
        libc.mallopt  # noqa: B018 - glibc has it; musl does not
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(trim_bytes: int = TRIM_BYTES) -> bool:
    """Allocate from the heap only and keep up to `trim_bytes` free at its top (see the
    module doc); False where this is not glibc (nothing changed)."""
    libc = _glibc()
    if libc is None:
        return False
    if not libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(trim_bytes, 2**31 - 1))):
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, ctypes.c_int(0)))


def release_freed_memory() -> None:
    """Give back every free page of the heap (an idle slot's)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))
