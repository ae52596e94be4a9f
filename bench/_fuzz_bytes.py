"""Random bytes for bench/fuzz.py: valid frames mutated, and frames around random msgpack."""

from __future__ import annotations

import random
import struct
from typing import Any

import msgpack


def mutate(rnd: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rnd.randrange(1, 4)):
        op = rnd.randrange(6)
        pos = rnd.randrange(len(data) + 1)
        if op == 0 and data:  # flip a bit
            pos = min(pos, len(data) - 1)
            data[pos] ^= 1 << rnd.randrange(8)
        elif op == 1:  # insert
            data[pos:pos] = rnd.randbytes(rnd.randrange(1, 8))
        elif op == 2 and data:  # delete
            del data[pos : pos + rnd.randrange(1, 8)]
        elif op == 3:  # cut (keeping a byte: an empty write would mean nothing, or EOF to a model)
            data = data[: max(1, pos)]
        elif op == 4 and data:  # set an interesting byte
            pos = min(pos, len(data) - 1)
            data[pos] = rnd.choice([0x00, 0xFF, 0x7F, 0x80, 0xC1, 0xCE, 0xDC, 0xDD, 0xDE, 0xDF, 0xC7])
        else:  # rewrite the length prefix to match (so the body's mutation is what is judged)
            if len(data) >= 4:
                data[:4] = struct.pack(">I", len(data) - 4)
    return bytes(data)


def wire_body(rnd: random.Random) -> bytes:
    """A frame whose body is random msgpack: a bare value, or a tagged array of wrong fields."""
    if rnd.random() < 0.3:
        body = msgpack.packb(_plain(rnd))
    else:
        tag = rnd.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 23, 99, -1])
        body = msgpack.packb([tag, *(_plain(rnd) for _ in range(rnd.randrange(5)))])
    return struct.pack(">I", len(body)) + body


def _plain(rnd: random.Random, depth: int = 0) -> Any:
    pick = rnd.randrange(8 if depth < 3 else 5)
    if pick == 0:
        return rnd.randint(-(2**40), 2**64 - 1)
    if pick == 1:
        return rnd.random()
    if pick == 2:
        return "".join(chr(rnd.randrange(32, 127)) for _ in range(rnd.randrange(8)))
    if pick == 3:
        return rnd.choice([None, True, False, b"\x00\x01"])
    if pick == 4:
        return msgpack.ExtType(rnd.randrange(0, 128), rnd.randbytes(rnd.randrange(12)))
    if pick in (5, 6):
        return [_plain(rnd, depth + 1) for _ in range(rnd.randrange(5))]
    return {str(rnd.randrange(9)): _plain(rnd, depth + 1) for _ in range(rnd.randrange(3))}
