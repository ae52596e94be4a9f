"""xoroshiro128+ generator states for mc_pi, seeded on the GPU in parallel, equal to numba's.

numba's ``create_xoroshiro128p_states(n, seed)`` seeds generator 0 with SplitMix64 and each
next one by jumping the previous one 2**64 steps ahead, one after another on the CPU: about
50-100 ms for the 262,144 generators of a large mc_pi launch, during which the card idles,
plus a 4 MiB upload. Every step of xoroshiro128+ is linear over GF(2) (xors, shifts,
rotations), so the jump is a 128 x 128 bit matrix J, and generator g is J**g applied to
generator 0. `jump_powers` computes J**(2**b) for every bit b once per process (on the CPU,
from numba's own jump constants, about 0.1 s); `_seed_py` then lets thread g apply the powers
for the bits of g to generator 0: at most 18 matrix-vector products of 128 bits, the same
states numba makes, bit for bit (tests/test_kernels_cuda.py compares them).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import numpy as np

from .cuda_support import jit_kernels

cuda: Any = None  # numba.cuda, bound by _kernels() before the kernels compile
__all__ = ["JUMP_BITS", "jump_powers", "seeded_states"]

JUMP_BITS = 18
"""Powers J**(2**b) kept, b < JUMP_BITS: enough for 2**18 = 262,144 generators (mc_pi's most)."""

SEED_THREADS = 64

_MASK = (1 << 64) - 1
_JUMP = (0xBEAC0467EBA5FACB, 0xD86B048B86AA9922)  # numba.cuda.random.xoroshiro128p_jump's
_ONE = np.uint64(1)


def _rotl(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) & _MASK


def _next(state: int) -> int:
    """One xoroshiro128+ step of the 128-bit state s0 | s1 << 64 (as numba's next)."""
    s0, s1 = state & _MASK, state >> 64
    s1 ^= s0
    return (_rotl(s0, 55) ^ s1 ^ ((s1 << 14) & _MASK)) | (_rotl(s1, 36) << 64)


def _jump(state: int) -> int:
    """numba's xoroshiro128p_jump: 2**64 steps ahead."""
    acc = 0
    for word in _JUMP:
        for b in range(64):
            if (word >> b) & 1:
                acc ^= state
            state = _next(state)
    return acc


def _apply(columns: list[int], state: int) -> int:
    """The matrix (given by its columns, the images of the unit states) times `state`."""
    result = 0
    bit = 0
    while state:
        if state & 1:
            result ^= columns[bit]
        state >>= 1
        bit += 1
    return result


@functools.cache
def jump_powers() -> np.ndarray:
    """uint64 (JUMP_BITS, 128, 2): column i of J**(2**b) as its (s0, s1) words."""
    columns = [_jump(1 << i) for i in range(128)]
    powers = np.empty((JUMP_BITS, 128, 2), np.uint64)
    for b in range(JUMP_BITS):
        powers[b, :, 0] = [c & _MASK for c in columns]
        powers[b, :, 1] = [c >> 64 for c in columns]
        columns = [_apply(columns, c) for c in columns]  # squared: J**(2**(b + 1))
    return powers


def first_state(seed: int) -> tuple[int, int]:
    """Generator 0 as numba seeds it: s0 = s1 = SplitMix64's first output for `seed`."""
    z = (seed + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    z ^= z >> 31
    return z, z


def _seed_py(s0_first: Any, s1_first: Any, powers: Any, states: Any) -> None:
    g = cuda.grid(1)
    if g >= states.shape[0]:
        return
    s0 = s0_first
    s1 = s1_first
    rest = g
    b = 0
    while rest > 0:
        if rest & 1:
            r0 = np.uint64(0)
            r1 = np.uint64(0)
            for i in range(64):
                if (s0 >> np.uint64(i)) & _ONE:
                    r0 ^= powers[b, i, 0]
                    r1 ^= powers[b, i, 1]
            for i in range(64):
                if (s1 >> np.uint64(i)) & _ONE:
                    r0 ^= powers[b, 64 + i, 0]
                    r1 ^= powers[b, 64 + i, 1]
            s0 = r0
            s1 = r1
        rest >>= 1
        b += 1
    states[g]["s0"] = s0
    states[g]["s1"] = s1


@functools.cache
def _kernels() -> SimpleNamespace:
    return jit_kernels(globals(), {"seed": _seed_py})


@functools.cache
def _device_powers(device: int) -> Any:
    """The jump powers on device number `device` (39 KiB), uploaded once per process and device."""
    return cuda.to_device(jump_powers())


def seeded_states(n: int, seed: int) -> Any:
    """A device array of `n` xoroshiro128+ states, equal to numba's
    ``create_xoroshiro128p_states(n, seed)``, seeded in parallel on the device."""
    from numba.cuda.random import xoroshiro128p_dtype

    if n > 1 << JUMP_BITS:
        raise ValueError(f"at most {1 << JUMP_BITS} generators, not {n}")
    kernels = _kernels()
    states = cuda.device_array(n, dtype=xoroshiro128p_dtype)
    if n:
        s0, s1 = first_state(seed)
        powers = _device_powers(int(getattr(cuda.get_current_device(), "id", 0)))
        kernels.seed[-(-n // SEED_THREADS), SEED_THREADS](np.uint64(s0), np.uint64(s1), powers, states)
    return states
