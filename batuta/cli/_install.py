"""`batuta cluster install`: this batuta on every SSH host of a cluster file.

On a terminal, a live line per host (its step, and a bar while wheels are pushed);
otherwise one line per step. Then a summary table (host, Python, path, seconds, result) and
each failure in full. Exit status 0 when every SSH host has batuta, 1 when one failed.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from batuta.cli._common import EXIT_FAILED, EXIT_OK, has_terminal, load_cluster, positive_int
from batuta.errors import UsageError

if TYPE_CHECKING:
    from batuta.runtime.cluster import ClusterConfig
    from batuta.runtime.install import HostInstalled, InstallProgressed, InstallTarget


def add_install_arguments(actions: Any) -> None:
    install = actions.add_parser(
        "install",
        help="install this batuta on every SSH host (a virtual environment in its cache folder)",
        description="Install this exact batuta, with this machine's dependency versions, on every SSH host "
        "of the cluster file: from the package index where a host reaches it, else from a wheelhouse "
        "pushed over SSH. A host needs sshd and python3 (3.11 or newer). A host already done is checked "
        "and left alone.",
    )
    install.add_argument("-c", "--cluster", metavar="FILE", required=True, help="the cluster file (TOML)")
    install.add_argument(
        "--jobs", type=positive_int, default=8, metavar="N", help="hosts installed at once (default: 8)"
    )
    install.add_argument(
        "--offline",
        action="store_true",
        help="do not try the package index from the hosts: push a wheelhouse to each (built here once)",
    )
    install.add_argument(
        "--index-url",
        metavar="URL",
        help="the package index (PEP 503 simple) the hosts install from, instead of index_url in the cluster "
        "file or pip's own; no credentials here (argv is visible to every user): put those in the cluster file",
    )
    install.add_argument("--json", action="store_true", help="one JSON object on stdout, no progress")


def cmd_cluster_install(args: argparse.Namespace) -> int:
    import asyncio

    from batuta.runtime.install import Installer

    cluster = load_cluster(args.cluster)
    if args.index_url is not None:
        check_index_url_argument(args.index_url)
    targets, notes = install_targets(cluster, index_url=args.index_url)
    if not targets:
        raise UsageError(f"{args.cluster}: no SSH hosts to install on ({'; '.join(notes) or 'none listed'})")
    live = has_terminal() and not args.json
    view = _LiveView(targets) if live else _LineView(quiet=args.json)
    installer = Installer(cluster.ssh, offline=args.offline, jobs=args.jobs, on_progress=view.progressed)
    with view:
        results = asyncio.run(installer.install_all(targets))
    if args.json:
        print(json.dumps({"cluster": str(args.cluster), "hosts": [_result_dict(r) for r in results], "notes": notes}))
    else:
        _print_summary(results, notes)
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


def check_index_url_argument(url: str) -> None:
    """--index-url: a simple index's URL, without credentials (a command line is public)."""
    from urllib.parse import urlsplit

    from batuta.runtime.install import index_url_problem

    problem = index_url_problem(url)
    if problem:
        raise UsageError(f"--index-url: {problem}")
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise UsageError(
            "--index-url: the URL holds credentials, and a command line is visible to every user of this "
            "machine; put index_url in the cluster file's [defaults] instead (or give pip a netrc on the hosts)"
        )


def install_targets(cluster: ClusterConfig, *, index_url: str | None = None) -> tuple[list[InstallTarget], list[str]]:
    """The cluster's SSH hosts as install targets, and a note for each host left out;
    `index_url` (--index-url) replaces the hosts' own."""
    from batuta.runtime.install import InstallTarget
    from batuta.transport.ssh import SSHTarget

    notes: list[str] = []
    if cluster.local is not None:
        notes.append(f"{cluster.local.name}: the local host runs this coordinator's batuta; nothing to install")
    targets: list[InstallTarget] = []
    for host in cluster.hosts:
        if host.transport == "tls":
            notes.append(f"{host.name}: a TLS worker is installed by its owner (`batuta worker` runs there); skipped")
            continue
        target = SSHTarget(
            host=host.address, port=host.port, user=host.user, identity_file=host.identity_file, name=host.name
        )
        note = (
            f"the agent runs python = {host.python} (set in the cluster file), not this environment"
            if host.python
            else ""
        )
        targets.append(
            InstallTarget(
                name=host.name, target=target, env=dict(host.env), note=note, index_url=index_url or host.index_url
            )
        )
    return targets, notes


def _result_dict(result: HostInstalled) -> dict[str, object]:
    return {
        "host": result.host,
        "ok": result.ok,
        "path": result.path or None,
        "python": result.python or None,
        "venv_python": result.venv_python or None,
        "seconds": result.seconds,
        "pushed_bytes": result.pushed_bytes,
        "error": result.error or None,
        "note": result.note or None,
    }


def _print_summary(results: list[HostInstalled], notes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("HOST", "PYTHON", "PATH", "PUSHED", "SECONDS", "RESULT"):
        table.add_column(column)
    for result in results:
        verdict = "[green]ok[/]" if result.ok else "[red]failed[/]"
        pushed = f"{result.pushed_bytes / 1e6:.1f} MB" if result.pushed_bytes else "-"
        row = (result.host, result.python or "-", result.path or "-", pushed, f"{result.seconds:.1f}", verdict)
        table.add_row(*row)
    console = Console()
    console.print(table)
    for result in results:
        if result.error:
            console.print(f"{result.host}: {result.error}", markup=False, highlight=False)
        elif result.note:
            console.print(f"{result.host}: {result.note}", markup=False, highlight=False)
    for note in notes:
        console.print(note, markup=False, highlight=False)


class _LineView:
    """Progress as plain lines: one per host and step (byte counts and pip's lines left out)."""

    def __init__(self, *, quiet: bool) -> None:
        self._quiet = quiet
        self._last: dict[str, str] = {}

    def __enter__(self) -> _LineView:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def progressed(self, event: InstallProgressed) -> None:
        if self._quiet or event.step in ("done", "failed") or self._last.get(event.host) == event.step:
            return
        self._last[event.host] = event.step
        print(f"{event.host}: {event.step}" + (f" {event.detail}" if event.detail else ""), flush=True)


class _LiveView:
    """Progress on a terminal: one rich line per host (its step; bytes while pushing)."""

    def __init__(self, targets: list[InstallTarget]) -> None:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/]"),
            TextColumn("{task.fields[host]}", markup=False),
            TextColumn("{task.description}", markup=False),
            TextColumn("{task.fields[size]}", markup=False),
            TimeElapsedColumn(),
        )
        width = max((len(t.name) for t in targets), default=4)
        self._tasks = {
            t.name: self._progress.add_task("waiting", host=t.name.ljust(width), size="", total=None) for t in targets
        }

    def __enter__(self) -> _LiveView:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def progressed(self, event: InstallProgressed) -> None:
        task = self._tasks.get(event.host)
        if task is None:
            return
        if event.total:
            size = f"{event.done / 1e6:.1f}/{event.total / 1e6:.1f} MB"
            self._progress.update(task, description=event.step, size=size)
            return
        text = (event.step + (f" ({event.detail})" if event.detail else ""))[:70]
        if event.step in ("done", "failed"):
            self._progress.update(task, description=text, size="", total=1, completed=1)
        else:
            self._progress.update(task, description=text, size="")
