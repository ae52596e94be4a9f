"""What one batch allocation asks for, and the cluster file's `[[allocations]]` tables.

    [[allocations]]
    kind = "slurm"                 # the only kind so far
    name = "gpu"                   # its hosts are gpu-0, gpu-1, ... (default: "slurm")
    nodes = 4
    time = "2:00:00"               # Slurm's --time
    bind = "10.0.0.5:9500"         # where the coordinator listens for its nodes (default 127.0.0.1:0)
    advertise = "login1"           # the name nodes dial, in the listener's certificate (default: bind's host)
    sbatch = ["--partition=gpu", "--gres=gpu:4"]
    slots = 32                     # per node (default: the CPUs Slurm gives the job there)
    gpus = "auto"
    directory = "~/batuta-jobs"    # on a file system the nodes share: script, credentials, output

The checks are the cluster file reader's (batuta/runtime/toml_fields.py), so errors name the
file, line and field the same way. `batuta alloc`'s options go through the very same checks
(`allocation_from_options`), their errors naming the option instead: a value is refused, or
read, alike wherever it is written. Building the allocation is batuta/runtime/allocation.py's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batuta.errors import ConfigError, UsageError
from batuta.runtime.slurm import time_limit_seconds
from batuta.runtime.toml_fields import FieldPath, FieldReader, field_name
from batuta.transport.tls import split_address

KINDS = ("slurm",)
DEFAULT_NAME = "slurm"
DEFAULT_BIND = "127.0.0.1:0"
DEFAULT_POLL_S = 5.0
MIN_POLL_S = 0.1
MAX_NODES = 4096

_KEYS = (
    "kind",
    "name",
    "nodes",
    "time",
    "bind",
    "advertise",
    "sbatch",
    "slots",
    "gpus",
    "python",
    "directory",
    "poll_interval",
    "kernel_modules",
    "tags",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class AllocationConfig:
    """One allocation: `nodes` nodes for `time`, each running one agent that dials `bind`.

    `name` prefixes its hosts (`NAME-0` ... `NAME-{nodes-1}`, by the node's place in the
    job). `advertise`: the address the nodes dial and the listener's certificate names
    (default: `bind`'s host; required when that is a wildcard). `python`: the interpreter on
    the nodes (default: this one, for a shared file system). `directory`: where the batch
    script, the nodes' credentials (0600) and the job's output go; it must be on a file
    system the nodes share (default: ~/.batuta/allocations). `poll_interval`: how often
    squeue is asked whether the job still runs. `directory_setting`: where `directory` is
    set (`allocations[0].directory in lab.toml`, `--directory`), for the message when this
    machine cannot make its folder there.
    """

    kind: str = "slurm"
    name: str = DEFAULT_NAME
    nodes: int
    time: str
    bind: str = DEFAULT_BIND
    advertise: str | None = None
    sbatch_options: tuple[str, ...] = ()
    slots: int | None = None
    gpus: str = "auto"
    python: str | None = None
    directory: Path | None = None
    poll_interval: float = DEFAULT_POLL_S
    kernel_modules: tuple[str, ...] = ()
    tags: frozenset[str] = frozenset()
    directory_setting: str = "directory"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"allocation kind {self.kind!r} is not supported; use one of: {', '.join(KINDS)}")
        if not 1 <= self.nodes <= MAX_NODES:
            raise UsageError(f"an allocation needs 1 to {MAX_NODES} nodes, not {self.nodes}")
        time_limit_seconds(self.time)
        try:
            host, _port = split_address(self.bind, 0)
        except ValueError as exc:
            raise UsageError(f"allocation {self.name}: bind {exc}") from None
        if host in ("0.0.0.0", "::", "") and not self.advertise:
            raise UsageError(
                f"allocation {self.name}: bind {self.bind} listens on every address, so nodes cannot know "
                "which to dial; set advertise to the name or address they reach this machine at"
            )

    @property
    def host_names(self) -> list[str]:
        return [f"{self.name}-{index}" for index in range(self.nodes)]

    @property
    def time_limit_s(self) -> int:
        return time_limit_seconds(self.time)


def read_allocations(value: Any, reader: FieldReader) -> tuple[AllocationConfig, ...]:
    """The `[[allocations]]` array, checked; errors name the file, line and field."""
    if not isinstance(value, list):
        raise reader.error(("allocations",), "expected an array of tables: write each as an [[allocations]] table")
    allocations = []
    names: set[str] = set()
    for index, entry in enumerate(value):
        path: FieldPath = ("allocations", index)
        if not isinstance(entry, dict):
            raise reader.error(path, "expected a table with kind, nodes and time; write it as [[allocations]]")
        allocation = _allocation(entry, path, reader)
        if allocation.name in names:
            raise reader.error((*path, "name"), f'duplicate allocation name {allocation.name!r}; set name = "..."')
        names.add(allocation.name)
        allocations.append(allocation)
    return tuple(allocations)


# sbatch options that would undo what batuta writes in the batch script: the node count names
# the hosts and the time limit bounds the nodes' certificates; one task per node and the
# output file are how the step and the end are found
_OWN_OPTIONS = {
    "--nodes": "give the node count as nodes (--nodes)",
    "-N": "give the node count as nodes (--nodes)",
    "--time": "give the time limit as time (--time)",
    "-t": "give the time limit as time (--time)",
    "--ntasks": "batuta runs one task per node",
    "-n": "batuta runs one task per node",
    "--ntasks-per-node": "batuta runs one task per node",
    "--output": "batuta writes the output beside the script, where it reads why a job ended",
    "-o": "batuta writes the output beside the script, where it reads why a job ended",
    "--array": "each array task would dial in as the same nodes; ask for the nodes with nodes (--nodes)",
    "-a": "each array task would dial in as the same nodes; ask for the nodes with nodes (--nodes)",
}
_LONG_OWN = [flag for flag in _OWN_OPTIONS if flag.startswith("--")]


def _batutas_own(options: tuple[str, ...]) -> str:
    """Why one of `options` may not be given ("" when none): sbatch would take it over the
    script's own line, silently, while batuta said and used its own value."""
    for option in options:
        flag = option.split("=", 1)[0]
        if flag not in _OWN_OPTIONS and not option.startswith("--") and option[:2] in _OWN_OPTIONS:
            flag = option[:2]  # -N2, -t30: the value attached
        if flag.startswith("--") and flag not in _OWN_OPTIONS and len(flag) > 3:
            # sbatch (getopt_long) takes an unambiguous prefix: --out=F is --output=F, --tim=5 --time=5
            prefixed = [own for own in _LONG_OWN if own.startswith(flag)]
            flag = prefixed[0] if len(prefixed) == 1 else flag
        fix = _OWN_OPTIONS.get(flag)
        if fix is not None:
            return f"{option!r} would override what batuta asks sbatch for; {fix}"
    return ""


def allocation_from_options(table: Mapping[str, Any], options: Mapping[str, str]) -> AllocationConfig:
    """`batuta alloc`'s options, given as an `[[allocations]]` table would give them (`table`,
    keyed as `_KEYS`), checked by the cluster file's own checks; `options` names the option of
    each key, and an error names that option (`--gpus: expected "auto", ...`)."""
    return _allocation(dict(table), (), _OptionReader(options))


class _OptionReader(FieldReader):
    """The cluster file's checks, for values from the command line: an error names the option
    that gave the value instead of a file, line and field."""

    def __init__(self, options: Mapping[str, str]) -> None:
        super().__init__("", "the command line", Path.cwd())  # relative paths: from where it was typed
        self._options = options

    def option(self, path: FieldPath) -> str:
        key = next((str(part) for part in reversed(path) if isinstance(part, str)), "")
        return self._options.get(key, key)

    def error(self, path: FieldPath, message: str) -> ConfigError:
        return ConfigError(f"{self.option(path)}: {message}")


def _setting(path: FieldPath, reader: FieldReader) -> str:
    """How a message names the setting at `path`: its option, or its field and file."""
    if isinstance(reader, _OptionReader):
        return reader.option(path)
    return f"{field_name(path)} in {reader._source}"


def _allocation(table: dict[str, Any], path: FieldPath, reader: FieldReader) -> AllocationConfig:
    reader._known_keys(table, path, _KEYS)
    for key in ("kind", "nodes", "time"):
        if key not in table:
            example = {"kind": '"slurm"', "nodes": "2", "time": '"1:00:00"'}[key]
            raise reader.error(path, f"missing {key}; add {key} = {example}")
    kind = reader._string((*path, "kind"), table["kind"])
    if kind not in KINDS:
        raise reader.error((*path, "kind"), f"{kind!r} is not supported; expected one of: {', '.join(KINDS)}")
    nodes = reader._count((*path, "nodes"), table["nodes"])
    if not 1 <= nodes <= MAX_NODES:
        raise reader.error((*path, "nodes"), f"expected 1 to {MAX_NODES} nodes, got {nodes}")
    fields: dict[str, Any] = {"kind": kind, "nodes": nodes, "time": reader._string((*path, "time"), table["time"])}
    try:
        time_limit_seconds(fields["time"])
    except UsageError as exc:
        raise reader.error((*path, "time"), str(exc)) from None
    if "name" in table:
        fields["name"] = reader._host_name((*path, "name"), table["name"])
    for key in ("bind", "advertise", "python"):
        if key in table:
            fields[key] = reader._string((*path, key), table[key])
    if "sbatch" in table:
        fields["sbatch_options"] = tuple(reader._string_list((*path, "sbatch"), table["sbatch"]))
        taken = _batutas_own(fields["sbatch_options"])
        if taken:
            raise reader.error((*path, "sbatch"), taken)
    if "slots" in table:
        fields["slots"] = reader._slots((*path, "slots"), table["slots"]) or None
    if "gpus" in table:
        fields["gpus"] = reader._gpus((*path, "gpus"), table["gpus"])
    if "directory" in table:
        fields["directory"] = reader._path((*path, "directory"), table["directory"])
    fields["directory_setting"] = _setting((*path, "directory"), reader)
    if "poll_interval" in table:
        poll = reader._seconds((*path, "poll_interval"), table["poll_interval"])
        if poll < MIN_POLL_S:  # 1e-9 ran squeue back to back against the cluster's controller
            raise reader.error((*path, "poll_interval"), f"at least {MIN_POLL_S:g} s: squeue is asked at this pace")
        fields["poll_interval"] = poll
    if "kernel_modules" in table:
        fields["kernel_modules"] = reader._modules((*path, "kernel_modules"), table["kernel_modules"])
    if "tags" in table:
        fields["tags"] = reader._tags((*path, "tags"), table["tags"])
    try:
        return AllocationConfig(**fields)
    except UsageError as exc:
        key = "bind" if "bind" in str(exc) else "nodes"
        raise reader.error((*path, key), str(exc)) from None
