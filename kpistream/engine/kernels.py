"""Compiled kernels (numba) of the key table (:func:`insert`, :func:`lookup`, ...): open
addressing, linear probing, tombstones.
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


@njit(cache=True, inline="always")
def _fix(k):
    """User keys 0 and 1 (empty, tombstone) moved out of the way."""
    return k + np.uint64(2) if k < np.uint64(2) else k


@njit(cache=True)
def insert(tkeys, tident, keys, ident, use_ident, out_slots, out_dup):
    """Insert each key (an entry of its own); with ``use_ident`` an entry of the
    same key and ident already on the probe sequence makes it a duplicate.

    Returns how many empty slots were consumed (tombstone reuse is free).

    A table is two parallel arrays: ``keys`` (uint64; 0 = empty, 1 = tombstone,
    so user keys are remapped away from those) and ``ident`` (uint64, an event
    id for deduplication).  Several entries may share a key (a multimap): they
    sit on the key's probe sequence, which ends at the first empty slot.
    Expiry marks slots as tombstones in place; a rebuild (on growth, or when
    tombstones pile up) re-inserts the survivors.

    Every kernel loops over a whole batch in machine code; Python only calls
    them once per batch.  Compiled on first use and cached on disk.
    """
    mask = np.uint64(tkeys.shape[0] - 1)
    consumed = 0
    for i in range(keys.shape[0]):
        k = _fix(keys[i])
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
        k = _fix(keys[i])
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


# ---------------------------------------------------------------------------
# join kernels


@njit(cache=True)
def apply_once(ps, once, positive, seen, use):
    """Kinds that count once per inference, in arrival order.

    ``once[i]`` is the pair's once-bit (0 for kinds that always count); the
    first pair of a bit per inference slot counts and sets the bit; a pair
    that is not ``positive`` (a false click) counts for nothing and sets
    nothing.  Updates ``seen`` (per slot) and ``use`` (per pair) in place.
    """
    for i in range(ps.shape[0]):
        bit = once[i]
        if bit == 0:
            continue
        if not positive[i]:
            use[i] = False
            continue
        s = ps[i]
        if seen[s] & bit:
            use[i] = False
        else:
            seen[s] |= bit


@njit(cache=True)
def ranking_pairs(rank_off, rank_len, arena, rel_offs, rel_items, rel_grades, k,
                  p_at_k, r_at_k, ndcg, rr):
    """Per (ranking, relevance) pair: P@k, R@k (NaN without relevant items), NDCG@k, RR@k.

    Linear gains (grade / log2(rank + 1)) as scikit-learn's ``ndcg_score``.
    """
    disc = np.empty(k, dtype=np.float64)
    for j in range(k):
        disc[j] = 1.0 / np.log2(j + 2.0)
    top = np.empty(k, dtype=np.float64)
    for i in range(rank_off.shape[0]):
        lo, hi = rel_offs[i], rel_offs[i + 1]
        m = min(rank_len[i], k)
        hits = 0
        dcg = 0.0
        first = -1
        for j in range(m):
            item = arena[rank_off[i] + j]
            g = 0.0
            for r in range(lo, hi):
                if rel_items[r] == item:
                    g = rel_grades[r]
                    break
            if g > 0.0:
                hits += 1
                dcg += g * disc[j]
                if first < 0:
                    first = j
        # ideal DCG: the k largest grades of the request
        n_rel = 0
        nt = 0
        for r in range(lo, hi):
            g = rel_grades[r]
            if g > 0.0:
                n_rel += 1
                # insertion into the descending top-k list
                if nt < k:
                    nt += 1
                    q = nt - 1
                elif g > top[k - 1]:
                    q = k - 1
                else:
                    continue
                while q > 0 and top[q - 1] < g:
                    top[q] = top[q - 1]
                    q -= 1
                top[q] = g
        idcg = 0.0
        for j in range(nt):
            idcg += top[j] * disc[j]
        p_at_k[i] = hits / k
        r_at_k[i] = hits / n_rel if n_rel > 0 else np.nan
        ndcg[i] = dcg / idcg if idcg > 0.0 else 0.0
        rr[i] = 1.0 / (first + 1.0) if first >= 0 else 0.0


@njit(cache=True)
def future_mask(ts, invalid, ref, max_future, out):
    """Stream-time far-future check, one event at a time: an event more than
    ``max_future`` ahead of the largest accepted event time so far (``ref``)
    is flagged; accepted events move ``ref``.  Returns the final ``ref``."""
    for i in range(ts.shape[0]):
        if invalid[i]:
            continue
        t = ts[i]
        if t > ref + max_future:
            out[i] = True
        elif t > ref:
            ref = t
    return ref
