"""Encrypted SSH identity files: sign with ssh-agent's copy of the key, or ask for its passphrase.

`ssh -i KEY` with an encrypted KEY works whenever ssh-agent holds that key: OpenSSH reads
the public key (KEY.pub, or the cleartext header of an OpenSSH-format key file), finds the
agent's copy and lets the agent sign, and only asks for the passphrase when there is none.
The SSH transport does the same with these parts: `encrypted_identity` says whether a file
is encrypted and what its public key is, `agent_holds` asks the agent, and
`unlock_on_terminal` asks for the passphrase on the controlling terminal.

A passphrase is only ever read from the terminal, with echo off: never from argv, the
environment or a file, and never logged. A key unlocked once is kept, decrypted, in this
process's memory (as ssh-agent keeps it), so that other hosts with the same identity file
and later reconnects do not ask again.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncssh

log = logging.getLogger("batuta.transport.ssh")

PASSPHRASE_TRIES = 3  # as OpenSSH's NumberOfPasswordPrompts
# The keys in ~/.ssh that ssh (and asyncssh) offer when no IdentityFile names one, in its order.
DEFAULT_IDENTITY_FILES = ("id_ed25519_sk", "id_ecdsa_sk", "id_ed448", "id_ed25519", "id_ecdsa", "id_rsa", "id_dsa")


class PassphraseRefused(Exception):
    """Every passphrase typed was wrong, or none was (the message says which)."""


@dataclass(frozen=True, slots=True)
class EncryptedIdentity:
    """An identity file whose private key is encrypted, and its public key where it is readable."""

    path: Path
    public_key: asyncssh.SSHKey | None  # from PATH.pub or the file's cleartext header; None: neither


def encrypted_identity(path: Path) -> EncryptedIdentity | None:
    """None if `path` holds a private key that needs no passphrase; what we know of it if it is
    encrypted. Raises OSError (unreadable) or asyncssh.KeyImportError (not a private key)."""
    try:
        asyncssh.read_private_key(path)
    except asyncssh.KeyImportError as exc:
        if not str(exc).startswith("Passphrase"):
            raise
    else:
        return None
    public_key = None
    # OpenSSH's order: the .pub beside it, then the key file's own public part (the OpenSSH
    # format keeps it in cleartext; PEM and PKCS#8 files have none).
    for candidate in (Path(f"{path}.pub"), path):
        try:
            public_key = asyncssh.read_public_key(candidate)
        except (OSError, ValueError):
            continue
        break
    return EncryptedIdentity(path=path, public_key=public_key)


def encrypted_among(paths: Sequence[str]) -> list[EncryptedIdentity]:
    """The encrypted private keys among `paths` (`~` expanded); files that are missing,
    unreadable or not private keys are left out, as ssh leaves them out of what it offers."""
    found = []
    for path in paths:
        try:
            identity = encrypted_identity(Path(path).expanduser())
        except (OSError, ValueError):  # KeyImportError is a ValueError
            continue
        if identity is not None:
            found.append(identity)
    return found


async def agent_holds(agent_path: str, public_key: asyncssh.SSHKey | None, timeout: float) -> bool | None:
    """Whether the ssh-agent at `agent_path` holds `public_key`; None if it cannot be reached."""
    try:
        async with asyncio.timeout(timeout):
            async with asyncssh.connect_agent(agent_path) as agent:
                keys = await agent.get_keys()
    except (OSError, ValueError, TimeoutError, asyncssh.Error) as exc:
        log.debug("ssh-agent %s: %s", agent_path, exc)
        return None
    if public_key is None:
        return False
    return any(key.public_data == public_key.public_data for key in keys)


_UNLOCKED: dict[tuple[str, int, int, int], asyncssh.SSHKey] = {}  # by path, mtime, size, inode


def unlock_on_terminal(identity: EncryptedIdentity, label: str) -> asyncssh.SSHKey | None:
    """The identity's key, decrypted with a passphrase typed on the terminal (up to
    PASSPHRASE_TRIES tries); None where there is no terminal. Raises PassphraseRefused.

    It runs on the event loop's thread and holds it, as ssh's prompt holds ssh: one prompt at
    a time, and Ctrl-C lands in the prompt, which then restores the terminal's echo.
    """
    try:
        st = os.stat(identity.path)
        cache_key: tuple[str, int, int, int] | None = (str(identity.path), st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        cache_key = None
    if cache_key is not None and cache_key in _UNLOCKED:
        return _UNLOCKED[cache_key]
    for attempt in range(1, PASSPHRASE_TRIES + 1):
        passphrase = ask_terminal(f"Enter passphrase for key '{identity.path}' (host {label}): ")
        if passphrase is None:
            return None
        if not passphrase:  # as ssh: an empty answer skips the key
            raise PassphraseRefused(f"no passphrase given for {identity.path}; load it with `ssh-add {identity.path}`")
        try:
            key = asyncssh.read_private_key(identity.path, passphrase)
        except (OSError, ValueError) as exc:  # KeyImportError, KeyEncryptionError: a wrong passphrase
            log.warning("host %s: %s: %s (try %d of %d)", label, identity.path, exc, attempt, PASSPHRASE_TRIES)
            continue
        if cache_key is not None:
            _UNLOCKED[cache_key] = key
        return key
    raise PassphraseRefused(
        f"wrong passphrase for {identity.path} ({PASSPHRASE_TRIES} tries); "
        f"check it with `ssh-keygen -y -f {identity.path}`"
    )


def ask_terminal(prompt: str) -> str | None:
    """What is typed on the controlling terminal, without echo; None where there is none.

    Only the terminal: getpass would fall back to stdin (echoing, or reading a pipe that
    carries something else), which is why /dev/tty is checked first.
    """
    try:
        tty = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return None
    os.close(tty)
    try:
        return getpass.getpass(prompt)  # opens /dev/tty itself, echo off
    except EOFError:  # Ctrl-D: as an empty answer
        return ""
