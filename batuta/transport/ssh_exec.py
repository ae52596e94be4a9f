"""Short commands and file copies over SSH, for setting a host up (`batuta cluster install`).

`SSHHost` is one authenticated connection, made by `ssh.connect_ssh` (so the host key, the
ssh config, jump hosts and encrypted identity files are handled exactly as for the agent's
stream). On it, `run` executes a command to completion (no terminal; stdin from `input`;
stdout read line by line as it comes, for progress), `put` copies files with SFTP, and
`open_stream` finally starts the agent on a channel of the same connection and hands the
connection to that stream: a host that is checked, or installed, on connect logs in once.

Copies are resumable: a file goes to `NAME.part-XXXXXXXX` and is renamed to `NAME` once
complete, so a `NAME` that is there (with the right size) is never sent again, and an
interrupted copy leaves only a part file (removed by a later copy once it is an hour old).
The part's name is this copy's own: hosts that share a home folder (NFS, on most clusters)
copy into the same folder at once, and a shared `NAME.part` was renamed away under the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import asyncssh

from batuta.transport.ssh import (
    SSHError,
    SSHSettings,
    SSHStream,
    SSHTarget,
    connect_ssh,
    redacted_command,
    remote_command,
    stream_on,
)

log = logging.getLogger("batuta.transport.ssh_exec")

OUTPUT_LIMIT = 256 * 1024  # of a command's stdout and stderr kept each (the end of it)
PART_SUFFIX = ".part"
STALE_PART_S = 3600.0  # a part file this old is an interrupted copy's, not one under way


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandResult:
    """How a remote command ended: its exit status (None: killed by a signal), and the end of
    its stdout and stderr as text."""

    exit_status: int | None
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


LineHandler = Callable[[str], None]
BytesHandler = Callable[[int], None]  # bytes copied so far, over all files of one `put`


class SSHHost:
    """One SSH connection to a host for commands and copies; `async with` closes it."""

    def __init__(
        self,
        *,
        target: SSHTarget,
        settings: SSHSettings,
        conn: asyncssh.SSHClientConnection,
        jumps: Sequence[asyncssh.SSHClientConnection],
        where: str,
    ) -> None:
        self.target = target
        self.settings = settings
        self.where = where  # "user@host:port"
        self._conn: asyncssh.SSHClientConnection | None = conn
        self._jumps = list(jumps)

    @classmethod
    async def connect(cls, target: SSHTarget, settings: SSHSettings) -> SSHHost:
        """Log in to `target`. Raises HostKeyError, SSHAuthError or SSHConnectError."""
        conn, jumps, where = await connect_ssh(target, settings)
        return cls(target=target, settings=settings, conn=conn, jumps=jumps, where=where)

    async def __aenter__(self) -> SSHHost:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _connection(self) -> asyncssh.SSHClientConnection:
        if self._conn is None:
            raise SSHError(f"host {self.target.label}: the connection was closed or handed to the agent")
        return self._conn

    async def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        input: bytes = b"",
        on_line: LineHandler | None = None,
    ) -> CommandResult:
        """Run `argv` (through the login shell, as `ssh.remote_command` writes it) and wait up to
        `timeout` seconds for it to exit; past that the channel is closed and SSHError raised.
        `on_line` hears each stdout line as it arrives."""
        conn = self._connection()
        command = remote_command(argv, env)
        label = self.target.label
        log.debug("host %s: running %s", label, redacted_command(argv, env))
        try:
            process = await asyncio.wait_for(
                conn.create_process(command, encoding=None, request_pty=False, term_type=None),
                self.settings.connect_timeout,
            )
        except TimeoutError:
            raise SSHError(
                f"host {label} ({self.where}): the server did not start a command within "
                f"{self.settings.connect_timeout:g}s"
            ) from None
        except (asyncssh.Error, OSError) as exc:
            raise SSHError(f"host {label} ({self.where}): could not start a command: {exc}") from exc
        try:
            async with asyncio.timeout(timeout):
                if input:
                    process.stdin.write(input)
                process.stdin.write_eof()
                out, err = await asyncio.gather(_read_lines(process.stdout, on_line), _read_lines(process.stderr, None))
                await process.wait_closed()
        except TimeoutError:
            process.close()
            raise SSHError(f"host {label} ({self.where}): a command ran past {timeout:g}s; stopped") from None
        except (asyncssh.Error, OSError) as exc:
            process.close()
            raise SSHError(f"host {label} ({self.where}): the connection broke during a command: {exc}") from exc
        return CommandResult(exit_status=process.exit_status, stdout=out, stderr=err)

    async def put(self, files: Sequence[Path], remote_dir: str, *, on_bytes: BytesHandler | None = None) -> list[str]:
        """Copy `files` into `remote_dir` (created if missing) with SFTP; a file already there
        with the same size is skipped. Returns the names that were sent."""
        conn = self._connection()
        label = self.target.label
        try:
            async with conn.start_sftp_client() as sftp:
                try:
                    await sftp.makedirs(remote_dir, exist_ok=True)
                except asyncssh.SFTPError as exc:
                    raise SSHError(
                        f"host {label} ({self.where}): {await self._why_no_folder(remote_dir, exc)}"
                    ) from exc
                entries = await sftp.readdir(remote_dir)
                there = {str(entry.filename): entry.attrs.size for entry in entries}
                todo = [f for f in files if there.get(f.name) != f.stat().st_size]
                now = time.time()
                for entry in entries:  # interrupted copies' parts; never another host's under way
                    name, mtime = str(entry.filename), entry.attrs.mtime
                    if PART_SUFFIX in name and mtime is not None and now - mtime > STALE_PART_S:
                        with contextlib.suppress(asyncssh.SFTPError):
                            await sftp.remove(posixpath.join(remote_dir, name))
                skipped = sum(f.stat().st_size for f in files if f not in todo)
                copied = 0

                def progress(_src: bytes, _dst: bytes, done: int, _total: int) -> None:
                    if on_bytes is not None:
                        on_bytes(skipped + copied + done)

                for path in todo:
                    final = posixpath.join(remote_dir, path.name)
                    part = f"{final}{PART_SUFFIX}-{secrets.token_hex(4)}"
                    await sftp.put(str(path), part, progress_handler=progress)
                    # atomic, and replacing: where another host's copy landed first, the same bytes
                    await sftp.posix_rename(part, final)
                    copied += path.stat().st_size
                if on_bytes is not None:
                    on_bytes(skipped + copied)
        except (asyncssh.Error, OSError) as exc:
            raise SSHError(f"host {label} ({self.where}): copying files to {remote_dir} failed: {exc}") from exc
        return [f.name for f in todo]

    async def _why_no_folder(self, remote_dir: str, exc: asyncssh.SFTPError) -> str:
        """Why `remote_dir` cannot be made there. SFTP says only "Failure" for a read-only file
        system, and asyncssh's makedirs then reports "... is not a directory"; `mkdir -p` there
        says what it is."""
        said = ""
        with contextlib.suppress(SSHError, asyncssh.Error, OSError):
            done = await self.run(["mkdir", "-p", "--", remote_dir], timeout=self.settings.connect_timeout)
            said = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        reason = said.removeprefix("mkdir: ") or exc.reason or str(exc)
        return (
            f"cannot create {remote_dir}: {reason}; point XDG_CACHE_HOME at a writable folder in the host's env "
            '(the cluster file\'s env = { XDG_CACHE_HOME = "..." }), or make its home writable'
        )

    async def open_stream(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> SSHStream:
        """Start `argv` (the agent) on a new channel; the stream owns the connection from here."""
        conn = self._connection()
        self._conn = None
        return await stream_on(conn, self._jumps, self.where, self.target, argv, self.settings, env=env)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for link in [conn, *reversed(self._jumps)]:
            link.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(link.wait_closed(), 2.0)


async def _read_lines(reader: asyncssh.SSHReader[bytes], on_line: LineHandler | None) -> str:
    """Everything `reader` gives until EOF as text (the last OUTPUT_LIMIT bytes of it), each
    complete line passed to `on_line` as it arrives."""
    kept = bytearray()
    pending = b""
    while True:
        chunk = await reader.read(64 * 1024)
        if not chunk:
            break
        kept += chunk
        del kept[:-OUTPUT_LIMIT]
        if on_line is not None:
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                on_line(line.decode("utf-8", "replace"))
    if on_line is not None and pending:
        on_line(pending.decode("utf-8", "replace"))
    return kept.decode("utf-8", "replace")
