"""Where an array's memory lies: in the process's brk heap, in shared memory, or in a mapping of its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def in_heap(array: np.ndarray) -> bool:
    """Whether `array`'s first byte lies in the `[heap]` region of /proc/self/maps."""
    address = array.__array_interface__["data"][0]
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith("[heap]"):
            start, end = (int(part, 16) for part in line.split()[0].split("-"))
            if start <= address < end:
                return True
    return False


def backing(array: np.ndarray) -> str:
    """The name /proc/self/maps gives the region holding `array`'s first byte ("" for an
    anonymous mapping; `/memfd:NAME (deleted)` for shared memory)."""
    address = array.__array_interface__["data"][0]
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(part, 16) for part in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) > 5 else ""
    return "?"
