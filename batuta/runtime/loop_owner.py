"""A pool belongs to the event loop it was started on.

Its sessions, timers and futures are that loop's: used from another one (a second
`asyncio.run`, a notebook cell run on a loop of its own, a thread's loop) it failed deep inside
asyncio ("Event loop is closed", a future attached to a different loop). It says so instead.
"""

from __future__ import annotations

import asyncio

from batuta.errors import UsageError


def check_loop(owner: asyncio.AbstractEventLoop | None) -> None:
    """Raise UsageError when called on a running loop other than `owner`. Off any loop (a
    plain function calling `put` or `submit_nowait`) it says nothing."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return
    if owner is None or running is owner:
        return
    which = "has ended" if owner.is_closed() else "is another"
    raise UsageError(
        f"the pool belongs to the event loop it was started on, which {which}; use it inside one "
        "loop (one asyncio.run around 'async with pool:' and its work), or hand coroutines to its "
        "loop from other threads with asyncio.run_coroutine_threadsafe"
    )
