"""Roll-ups and retention: each coarser resolution's buckets as the merge of the finer
buckets' states, and the deletion of buckets older than their resolution keeps."""

from __future__ import annotations

from typing import Iterable, Iterator

from kpistream.engine.states import MetricState
from kpistream.store.catalog import SeriesCatalog
from kpistream.store.codec import decode_state
from kpistream.store.db import I64_MIN, StoreDB, clamp
from kpistream.store.resolutions import Resolution
from kpistream.store.write import StateWriter

__all__ = ["Rollup", "SettledCache"]

Merged = dict[tuple[int, str], MetricState]     # (series id, family) -> state


class SettledCache:
    """Per coarse resolution and open bucket: ``(upto, merged)``, the merge of its settled
    finer buckets before ``upto`` (final for every family, so they change only by a rewrite)."""

    def __init__(self, resolutions: tuple[Resolution, ...]) -> None:
        self._resolutions = resolutions
        self._by_res: dict[str, dict[int, tuple[int, Merged]]] = {
            r.name: {} for r in resolutions[1:]}

    def __getitem__(self, name: str) -> dict[int, tuple[int, Merged]]:
        return self._by_res[name]

    def clear(self) -> None:
        for d in self._by_res.values():
            d.clear()

    def invalidate(self, fine: Resolution, starts: set[int]) -> None:
        """A finer bucket below a cached settled mark changed (a rewrite): drop that cache."""
        i = self._resolutions.index(fine)
        if i + 1 >= len(self._resolutions) or not starts:
            return
        cache = self._by_res[self._resolutions[i + 1].name]
        for b in [b for b, (upto, _) in cache.items() if any(b <= s < upto for s in starts)]:
            del cache[b]


