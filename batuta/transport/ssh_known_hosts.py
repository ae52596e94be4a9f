"""known_hosts for the SSH transport: reading the files, judging a host's key, remembering one.

`KNOWN_HOSTS` parses the known_hosts files once per process and again only when one changes
on disk (lines asyncssh cannot read are skipped with a warning, as OpenSSH skips them).
`HostKeyPolicy` is what asyncssh asks about a key those files do not trust: a changed key is
refused, always; an unknown one is refused, or with trust-on-first-use accepted and appended
after the connect by `append_known_host`, under a lock, as OpenSSH writes it.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncssh

log = logging.getLogger("batuta.transport.ssh")

DEFAULT_PORT = 22


class KnownHostsFiles:
    """known_hosts files parsed once and re-read only when one of them changes on disk."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, ...], tuple[tuple[Any, ...], asyncssh.SSHKnownHosts]] = {}

    def load(self, paths: Sequence[str]) -> asyncssh.SSHKnownHosts:
        key = tuple(paths)
        stamp = tuple(_stamp(p) for p in paths)
        cached = self._cache.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        parts: list[str] = []
        for path in paths:
            try:
                parts.append(Path(path).read_text(encoding="utf-8", errors="replace"))
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot read known_hosts %s: %s", path, exc)
        known = parse_known_hosts("\n".join(parts), ", ".join(paths))
        self._cache[key] = (stamp, known)
        return known


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def parse_known_hosts(text: str, where: str) -> asyncssh.SSHKnownHosts:
    """Parse known_hosts text; lines asyncssh cannot read are skipped (as OpenSSH does)."""
    try:
        return asyncssh.import_known_hosts(text)
    except (ValueError, asyncssh.KeyImportError):
        pass
    good: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            asyncssh.import_known_hosts(line)
        except (ValueError, asyncssh.KeyImportError) as exc:
            log.warning("known_hosts %s: skipping line %d: %s", where, number, exc)
            continue
        good.append(line)
    return asyncssh.import_known_hosts("\n".join(good))


KNOWN_HOSTS = KnownHostsFiles()


def known_hosts_pattern(host: str, port: int) -> str:
    """How OpenSSH writes a host in known_hosts: `host`, or `[host]:port` off port 22."""
    return host if port == DEFAULT_PORT else f"[{host}]:{port}"


def append_known_host(path: Path, host: str, port: int, key: asyncssh.SSHKey) -> None:
    """Append one host key line to `path`, creating it (0600, folder 0700) if needed.

    The file is locked while appending, and a missing final newline is added first, so
    concurrent writers (other batuta processes, OpenSSH itself) never interleave lines.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_text = key.export_public_key("openssh").decode("ascii").split()
    line = f"{known_hosts_pattern(host, port)} {key_text[0]} {key_text[1]}\n".encode("ascii")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


class HostKeyPolicy(asyncssh.SSHClient):
    """asyncssh asks this only about keys known_hosts does not trust; it decides and remembers.

    known host + untrusted key = changed: refused, always. Unknown host: refused, or with
    trust-on-first-use accepted and remembered for `append_known_host` after the connect.
    """

    def __init__(self, known: asyncssh.SSHKnownHosts, trust_on_first_use: bool) -> None:
        self._known = known
        self._trust_on_first_use = trust_on_first_use
        self.verdict = ""  # "unknown" or "changed" once a key was refused
        self.offered: asyncssh.SSHKey | None = None
        self.learned: tuple[str, int, asyncssh.SSHKey] | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self.offered = key
        match_port = None if port == DEFAULT_PORT else port
        trusted, ca_keys, *_ = self._known.match(host, addr, match_port)
        if trusted or ca_keys:
            self.verdict = "changed"
            return False
        if self._trust_on_first_use:
            self.learned = (host, port, key)
            return True
        self.verdict = "unknown"
        return False
