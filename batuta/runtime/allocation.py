"""A batch allocation's nodes as pool hosts: they join as they start, and leave when it ends.

`Allocation` gives the pool one `HostSpec` per node (`NAME-0` ... `NAME-{N-1}`), marked
`joins_later`: the pool does not wait for them to start (a job may queue for a while), and
each joins when its node dials in. The first launch of any of them submits the job:

1. A CA is made for this allocation alone, in memory (its key is never written), with a
   server certificate for the coordinator's listener (naming `advertise`) and one client
   certificate for the nodes. The listener's key goes to a private temporary folder just
   long enough for OpenSSL to load it; the nodes' certificate, key and the CA go to one file
   created 0600 in the allocation's folder (shared with the nodes), whose path, never its
   contents, is in the batch script.
2. The listener binds `bind` (a TLS server that requires a client certificate from that
   CA), so the nodes can dial it before the job is submitted.
3. sbatch submits the script (batuta/runtime/slurm.py); each node's step runs
   `batuta.agent.dial`, which connects, names its node (index and name), and relays to a
   fresh agent. The stream goes to the host session waiting for that index; its launch
   returns and the handshake proceeds as for any host.

While the job lives, squeue is asked every `poll_interval` seconds. When a node's
connection ends (scancel, the time limit, the node failing) the pool's liveness finds the
stream closed and requeues the node's tasks, as for any lost host; the relaunch then waits
for that node to dial again and, once the job has ended, fails as not retryable: the host is
retired with the reason ("allocation slurm: job 42 ended"). `close()` (the pool's own
close) cancels a job still running, closes the listener and deletes the credentials file.
A coordinator killed outright leaves both; the next submission of the same allocation from
this machine cleans up after it (`clear_killed_runs`, from the folder's owner file).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime as dt
import json
import logging
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from batuta.agent.dial import parse_greeting
from batuta.errors import ConfigError
from batuta.runtime import slurm
from batuta.runtime.allocation_config import AllocationConfig
from batuta.runtime.session import HostSpec, Launcher
from batuta.transport.base import ByteStream
from batuta.transport.certs import CLIENT, SERVER, issue, new_ca, write_private, write_public
from batuta.transport.tls import READ_CHUNK, TLSStream, format_address, server_context, split_address, tune_socket

log = logging.getLogger("batuta.runtime.allocation")

GREETING_TIMEOUT_S = 10.0  # a node that connected says which it is at once
HANDSHAKE_TIMEOUT_S = 10.0
CERT_MARGIN = dt.timedelta(hours=1)  # certificates outlive the time limit by this much...
# ...and the job's wait in the queue, which may be long: dated from the submission, they had
# expired before a job that waited more than an hour started. They are this allocation's
# alone, trusted by its listener only, which lives as long as the run.
QUEUE_WAIT_ALLOWED = dt.timedelta(days=7)
# a node's own error line in the job's output: batuta's ("batuta dial: error: ..."), or a
# Python error ("... (ModuleNotFoundError: No module named 'batuta')"), not srun's about it
_NODE_ERROR = re.compile(r"batuta[\w ]*: error: |\b[A-Z]\w*(Error|Exception)\b")
CREDENTIALS = "node-credentials.pem"
DEFAULT_DIRECTORY = Path("~/.batuta/allocations")
KEEP_FOLDERS = 20  # an allocation's folders kept (script and Slurm's output), the newest; one per run piled up
_FOLDER = re.compile(r"(?P<name>.+)-\d{8}-\d{6}-\d+")  # NAME-YYYYmmdd-HHMMSS-PID (_make_directory)


OWNER = "coordinator.json"  # {"host", "pid", "job"}: whose run a folder is, to clean up after it if it was killed


def _folders(base: Path, name: str) -> list[Path]:
    """The allocation `name`'s folders under `base`, newest first."""
    try:
        mine = [p for p in base.iterdir() if (m := _FOLDER.fullmatch(p.name)) and m["name"] == name and p.is_dir()]
    except OSError:
        return []
    return sorted(mine, key=lambda p: p.name, reverse=True)


def _prune(base: Path, name: str, *, keep: int) -> None:
    """Remove all but the `keep` newest of the allocation `name`'s earlier folders under
    `base`; never one with nodes' credentials in it (a run of it may still be going)."""
    for old in _folders(base, name)[keep:]:
        if not (old / CREDENTIALS).exists():
            shutil.rmtree(old, ignore_errors=True)


