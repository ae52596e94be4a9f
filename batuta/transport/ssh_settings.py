"""What an SSH host is and how it is reached (the cluster file's `[ssh]` table and a host's
address), and the errors of the SSH edge: everything of the SSH transport that a cluster file,
a command line or an `except` clause names, without importing asyncssh.

`ssh.py` connects. The cluster file is read, and local hosts start, without paying for
asyncssh's import (a tenth of a second or more, and its crypto probes run `ldconfig`
through `ctypes.util.find_library`): it is imported when a host is reached over SSH.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from batuta.errors import HostConfigError, TransportError
from batuta.transport.datalink_setting import DataLinkSetting

# -- errors -------------------------------------------------------------------------------


class SSHError(TransportError):
    """Something between us and a host's agent went wrong at the SSH level."""


class SSHConnectError(SSHError):
    """No SSH session: connection refused, timed out, name not resolved, or closed early."""


class SSHAuthError(SSHConnectError):
    """The server refused every key we offered for that user."""

    retryable = False


class SSHSettingsError(SSHConnectError, HostConfigError):
    """The host's ssh settings cannot be used here: an identity file (the cluster file's, or an
    ssh config's IdentityFile) is missing or unreadable, or a setting is invalid."""


class HostKeyError(SSHError):
    """The host's key is not in known_hosts (unknown) or does not match it (changed)."""

    retryable = False

    def __init__(self, message: str, *, changed: bool) -> None:
        super().__init__(message)
        self.changed = changed


class SSHKeyLockedError(SSHAuthError):
    """The identity file is encrypted, no ssh-agent holds it, and no passphrase could be asked for."""


# -- settings -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SSHSettings:
    """How every SSH host of a cluster is reached (the cluster file's `[ssh]` table).

    `known_hosts`: the file to verify against and to record trusted-on-first-use keys in;
    None means the ssh config's `UserKnownHostsFile`, else `~/.ssh/known_hosts`.
    `config_files`: ssh config files; None means `~/.ssh/config` if it is readable, and
    an empty tuple means none at all.
    """

    known_hosts: Path | None = None
    config_files: tuple[Path, ...] | None = None
    connect_timeout: float = 10.0
    trust_on_first_use: bool = False
    # Ask on the terminal for the passphrase of an encrypted identity file that no ssh-agent
    # holds. A full-screen app that owns the terminal turns this off (the error then says
    # to `ssh-add` the key).
    ask_passphrase: bool = True
    data_link: DataLinkSetting | None = None  # `data_link`: big arrays beside the channel (bulk.py)

    def config_paths(self) -> list[str]:
        if self.config_files is not None:
            return [str(p) for p in self.config_files]
        default = Path("~/.ssh/config").expanduser()
        return [str(default)] if os.access(default, os.R_OK) else []


@dataclass(frozen=True, slots=True, kw_only=True)
class SSHTarget:
    """One SSH destination. Unset fields come from the ssh config, then OpenSSH's defaults."""

    host: str  # a host name, an address, or an ssh config alias
    port: int | None = None
    user: str | None = None
    identity_file: Path | None = None
    name: str = ""  # the cluster's name for it, for messages

    @property
    def label(self) -> str:
        return self.name or self.host
