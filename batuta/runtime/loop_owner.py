"""A pool belongs to the event loop it was started on.

Its sessions, timers and futures are that loop's: used from another one (a second
`asyncio.run`, a notebook cell run on a loop of its own, a thread's loop) it failed deep inside
asyncio ("Event loop is closed", a future attached to a different loop). It says so instead.
"""

from __future__ import annotations

import asyncio

from batuta.errors import UsageError


def check_loop(owner: asyncio.AbstractEventLoop | None) -> None:
    """Raise UsageError when called on a running loop other than `owner`, or from a thread
    other than the one `owner` runs in. Off any loop while `owner` is not running (a pool
    driven by hand with `run_until_complete`, between two calls) it says nothing."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        # In the loop's own thread the loop is found even from a plain function it calls: not
        # found while it runs, this is another thread, where `submit_nowait` lost tasks or
        # left the pool stalled (asyncio's objects are not thread-safe).
        if owner is not None and owner.is_running():
            raise UsageError(
                "the pool was called from a thread other than its event loop's; asyncio is not "
                "thread-safe: hand the call to its loop, with loop.call_soon_threadsafe(pool.submit_nowait, "
                "task) or asyncio.run_coroutine_threadsafe(pool.submit(task), loop)"
            ) from None
        return
    if owner is None or running is owner:
        return
    which = "has ended" if owner.is_closed() else "is another"
    raise UsageError(
        f"the pool belongs to the event loop it was started on, which {which}; use it inside one "
        "loop (one asyncio.run around 'async with pool:' and its work), or hand coroutines to its "
        "loop from other threads with asyncio.run_coroutine_threadsafe"
    )
