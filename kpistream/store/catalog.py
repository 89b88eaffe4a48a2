"""The store's series: the integer id of each series key (rows and states carry the id),
and the ids whose labels match a filter."""

from __future__ import annotations

import sqlite3
from typing import Any, Iterable, Mapping, Sequence

from kpistream.store.codec import key_from_json, key_to_json, labels_to_json
from kpistream.wire.batch import SeriesKey, series_labels

__all__ = ["SeriesCatalog"]


class SeriesCatalog:
    """Series ids over the ``series`` table, cached: key -> id for the writer, id -> (key,
    labels) for readers (refreshed from the table when an id is not known yet)."""

    def __init__(self, conn: sqlite3.Connection, label_cols: Sequence[str]) -> None:
        self._conn = conn
        self.label_cols = list(label_cols)
        self._ids: dict[SeriesKey, int] = {}
        self._series: dict[int, tuple[SeriesKey, dict[str, str]]] = {}
        self._max_series_id = 0

    def id_for(self, key: SeriesKey, start: int) -> int:
        """The id of ``key``, added (last seen at ``start``) if new; inside a write transaction."""
        sid = self._ids.get(key)
        if sid is None:
            kj = key_to_json(key)
            c = self._conn
            c.execute("INSERT OR IGNORE INTO series(key, labels, last_ms) VALUES (?, ?, ?)",
                      (kj, labels_to_json(series_labels(key)), start))
            sid = int(c.execute("SELECT id FROM series WHERE key = ?", (kj,)).fetchone()[0])
            self._ids[key] = sid
            self._series[sid] = (key, series_labels(key))
        return sid

    def _refresh(self) -> None:
        rows = self._conn.execute("SELECT id, key FROM series WHERE id > ? ORDER BY id",
                                  (self._max_series_id,)).fetchall()
        for sid, kj in rows:
            key = key_from_json(kj)
            self._series[sid] = (key, series_labels(key))
            self._max_series_id = max(self._max_series_id, sid)

    def info(self, sid: int) -> tuple[SeriesKey, dict[str, str]] | None:
        """The key and labels of series ``sid`` (None: not in the table, e.g. forgotten)."""
        info = self._series.get(sid)
        if info is None:
            self._refresh()
            info = self._series.get(sid)
        return info

    def match(self, labels: Mapping[str, Any]) -> list[int]:
        """The sorted ids whose labels equal each given value (or one of a list of values)."""
        unknown = sorted(set(labels) - set(self.label_cols))
        if unknown:
            raise ValueError(f"unknown label(s): {', '.join(unknown)} "
                             f"(series labels of this store: {', '.join(self.label_cols)})")
        want = {k: ({str(v)} if isinstance(v, str) or not isinstance(v, Iterable)
                    else {str(x) for x in v}) for k, v in labels.items()}
        self._refresh()
        return sorted(sid for sid, (_, lab) in self._series.items()
                      if all(lab.get(k) in vals for k, vals in want.items()))

    def forget_ids(self) -> None:
        """Forget the writer's key -> id cache (series rows were deleted)."""
        self._ids.clear()

    def forget(self) -> None:
        """Forget everything cached (a failed transaction may have added ids it rolled back)."""
        self._ids.clear()
        self._series.clear()
        self._max_series_id = 0
