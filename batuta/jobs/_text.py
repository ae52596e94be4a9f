"""A job's value, or its exception, as text: `str()` of what a user's `main` returned runs the
user's code, and a `__str__` that raises took the whole report down (the summary, the JSON
on stdout) after the job had done its work."""

from __future__ import annotations


def printable(value: object) -> str:
    """`str(value)`, else `repr(value)`, else a placeholder naming the type and what went wrong."""
    try:
        return str(value)
    except Exception:
        pass
    try:
        return repr(value)
    except Exception as exc:
        return f"<unprintable {type(value).__name__}: {type(exc).__name__} in its __str__ and __repr__>"
