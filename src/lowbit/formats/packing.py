"""Bit packing of 1..8-bit codes into uint8, along the last dimension.

Byte layout (little-endian within a group), for codes c0, c1, ... of `bits` bits each:
a *group* is the smallest run of codes that fills whole bytes, g = 8 / gcd(bits, 8) codes in
g * bits / 8 bytes. Within a group, code i occupies bits [i*bits, (i+1)*bits) of the group's
integer, and byte j of the group is bits [8j, 8j+8) of it. So

    bits=4: 2 codes per byte, c0 in the low nibble            (same as llama.cpp's nibble order
                                                                 within a byte, not across a block)
    bits=2: 4 codes per byte, c0 in bits 0-1
    bits=1: 8 codes per byte, c0 in bit 0
    bits=3: 8 codes in 3 bytes: v = c0 | c1<<3 | ... | c7<<21; bytes v&255, v>>8&255, v>>16
    bits=6: 4 codes in 3 bytes: v = c0 | c1<<6 | c2<<12 | c3<<18; bytes as above
    bits=8: the codes themselves

A row of n codes takes ceil(n / g) groups; the tail of the last group is zero-filled.
"""

from __future__ import annotations

import math

import torch


def group_codes(bits: int) -> int:
    """Codes per packing group (the smallest run filling whole bytes)."""
    _check_bits(bits)
    return 8 // math.gcd(bits, 8)


def packed_len(n: int, bits: int) -> int:
    """Bytes used by `n` codes of `bits` bits."""
    g = group_codes(bits)
    return -(-n // g) * g * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last dim into uint8.

    Example:
        >>> import torch
        >>> pack(torch.tensor([1, 2, 3, 4], dtype=torch.uint8), 4).tolist()
        [33, 67]
    """
    _check_bits(bits)
    if bits == 8:
        return codes.to(torch.uint8)
    g = group_codes(bits)
    nbytes = g * bits // 8
    n = codes.shape[-1]
    pad = (-n) % g
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*codes.shape[:-1], -1, g)
    shifts = torch.arange(g, device=c.device, dtype=torch.int64) * bits
    v = (c << shifts).sum(-1, keepdim=True)  # disjoint bit ranges: sum == bitwise or
    byte_shifts = torch.arange(nbytes, device=c.device, dtype=torch.int64) * 8
    out = (v >> byte_shifts) & 0xFF
    return out.reshape(*codes.shape[:-1], -1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: the first `n` codes of each row, as uint8."""
    _check_bits(bits)
    if bits == 8:
        return packed[..., :n]
    if bits in (1, 2, 4):  # whole codes per byte: shift the uint8 bytes directly (the hot decode path)
        per_byte = 8 // bits
        mask = (1 << bits) - 1
        parts = [(packed >> (i * bits)) & mask for i in range(per_byte)]
        return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)[..., :n]
    g = group_codes(bits)
    nbytes = g * bits // 8
    p = packed.to(torch.int64).reshape(*packed.shape[:-1], -1, nbytes)
    byte_shifts = torch.arange(nbytes, device=p.device, dtype=torch.int64) * 8
    v = (p << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(g, device=p.device, dtype=torch.int64) * bits
    codes = (v >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
