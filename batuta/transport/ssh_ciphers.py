"""Which cipher an SSH link to a host prefers, when nobody chose one.

Every byte of a value sent to or fetched from an SSH host is encrypted by asyncssh, in this
process, one packet at a time, and by sshd on the host: on a small coordinator that is where
a big transfer's time goes. asyncssh offers chacha20-poly1305 first, as OpenSSH does. Where
the CPU has AES instructions, AES-GCM is the cheaper of the two by far (`cryptography` hands
it to OpenSSL's AES-NI code; chacha20 and poly1305 run as two passes): on the 2-core VM of
`bench/RESULTS.md` one channel carried 0.55 GB/s with aes128-gcm against 0.31 GB/s with
chacha20-poly1305. Both are authenticated ciphers that OpenSSH ships enabled; only the order
changes, and a `Ciphers` line in the ssh config still wins (see `preferred_ciphers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

AES_GCM_FIRST = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def cpu_has_aes(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has AES instructions (x86 `aes`, ARM `aes` in its features).
    False where the kernel does not say (not Linux): the defaults stay."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features") and "aes" in value.split():
            return True
    return False


def preferred_ciphers(configured: Sequence[bytes], defaults: Sequence[bytes], has_aes: bool) -> list[str] | None:
    """The cipher order to ask asyncssh for, or None to leave `configured` as it is.

    `configured` is what asyncssh settled on from the ssh config; when it is its own
    `defaults` (no `Ciphers` line) and the CPU has AES instructions, AES-GCM goes first and
    the rest keep their order."""
    if not has_aes or list(configured) != list(defaults):
        return None
    rest = [name.decode() for name in defaults if name.decode() not in AES_GCM_FIRST]
    offered = [name for name in AES_GCM_FIRST if name.encode() in defaults]
    return offered + rest if offered else None
