"""Writing states: the engine's time panes as the base resolution, and any resolution's
states with their tidy rows, deadlines (provisional -> final) and roll-up marks."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

from kpistream.engine import Partial
from kpistream.engine.families import FAMILY_CLASSES
from kpistream.engine.states import MetricState
from kpistream.store.catalog import SeriesCatalog
from kpistream.store.codec import encode_state
from kpistream.store.db import I64_MIN, MAX_IN, StoreDB, clamp
from kpistream.store.resolutions import Resolution
from kpistream.wire.batch import SeriesKey

__all__ = ["Item", "StateWriter"]

#: One state to store: (bucket start, series id, family, state, final).
Item = tuple[int, int, str, MetricState, bool]

_DEL_ROWS = "DELETE FROM rows WHERE res = ? AND start = ? AND series = ? AND family = ?"
_INS_ROWS = ("INSERT INTO rows(res, start, series, family, metric, value, count, labelled, "
             "provisional, deadline) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_UPSERT_STATE = ("INSERT INTO states(res, start, series, family, final, deadline, state) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?) "
                 "ON CONFLICT(res, start, series, family) DO UPDATE SET final = excluded.final, "
                 "deadline = excluded.deadline, state = excluded.state")


class StateWriter:
    """Upserts states, each beside its tidy rows, so that a query never decodes a state.

    A later state of the same bucket replaces the earlier one (states are
    cumulative), and a final state is never replaced by a provisional one
    (one look-up of the final states among a batch's buckets).  A state's
    ``deadline`` is its bucket end, plus the label delay for quality and
    feedback families; once the watermark passes it the state is final, as
    in the aggregator.  Every write marks the coarser buckets it touches as
    pending a roll-up.  ``on_put(resolution, starts)`` hears which buckets of
    a resolution were (re)written.  Callers hold the store's transaction for
    everything but :meth:`write`, which opens its own.
    """

    def __init__(self, db: StoreDB, catalog: SeriesCatalog,
                 on_put: Callable[[Resolution, set[int]], None] | None = None) -> None:
        self._db = db
        self._catalog = catalog
        self._on_put = on_put

    def horizon(self, family: str) -> int:
        """How long after its bucket's end a state of ``family`` may still change (ms)."""
        try:
            cls = FAMILY_CLASSES[family]
        except KeyError:
            raise ValueError(f"unknown metric family {family!r} "
                             f"(known: {', '.join(FAMILY_CLASSES)})") from None
        return self._db.config.label_delay_ms if cls.horizon == "label" else 0

    def write(self, partials: Iterable[Partial], watermark: int | None = None) -> int:
        """Upsert the base-resolution states of time panes; returns rows written.

        ``watermark`` (the publisher's, over all shards) makes states final
        whose deadline it has passed, and flips stored base rows that it has
        made final.  Count-window partials are ignored.  One transaction.
        """
        base = self._db.base
        latest: dict[tuple[int, SeriesKey, str], tuple[Partial, bool]] = {}
        for p in partials:
            if p.space != "time":
                continue
            if p.end_ms - p.start_ms != base.step_ms or p.key % base.step_ms:
                raise ValueError(f"partial pane [{p.start_ms}, {p.end_ms}) does not match the "
                                 f"store's base resolution {base.name} ({base.step_ms} ms)")
            fin = bool(p.final) or (watermark is not None
                                    and watermark >= p.end_ms + self.horizon(p.family))
            k = (int(p.key), p.series, p.family)
            prev = latest.get(k)
            if prev is not None and prev[1] and not fin:
                continue
            latest[k] = (p, fin)
        with self._db.transaction() as c:
            items = []
            last: dict[int, int] = {}
            for (start, series, family), (p, fin) in latest.items():
                sid = self._catalog.id_for(series, start)
                if last.get(sid, I64_MIN) < start:
                    last[sid] = start
                items.append((start, sid, family, p.state, fin))
            n = self.put(base, items)
            if last:
                c.executemany("UPDATE series SET last_ms = MAX(last_ms, ?) WHERE id = ?",
                              [(v, k) for k, v in last.items()])
            starts = {it[0] for it in items}
            self.mark_pending(1, starts)
            if watermark is not None:
                self.finalize(base, watermark)
                # the highest watermark written: a restarted publisher resumes from it
                row = c.execute("SELECT value FROM meta WHERE key = 'watermark'").fetchone()
                if row is None or int(row[0]) < int(watermark):
                    c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('watermark', ?)",
                              (str(int(watermark)),))
        return n

    def put(self, res: Resolution, items: Sequence[Item]) -> int:
        """Upsert (start, series id, family, state, final) items of one resolution; rows written."""
        step, name = res.step_ms, res.name
        c = self._db.conn
        # a final state never changes: neither a provisional nor another final state
        # replaces it (a restarted source's partial view of a pane would)
        all_starts = sorted({it[0] for it in items})
        if all_starts:
            final: set[tuple[int, int, str]] = set()
            for i in range(0, len(all_starts), MAX_IN):
                chunk = all_starts[i:i + MAX_IN]
                final.update(c.execute(
                    f"SELECT start, series, family FROM states WHERE res = ? AND final = 1 "
                    f"AND start IN ({','.join('?' * len(chunk))})", [name, *chunk]).fetchall())
            if final:
                items = [it for it in items if (it[0], it[1], it[2]) not in final]
        st_rows, del_rows, row_rows = [], [], []
        encode = encode_state
        for start, sid, family, state, fin in items:
            deadline = start + step + self.horizon(family)
            f = 1 if fin else 0
            st_rows.append((name, start, sid, family, f, deadline, encode(state)))
            del_rows.append((name, start, sid, family))
            prov = 1 - f
            for metric, (value, count, labelled) in state.value().items():
                row_rows.append((name, start, sid, family, metric, float(value), int(count),
                                 None if labelled is None else int(labelled), prov, deadline))
        c.executemany(_DEL_ROWS, del_rows)
        c.executemany(_INS_ROWS, row_rows)
        c.executemany(_UPSERT_STATE, st_rows)
        if self._on_put is not None:
            self._on_put(res, {it[0] for it in items})
        return len(row_rows)

    def mark_pending(self, level: int, starts: Iterable[int]) -> None:
        """Mark the buckets of resolutions >= ``level`` that contain ``starts`` for roll-up."""
        starts = set(starts)
        if not starts:
            return
        todo = []
        for r in self._db.resolutions[level:]:
            todo.extend((r.name, b) for b in {s - s % r.step_ms for s in starts})
        self._db.conn.executemany("INSERT OR IGNORE INTO pending(res, start) VALUES (?, ?)", todo)

    def finalize(self, res: Resolution, watermark: int) -> None:
        """Make stored states final whose deadline the watermark has passed.

        Coarse buckets still pending a roll-up are left alone: their stored
        state may miss finer updates, and only a recomputation makes it final.
        """
        wm = clamp(watermark)
        skip = "" if res is self._db.base else \
            " AND start NOT IN (SELECT start FROM pending WHERE res = ?1)"
        c = self._db.conn
        c.execute("UPDATE states SET final = 1 WHERE res = ?1 AND final = 0 AND deadline <= ?2"
                  + skip, (res.name, wm))
        c.execute("UPDATE rows SET provisional = 0 WHERE res = ?1 AND provisional = 1 "
                  "AND deadline <= ?2" + skip, (res.name, wm))
