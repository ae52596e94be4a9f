"""The agent's command line: `python -m batuta.agent --stdio [--slots N] [--gpus ...] ...`.

Parsing is separate from running so that `batuta agent ...` (the CLI subcommand) and the
tests share one definition. Bad arguments raise `UsageError` with a one-line message; the
caller prints it and exits with status 2, because the coordinator shows the agent's stderr
to a person and a full argparse usage dump there is noise.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import NoReturn

from batuta.agent.objects import (
    ENV_GIVEN,
    GPU_CACHE_ENV,
    HOST_MEMORY_ENV,
    OBJECT_MEMORY_ENV,
    parse_gpu_cache,
    parse_host_memory,
    parse_object_memory,
)
from batuta.core.task import MAX_SLOTS
from batuta.errors import UsageError
from batuta.protocol._fields import MAX_MODULE_CHARS

MAX_KERNEL_MODULES = 1_000  # the protocol's MAX_CODE_MODULES: Hello.modules holds one digest each

PROG = "batuta agent"


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuSelection:
    """`--gpus`: "auto" (every GPU NVML reports), "none", or explicit NVML indices."""

    mode: str  # "auto" | "none" | "list"
    indices: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentOptions:
    """What the agent was asked to do."""

    cpu_slots: int
    gpus: GpuSelection
    kernel_modules: tuple[str, ...] = ()
    name: str | None = None
    object_memory: str | None = None  # the object store's memory cap (see agent/objects.py)


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parse_gpus(text: str) -> GpuSelection:
    value = text.strip().lower()
    if value in ("auto", "all"):
        return GpuSelection(mode="auto")
    if value in ("none", "no", "off", ""):
        return GpuSelection(mode="none")
    indices: list[int] = []
    for part in value.split(","):
        part = part.strip()
        if not part.isdigit():
            raise UsageError(f"--gpus {text!r}: expected auto, none or GPU indices like 0,1")
        if int(part) not in indices:
            indices.append(int(part))
    return GpuSelection(mode="list", indices=tuple(indices))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Run the batuta host agent: worker slots fed over a framed stdin/stdout stream.",
    )
    parser.add_argument(
        "--stdio",
        action="store_true",
        help="speak the batuta protocol on stdin/stdout (the only transport; required)",
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=None,
        metavar="N",
        help="CPU worker slots (default: the number of CPUs)",
    )
    parser.add_argument(
        "--gpus",
        default="auto",
        metavar="auto|none|0,1",
        help="GPU slots: one per NVIDIA GPU (auto), none, or these NVML indices",
    )
    parser.add_argument(
        "--kernel-module",
        action="append",
        default=[],
        metavar="MOD",
        help="import this module's kernels into the registry in every slot (repeatable)",
    )
    parser.add_argument("--name", default=None, help="host name to report (default: hostname)")
    parser.add_argument(
        "--object-memory",
        default=None,
        metavar="BYTES|PCT%",
        help="memory for put and kept objects before they spill to disk (default: 30%% of RAM, "
        "or $BATUTA_OBJECT_MEMORY)",
    )
    return parser


def parse_args(argv: list[str]) -> AgentOptions:
    """Parse `argv` (without the program name). Raises `UsageError` with a one-line message."""
    namespace = build_parser().parse_args(argv)
    if not namespace.stdio:
        raise UsageError("--stdio is required (the agent speaks its protocol on stdin/stdout)")
    slots = namespace.slots if namespace.slots is not None else (os.cpu_count() or 1)
    if slots < 0:
        raise UsageError(f"--slots {slots}: expected a number of CPU slots >= 0")
    if slots > MAX_SLOTS:
        raise UsageError(f"--slots {slots}: at most {MAX_SLOTS} slots per agent")
    for module in namespace.kernel_module:
        if not module or len(module) > MAX_MODULE_CHARS or not all(part.isidentifier() for part in module.split(".")):
            raise UsageError(f"--kernel-module {module!r}: expected a dotted module name")
    if len(namespace.kernel_module) > MAX_KERNEL_MODULES:  # each one's digest goes in the Hello
        raise UsageError(f"--kernel-module: at most {MAX_KERNEL_MODULES} modules")
    if namespace.object_memory is not None:
        parse_object_memory(namespace.object_memory, 0)  # refuse a bad value here, with its fix
    elif os.environ.get(OBJECT_MEMORY_ENV):
        parse_object_memory(os.environ[OBJECT_MEMORY_ENV], 0, given=ENV_GIVEN)
    if os.environ.get(HOST_MEMORY_ENV):
        parse_host_memory(os.environ[HOST_MEMORY_ENV])
    if os.environ.get(GPU_CACHE_ENV):
        parse_gpu_cache(os.environ[GPU_CACHE_ENV], 0)  # as the object memory's: at start, not at a GPU task
    if namespace.name is not None and not namespace.name.strip():
        raise UsageError("--name: expected a non-empty host name")
    return AgentOptions(
        cpu_slots=slots,
        gpus=_parse_gpus(namespace.gpus),
        kernel_modules=tuple(namespace.kernel_module),
        name=namespace.name,
        object_memory=namespace.object_memory,
    )
