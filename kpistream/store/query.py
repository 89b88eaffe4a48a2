"""Reading the store: tidy rows as pandas DataFrames shaped like ``kpistream replay``
output, the stored states for callers that merge further, and a summary per resolution."""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple, Sequence

import numpy as np
import pandas as pd

from kpistream.engine.states import MetricState
from kpistream.store.catalog import SeriesCatalog
from kpistream.store.codec import decode_state
from kpistream.store.db import MAX_IN, StoreDB, clamp
from kpistream.store.resolutions import Resolution
from kpistream.windows.aggregate import ROW_COLUMNS, rows_frame
from kpistream.wire.batch import SeriesKey

__all__ = ["SeriesReader", "StoredState", "to_ms"]


def to_ms(x: Any, name: str) -> int | None:
    """Epoch ms from ms, ISO strings, datetime, numpy datetime64 or pd.Timestamp (naive = UTC)."""
    if x is None:
        return None
    if isinstance(x, bool):
        raise ValueError(f"{name}: expected a time, got {x!r}")
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return int(x)
    if isinstance(x, str) and x.strip().lstrip("-").isdigit():
        return int(x.strip())
    if isinstance(x, (str, datetime, np.datetime64, pd.Timestamp)):
        try:
            ts = pd.Timestamp(x)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{name}: not a time: {x!r} ({e})") from None
        if ts is pd.NaT:
            raise ValueError(f"{name}: not a time: {x!r}")
        if ts.tzinfo is None:
            ts = ts.tz_localize("UTC")
        return int(ts.value // 1_000_000)
    raise ValueError(f"{name}: expected epoch ms, an ISO string, datetime or pd.Timestamp, got {x!r}")


class StoredState(NamedTuple):
    """One stored state: bucket start (epoch ms), series, family and the decoded state."""

    start: int
    series: SeriesKey
    family: str
    state: MetricState


class SeriesReader:
    """Queries over the ``rows`` table (one indexed range scan, no state decoded) and the
    ``states`` table, under the store's lock."""

    def __init__(self, db: StoreDB, catalog: SeriesCatalog) -> None:
        self._db = db
        self._catalog = catalog

    @staticmethod
    def _range_sql(select: str, res: Resolution, start: Any, end: Any) -> tuple[list, list]:
        """The SELECT for one resolution and ``start <= bucket start < end``."""
        s, e = to_ms(start, "start"), to_ms(end, "end")
        sql = [select]
        params: list[Any] = [res.name]
        if s is not None:
            sql.append("AND start >= ?")
            params.append(clamp(s))
        if e is not None:
            sql.append("AND start < ?")
            params.append(clamp(e))
        return sql, params

    def query(self, metric: str | Sequence[str] | None = None, *, start: Any = None,
              end: Any = None, resolution: str | None = None, **labels: Any) -> pd.DataFrame:
        """Tidy rows (see :meth:`SeriesStore.query`)."""
        res = self._db.resolution(resolution)
        sql, params = self._range_sql(
            "SELECT start, series, metric, value, count, labelled, provisional "
            "FROM rows WHERE res = ?", res, start, end)
        if metric is not None:
            metrics = [metric] if isinstance(metric, str) else list(metric)
            if not metrics:
                return self._frame(res, [])
            sql.append(f"AND metric IN ({','.join('?' * len(metrics))})")
            params.extend(metrics)
        keep: set[int] | None = None
        with self._db.lock:
            if labels:
                sids = self._catalog.match(labels)
                if not sids:
                    return self._frame(res, [])
                if len(sids) <= MAX_IN:
                    sql.append(f"AND series IN ({','.join('?' * len(sids))})")
                    params.extend(sids)
                else:
                    keep = set(sids)
            sql.append("ORDER BY start, series, family, metric")
            data = self._db.conn.execute(" ".join(sql), params).fetchall()
            if keep is not None:
                data = [r for r in data if r[1] in keep]
            return self._frame(res, data)

    def _frame(self, res: Resolution, data: list[tuple]) -> pd.DataFrame:
        segs = self._db.config.segments
        label_cols = self._catalog.label_cols
        if not data:
            return rows_frame([], segs)
        n = len(data)
        starts, sids, metrics, values, counts, labelled, prov = zip(*data)
        start = np.fromiter(starts, dtype=np.int64, count=n)
        sid = np.fromiter(sids, dtype=np.int64, count=n)
        uniq, inv = np.unique(sid, return_inverse=True)
        infos = [self._catalog.info(int(u)) for u in uniq]
        cols: dict[str, Any] = {
            "window": np.full(n, res.name, dtype=object),
            "window_start": pd.to_datetime(pd.Series(start), unit="ms", utc=True),
            "window_end": pd.to_datetime(pd.Series(start + res.step_ms), unit="ms", utc=True),
            "metric": np.array(metrics, dtype=object),
            "value": np.array(values, dtype=np.float64),   # NULL (NaN stored) -> NaN
            "count": np.fromiter(counts, dtype=np.int64, count=n),
            "labelled": pd.array(list(labelled), dtype="Int64"),
            "provisional": np.fromiter(prov, dtype=bool, count=n),
        }
        for lab in label_cols:
            per = np.array([None if info is None else info[1].get(lab) for info in infos],
                           dtype=object)
            cols[lab] = per[inv]
        df = pd.DataFrame(cols, columns=list(ROW_COLUMNS) + label_cols)
        return df.sort_values(["window", "window_start", *label_cols, "metric"],
                              kind="stable").reset_index(drop=True)

    def states(self, start: Any = None, end: Any = None, *, resolution: str | None = None,
               family: str | Sequence[str] | None = None, **labels: Any) -> list[StoredState]:
        """The stored states (see :meth:`SeriesStore.states`)."""
        res = self._db.resolution(resolution)
        sql, params = self._range_sql("SELECT start, series, family, state FROM states WHERE res = ?",
                                      res, start, end)
        if family is not None:
            fams = [family] if isinstance(family, str) else list(family)
            sql.append(f"AND family IN ({','.join('?' * len(fams))})")
            params.extend(fams)
        sql.append("ORDER BY start, series, family")
        with self._db.lock:
            keep = set(self._catalog.match(labels)) if labels else None
            out = []
            for st, sid, fam, blob in self._db.conn.execute(" ".join(sql), params):
                if keep is not None and sid not in keep:
                    continue
                info = self._catalog.info(sid)
                if info is None:
                    continue
                out.append(StoredState(int(st), info[0], fam, decode_state(blob)))
        return out

    def info(self) -> dict[str, Any]:
        """Per resolution: states, rows, provisional rows, first and last bucket; and totals."""
        db = self._db
        out: dict[str, Any] = {"file": str(db.file), "nbytes": db.nbytes(), "resolutions": {}}
        with db.lock:
            c = db.conn
            for r in db.resolutions:
                n, lo, hi = c.execute("SELECT COUNT(*), MIN(start), MAX(start) FROM states "
                                      "WHERE res = ?", (r.name,)).fetchone()
                nr, npv = c.execute("SELECT COUNT(*), COALESCE(SUM(provisional), 0) FROM rows "
                                    "WHERE res = ?", (r.name,)).fetchone()
                out["resolutions"][r.name] = {"states": n, "rows": nr, "provisional_rows": npv,
                                              "first": lo, "last": hi}
            out["series"] = c.execute("SELECT COUNT(*) FROM series").fetchone()[0]
        return out
