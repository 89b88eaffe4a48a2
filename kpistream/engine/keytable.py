"""A hash multimap on 64-bit keys with typed value columns (:class:`KeyTable`): the join and
dedup tables.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from kpistream.engine import kernels as K

_NO_EXPIRY = np.iinfo(np.int64).max
_MAX_LOAD = 0.6


class KeyTable:
    """Hash multimap: uint64 key -> entries with typed value columns.

    ``columns`` maps a column name to a numpy dtype; ``arenas`` maps an arena
    name to ``{field: dtype}`` and adds the columns ``<name>_off`` and
    ``<name>_len``.  Slot indexes returned by the methods index the value
    columns directly (``table.col["ts"][slots]``) until the next insert.

    One request id can hold several entries (the primary's and the shadow's
    inference; a click and later a conversion), each with its own values.  The
    probing runs in compiled kernels (:mod:`kpistream.engine.kernels`, numba): one
    call per batch, open addressing with linear probing, tombstones for expired
    entries, so a batch of 65,536 keys costs one pass in machine code.

    Every entry carries an ``expiry`` (event-time ms).  Entries whose expiry has
    passed are invisible to lookups at once and are turned into tombstones by
    :meth:`KeyTable.expire`, which returns their values so the caller can count
    them.  ``capacity`` bounds the live entries; beyond it the entries that
    expire first are evicted (kept for :meth:`take_evicted`, to be counted).

    Variable-length payloads (a ranking, a relevance list) live in *arenas*:
    append-only arrays addressed by per-entry ``(offset, length)`` columns and
    compacted when more than half of them is garbage.
    """

    def __init__(self, capacity: int, columns: Mapping[str, np.dtype | type] | None = None,
                 arenas: Mapping[str, Mapping[str, np.dtype | type]] | None = None,
                 initial: int = 16384) -> None:
        self.capacity = int(capacity)
        self._dtypes = {"expiry": np.int64, **(columns or {})}
        self._arena_dtypes = {a: dict(f) for a, f in (arenas or {}).items()}
        for a in self._arena_dtypes:
            self._dtypes[f"{a}_off"] = np.int64
            self._dtypes[f"{a}_len"] = np.int32
        self.arena: dict[str, dict[str, np.ndarray]] = {
            a: {f: np.zeros(1024, dt) for f, dt in fs.items()}
            for a, fs in self._arena_dtypes.items()}
        self._arena_used = {a: 0 for a in self._arena_dtypes}
        self._arena_live = {a: 0 for a in self._arena_dtypes}
        size = 16
        while size < 2 * initial:
            size *= 2
        self._alloc(size)
        self.n = 0          # live entries
        self.used = 0       # non-empty slots (live + tombstones)
        self.min_expiry = _NO_EXPIRY
        self.evicted: dict[str, np.ndarray] = {}
        self.evicted_total = 0

    # -- storage -------------------------------------------------------------
    def _alloc(self, size: int) -> None:
        self.size = size
        self.keys = np.zeros(size, dtype=np.uint64)
        self.ident = np.zeros(size, dtype=np.uint64)
        self.col = {c: np.zeros(size, dtype=dt) for c, dt in self._dtypes.items()}
        self.col["expiry"][:] = _NO_EXPIRY

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        return (self.keys.nbytes + self.ident.nbytes + sum(a.nbytes for a in self.col.values())
                + sum(a.nbytes for fs in self.arena.values() for a in fs.values()))

    # -- operations ------------------------------------------------------------
    def insert_multi(self, keys: np.ndarray, expiry: np.ndarray,
                     ident: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each key gets an entry of its own. Returns ``(slots, duplicate)``.

        With ``ident``, a live or expired-but-not-yet-dropped entry of the same
        key and ident (or an earlier row of this batch) makes the row a
        duplicate: it is not inserted and its slot is -1.
        """
        n = len(keys)
        self._reserve(n)
        k = np.ascontiguousarray(keys, dtype=np.uint64)
        idv = (np.ascontiguousarray(ident, dtype=np.uint64) if ident is not None
               else np.zeros(n, dtype=np.uint64))
        slots = np.empty(n, dtype=np.int64)
        dup = np.zeros(n, dtype=bool)
        consumed = K.insert(self.keys, self.ident, k, idv, ident is not None, slots, dup)
        self.used += consumed
        placed = ~dup
        ps = slots[placed]
        self.n += len(ps)
        exp = expiry[placed]
        self.col["expiry"][ps] = exp
        for a in self._arena_dtypes:
            self.col[f"{a}_len"][ps] = 0
        if len(exp):
            self.min_expiry = min(self.min_expiry, int(exp.min()))
        return slots, dup

    def lookup_multi(self, keys: np.ndarray, now: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every live entry of each key: ``(query_index, slot)`` pairs.

        Entries with ``expiry <= now`` are skipped: they are as good as gone.
        """
        k = np.ascontiguousarray(keys, dtype=np.uint64)
        now_ = np.iinfo(np.int64).min if now is None else int(now)
        cap = max(16, 2 * len(k))
        while True:
            q = np.empty(cap, dtype=np.int64)
            s = np.empty(cap, dtype=np.int64)
            m = K.lookup(self.keys, self.col["expiry"], k, now_, q, s)
            if m >= 0:
                return q[:m], s[:m]
            cap *= 4

    def live_slots(self) -> np.ndarray:
        return K.live_slots(self.keys)

    # -- arenas ------------------------------------------------------------------
    def arena_put(self, name: str, slots: np.ndarray, offsets: np.ndarray,
                  data: Mapping[str, np.ndarray], rows: np.ndarray) -> None:
        """Store CSR rows ``rows`` of ``data`` (by ``offsets``) for ``slots``."""
        from kpistream.wire.batch import ranges

        lo = offsets[rows]
        lens = offsets[rows + 1] - lo
        sel = ranges(lo, lens)
        used = self._arena_used[name]
        need = used + len(sel)
        arena = self.arena[name]
        first = next(iter(arena.values()))
        if need > len(first):
            new_len = max(need, 2 * len(first))
            for f, arr in arena.items():
                grown = np.zeros(new_len, dtype=arr.dtype)
                grown[:used] = arr[:used]
                arena[f] = grown
        for f, arr in arena.items():
            arr[used:need] = data[f][sel]
        starts = np.zeros(len(rows), dtype=np.int64)
        if len(rows) > 1:
            np.cumsum(lens[:-1], out=starts[1:])
        self.col[f"{name}_off"][slots] = used + starts
        self.col[f"{name}_len"][slots] = lens
        self._arena_used[name] = need
        self._arena_live[name] += len(sel)

    def _arena_release(self, removed: Mapping[str, np.ndarray]) -> None:
        for a in self._arena_dtypes:
            self._arena_live[a] -= int(removed[f"{a}_len"].sum())
            if self._arena_used[a] > 2 * self._arena_live[a] + 65536:
                self._compact_arena(a)

    def _compact_arena(self, a: str) -> None:
        from kpistream.wire.batch import ranges

        live = self.live_slots()
        lo = self.col[f"{a}_off"][live]
        ln = self.col[f"{a}_len"][live].astype(np.int64)
        sel = ranges(lo, ln)
        for f, arr in self.arena[a].items():
            self.arena[a][f] = arr[sel]
        starts = np.zeros(len(live), dtype=np.int64)
        if len(live) > 1:
            np.cumsum(ln[:-1], out=starts[1:])
        self.col[f"{a}_off"][live] = starts
        self._arena_used[a] = self._arena_live[a] = len(sel)

    # -- expiry, eviction, growth --------------------------------------------------
    def _remove(self, slots: np.ndarray, cols=None) -> dict[str, np.ndarray]:
        keep = set(cols or self.col) | {f"{a}_len" for a in self._arena_dtypes} | {"expiry"}
        removed = {c: a[slots] for c, a in self.col.items() if c in keep}
        self.keys[slots] = K.TOMB
        self.col["expiry"][slots] = _NO_EXPIRY
        self.n -= len(slots)
        self._arena_release(removed)
        return removed

    def expire(self, now: int, cols=None) -> dict[str, np.ndarray]:
        """Drop entries with ``expiry <= now``; returns their values as ``{column: array}``.

        ``cols`` limits the returned columns to those the caller counts.
        """
        if self.min_expiry > now or self.n == 0:
            return {}
        gone = K.expired_slots(self.keys, self.col["expiry"], int(now))
        self.min_expiry = int(now) + 1  # a lower bound of what is left
        if not len(gone):
            return {}
        return self._remove(gone, cols)

    def take_evicted(self) -> dict:
        """Entries evicted for capacity since the last call (``{column: array}``)."""
        out, self.evicted = self.evicted, {}
        return out

    def _evict(self, over: int) -> None:
        """Evict the ``over`` entries that expire first (kept for :meth:`take_evicted`)."""
        live = self.live_slots()
        over = min(over, len(live))
        if over <= 0:
            return
        part = np.argpartition(self.col["expiry"][live], over - 1)[:over]
        ev = self._remove(live[part])
        self.evicted = ({c: np.concatenate([self.evicted[c], ev[c]]) for c in ev}
                        if self.evicted else ev)
        self.evicted_total += over

    def enforce_capacity(self) -> None:
        """Back within ``capacity`` (a batch larger than the free room overshoots until now)."""
        if self.n > self.capacity:
            self._evict(self.n - self.capacity)

    def _reserve(self, incoming: int) -> None:
        over = self.n + incoming - self.capacity
        if over > 0:
            self._evict(over)
        if self.used + incoming > _MAX_LOAD * self.size:
            # room for the live entries at a load of at most 40 % (tombstones go)
            size = 16
            while (self.n + incoming) * 5 > 2 * size:
                size *= 2 if size >= 1 << 20 else 4  # grow fast while small
            self._rebuild(size)

    def _rebuild(self, size: int) -> None:
        """Re-insert the live entries into a fresh table of ``size`` slots (drops tombstones)."""
        live = self.live_slots()
        old_keys, old_ident, old_col = self.keys, self.ident, self.col
        self._alloc(size)
        slots = np.empty(len(live), dtype=np.int64)
        K.place(self.keys, old_keys[live], slots)
        self.ident[slots] = old_ident[live]
        for c, arr in old_col.items():
            self.col[c][slots] = arr[live]
        self.used = self.n = len(live)
