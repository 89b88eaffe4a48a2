"""Compiled kernels (numba) of the key table: open addressing, linear probing, tombstones.

A table is two parallel arrays: ``keys`` (uint64; 0 = empty, 1 = tombstone,
so user keys are remapped away from those) and ``ident`` (uint64, an event
id for deduplication).  Several entries may share a key (a multimap): they
sit on the key's probe sequence, which ends at the first empty slot.
Expiry marks slots as tombstones in place; a rebuild (on growth, or when
tombstones pile up) re-inserts the survivors.

Every kernel loops over a whole batch in machine code; Python only calls
them once per batch.  Compiled on first use and cached on disk.
"""

from __future__ import annotations

import numpy as np
from numba import njit

EMPTY = np.uint64(0)
TOMB = np.uint64(1)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


@njit(cache=True, inline="always")
def _mix(z):
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(cache=True)
def fix_keys(keys):
    """User keys with 0 and 1 (empty, tombstone) moved out of the way."""
    out = keys.copy()
    for i in range(out.shape[0]):
        if out[i] < np.uint64(2):
            out[i] += np.uint64(2)
    return out


@njit(cache=True)
def insert(tkeys, tident, keys, ident, use_ident, out_slots, out_dup):
    """Insert each key (an entry of its own); with ``use_ident`` an entry of the
    same key and ident already on the probe sequence makes it a duplicate.

    Returns how many empty slots were consumed (tombstone reuse is free).
    """
    mask = np.uint64(tkeys.shape[0] - 1)
    consumed = 0
    for i in range(keys.shape[0]):
        k = keys[i]
        h = _mix(k) & mask
        free = -1
        dup = False
        while True:
            tk = tkeys[h]
            if tk == EMPTY:
                if free < 0:
                    free = np.int64(h)
                    consumed += 1
                break
            if tk == TOMB:
                if free < 0:
                    free = np.int64(h)
            elif use_ident and tk == k and tident[h] == ident[i]:
                dup = True
                break
            h = (h + np.uint64(1)) & mask
        if dup:
            out_dup[i] = True
            out_slots[i] = -1
        else:
            tkeys[free] = k
            tident[free] = ident[i]
            out_slots[i] = free
    return consumed


@njit(cache=True)
def lookup(tkeys, texp, keys, now, out_q, out_s):
    """All live entries (expiry > now) of each key, as (query index, slot) pairs.

    Returns the number of pairs, or -1 if ``out_q`` was too small.
    """
    mask = np.uint64(tkeys.shape[0] - 1)
    n = 0
    cap = out_q.shape[0]
    for i in range(keys.shape[0]):
        k = keys[i]
        h = _mix(k) & mask
        while True:
            tk = tkeys[h]
            if tk == EMPTY:
                break
            if tk == k and texp[h] > now:
                if n >= cap:
                    return -1
                out_q[n] = i
                out_s[n] = np.int64(h)
                n += 1
            h = (h + np.uint64(1)) & mask
    return n


@njit(cache=True)
def expired_slots(tkeys, texp, now):
    """Slots of live entries with expiry <= now."""
    n = 0
    for h in range(tkeys.shape[0]):
        if tkeys[h] > TOMB and texp[h] <= now:
            n += 1
    out = np.empty(n, dtype=np.int64)
    j = 0
    for h in range(tkeys.shape[0]):
        if tkeys[h] > TOMB and texp[h] <= now:
            out[j] = h
            j += 1
    return out


@njit(cache=True)
def live_slots(tkeys):
    n = 0
    for h in range(tkeys.shape[0]):
        if tkeys[h] > TOMB:
            n += 1
    out = np.empty(n, dtype=np.int64)
    j = 0
    for h in range(tkeys.shape[0]):
        if tkeys[h] > TOMB:
            out[j] = h
            j += 1
    return out


@njit(cache=True)
def place(tkeys, keys, out_slots):
    """Insert keys into a fresh table (no tombstones, no dedup): their slots."""
    mask = np.uint64(tkeys.shape[0] - 1)
    for i in range(keys.shape[0]):
        k = keys[i]
        h = _mix(k) & mask
        while tkeys[h] != EMPTY:
            h = (h + np.uint64(1)) & mask
        tkeys[h] = k
        out_slots[i] = np.int64(h)