def _write_owner(directory: Path, job_id: str | None) -> None:
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "job": job_id}
    with contextlib.suppress(OSError):
        write_public(directory / OWNER, json.dumps(owner).encode(), overwrite=True)


def _killed_run(folder: Path) -> dict[str, object] | None:
    """What the folder's owner file says, if the coordinator that wrote it ran on this machine
    and is gone while its nodes' credentials are still there: it ended without closing
    (kill -9, a crash, the machine's OOM killer), where a close or the exit removes them."""
    if not (folder / CREDENTIALS).exists():
        return None
    try:
        owner = json.loads((folder / OWNER).read_text())
    except (OSError, ValueError):
        return None  # an older batuta's, or being written: not known to be over
    if not isinstance(owner, dict):
        return None
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return None  # another login node's run may still be going: its coordinator cannot be seen from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return owner
    except OSError:
        return None  # alive (another user's process, now): not ours to judge
    return None  # alive: that run is going, or its PID was taken again (then left as it is)


async def clear_killed_runs(base: Path, name: str) -> None:
    """Clean up after earlier runs of the allocation `name` whose coordinator was killed: their
    nodes' credentials were left on disk, and a job that was still queued stayed there, to start
    later and find no one to dial. Its credentials file is deleted and the job cancelled, where
    squeue still lists it under batuta's job name (a job of that id on another cluster is not it).
    A folder whose run cannot be judged loses its credentials once they expire (`_forget_expired`)."""
    for folder in _folders(base, name):
        owner = _killed_run(folder)
        if owner is None:
            _forget_expired(folder, name)
            continue
        with contextlib.suppress(OSError):
            (folder / CREDENTIALS).unlink()
        job = owner.get("job")
        done = "its nodes' credentials deleted"
        if isinstance(job, str) and await slurm.job_queued(job, f"batuta-{name}"):
            problem = await slurm.cancel(job)
            if problem:
                done += f"; its job {job} is still queued ({problem}): cancel it yourself, scancel {job}"
            else:
                done += f" and its job {job}, still queued, cancelled"
        log.warning(
            "allocation %s: an earlier run (pid %s, %s) ended without cleaning up (killed?): %s",
            name,
            owner.get("pid"),
            folder,
            done,
        )


def _forget_expired(folder: Path, name: str) -> None:
    """Delete the folder's nodes' credentials once their certificate has expired: no run can
    use them then, whoever's it was. A folder whose run cannot be judged otherwise (one of an
    older batuta, which wrote no owner file, or another machine's) kept them for good, and so
    was never pruned."""
    credentials = folder / CREDENTIALS
    try:  # the file's first certificate is the nodes' (_submit)
        cert = x509.load_pem_x509_certificate(credentials.read_bytes())
    except (OSError, ValueError):
        return  # none there (the run ended well), or unreadable: not known to be over
    if cert.not_valid_after_utc >= dt.datetime.now(dt.UTC):
        return
    with contextlib.suppress(OSError):
        credentials.unlink()
    log.info(
        "allocation %s: an earlier run's nodes' credentials (%s) expired on %s UTC: deleted",
        name,
        folder,
        f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M}",
    )


def folder_problem(base: Path) -> str:
    """Why this process cannot create a folder under `base` ("" when it can), found without
    creating anything: the nearest part of `base` that exists must be a folder it may write."""
    for existing in (base, *base.parents):
        try:
            mode = existing.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue  # not there yet: the folder is made with its parents
        except OSError as exc:
            return f"cannot look at {existing} for its folder: {exc.strerror}"
        if not stat.S_ISDIR(mode):
            return f"cannot create its folder in {base}: {existing} is not a folder"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"cannot create its folder in {base}: {existing} is not writable here"
        return ""
    return ""


def _described(state: str, reason: str) -> str:
    """ "RUNNING", or a pending job's reason in Slurm's word and in plain words: "PENDING
    (Resources: waiting for nodes to free up)"."""
    if state != "PENDING" or not reason or reason == "None":
        return state
    meaning = slurm.WAITING_REASONS.get(reason)
    return f"PENDING ({reason}: {meaning})" if meaning else f"PENDING ({reason})"


