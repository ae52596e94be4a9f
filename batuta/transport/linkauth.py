"""Both ends of an unencrypted data link prove they know its one-time token, never sending it.

`[ssh] data_link_encryption = "none"` (`transport/bulk.py`) makes the data connections plain
TCP: for a network the user trusts, as Dask's tcp://, MPI or Ray's object transfer, where
TLS's CPU cost is the bottleneck. Nothing on the wire is confidential or protected from
change then; but a process that connects without the token is still refused, and the agent
still sends data only to the coordinator that offered the link: each side sends a random
nonce, and each proves it knows the token with an HMAC-SHA256 keyed by it, over a label of
its own (so neither side's proof can be sent back as the other's), the role and both nonces
(so no proof seen on the wire is good for another connection)::

    agent -> coordinator: PLAIN_MAGIC (8) | role (1) | agent nonce (32)
    coordinator -> agent: coordinator nonce (32)
    agent -> coordinator: agent proof (32)
    coordinator -> agent: coordinator proof (32), only if the agent's proof matched a token
    coordinator -> agent: b"\\x01" (accepted), as over TLS

The coordinator has one token per session it offered a link on the listener, so it finds the
dialler's by trying each (`find_token`). Pure functions: the socket I/O is `bulk.py`'s.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

PLAIN_MAGIC = b"BATPLAN1"
NONCE_BYTES = 32
PROOF_BYTES = 32  # SHA-256
_AGENT_LABEL = b"batuta data link 1: the agent proves the token"
_COORDINATOR_LABEL = b"batuta data link 1: the coordinator proves the token"


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def _proof(label: bytes, token: bytes, role: bytes, agent_nonce: bytes, coordinator_nonce: bytes) -> bytes:
    return hmac.new(token, label + role + agent_nonce + coordinator_nonce, hashlib.sha256).digest()


def agent_proof(token: bytes, role: bytes, agent_nonce: bytes, coordinator_nonce: bytes) -> bytes:
    """What the agent sends to show it holds `token`."""
    return _proof(_AGENT_LABEL, token, role, agent_nonce, coordinator_nonce)


def coordinator_proof(token: bytes, role: bytes, agent_nonce: bytes, coordinator_nonce: bytes) -> bytes:
    """What the coordinator sends back to show it holds `token` too."""
    return _proof(_COORDINATOR_LABEL, token, role, agent_nonce, coordinator_nonce)


def proves_coordinator(proof: bytes, token: bytes, role: bytes, agent_nonce: bytes, coordinator_nonce: bytes) -> bool:
    """Whether `proof` is the coordinator's for this connection (the agent's check)."""
    return hmac.compare_digest(proof, coordinator_proof(token, role, agent_nonce, coordinator_nonce))


def find_token(
    tokens: Iterable[bytes], proof: bytes, role: bytes, agent_nonce: bytes, coordinator_nonce: bytes
) -> bytes | None:
    """The token among `tokens` that the agent's `proof` was made with, or None (the
    coordinator's check). Every token is tried, so the time taken says nothing of which."""
    found: bytes | None = None
    for token in tokens:
        if hmac.compare_digest(proof, agent_proof(token, role, agent_nonce, coordinator_nonce)):
            found = token
    return found
