"""Where served coordinators listen: one Unix socket per coordinator, in a folder only its user can enter.

The folder is `/tmp/batuta-UID`, or `$BATUTA_RUNTIME_DIR` where set. Not `$XDG_RUNTIME_DIR`:
systemd-logind removes that folder when the user's last session ends, which is the moment a
served run exists for (started over SSH, then logged out): its socket and log went with it,
and the job ran on where `batuta ps` and `batuta stop` could no longer find it. tmux keeps its
sockets in /tmp for the same reason (and systemd-tmpfiles leaves a socket in use alone). The
folder is created mode 0700 and refused when another user owns it, others may enter it, or it
is a link: a socket there is reachable by its owner alone, on top of the socket's own mode
0600 and the coordinator's peer-credential check. A coordinator is named by its socket:
NAME.sock; its log is NAME.log beside it.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from pathlib import Path

from batuta.errors import UsageError

SUFFIX = ".sock"
RUNTIME_DIR_ENV = "BATUTA_RUNTIME_DIR"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def runtime_dir(*, create: bool = True) -> Path:
    """This user's folder of coordinator sockets and logs (created 0700 when `create`)."""
    chosen = os.environ.get(RUNTIME_DIR_ENV, "")
    folder = Path(chosen).expanduser() if chosen else Path(f"/tmp/batuta-{os.getuid()}")
    fix = f"set {RUNTIME_DIR_ENV} to a folder of yours"
    if create:
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create {folder}: {exc.strerror or exc}; {fix}") from None
    if folder.exists() or folder.is_symlink():
        info = folder.lstat()
        if stat.S_ISLNK(info.st_mode):
            raise UsageError(f"{folder} is a symbolic link, not a folder of yours; remove it, or {fix}")
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise UsageError(
                f"{folder} is not a folder that only you can enter (owner uid {info.st_uid}, mode "
                f"{stat.S_IMODE(info.st_mode):o}); remove it or 'chmod 700' it, or {fix}"
            )
    return folder


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"coordinator name {name!r} is not usable; use up to 64 letters, digits, '.', '_' or '-', e.g. kmeans-1"
        )
    return name


def socket_path(name: str) -> Path:
    return runtime_dir() / f"{check_name(name)}{SUFFIX}"


def listed_sockets() -> list[Path]:
    """Every coordinator socket in this user's folder, by name."""
    folder = runtime_dir(create=False)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(SUFFIX) and _is_socket(p))


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except OSError:
        return False


def kind_of(path: Path) -> str | None:
    """What `path` is when it exists and is not a socket ("a folder", "a regular file"), for
    an error that says so instead of calling it a dead coordinator's socket; else None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file (a device or a pipe)"


def is_stale(path: Path) -> bool:
    """True when nothing listens on the socket at `path` (its coordinator died without removing it)."""
    if path.exists() and not _is_socket(path):
        return False  # a file of another kind (connecting to it is refused too): not ours to remove
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except OSError:
        return False  # in use, or not ours to judge (permission): leave it alone
    finally:
        probe.close()
    return False


def name_of(path: Path) -> str:
    return path.name.removesuffix(SUFFIX)