class Allocation:
    """One batch job whose nodes dial this coordinator. Use its `host_specs()` in a pool and
    `close()` it when the pool closes (`Pool.add_closer`)."""

    def __init__(self, config: AllocationConfig) -> None:
        problem = folder_problem(config.directory or DEFAULT_DIRECTORY.expanduser())
        if problem:  # this machine's own setting: said once, before anything is submitted
            raise ConfigError(
                f"allocation {config.name}: {problem}; set {config.directory_setting} to a folder on a file "
                "system the nodes share"
            )
        self.config = config
        self.job_id: str | None = None
        self.state = "not submitted"
        self.address: tuple[str, int] | None = None  # where the listener listens, once it does
        self.directory: Path | None = None
        self._submitting: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None
        self._waiting: dict[int, asyncio.Future[ByteStream]] = {}
        self._arrived: dict[int, ByteStream] = {}
        self._joined: dict[int, str] = {}  # index -> node name, as the nodes said
        self._ended: str | None = None  # why no more nodes will join
        self._poller: asyncio.Task[None] | None = None
        self._reason = ""  # why the job is in its state, as squeue last said
        self._closed = False
        # told, for each node not joined yet, why (its job is queued...): the pool's host_state_changed
        self.on_waiting: Callable[..., None] | None = None

    # -- the pool's side ----------------------------------------------------------------------

    def host_specs(self) -> list[HostSpec]:
        """One host per node; each launch waits for its node to dial in."""
        config = self.config
        return [
            HostSpec(
                name=name,
                launch=self._launcher(index),
                tags=config.tags,
                kernel_modules=config.kernel_modules,
                joins_later=True,
            )
            for index, name in enumerate(config.host_names)
        ]

    def _launcher(self, index: int) -> Launcher:
        async def launch() -> ByteStream:
            return await self.node_stream(index)

        return launch

    async def node_stream(self, index: int) -> ByteStream:
        """The stream of node `index` once it has dialled in; submits the job first if that
        has not been done. Raises AllocationError (not retryable) once the job has ended."""
        await self.submit()
        stream = self._arrived.pop(index, None)
        if stream is not None:
            return stream
        if self._ended is not None:
            raise slurm.AllocationError(self._ended)
        future: asyncio.Future[ByteStream] = asyncio.get_running_loop().create_future()
        self._waiting[index] = future
        try:
            return await future
        finally:
            if self._waiting.get(index) is future:
                del self._waiting[index]

    async def submit(self) -> None:
        """Make the certificates, start the listener and submit the job (once; every launch
        awaits the same submission, and its failure)."""
        if self._closed:
            raise slurm.AllocationError(f"allocation {self.config.name}: closed")
        if self._submitting is None:
            self._submitting = asyncio.create_task(self._submit(), name=f"submit-{self.config.name}")
        await asyncio.shield(self._submitting)

    async def close(self) -> None:
        """Cancel the job if it still runs, stop listening, delete the nodes' credentials."""
        if self._closed:
            return
        self._closed = True
        self._end(f"allocation {self.config.name}: the pool closed")
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._submitting is not None and not self._submitting.done():
            self._submitting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._submitting
        job = self._job_to_cancel()
        if job is not None:
            problem = await slurm.cancel(job)
            if problem:
                log.warning(
                    "allocation %s: scancel %s: %s; if squeue still lists it, cancel it yourself: scancel %s",
                    self.config.name,
                    job,
                    problem,
                    job,
                )
        atexit.unregister(self._cancel_at_exit)  # done: nothing left for the exit to do
        if self._server is not None:
            self._server.close()
        for stream in self._arrived.values():
            stream.kill()
        self._arrived.clear()
        self._forget_credentials()

    def _forget_credentials(self) -> None:
        if self.directory is not None:
            with contextlib.suppress(OSError):
                (self.directory / CREDENTIALS).unlink()

    def _cancel_at_exit(self) -> None:
        """At the interpreter's exit, where `close()` did not get to the end: a second Ctrl-C
        (`timeout -s INT` signals the process and its group: two) raised KeyboardInterrupt
        while its scancel was on its way, and the job stayed queued with the nodes' key on disk.
        A plain blocking scancel here, which nothing interrupts any more."""
        job = self._job_to_cancel()
        if job is not None:
            slurm.cancel_now(job)
        self._forget_credentials()

    def _job_to_cancel(self) -> str | None:
        """The job, if it may still run or run again (Slurm requeues from a node failure)."""
        if self.state in slurm.FINAL_STATES and self.state not in slurm.REQUEUEABLE_STATES:
            return None
        return self.job_id

    # -- submitting ---------------------------------------------------------------------------

    async def _submit(self) -> None:
        config = self.config
        host, port = split_address(config.bind, 0)
        advertise = config.advertise or host
        limit = dt.timedelta(seconds=config.time_limit_s)
        not_after = dt.datetime.now(dt.UTC) + QUEUE_WAIT_ALLOWED + limit + CERT_MARGIN
        ca = new_ca(f"batuta allocation {config.name}", not_after=not_after + CERT_MARGIN)
        server = issue(ca, SERVER, f"batuta coordinator {config.name}", hosts=[advertise], not_after=not_after)
        node = issue(ca, CLIENT, f"batuta node {config.name}", not_after=not_after)
        private = Path(tempfile.mkdtemp(prefix="batuta-listener-"))
        try:  # OpenSSL reads the listener's key from a file: one that lives only for this
            write_public(private / "ca.pem", ca.cert_pem())
            write_public(private / "server.pem", server.cert_pem())
            write_private(private / "server.key", server.key_pem())
            context = server_context(cert=private / "server.pem", key=private / "server.key", ca=private / "ca.pem")
        finally:
            shutil.rmtree(private, ignore_errors=True)
        try:
            self._server = await asyncio.start_server(
                self._on_node, host, port, ssl=context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S, limit=READ_CHUNK
            )
        except OSError as exc:  # this machine's setting, as a folder it cannot make: exit 2, not "no host"
            raise slurm.AllocationConfigError(
                # asyncio's strerror is "error while attempting to bind on address (...): ..."
                f"allocation {config.name}: cannot listen on {config.bind}: "
                f"{os.strerror(exc.errno) if exc.errno else exc}; set bind to an "
                "address of this machine that the nodes reach"
            ) from None
        await clear_killed_runs(config.directory or DEFAULT_DIRECTORY.expanduser(), config.name)
        directory = self._make_directory()  # once listening: a bind that fails leaves no empty folder behind
        _write_owner(directory, None)  # before sbatch: a kill while it runs still leaves the credentials known
        credentials = directory / CREDENTIALS
        write_private(credentials, node.cert_pem() + ca.cert_pem() + node.key_pem(), overwrite=True)
        bound = self._server.sockets[0].getsockname()
        self.address = (bound[0], int(bound[1]))
        dial = format_address(advertise, self.address[1])
        step = [
            config.python or sys.executable,
            "-m",
            "batuta.agent.dial",
            "--connect",
            dial,
            "--server-name",
            advertise,
            "--credentials",
            str(credentials),
            "--gpus",
            config.gpus,
        ]
        if config.slots is not None:
            step += ["--slots", str(config.slots)]
        for module in config.kernel_modules:
            step += ["--kernel-module", module]
        script = directory / "batch.sh"
        text = slurm.batch_script(
            name=f"batuta-{config.name}",
            nodes=config.nodes,
            time=config.time,
            output=directory / "slurm-%j.out",
            step=step,
        )
        write_public(script, text.encode(), overwrite=True)
        try:
            self.job_id = await slurm.submit(script, config.sbatch_options)
        except slurm.AllocationError as exc:  # named: beside other hosts, or alone, it is this allocation's
            raise type(exc)(f"allocation {config.name}: {exc}") from None
        self.state = "PENDING"
        atexit.register(self._cancel_at_exit)
        _write_owner(directory, self.job_id)
        log.info(
            "allocation %s: job %s submitted (%d node%s for %s); listening on %s",
            config.name,
            self.job_id,
            config.nodes,
            "" if config.nodes == 1 else "s",
            slurm.slurm_form(config.time_limit_s),  # "5" said "(2 nodes, 5)": minutes, as Slurm reads it
            format_address(*self.address),
        )
        self._tell_waiting(f"allocation {config.name}: job {self.job_id} is PENDING")
        self._poller = asyncio.create_task(self._poll(), name=f"squeue-{config.name}")

    def _make_directory(self) -> Path:
        base = self.config.directory or DEFAULT_DIRECTORY.expanduser()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        directory = base / f"{self.config.name}-{stamp}-{os.getpid()}"
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:  # this machine's setting: a configuration error (exit 2), as folder_problem's
            raise slurm.AllocationConfigError(
                f"allocation {self.config.name}: cannot create {directory}: {exc.strerror}; set "
                f"{self.config.directory_setting} to a folder on a file system the nodes share"
            ) from None
        self.directory = directory
        _prune(base, self.config.name, keep=KEEP_FOLDERS)
        return directory

    # -- nodes dialling in --------------------------------------------------------------------

    async def _on_node(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        where = format_address(str(peer[0]), int(peer[1])) if peer else "?"
        try:
            line = await asyncio.wait_for(reader.readline(), GREETING_TIMEOUT_S)
        except (TimeoutError, ValueError, ConnectionError, OSError) as exc:
            log.warning("allocation %s: %s connected but did not name its node (%s)", self.config.name, where, exc)
            writer.close()
            return
        greeting = parse_greeting(line)
        if greeting is None or greeting[0] >= self.config.nodes or self._closed:
            log.warning("allocation %s: refused %s: not one of its nodes (%r)", self.config.name, where, line[:80])
            writer.close()
            return
        index, name = greeting
        tune_socket(writer.get_extra_info("socket"), keepalive_s=10.0)
        stream = TLSStream(reader, writer, description=f"slurm node {name} (job {self.job_id}, {where})")
        self._joined[index] = name
        log.info("allocation %s: node %d (%s) dialled in from %s", self.config.name, index, name, where)
        waiting = self._waiting.pop(index, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(stream)
            return
        old = self._arrived.pop(index, None)
        if old is not None:  # the same node again: the newer connection is the one that counts
            old.kill()
        self._arrived[index] = stream

    # -- the job's life -------------------------------------------------------------------------

    async def _poll(self) -> None:
        assert self.job_id is not None
        # Not `while True`: a cancel that lands as squeue's answer does is swallowed by
        # Python 3.11's `asyncio.wait_for` (it returns the answer), and the poller went on asking
        # for ever while `close` awaited it (a run that never ended; one in ~25 under load).
        while not self._closed:
            await asyncio.sleep(self.config.poll_interval)  # squeue is asked at this pace, by design
            answer = await slurm.job_state(self.job_id)
            if self._closed:
                return
            if answer is None:
                continue
            state, reason = answer
            reason = "" if reason == "None" else reason  # no reason: as after the submission, no news
            if (state, reason) != (self.state, self._reason):
                self._say_state(state, reason)
                self.state, self._reason = state, reason
                if state not in slurm.FINAL_STATES:
                    described = _described(state, reason)
                    self._tell_waiting(f"allocation {self.config.name}: job {self.job_id} is {described}")
            if state in slurm.FINAL_STATES:
                how = "" if state == slurm.ENDED else f" ({state})"
                self._end(f"allocation {self.config.name}: job {self.job_id} ended{how}{self._output_hint()}")
                return

    def _tell_waiting(self, why: str) -> None:
        if self.on_waiting is None:
            return
        for index, host in enumerate(self.config.host_names):
            if index not in self._joined:
                self.on_waiting(host=host, reason=why)

    def _say_state(self, state: str, reason: str) -> None:
        """ "job 42 is RUNNING"; a pending job says why, in Slurm's word and in plain words
        ("PENDING (Resources: waiting for nodes to free up)"), and where Slurm will never start
        it as asked, says so with what to change: it waited in silence."""
        name, job = self.config.name, self.job_id
        hopeless = slurm.HOPELESS_REASONS.get(reason) if state == "PENDING" else None
        if hopeless is not None:
            why, fix = hopeless
            log.warning(
                "allocation %s: job %s is PENDING (%s) and Slurm will not start it as asked: %s; stop this run "
                "(Ctrl-C) and %s",
                name,
                job,
                reason,
                why,
                fix,
            )
        elif state == slurm.ENDED:  # not a state of Slurm's: squeue no longer lists it
            log.info("allocation %s: job %s has left Slurm's queue", name, job)
        else:
            log.info("allocation %s: job %s is %s", name, job, _described(state, reason))

    def _end(self, why: str) -> None:
        if self._ended is None:
            self._ended = why
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(slurm.AllocationError(self._ended))
        self._waiting.clear()

    def _output_hint(self) -> str:
        if self.directory is None or self.job_id is None:
            return ""
        output = self.directory / f"slurm-{self.job_id}.out"
        try:
            lines = [line.strip() for line in output.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        # slurmstepd's own word on the end ("*** JOB 10 ON n1 CANCELLED AT ... DUE TO TIME
        # LIMIT ***") says more than a node's last line ("session ended: stopped by a signal");
        # a node's own error (batuta dial's, or Python's "No module named 'batuta'") more than
        # srun's last line about it ("srun: error: n1: task 0: Exited with exit code 1")
        said = [line for line in lines if "*** " in line and line.endswith(" ***")]
        said = said or [line for line in lines if _NODE_ERROR.search(line)] or lines
        return f" (its output {output}: {said[-1]})" if said else ""
