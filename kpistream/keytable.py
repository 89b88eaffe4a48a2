"""A vectorized hash multimap on 64-bit keys, for deduplication and the request-id join.

Open addressing with linear probing over power-of-two arrays; every
operation takes a whole batch of keys and runs a few numpy passes (one per
probe step), so a batch of 65,536 keys costs a handful of vectorized array
operations and no Python loop per key.

A *multimap*: one request id can hold several entries (the primary's and the
shadow's inference, a click and later a conversion).  Entry ``j`` of key
``r`` lives under the slot key ``mix(r, j)``; inserting takes the first free
``j``, looking up walks ``j = 0, 1, ...`` until a miss.  Rebuilding (on growth
or when expired entries are dropped) re-inserts the survivors in their
original order, so the ``j`` chains stay dense.

Every entry carries an ``expiry`` (event-time ms).  Entries whose expiry has
passed are invisible to lookups at once and are physically dropped by
:meth:`KeyTable.expire`, which returns them so the caller can count them.
``capacity`` bounds the live entries; beyond it the entries that expire first
are evicted (returned too, to be counted).

Variable-length payloads (a ranking, a relevance list) live in *arenas*:
append-only arrays addressed by per-entry ``(offset, length)`` columns, and
compacted on rebuild.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

_EMPTY = np.uint64(0)
_C1 = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_NO_EXPIRY = np.iinfo(np.int64).max


def _first_byte(words: np.ndarray) -> np.ndarray:
    """Index of the lowest nonzero byte of each (nonzero) uint64 holding 0/1 bytes."""
    low = words & (~words + np.uint64(1))  # lowest set bit, a power of two
    return (np.log2(low.astype(np.float64)).astype(np.int64)) >> 3


def mix(keys: np.ndarray, j: int) -> np.ndarray:
    """splitmix64 of ``key + j * golden``: the slot key of entry ``j`` (never 0)."""
    with np.errstate(over="ignore"):
        z = keys + np.uint64(j) * _C1 if j else keys.copy()
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    z[z == _EMPTY] = 1
    return z


class KeyTable:
    """Vectorized hash multimap: uint64 key -> rows of typed value columns.

    ``columns`` maps a column name to a numpy dtype; ``arenas`` maps an arena
    name to ``{field: dtype}``.  Each arena adds the columns ``<name>_off``
    and ``<name>_len``.  Slot indexes returned by the methods index the value
    columns directly (``table.col["ts"][slots]``).
    """

    def __init__(self, capacity: int, columns: Mapping[str, np.dtype | type] | None = None,
                 arenas: Mapping[str, Mapping[str, np.dtype | type]] | None = None,
                 initial: int = 1024, max_chain: int = 16, presence_bits: int = 0) -> None:
        self.capacity = int(capacity)
        # a one-byte-per-bucket presence filter: lets callers skip lookups of
        # keys that are surely absent (false positives only, cleared on rebuild)
        self._presence = np.zeros(1 << presence_bits, dtype=np.uint8) if presence_bits else None
        self._pmask = np.uint64((1 << presence_bits) - 1)
        self.max_chain = max_chain
        self._dtypes = {"key": np.uint64, "expiry": np.int64, "nchain": np.uint8,
                        **(columns or {})}
        self._arena_dtypes = {a: dict(f) for a, f in (arenas or {}).items()}
        for a in self._arena_dtypes:
            self._dtypes[f"{a}_off"] = np.int64
            self._dtypes[f"{a}_len"] = np.int32
        self.arena: dict[str, dict[str, np.ndarray]] = {
            a: {f: np.zeros(0, dt) for f, dt in fs.items()} for a, fs in self._arena_dtypes.items()}
        self._arena_used = {a: 0 for a in self._arena_dtypes}
        size = 1
        while size < max(16, 2 * initial):
            size *= 2
        self._alloc(size)
        self.n = 0            # occupied slots (live or expired-not-yet-dropped)
        self.min_expiry = _NO_EXPIRY
        self.evicted: dict[str, np.ndarray] = {}
        self.evicted_total = 0

    # -- storage -------------------------------------------------------------
    _W = 8  # slots per bucket: one 64-byte cache line of keys

    def _alloc(self, size: int) -> None:
        self.size = size
        self.nbuckets = size // self._W
        self.bmask = self.nbuckets - 1
        self.bucket_keys = np.zeros((self.nbuckets, self._W), dtype=np.uint64)
        self.slot_keys = self.bucket_keys.reshape(-1)
        self.col = {c: np.zeros(size, dtype=dt) for c, dt in self._dtypes.items()}
        self.col["expiry"][:] = _NO_EXPIRY
        self._owner = np.empty(size, dtype=np.int64)  # scratch for claim resolution

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        return (self.slot_keys.nbytes + sum(a.nbytes for a in self.col.values())
                + sum(a.nbytes for fs in self.arena.values() for a in fs.values()))

    # -- probing ---------------------------------------------------------------
    def _find(self, q: np.ndarray, claim: bool) -> tuple[np.ndarray, np.ndarray]:
        """Slots of slot-keys ``q``; with ``claim``, missing keys take an empty slot.

        Buckets of 8 slots are searched a whole bucket per step; a bucket with
        an empty slot ends the search (slots are only freed by a rebuild).
        Returns ``(slots, found)``: ``found`` is False where the key was absent
        (then ``slots`` is the newly claimed slot, or -1 without ``claim``).
        Equal keys within ``q`` are resolved: one claims, the others then find it.
        """
        n = len(q)
        W = self._W
        slots = np.full(n, -1, dtype=np.int64)
        found = np.zeros(n, dtype=bool)
        idx = np.arange(n)
        b = (q & np.uint64(self.bmask)).astype(np.int64)
        qq = q
        bk = self.bucket_keys
        while idx.size:
            rows = bk[b]
            # one uint64 per bucket row of 8 booleans: nonzero <=> any; the
            # lowest set byte is the first match
            eqw = (rows == qq[:, None]).view(np.uint64).ravel()
            hit = eqw != 0
            if hit.any():
                hs = b[hit] * W + _first_byte(eqw[hit])
                slots[idx[hit]] = hs
                found[idx[hit]] = True
            empw = (rows == _EMPTY).view(np.uint64).ravel()
            has_empty = (empw != 0) & ~hit
            full = ~(hit | has_empty)
            if claim and has_empty.any():
                ci = np.flatnonzero(has_empty)
                cs = b[ci] * W + _first_byte(empw[ci])
                owner = self._owner
                owner[cs[::-1]] = ci[::-1]
                win = owner[cs] == ci
                wi, ws = ci[win], cs[win]
                self.slot_keys[ws] = qq[wi]
                slots[idx[wi]] = ws
                self.n += len(wi)
                # losers retry the same bucket; full buckets move on
                retry = np.zeros(len(b), dtype=bool)
                retry[ci[~win]] = True
                nb = np.where(full, (b + 1) & self.bmask, b)
                cont = retry | full
                idx, b, qq = idx[cont], nb[cont], qq[cont]
            else:
                idx, b, qq = idx[full], (b[full] + 1) & self.bmask, qq[full]
        return slots, found

    # -- public operations -----------------------------------------------------
    def insert_multi(self, keys: np.ndarray, expiry: np.ndarray,
                     ident: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Multimap insert: each key gets its own entry (the first free ``j``).

        With ``ident`` (needs an ``ident`` column), an entry of the same key
        with the same ident makes the row a duplicate: it is not inserted.
        Returns ``(slots, duplicate)``; a slot of -1 without ``duplicate``
        means the key already had ``max_chain`` entries (dropped).
        """
        self._reserve(len(keys))
        n = len(keys)
        slots = np.full(n, -1, dtype=np.int64)
        dup = np.zeros(n, dtype=bool)
        head = np.full(n, -1, dtype=np.int64)
        rem = np.arange(n)
        col = self.col
        for j in range(self.max_chain):
            if not rem.size:
                break
            s, found = self._find(mix(keys[rem], j), claim=True)
            if j == 0:
                head[rem] = s
            new = ~found
            slots[rem[new]] = s[new]
            if ident is not None:
                # written now: a repeat later in this batch must see it
                col["ident"][s[new]] = ident[rem[new]]
            if ident is not None and found.any():
                same = col["ident"][s[found]] == ident[rem[found]]
                if same.any():
                    d = rem[found][same]
                    dup[d] = True
                    found[np.flatnonzero(found)[same]] = False
            if j:
                np.maximum.at(col["nchain"], head[rem[new]], j + 1)
            else:
                col["nchain"][s[new]] = 1
            rem = rem[found]
        placed = slots >= 0
        ps = slots[placed]
        col["expiry"][ps] = expiry[placed]
        col["key"][ps] = keys[placed]
        if self._presence is not None:
            self._presence[(keys[placed] & self._pmask).astype(np.int64)] = 1
        if placed.any():
            self.min_expiry = min(self.min_expiry, int(expiry[placed].min()))
        return slots, dup

    def lookup_multi(self, keys: np.ndarray, now: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All entries of each key: returns ``(query_index, slot)`` pairs.

        Entries with ``expiry <= now`` are skipped (they are as good as gone).
        The first entry of a key records how many the key has, so keys with
        one entry cost one probe.
        """
        qi_parts, sl_parts = [], []
        rem = np.arange(len(keys))
        col = self.col
        nchain = None
        for j in range(self.max_chain):
            if not rem.size:
                break
            s, found = self._find(mix(keys[rem], j), claim=False)
            rem, s = rem[found], s[found]
            if j == 0:
                nchain = col["nchain"][s]
            if now is not None:
                ok = col["expiry"][s] > now
                qi_parts.append(rem[ok])
                sl_parts.append(s[ok])
            else:
                qi_parts.append(rem)
                sl_parts.append(s)
            more = nchain > j + 1
            rem, nchain = rem[more], nchain[more]
        if not qi_parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(qi_parts), np.concatenate(sl_parts)

    def may_contain(self, keys: np.ndarray) -> np.ndarray:
        """False where ``keys`` are surely absent (needs ``presence_bits``)."""
        if self._presence is None:
            return np.ones(len(keys), dtype=bool)
        return self._presence[(keys & self._pmask).astype(np.int64)].astype(bool)

    def live_slots(self) -> np.ndarray:
        return np.flatnonzero(self.slot_keys != _EMPTY)

    # -- arenas ------------------------------------------------------------------
    def arena_put(self, name: str, slots: np.ndarray, offsets: np.ndarray,
                  data: Mapping[str, np.ndarray], rows: np.ndarray) -> None:
        """Store CSR rows ``rows`` of ``data`` (by ``offsets``) for ``slots``."""
        from .batch import _ranges

        lo = offsets[rows]
        lens = offsets[rows + 1] - lo
        sel = _ranges(lo, lens)
        used = self._arena_used[name]
        need = used + len(sel)
        arena = self.arena[name]
        first = next(iter(arena.values()))
        if need > len(first):
            new_len = max(need, 2 * len(first), 1024)
            for f, arr in arena.items():
                grown = np.zeros(new_len, dtype=arr.dtype)
                grown[:used] = arr[:used]
                arena[f] = grown
        for f, arr in arena.items():
            arr[used:need] = data[f][sel]
        starts = np.zeros(len(rows), dtype=np.int64)
        if len(rows):
            starts[1:] = np.cumsum(lens)[:-1]
        self.col[f"{name}_off"][slots] = used + starts
        self.col[f"{name}_len"][slots] = lens
        self._arena_used[name] = need

    # -- expiry, eviction, growth --------------------------------------------------
    def expire(self, now: int, force: bool = False) -> dict[str, np.ndarray]:
        """Drop entries with ``expiry <= now``; returns their values as ``{column: array}``.

        Expired entries are already invisible to lookups, so the (linear)
        rebuild only runs once at least a quarter of the table has expired,
        or with ``force``.
        """
        if self.min_expiry > now or self.n == 0:
            return {}
        live = self.live_slots()
        exp = self.col["expiry"][live]
        gone = exp <= now
        n_gone = int(gone.sum())
        if not force and n_gone * 4 < self.n:
            return {}
        removed = {c: a[live[gone]] for c, a in self.col.items()}
        self._rebuild(live[~gone], self.size)
        return removed

    def _evict_for(self, incoming: int) -> None:
        over = self.n + incoming - self.capacity
        if over <= 0:
            return
        live = self.live_slots()
        over = min(over, len(live))
        order = np.argsort(self.col["expiry"][live], kind="stable")
        gone = np.zeros(len(live), dtype=bool)
        gone[order[:over]] = True
        ev = {c: a[live[gone]] for c, a in self.col.items()}
        self.evicted = ({c: np.concatenate([self.evicted[c], ev[c]]) for c in ev}
                        if self.evicted else ev)
        self.evicted_total += int(gone.sum())
        self._rebuild(live[~gone], self.size)

    def take_evicted(self) -> dict:
        """Entries evicted for capacity since the last call (``{column: array}``)."""
        out, self.evicted = self.evicted, {}
        return out

    def _reserve(self, incoming: int) -> None:
        if self.n + incoming > self.capacity:
            self._evict_for(incoming)
        need = self.n + incoming
        if need * 2 > self.size:
            size = self.size
            while need * 2 > size:
                size *= 2
            self._rebuild(self.live_slots(), size)

    def _rebuild(self, keep: np.ndarray, size: int) -> None:
        """Re-insert the entries at old slots ``keep`` into a fresh table of ``size`` slots.

        Each key's entries are re-chained densely (``j = 0, 1, ...``) and its
        first entry's ``nchain`` recomputed.
        """
        from .batch import _ranges

        old_col = self.col
        old_arena = {a: dict(fs) for a, fs in self.arena.items()}
        self._alloc(size)
        self.n = 0
        keys = old_col["key"][keep]
        slots = np.full(len(keep), -1, dtype=np.int64)
        head = np.full(len(keep), -1, dtype=np.int64)
        depth = np.zeros(len(keep), dtype=np.uint8)
        rem = np.arange(len(keep))
        for j in range(self.max_chain):
            if not rem.size:
                break
            s, found = self._find(mix(keys[rem], j), claim=True)
            if j == 0:
                head[rem] = s
            slots[rem[~found]] = s[~found]
            depth[rem[~found]] = j + 1
            rem = rem[found]
        for c, arr in old_col.items():
            self.col[c][slots] = arr[keep]
        if self._presence is not None:
            self._presence[:] = 0
            self._presence[(keys & self._pmask).astype(np.int64)] = 1
        nch = self.col["nchain"]
        nch[slots] = 0
        np.maximum.at(nch, head, depth)
        self.min_expiry = int(old_col["expiry"][keep].min()) if len(keep) else _NO_EXPIRY
        for a in self.arena:
            lo = old_col[f"{a}_off"][keep]
            ln = old_col[f"{a}_len"][keep].astype(np.int64)
            sel = _ranges(lo, ln)
            for f in self.arena[a]:
                self.arena[a][f] = old_arena[a][f][sel]
            starts = np.zeros(len(keep), dtype=np.int64)
            if len(keep):
                np.cumsum(ln[:-1], out=starts[1:])
            self.col[f"{a}_off"][slots] = starts
            self._arena_used[a] = len(sel)
