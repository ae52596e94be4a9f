"""`batuta alloc slurm JOB --nodes N --time T [-- SBATCH_OPTION ...]`: run a job on a Slurm allocation.

The command is `batuta run JOB` whose pool is (or also holds, with `--cluster`) the nodes of
one batch allocation: it is submitted when the pool starts, its nodes join as Slurm starts
them (their agents dial this coordinator over mutual TLS; batuta/runtime/allocation.py), and
it is cancelled when the job is done. Everything after `--` goes to sbatch unchanged.

The options are checked as the cluster file's `[[allocations]]` table is, by the same code
(batuta/runtime/allocation_config.py), so a value is refused, or read, alike in both.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from batuta.cli._common import integer, load_cluster
from batuta.cli._run import add_run_arguments, cmd_run
from batuta.errors import UsageError


def add_alloc_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=("slurm",), help="the batch scheduler (slurm)")
    add_run_arguments(
        parser, cluster_help="also run on the hosts of this cluster file (TOML), beside the nodes", local_pool=False
    )
    alloc = parser.add_argument_group("the allocation (options after -- go to sbatch)")
    alloc.add_argument("--nodes", type=_nodes, required=True, metavar="N", help="nodes to ask for")
    alloc.add_argument("--time", required=True, metavar="LIMIT", help="Slurm time limit: minutes (30), H:MM:SS or D-H")
    alloc.add_argument(
        "--bind",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="where this coordinator listens for its nodes (default: 127.0.0.1:0, this machine only)",
    )
    alloc.add_argument("--advertise", metavar="NAME", help="the name or address the nodes dial (default: bind's)")
    alloc.add_argument(
        "--slots", type=integer, metavar="N", help="CPU slots per node (default, or 0: the CPUs Slurm gives the job)"
    )
    alloc.add_argument("--gpus", default="auto", help="GPU slots per node: auto, none or indices (default: auto)")
    alloc.add_argument(
        "--node-prefix", default="slurm", metavar="PREFIX", help="prefix of the nodes' host names (default: slurm)"
    )
    alloc.add_argument(
        "--directory",
        metavar="DIR",
        help="a folder the nodes share, for the script, their credentials and the output "
        "(default: ~/.batuta/allocations)",
    )
    alloc.add_argument("--python", metavar="PATH", help="the interpreter on the nodes (default: this one)")
    alloc.add_argument(
        "--poll-interval", type=_number, default=5.0, metavar="SECONDS", help="how often squeue is asked"
    )
    parser.set_defaults(sbatch_options=[])


def _nodes(text: str) -> int:
    """Only the conversion, as `_number`."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of nodes, e.g. 2") from None


def _number(text: str) -> float:
    """Only the conversion: whether the number fits is the cluster file's check (cmd_alloc)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds, e.g. 30") from None


# Each option's key in an `[[allocations]]` table: the options are checked as that table is
# (runtime/allocation_config.py), so a value the cluster file refuses is refused here too
_OPTION_OF_KEY = {
    "kind": "KIND",
    "name": "--node-prefix",
    "nodes": "--nodes",
    "time": "--time",
    "bind": "--bind",
    "advertise": "--advertise",
    "sbatch": "the sbatch options after --",
    "slots": "--slots",
    "gpus": "--gpus",
    "python": "--python",
    "directory": "--directory",
    "poll_interval": "--poll-interval",
}


def cmd_alloc(args: argparse.Namespace) -> int:
    """Run JOB on the cluster file's hosts (if any) plus the allocation's nodes."""
    from batuta.runtime.allocation_config import allocation_from_options
    from batuta.runtime.cluster import ClusterConfig

    if args.workers:
        raise UsageError("--workers sizes a local pool; an allocation's nodes take --slots")
    given = {
        "kind": args.kind,
        "name": args.node_prefix,
        "nodes": args.nodes,
        "time": args.time,
        "bind": args.bind,
        "advertise": args.advertise,
        "sbatch": list(args.sbatch_options),
        "slots": args.slots,
        "gpus": args.gpus,
        "python": args.python,
        "directory": args.directory,
        "poll_interval": args.poll_interval,
    }
    config = allocation_from_options({k: v for k, v in given.items() if v is not None}, _OPTION_OF_KEY)
    cluster = load_cluster(args.cluster) if args.cluster else ClusterConfig(source="batuta alloc")
    taken = set(cluster.host_names) & set(config.host_names)
    if taken:
        raise UsageError(
            f"host names {sorted(taken)} are in the cluster file too; pass --node-prefix to tell them apart"
        )
    args.cluster_config = replace(cluster, allocations=(*cluster.allocations, config))
    return cmd_run(args)  # which says what the allocation does (cli/_run.py's NEWS_LOGGERS)


def split_sbatch_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """`batuta alloc ... -- OPTIONS`: (what argparse reads, what goes to sbatch)."""
    if argv[:1] == ["alloc"] and "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []
