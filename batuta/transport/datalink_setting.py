"""The data link's setting from the cluster file: whether the coordinator offers one, where
its listener binds, and whether it is encrypted (`[ssh] data_link`, `data_link_encryption`).
What the link does with it is `bulk.py`'s."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from batuta.transport.tls import split_address


@dataclass(frozen=True, slots=True)
class DataLinkSetting:
    """Where the coordinator's data listener binds. `host` "" means the local address of each
    host's SSH connection (the address that host reaches us at); `port` 0 means any free one.
    `encrypted` False: plain TCP, authenticated both ways but neither secret nor protected
    from change on the wire (`data_link_encryption = "none"`, `linkauth.py`)."""

    host: str = ""
    port: int = 0
    encrypted: bool = True

    @property
    def follows_ssh(self) -> bool:
        return not self.host


def parse_data_link(text: str) -> DataLinkSetting | None:
    """The cluster file's `[ssh] data_link`: "off" (None), "ssh", or "ADDRESS[:PORT]".
    Raises ValueError with the fix."""
    value = text.strip()
    if value in ("", "off"):
        return None
    if value == "ssh":
        return DataLinkSetting()
    try:
        host, port = split_address(value, 0)
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f'expected "off", "ssh" or a local IP address with an optional port ("10.0.0.5", '
            f'"10.0.0.5:7000"), got {value!r}'
        ) from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range (0-65535)")
    return DataLinkSetting(host=host, port=port)


ENCRYPTIONS = {"tls": True, "none": False}  # `data_link_encryption` -> DataLinkSetting.encrypted


def parse_data_link_encryption(text: str) -> bool:
    """The cluster file's `[ssh] data_link_encryption`: "tls" (True) or "none". Raises
    ValueError with the fix."""
    if text.strip() not in ENCRYPTIONS:
        raise ValueError(f'expected "tls" (the default) or "none" (plain TCP, for private networks), got {text!r}')
    return ENCRYPTIONS[text.strip()]