class Rollup:
    """Coarse buckets are merges of states, never averages of values.

    A ``1m`` latency p99 comes from the merged sketch and a ``1m`` ratio from
    summed counts, exactly what the engine computes for a 1 min window.
    Roll-ups are incremental: writes mark the coarse buckets they touch as
    pending; a coarse bucket is written final once its end plus the label
    delay is behind the watermark (a per-resolution ``rolled_to`` mark in
    ``meta`` makes this idempotent and cheap to call every second), and, on
    request, the pending open buckets are recomputed as provisional.  The
    merge of an open bucket's settled finer buckets is cached
    (:class:`SettledCache`), so the running hour re-reads a few minutes, not
    sixty.  Retention deletes old buckets and forgotten series; the file's
    incremental auto-vacuum gives the pages back.
    """

    def __init__(self, db: StoreDB, writer: StateWriter, catalog: SeriesCatalog,
                 settled: SettledCache) -> None:
        self._db = db
        self._writer = writer
        self._catalog = catalog
        self.settled = settled

    def rollup(self, watermark: int, *, provisional: bool | Iterable[str] = True) -> int:
        """Merge finer buckets into coarser ones; returns rows written (see SeriesStore.rollup)."""
        db, writer = self._db, self._writer
        resolutions = db.resolutions
        wm = int(watermark)
        names = {r.name for r in resolutions}
        if provisional is True:
            prov = names
        elif provisional is False:
            prov = set()
        else:
            prov = {provisional} if isinstance(provisional, str) else set(provisional)
            bad = sorted(prov - names)
            if bad:
                raise ValueError(f"unknown resolution(s) {', '.join(bad)} "
                                 f"(this store has {', '.join(r.name for r in resolutions)})")
            # a running hour is merged from running minutes: refresh those too
            top = max((i for i, r in enumerate(resolutions) if r.name in prov), default=0)
            prov |= {r.name for r in resolutions[: top + 1]}
        delay = db.config.label_delay_ms
        written = 0
        with db.transaction() as c:
            meta = dict(c.execute("SELECT key, value FROM meta WHERE key LIKE 'rolled_to:%'"))
            writer.finalize(db.base, wm)
            for i in range(1, len(resolutions)):
                fine, coarse = resolutions[i - 1], resolutions[i]
                step = coarse.step_ms
                final_to = clamp(((wm - delay) // step) * step)
                rk = f"rolled_to:{coarse.name}"
                rolled = int(meta[rk]) if rk in meta else I64_MIN
                buckets: set[int] = set()
                if final_to > rolled:
                    buckets.update(b for (b,) in c.execute(
                        "SELECT DISTINCT (start / ?) * ? FROM states WHERE res = ? AND start >= ? "
                        "AND start < ?", (step, step, fine.name, rolled, final_to)))
                done = []
                for (b,) in c.execute("SELECT start FROM pending WHERE res = ?", (coarse.name,)).fetchall():
                    if b + step <= final_to or coarse.name in prov:
                        buckets.add(b)
                        done.append((coarse.name, b))
                for b in sorted(buckets):
                    items = [(b, sid, fam, st, wm >= b + step + writer.horizon(fam))
                             for (sid, fam), st in self._merge_bucket(i, b, wm).items()]
                    if items:
                        written += writer.put(coarse, items)
                        writer.mark_pending(i + 1, [b])
                c.executemany("DELETE FROM pending WHERE res = ? AND start = ?", done)
                if final_to > rolled:
                    c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                              (rk, str(final_to)))
                writer.finalize(coarse, wm)
        return written

    def _load(self, res: Resolution, lo: int, hi: int) -> Iterator[tuple[int, str, MetricState]]:
        cur = self._db.conn.execute(
            "SELECT series, family, state FROM states WHERE res = ? AND start >= ? AND start < ? "
            "ORDER BY start, series, family", (res.name, lo, hi))
        for sid, fam, blob in cur:
            yield sid, fam, decode_state(blob)

    @staticmethod
    def _merge_into(acc: Merged, states: Iterable[tuple[int, str, MetricState]]) -> None:
        for sid, fam, st in states:
            prev = acc.get((sid, fam))
            if prev is None:
                acc[(sid, fam)] = st
            else:
                prev.merge(st)

    def _merge_bucket(self, i: int, b: int, wm: int) -> Merged:
        """The states of coarse bucket ``b`` of resolution ``i``: merges of the finer ones.

        Finer buckets that end before ``wm - label_delay`` are settled, so their
        merge is cached for the open coarse bucket and only the unsettled tail
        is read again.
        """
        fine, coarse = self._db.resolutions[i - 1], self._db.resolutions[i]
        end = b + coarse.step_ms
        settled = ((wm - self._db.config.label_delay_ms) // fine.step_ms) * fine.step_ms
        settled = min(max(settled, b), end)
        cache = self.settled[coarse.name]
        upto, acc = cache.pop(b, (b, {}))
        if settled > upto:
            self._merge_into(acc, self._load(fine, upto, settled))
            upto = settled
        if upto >= end:
            return acc                      # complete: the cache is no longer needed
        cache[b] = (upto, acc)
        out = {k: st.copy() for k, st in acc.items()}
        self._merge_into(out, self._load(fine, upto, end))
        return out

    def apply_retention(self, now_ms: int) -> int:
        """Delete buckets that ended more than their retention before ``now_ms``; states deleted."""
        now = int(now_ms)
        deleted = 0
        resolutions = self._db.resolutions
        with self._db.transaction() as c:
            for r in resolutions:
                if r.retention_ms is None:
                    continue
                last_start = clamp(now - r.retention_ms - r.step_ms)  # start + step <= now - keep
                c.execute("DELETE FROM rows WHERE res = ? AND start <= ?", (r.name, last_start))
                deleted += c.execute("DELETE FROM states WHERE res = ? AND start <= ?",
                                     (r.name, last_start)).rowcount
                c.execute("DELETE FROM pending WHERE res = ? AND start <= ?", (r.name, last_start))
            if all(r.retention_ms is not None for r in resolutions):
                cutoff = clamp(now - max(r.retention_ms + r.step_ms for r in resolutions))
                gone = c.execute("DELETE FROM series WHERE last_ms <= ?", (cutoff,)).rowcount
                if gone:
                    self._catalog.forget_ids()
            self.settled.clear()
        if deleted:
            self._db.vacuum()
        return deleted
