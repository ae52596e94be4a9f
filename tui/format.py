"""Small number and name formatters shared by the drawing code and the screens (pure functions)."""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Mapping

from rich.cells import cell_len


def duration(seconds: float | None, *, compact: bool = False) -> str:
    """A duration in the unit that reads best: '840 µs', '4.1 ms', '2.35 s', '3m05s', '-'.

    `compact` drops the space before the unit ('4.1ms'), for tight headers.
    """
    if compact:
        return duration(seconds).replace(" ", "")
    if seconds is None or math.isnan(seconds):
        return "-"
    if seconds < 0:
        seconds = 0.0
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        value = seconds * 1e3
        return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def age(seconds: float | None) -> str:
    """A coarse age or remaining time: '0.4s', '12s', '3m05s', '2h10m', '-'."""
    if seconds is None or math.isnan(seconds) or math.isinf(seconds):
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def axis_duration(seconds: float) -> str:
    """A short axis label for a power of ten: '1µs', '10ms', '1s', '100s'."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale * 0.999:
            value = seconds / scale
            return f"{value:.0f}{unit}"
    return f"{seconds * 1e9:.0f}ns"


def count(value: int) -> str:
    """A count with thousands separators: '12,345'."""
    return f"{value:,}"


def rate(per_second: float) -> str:
    """A rate: '0/s', '12/s', '1,234/s', '45.6k/s'."""
    if per_second >= 100_000:
        return f"{per_second / 1000:,.0f}k/s"
    if per_second >= 10_000:
        return f"{per_second / 1000:.1f}k/s"
    return f"{per_second:,.0f}/s"


def size(value: int) -> str:
    """Bytes in at most five characters, binary units: '0', '512B', '12K', '1.2G', '80G'."""
    if value <= 0:
        return "0"
    if value < 1024:
        return f"{value}B"
    scaled = value / 1024
    for unit in "KMGT":
        if scaled < 9.95:
            return f"{scaled:.1f}{unit}"
        if scaled < 999.5:
            return f"{scaled:.0f}{unit}"
        scaled /= 1024
    return f"{scaled:.0f}P"


def gib(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**30:.1f}"


def percent(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}%"


# -- names cut to a column ------------------------------------------------------------------

HOST_CELLS = 14  # a host's name in the nodes panel's column and in alert titles: cut alike in both


def _take(text: str, cells: int, *, from_end: bool = False) -> str:
    """The longest start (or end) of `text` that fits `cells` terminal cells (a CJK character takes two)."""
    taken: list[str] = []
    used = 0
    for char in reversed(text) if from_end else text:
        used += cell_len(char)
        if used > cells:
            break
        taken.append(char)
    return "".join(reversed(taken)) if from_end else "".join(taken)


def cut_end(text: str, width: int) -> str:
    """`text` in at most `width` cells, its end cut off (…)."""
    if cell_len(text) <= width:
        return text
    return _take(text, width - 1) + "…" if width > 1 else _take(text, width)


def cut_middle(text: str, width: int) -> str:
    """`text` in at most `width` cells, its middle cut out (…), more of its end kept than of its start."""
    if cell_len(text) <= width:
        return text
    if width < 3:
        return cut_end(text, width)
    tail = _take(text, (width - 1 + 1) // 2, from_end=True)
    return _take(text, width - 1 - cell_len(tail)) + "…" + tail


def cut_around(text: str, at: int, width: int) -> str:
    """`text` in at most `width` cells, the part around character `at` kept, what is cut of
    either end marked (…)."""
    if cell_len(text) <= width:
        return text
    if width < 5:
        return cut_end(text, width)
    room = width - 2  # an ellipsis each side
    start = max(0, at - room // 2)
    window = _take(text[start:], room + (0 if start else 1))
    return ("…" if start else "") + window + ("…" if start + len(window) < len(text) else "")


def _common_start(texts: list[str]) -> int:
    """How many characters all of `texts` begin with (those of the first and last in order)."""
    first, last = min(texts), max(texts)
    same = 0
    while same < min(len(first), len(last)) and first[same] == last[same]:
        same += 1
    return same


@functools.lru_cache(maxsize=16)
def short_names(names: tuple[str, ...], width: int) -> Mapping[str, str]:
    """Each of `names` (a cluster's hosts) in at most `width` cells, told apart from the others.

    Cut at the end, as any cell is ("gpu-node-017.clu…"), unless that leaves two alike: hosts
    named alike up to their last characters ("compute-rack-a-node-001", "...-002") all read
    "compute-rack-…", so those are cut in the middle, which keeps the end that tells them
    apart ("comput…node-001"). Names alike at both ends ("compute-rack-a-node-001.cluster.
    example.org", "...-002.cluster...") read alike that way too: those keep the part around
    where they differ ("…node-001.clu…")."""
    ends = {name: cut_end(name, width) for name in names}
    alike = Counter(ends.values())
    short = {name: cut if alike[cut] == 1 else cut_middle(name, width) for name, cut in ends.items()}
    still = Counter(short.values())
    groups: dict[str, list[str]] = {}
    for name, cut in short.items():
        if still[cut] > 1:
            groups.setdefault(cut, []).append(name)
    for group in groups.values():
        at = _common_start(group)  # where the first of them differs from the rest
        for name in group:
            short[name] = cut_around(name, at, width)
    return short


def short_slot(slot_id: str, hosts: tuple[str, ...], width: int) -> str:
    """A slot id ("host/3") in at most `width` cells: its host as `short_names` cuts it, and its
    index whole (cut at the end, every slot of a long-named host read the same)."""
    if cell_len(slot_id) <= width:
        return slot_id
    host, sep, index = slot_id.rpartition("/")
    room = width - cell_len(sep + index)
    if not sep or room < 2:
        return cut_end(slot_id, width)
    short = short_names(hosts, room).get(host)
    return (short if short is not None else cut_end(host, room)) + sep + index
