"""Core: the task model and the sans-I/O scheduler. No I/O, no clocks, no asyncio, no globals."""
