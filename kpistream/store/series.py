"""The embedded time-series store: pane states and tidy rows in one SQLite file.

The live publisher writes every closed or updated *pane* (the engine's time
panes: :class:`~kpistream.engine.engine.Partial` with ``space == "time"``, one per
series and family, cumulative, possibly provisional) into a
:class:`SeriesStore`; users read it back from a notebook as pandas
DataFrames shaped exactly like ``kpistream replay`` output
(:func:`kpistream.windows.aggregate.rows_frame`).

What is stored, per *resolution* (``10s`` = the engine's pane, ``1m``,
``1h``), per bucket start, per series and per metric family:

- the **mergeable state**, pickled (protocol 5), with a ``final`` flag and
  its ``deadline`` (bucket end, plus the label delay for quality families);
- the **tidy rows** of that state (``metric, value, count, labelled,
  provisional``), materialized, so a query is one indexed range scan and
  never unpickles anything;
- the **series** once, in a table of their own (id ↔ JSON of the
  ``SeriesKey`` and of the label dict); rows and states carry the integer id;
- the engine config (JSON) and the resolutions in a ``meta`` table, so a
  notebook opens the store with nothing but its path (:func:`open_store`,
  :func:`load_series`).

Why it is built this way:

- **SQLite** (stdlib ``sqlite3``): embedded, one file, no server, no new
  dependency.  In **WAL** mode one writer and any number of reader processes
  work at once and readers never block the writer (they read a snapshot);
  a transaction per :meth:`SeriesStore.write` makes a batch atomic, so a
  reader never sees half a publish.  Parquet files would need rewriting to
  replace a provisional pane by its final state and a compaction job;
  DuckDB's file lock keeps a notebook out while the publisher holds the
  file; Prometheus's TSDB cannot hold mergeable sketches.
- **States, not only values**: a coarse bucket is the *merge* of its finer
  buckets' states (:meth:`MetricState.merge`), so a ``1m`` latency p99 comes
  from the merged sketch and a ``1m`` ratio from summed counts, exactly what
  the engine computes for a 1 min window — never an average of percentiles
  or of ratios.  :meth:`SeriesStore.states` hands the states out for any
  other window a caller wants to build.
- **Rows beside states**: a query reads only the rows table (clustered by
  ``(resolution, start, series, family, metric)``, ``WITHOUT ROWID``), which
  is what keeps notebook queries cheap; the states are only unpickled by
  :meth:`SeriesStore.rollup` and :meth:`SeriesStore.states`.
- **Provisional, then final**: a later state of the same pane replaces the
  earlier one (states are cumulative), and a final state is never replaced by
  a provisional one (one look-up of the final states among a batch's buckets).  ``provisional`` follows the
  aggregator: operational families (traffic, latency, cost) are final once
  the watermark passes the bucket end, quality and feedback families once it
  passes the end plus the label delay, or when the partial says final.
- **Roll-ups** are incremental: writes mark the coarse buckets they touch as
  pending; :meth:`SeriesStore.rollup` writes a coarse bucket final once its
  end plus the label delay is behind the watermark (a per-resolution
  ``rolled_to`` mark makes this idempotent and cheap to call every second),
  and, on request (``provisional=``), recomputes the pending open buckets —
  the running minute and hour — as provisional rows.  The merge of a coarse
  bucket's *settled* finer buckets (those final for every family) is cached
  by the writer, so the running hour re-reads a few minutes, not sixty.
- **Bounded**: each resolution has a retention (default 1 day of panes,
  7 days of minutes, 90 days of hours); :meth:`SeriesStore.apply_retention`
  deletes older buckets and forgotten series; the file is created with
  incremental auto-vacuum so freed pages go back to the file system.

Concurrency contract: one writer process (the publisher) and many readers.
A ``SeriesStore`` object may be shared between threads (a lock serializes
its use).  States are pickles: open only store files you trust.

Example::

    from kpistream.store.series import load_series
    df = load_series("data/store", metric=["accuracy", "latency_p99"],
                     resolution="1m", model="churn", start="2026-01-01T00:00Z")
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd

from kpistream.windows.aggregate import ROW_COLUMNS, rows_frame
from kpistream.wire.batch import BASE_LABELS, SeriesKey, series_labels
from kpistream.spec.metrics import EngineConfig, WindowSpec, format_duration, parse_duration
from kpistream.engine import Partial
from kpistream.errors import ConfigError
from kpistream.engine.families import FAMILY_CLASSES
from kpistream.engine.states import MetricState

__all__ = ["DB_NAME", "Resolution", "SeriesStore", "StoredState", "default_resolutions",
           "load_series", "open_store"]

DB_NAME = "kpistream.sqlite"
SCHEMA_VERSION = 1
PICKLE_PROTOCOL = 5
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_MAX_IN = 900          # label filters with more series ids than this filter in pandas
_DAY = 86_400_000


def _clamp(x: int) -> int:
    return min(max(int(x), _I64_MIN), _I64_MAX)


# ---------------------------------------------------------------- resolutions

@dataclass(frozen=True, slots=True)
class Resolution:
    """One level of the store: buckets of ``step_ms``, kept ``retention_ms`` (None = forever)."""

    name: str
    step_ms: int
    retention_ms: int | None = None

    @classmethod
    def of(cls, step: str | int, retention: str | int | None = None,
           name: str | None = None) -> "Resolution":
        """``Resolution.of("1m", "7d")``: durations as in the config (``10s``, ``5m``, ms)."""
        s = parse_duration(step, "step")
        r = None if retention is None else parse_duration(retention, "retention")
        return cls(name or format_duration(s), s, r)


def default_resolutions(config: EngineConfig) -> tuple[Resolution, ...]:
    """The pane (1 day), ``1m`` (7 days), ``1h`` (90 days).

    A default level whose step is not a coarser multiple of the previous one
    (a pane of 7 s, say) is left out.
    """
    base = config.pane_ms
    out = [Resolution(format_duration(base), base, _DAY)]
    for name, step, keep in (("1m", 60_000, 7 * _DAY), ("1h", 3_600_000, 90 * _DAY)):
        if step > out[-1].step_ms and step % out[-1].step_ms == 0:
            out.append(Resolution(name, step, keep))
    return tuple(out)


def _check_resolutions(res: Sequence[Resolution], config: EngineConfig) -> tuple[Resolution, ...]:
    res = tuple(res)
    if not res:
        raise ConfigError("resolutions", "at least one resolution (the pane) is needed")
    names = [r.name for r in res]
    for i, r in enumerate(res):
        if not isinstance(r, Resolution):
            raise ConfigError(f"resolutions[{i}]", f"expected a Resolution, got {r!r}")
        if not isinstance(r.name, str) or not r.name:
            raise ConfigError(f"resolutions[{i}].name", "must be a non-empty string")
        if names.count(r.name) > 1:
            raise ConfigError(f"resolutions[{i}].name", f"duplicate resolution name {r.name!r}")
        if isinstance(r.step_ms, bool) or not isinstance(r.step_ms, int) or r.step_ms <= 0:
            raise ConfigError(f"resolutions[{i}].step_ms", f"must be a positive integer, got {r.step_ms!r}")
        if r.retention_ms is not None and (isinstance(r.retention_ms, bool)
                                           or not isinstance(r.retention_ms, int)
                                           or r.retention_ms <= 0):
            raise ConfigError(f"resolutions[{i}].retention_ms",
                              f"must be a positive integer or None, got {r.retention_ms!r}")
    if res[0].step_ms != config.pane_ms:
        raise ConfigError("resolutions[0].step_ms",
                          f"the base resolution must be the engine's pane ({config.pane_ms} ms), "
                          f"got {res[0].step_ms} ms")
    for i in range(1, len(res)):
        fine, coarse = res[i - 1], res[i]
        if coarse.step_ms <= fine.step_ms or coarse.step_ms % fine.step_ms:
            raise ConfigError(f"resolutions[{i}].step_ms",
                              f"must be a larger multiple of resolutions[{i - 1}].step_ms "
                              f"({fine.step_ms} ms), got {coarse.step_ms} ms")
        need = coarse.step_ms + config.label_delay_ms
        if fine.retention_ms is not None and fine.retention_ms < need:
            raise ConfigError(f"resolutions[{i - 1}].retention_ms",
                              f"must keep at least one {coarse.name} bucket plus the label delay "
                              f"({need} ms) so roll-ups see every pane, got {fine.retention_ms} ms")
    return res


# ------------------------------------------------------------- config as JSON

def config_to_json(config: EngineConfig) -> str:
    d: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if f.name == "windows":
            v = [dataclasses.asdict(w) for w in v]
        elif f.name == "extra":
            try:
                v = json.loads(json.dumps(dict(v)))
            except (TypeError, ValueError):
                v = {}
        elif isinstance(v, tuple):
            v = list(v)
        d[f.name] = v
    return json.dumps(d, sort_keys=True)


def config_from_json(text: str) -> EngineConfig:
    d = json.loads(text)
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    kw: dict[str, Any] = {}
    for k, v in d.items():
        if k not in known:
            continue
        if k == "windows":
            v = tuple(WindowSpec(**w) for w in v)
        elif isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    return EngineConfig(**kw)


def _key_json(key: SeriesKey) -> str:
    return json.dumps([key[0], key[1], key[2], key[3], [list(kv) for kv in key[4]]],
                      separators=(",", ":"))


def _key_from_json(text: str) -> SeriesKey:
    k = json.loads(text)
    return (k[0], k[1], k[2], k[3], tuple((a, b) for a, b in k[4]))


# ---------------------------------------------------------------- time input

def _to_ms(x: Any, name: str) -> int | None:
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
    """One stored state: bucket start (epoch ms), series, family and the unpickled state."""

    start: int
    series: SeriesKey
    family: str
    state: MetricState


# -------------------------------------------------------------------- schema

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    labels TEXT NOT NULL,
    last_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS states(
    res TEXT NOT NULL, start INTEGER NOT NULL, series INTEGER NOT NULL, family TEXT NOT NULL,
    final INTEGER NOT NULL, deadline INTEGER NOT NULL, state BLOB NOT NULL,
    PRIMARY KEY(res, start, series, family));
CREATE INDEX IF NOT EXISTS states_open ON states(res, deadline) WHERE final = 0;
CREATE TABLE IF NOT EXISTS rows(
    res TEXT NOT NULL, start INTEGER NOT NULL, series INTEGER NOT NULL, family TEXT NOT NULL,
    metric TEXT NOT NULL, value REAL, count INTEGER NOT NULL, labelled INTEGER,
    provisional INTEGER NOT NULL, deadline INTEGER NOT NULL,
    PRIMARY KEY(res, start, series, family, metric)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rows_open ON rows(res, deadline) WHERE provisional = 1;
CREATE TABLE IF NOT EXISTS pending(
    res TEXT NOT NULL, start INTEGER NOT NULL, PRIMARY KEY(res, start)) WITHOUT ROWID;
"""

# A final state is never replaced by a provisional one: _put drops such
# items after one look-up of the final states among the batch's buckets.
_DEL_ROWS = "DELETE FROM rows WHERE res = ? AND start = ? AND series = ? AND family = ?"
_INS_ROWS = ("INSERT INTO rows(res, start, series, family, metric, value, count, labelled, "
             "provisional, deadline) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_UPSERT_STATE = ("INSERT INTO states(res, start, series, family, final, deadline, state) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?) "
                 "ON CONFLICT(res, start, series, family) DO UPDATE SET final = excluded.final, "
                 "deadline = excluded.deadline, state = excluded.state")


def _db_file(path: str | Path) -> Path:
    p = Path(path)
    if p.suffix in (".sqlite", ".sqlite3", ".db") or p.is_file():
        return p
    return p / DB_NAME


# --------------------------------------------------------------------- store

class SeriesStore:
    """Pane states and tidy rows per resolution, in one SQLite file (WAL).

    ``path`` is a directory (the file is ``<path>/kpistream.sqlite``) or a
    ``.sqlite`` / ``.db`` file.  A new store needs ``config``; an existing
    one remembers its config and resolutions (``config=None`` reads them).
    ``readonly`` opens an existing store for queries only.
    """

    def __init__(self, path: str | Path, config: EngineConfig | None = None,
                 resolutions: Sequence[Resolution] | None = None, *,
                 readonly: bool = False, timeout: float = 30.0) -> None:
        self.file = _db_file(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        self._settled: dict[str, dict[int, tuple[int, dict[tuple[int, str], MetricState]]]] = {}
        self._data_version: int | None = None
        exists = self.file.exists()
        if not exists and (readonly or config is None):
            raise FileNotFoundError(f"{self.file}: no store here (a new store needs a config)")
        if not exists:
            self.file.parent.mkdir(parents=True, exist_ok=True)
        if readonly:
            uri = self.file.resolve().as_uri() + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None,
                                   check_same_thread=False)
        else:
            conn = sqlite3.connect(self.file, timeout=timeout, isolation_level=None,
                                   check_same_thread=False)
        self._conn = conn
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        if not readonly:
            if not exists:
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # before the first table
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")     # durable at each WAL checkpoint
            conn.execute("PRAGMA journal_size_limit = 8388608")  # WAL file kept <= 8 MiB
            with self._tx():
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
        conn.execute("PRAGMA temp_store = MEMORY")
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        self.config, self.resolutions = self._settle_meta(meta, config, resolutions)
        self._by_name = {r.name: r for r in self.resolutions}
        self.base = self.resolutions[0]
        self._label_cols = list(BASE_LABELS) + list(self.config.segments)
        # writer cache: series key -> id; reader cache: id -> (key, labels)
        self._ids: dict[SeriesKey, int] = {}
        self._series: dict[int, tuple[SeriesKey, dict[str, str]]] = {}
        self._max_series_id = 0
        # writer-side roll-up cache, per coarse resolution and open bucket: the
        # merge of its settled (final, unchangeable) finer buckets up to a mark
        self._settled = {r.name: {} for r in self.resolutions[1:]}
        self._closed = False

    # ------------------------------------------------------------- set-up
    def _settle_meta(self, meta: Mapping[str, str], config: EngineConfig | None,
                     resolutions: Sequence[Resolution] | None):
        stored_cfg = config_from_json(meta["config"]) if "config" in meta else None
        stored_res = (tuple(Resolution(**r) for r in json.loads(meta["resolutions"]))
                      if "resolutions" in meta else None)
        if "schema_version" in meta and int(meta["schema_version"]) != SCHEMA_VERSION:
            raise ConfigError("schema_version", f"store schema {meta['schema_version']} is not "
                                                f"supported (expected {SCHEMA_VERSION})")
        if config is None:
            if stored_cfg is None:
                raise ConfigError("config", f"{self.file} holds no config; pass one")
            config = stored_cfg
        elif stored_cfg is not None:
            for attr in ("pane_ms", "segments", "relative_accuracy"):
                a, b = getattr(stored_cfg, attr), getattr(config, attr)
                if a != b:
                    raise ConfigError(attr, f"the store at {self.file} was created with "
                                            f"{attr}={a!r}; the given config has {b!r}")
        if resolutions is None:
            resolutions = stored_res or default_resolutions(config)
        res = _check_resolutions(resolutions, config)
        if stored_res is not None and stored_res != res:
            raise ConfigError("resolutions", f"the store at {self.file} has resolutions "
                                             f"{[dataclasses.astuple(r) for r in stored_res]}; "
                                             f"given {[dataclasses.astuple(r) for r in res]}")
        if not self.readonly:
            cfg_json = config_to_json(config)
            updates = {"schema_version": str(SCHEMA_VERSION),
                       "resolutions": json.dumps([dataclasses.asdict(r) for r in res])}
            if meta.get("config") != cfg_json:
                updates["config"] = cfg_json   # the latest writer's config (compatible, checked)
            updates = {k: v for k, v in updates.items() if meta.get(k) != v}
            if updates:
                with self._tx():
                    self._conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                           list(updates.items()))
        return config, res

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise PermissionError(f"{self.file} is open read-only")
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        # another connection committed since our last transaction: forget what we cached
        dv = c.execute("PRAGMA data_version").fetchone()[0]
        if dv != self._data_version:
            self._data_version = dv
            self._drop_settled()
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            # what we cached during the transaction may not be in the database
            self._ids.clear()
            self._series.clear()
            self._max_series_id = 0
            self._drop_settled()
            raise
        c.execute("COMMIT")

    def _horizon(self, family: str) -> int:
        try:
            cls = FAMILY_CLASSES[family]
        except KeyError:
            raise ValueError(f"unknown metric family {family!r} "
                             f"(known: {', '.join(FAMILY_CLASSES)})") from None
        return self.config.label_delay_ms if cls.horizon == "label" else 0

    def resolution(self, name: str | None = None) -> Resolution:
        """The resolution called ``name`` (None: the base)."""
        if name is None:
            return self.base
        try:
            return self._by_name[name]
        except KeyError:
            raise ValueError(f"unknown resolution {name!r} (this store has "
                             f"{', '.join(self._by_name)})") from None

    # ------------------------------------------------------------- series
    def _series_id(self, key: SeriesKey, start: int) -> int:
        sid = self._ids.get(key)
        if sid is None:
            kj = _key_json(key)
            c = self._conn
            c.execute("INSERT OR IGNORE INTO series(key, labels, last_ms) VALUES (?, ?, ?)",
                      (kj, json.dumps(series_labels(key)), start))
            sid = int(c.execute("SELECT id FROM series WHERE key = ?", (kj,)).fetchone()[0])
            self._ids[key] = sid
            self._series[sid] = (key, series_labels(key))
        return sid

    def _refresh_series(self) -> None:
        rows = self._conn.execute("SELECT id, key FROM series WHERE id > ? ORDER BY id",
                                  (self._max_series_id,)).fetchall()
        for sid, kj in rows:
            key = _key_from_json(kj)
            self._series[sid] = (key, series_labels(key))
            self._max_series_id = max(self._max_series_id, sid)

    def _series_info(self, sid: int) -> tuple[SeriesKey, dict[str, str]] | None:
        info = self._series.get(sid)
        if info is None:
            self._refresh_series()
            info = self._series.get(sid)
        return info

    def _match_series(self, labels: Mapping[str, Any]) -> list[int]:
        unknown = sorted(set(labels) - set(self._label_cols))
        if unknown:
            raise ValueError(f"unknown label(s): {', '.join(unknown)} "
                             f"(series labels of this store: {', '.join(self._label_cols)})")
        want = {k: ({str(v)} if isinstance(v, str) or not isinstance(v, Iterable)
                    else {str(x) for x in v}) for k, v in labels.items()}
        self._refresh_series()
        return sorted(sid for sid, (_, lab) in self._series.items()
                      if all(lab.get(k) in vals for k, vals in want.items()))

    # -------------------------------------------------------------- write
    def write(self, partials: Iterable[Partial], watermark: int | None = None) -> int:
        """Upsert the base-resolution states of time panes; returns rows written.

        A later state of a pane replaces the earlier one; a final state is
        never replaced by a provisional one.  ``watermark`` (the publisher's,
        over all shards) makes states final whose deadline it has passed, and
        flips stored base rows that it has made final.  Count-window partials
        are ignored.  One transaction.
        """
        base = self.base
        latest: dict[tuple[int, SeriesKey, str], tuple[Partial, bool]] = {}
        for p in partials:
            if p.space != "time":
                continue
            if p.end_ms - p.start_ms != base.step_ms or p.key % base.step_ms:
                raise ValueError(f"partial pane [{p.start_ms}, {p.end_ms}) does not match the "
                                 f"store's base resolution {base.name} ({base.step_ms} ms)")
            fin = bool(p.final) or (watermark is not None
                                    and watermark >= p.end_ms + self._horizon(p.family))
            k = (int(p.key), p.series, p.family)
            prev = latest.get(k)
            if prev is not None and prev[1] and not fin:
                continue
            latest[k] = (p, fin)
        with self._lock, self._tx() as c:
            items = []
            last: dict[int, int] = {}
            for (start, series, family), (p, fin) in latest.items():
                sid = self._series_id(series, start)
                if last.get(sid, _I64_MIN) < start:
                    last[sid] = start
                items.append((start, sid, family, p.state, fin))
            n = self._put(base, items)
            if last:
                c.executemany("UPDATE series SET last_ms = MAX(last_ms, ?) WHERE id = ?",
                              [(v, k) for k, v in last.items()])
            starts = {it[0] for it in items}
            self._mark_pending(1, starts)
            if watermark is not None:
                self._finalize(base, watermark)
        return n

    def _put(self, res: Resolution, items: Sequence[tuple[int, int, str, MetricState, bool]]) -> int:
        """Upsert (start, series id, family, state, final) items of one resolution; rows written."""
        step, name = res.step_ms, res.name
        c = self._conn
        prov_starts = sorted({it[0] for it in items if not it[4]})
        if prov_starts:
            final: set[tuple[int, int, str]] = set()
            for i in range(0, len(prov_starts), _MAX_IN):
                chunk = prov_starts[i:i + _MAX_IN]
                final.update(c.execute(
                    f"SELECT start, series, family FROM states WHERE res = ? AND final = 1 "
                    f"AND start IN ({','.join('?' * len(chunk))})", [name, *chunk]).fetchall())
            if final:
                items = [it for it in items if it[4] or (it[0], it[1], it[2]) not in final]
        st_rows, del_rows, row_rows = [], [], []
        dumps = pickle.dumps
        for start, sid, family, state, fin in items:
            deadline = start + step + self._horizon(family)
            f = 1 if fin else 0
            st_rows.append((name, start, sid, family, f, deadline, dumps(state, PICKLE_PROTOCOL)))
            del_rows.append((name, start, sid, family))
            prov = 1 - f
            for metric, (value, count, labelled) in state.value().items():
                row_rows.append((name, start, sid, family, metric, float(value), int(count),
                                 None if labelled is None else int(labelled), prov, deadline))
        c.executemany(_DEL_ROWS, del_rows)
        c.executemany(_INS_ROWS, row_rows)
        c.executemany(_UPSERT_STATE, st_rows)
        self._invalidate_settled(res, {it[0] for it in items})
        return len(row_rows)

    def _drop_settled(self) -> None:
        for d in self._settled.values():
            d.clear()

    def _invalidate_settled(self, fine: Resolution, starts: set[int]) -> None:
        """A finer bucket below a cached settled mark changed (a rewrite): drop that cache."""
        i = self.resolutions.index(fine)
        if i + 1 >= len(self.resolutions) or not starts:
            return
        cache = self._settled[self.resolutions[i + 1].name]
        for b in [b for b, (upto, _) in cache.items() if any(b <= s < upto for s in starts)]:
            del cache[b]

    def _mark_pending(self, level: int, starts: Iterable[int]) -> None:
        """Mark the buckets of resolutions >= ``level`` that contain ``starts`` for roll-up."""
        starts = set(starts)
        if not starts:
            return
        todo = []
        for r in self.resolutions[level:]:
            todo.extend((r.name, b) for b in {s - s % r.step_ms for s in starts})
        self._conn.executemany("INSERT OR IGNORE INTO pending(res, start) VALUES (?, ?)", todo)

    def _finalize(self, res: Resolution, watermark: int) -> None:
        """Make stored states final whose deadline the watermark has passed.

        Coarse buckets still pending a roll-up are left alone: their stored
        state may miss finer updates, and only a recomputation makes it final.
        """
        wm = _clamp(watermark)
        c = self._conn
        skip = "" if res is self.base else \
            " AND start NOT IN (SELECT start FROM pending WHERE res = ?1)"
        c.execute("UPDATE states SET final = 1 WHERE res = ?1 AND final = 0 AND deadline <= ?2"
                  + skip, (res.name, wm))
        c.execute("UPDATE rows SET provisional = 0 WHERE res = ?1 AND provisional = 1 "
                  "AND deadline <= ?2" + skip, (res.name, wm))

    # ------------------------------------------------------------- roll-up
    def rollup(self, watermark: int, *, provisional: bool | Iterable[str] = True) -> int:
        """Merge finer buckets into coarser ones; returns rows written.

        For each coarser resolution (from the finest up), every bucket whose
        end plus the label delay the watermark has passed, and that is not
        rolled up final yet (or was touched again by a rewrite), is merged
        from the next finer resolution's states (per series and family) and
        written final.  Idempotent: a second call with the same watermark
        writes nothing.

        ``provisional`` (True, False, or resolution names) also recomputes the
        open buckets that writes touched since the last roll-up — the running
        minute or hour — and writes them provisional (operational families
        final once the watermark passes the bucket end, as the aggregator
        does).  That costs about (label delay / finer step) finer states per
        series and family and open bucket, so a publisher may roll up final
        buckets every second and the running ones less often.
        """
        wm = int(watermark)
        names = set(self._by_name)
        if provisional is True:
            prov = names
        elif provisional is False:
            prov = set()
        else:
            prov = {provisional} if isinstance(provisional, str) else set(provisional)
            bad = sorted(prov - names)
            if bad:
                raise ValueError(f"unknown resolution(s) {', '.join(bad)} "
                                 f"(this store has {', '.join(self._by_name)})")
            # a running hour is merged from running minutes: refresh those too
            top = max((i for i, r in enumerate(self.resolutions) if r.name in prov), default=0)
            prov |= {r.name for r in self.resolutions[: top + 1]}
        delay = self.config.label_delay_ms
        written = 0
        with self._lock, self._tx() as c:
            meta = dict(c.execute("SELECT key, value FROM meta WHERE key LIKE 'rolled_to:%'"))
            self._finalize(self.base, wm)
            for i in range(1, len(self.resolutions)):
                fine, coarse = self.resolutions[i - 1], self.resolutions[i]
                step = coarse.step_ms
                final_to = _clamp(((wm - delay) // step) * step)
                rk = f"rolled_to:{coarse.name}"
                rolled = int(meta[rk]) if rk in meta else _I64_MIN
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
                    items = [(b, sid, fam, st, wm >= b + step + self._horizon(fam))
                             for (sid, fam), st in self._merge_bucket(i, b, wm).items()]
                    if items:
                        written += self._put(coarse, items)
                        self._mark_pending(i + 1, [b])
                c.executemany("DELETE FROM pending WHERE res = ? AND start = ?", done)
                if final_to > rolled:
                    c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                              (rk, str(final_to)))
                self._finalize(coarse, wm)
        return written

    def _load(self, res: Resolution, lo: int, hi: int) -> Iterator[tuple[int, str, MetricState]]:
        cur = self._conn.execute(
            "SELECT series, family, state FROM states WHERE res = ? AND start >= ? AND start < ? "
            "ORDER BY start, series, family", (res.name, lo, hi))
        for sid, fam, blob in cur:
            yield sid, fam, pickle.loads(blob)

    @staticmethod
    def _merge_into(acc: dict[tuple[int, str], MetricState], states) -> None:
        for sid, fam, st in states:
            prev = acc.get((sid, fam))
            if prev is None:
                acc[(sid, fam)] = st
            else:
                prev.merge(st)

    def _merge_bucket(self, i: int, b: int, wm: int) -> dict[tuple[int, str], MetricState]:
        """The states of coarse bucket ``b`` of resolution ``i``: merges of the finer ones.

        Finer buckets that end before ``wm - label_delay`` are settled (final
        for every family; only a rewrite, which invalidates the cache, changes
        them), so their merge is cached for the open coarse bucket and only the
        unsettled tail is read again: the running hour reads a few minutes,
        not sixty.
        """
        fine, coarse = self.resolutions[i - 1], self.resolutions[i]
        end = b + coarse.step_ms
        settled = ((wm - self.config.label_delay_ms) // fine.step_ms) * fine.step_ms
        settled = min(max(settled, b), end)
        cache = self._settled[coarse.name]
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

    # ----------------------------------------------------------- retention
    def apply_retention(self, now_ms: int) -> int:
        """Delete buckets that ended more than their resolution's retention before ``now_ms``.

        Returns the number of stored states (bucket x series x family) deleted.
        Series not seen for longer than every retention are forgotten too.
        """
        now = int(now_ms)
        deleted = 0
        with self._lock, self._tx() as c:
            for r in self.resolutions:
                if r.retention_ms is None:
                    continue
                last_start = _clamp(now - r.retention_ms - r.step_ms)  # start + step <= now - keep
                c.execute("DELETE FROM rows WHERE res = ? AND start <= ?", (r.name, last_start))
                deleted += c.execute("DELETE FROM states WHERE res = ? AND start <= ?",
                                     (r.name, last_start)).rowcount
                c.execute("DELETE FROM pending WHERE res = ? AND start <= ?", (r.name, last_start))
            if all(r.retention_ms is not None for r in self.resolutions):
                cutoff = _clamp(now - max(r.retention_ms + r.step_ms for r in self.resolutions))
                gone = c.execute("DELETE FROM series WHERE last_ms <= ?", (cutoff,)).rowcount
                if gone:
                    self._ids.clear()
            self._drop_settled()
        if deleted:
            with self._lock:
                # give the freed pages back to the file system (executescript runs the
                # pragma to completion; execute() would free one page), then let a
                # passive checkpoint (never waiting for readers) shrink the file
                self._conn.executescript("PRAGMA incremental_vacuum;")
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        return deleted

    # --------------------------------------------------------------- query
    @staticmethod
    def _range_sql(select: str, res: Resolution, start: Any, end: Any) -> tuple[list, list]:
        """The SELECT for one resolution and ``start <= bucket start < end``."""
        s, e = _to_ms(start, "start"), _to_ms(end, "end")
        sql = [select]
        params: list[Any] = [res.name]
        if s is not None:
            sql.append("AND start >= ?")
            params.append(_clamp(s))
        if e is not None:
            sql.append("AND start < ?")
            params.append(_clamp(e))
        return sql, params

    def query(self, metric: str | Sequence[str] | None = None, *, start: Any = None,
              end: Any = None, resolution: str | None = None, **labels: Any) -> pd.DataFrame:
        """Tidy rows as :func:`kpistream.windows.aggregate.rows_frame` makes them.

        ``window`` is the resolution's name; ``start`` / ``end`` (epoch ms,
        ISO strings, datetime or pd.Timestamp; naive means UTC) select
        ``start <= window_start < end``; label keywords match exactly (a list
        matches any of its values); an unknown label name is a ValueError.
        """
        res = self.resolution(resolution)
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
        with self._lock:
            if labels:
                sids = self._match_series(labels)
                if not sids:
                    return self._frame(res, [])
                if len(sids) <= _MAX_IN:
                    sql.append(f"AND series IN ({','.join('?' * len(sids))})")
                    params.extend(sids)
                else:
                    keep = set(sids)
            sql.append("ORDER BY start, series, family, metric")
            data = self._conn.execute(" ".join(sql), params).fetchall()
            if keep is not None:
                data = [r for r in data if r[1] in keep]
            return self._frame(res, data)

    def _frame(self, res: Resolution, data: list[tuple]) -> pd.DataFrame:
        segs = self.config.segments
        if not data:
            return rows_frame([], segs)
        n = len(data)
        starts, sids, metrics, values, counts, labelled, prov = zip(*data)
        start = np.fromiter(starts, dtype=np.int64, count=n)
        sid = np.fromiter(sids, dtype=np.int64, count=n)
        uniq, inv = np.unique(sid, return_inverse=True)
        infos = [self._series_info(int(u)) for u in uniq]
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
        for lab in self._label_cols:
            per = np.array([None if info is None else info[1].get(lab) for info in infos],
                           dtype=object)
            cols[lab] = per[inv]
        df = pd.DataFrame(cols, columns=list(ROW_COLUMNS) + self._label_cols)
        return df.sort_values(["window", "window_start", *self._label_cols, "metric"],
                              kind="stable").reset_index(drop=True)

    def states(self, start: Any = None, end: Any = None, *, resolution: str | None = None,
               family: str | Sequence[str] | None = None, **labels: Any) -> list[StoredState]:
        """The stored states with ``start <= bucket start < end``, in time order.

        For callers that merge further (an arbitrary window, say): each state is
        a fresh, unpickled object the caller owns.
        """
        res = self.resolution(resolution)
        sql, params = self._range_sql("SELECT start, series, family, state FROM states WHERE res = ?",
                                      res, start, end)
        if family is not None:
            fams = [family] if isinstance(family, str) else list(family)
            sql.append(f"AND family IN ({','.join('?' * len(fams))})")
            params.extend(fams)
        sql.append("ORDER BY start, series, family")
        with self._lock:
            keep = set(self._match_series(labels)) if labels else None
            out = []
            for st, sid, fam, blob in self._conn.execute(" ".join(sql), params):
                if keep is not None and sid not in keep:
                    continue
                info = self._series_info(sid)
                if info is None:
                    continue
                out.append(StoredState(int(st), info[0], fam, pickle.loads(blob)))
        return out

    @contextmanager
    def snapshot(self) -> Iterator["SeriesStore"]:
        """Queries inside see one consistent snapshot (a read transaction).

        The writer is not blocked (WAL); it only cannot checkpoint past the
        snapshot until it ends, so keep snapshots short.
        """
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self
            finally:
                self._conn.execute("COMMIT")

    # ------------------------------------------------------------- reports
    def nbytes(self) -> int:
        """Bytes on disk: the database file plus its WAL and shared-memory files."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.file) + suffix)
            if p.exists():
                total += p.stat().st_size
        return total

    def info(self) -> dict[str, Any]:
        """Per resolution: states, rows, provisional rows, first and last bucket; and totals."""
        out: dict[str, Any] = {"file": str(self.file), "nbytes": self.nbytes(), "resolutions": {}}
        with self._lock:
            c = self._conn
            for r in self.resolutions:
                n, lo, hi = c.execute("SELECT COUNT(*), MIN(start), MAX(start) FROM states "
                                      "WHERE res = ?", (r.name,)).fetchone()
                nr, npv = c.execute("SELECT COUNT(*), COALESCE(SUM(provisional), 0) FROM rows "
                                    "WHERE res = ?", (r.name,)).fetchone()
                out["resolutions"][r.name] = {"states": n, "rows": nr, "provisional_rows": npv,
                                              "first": lo, "last": hi}
            out["series"] = c.execute("SELECT COUNT(*) FROM series").fetchone()[0]
        return out

    # ----------------------------------------------------------- lifecycle
    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> "SeriesStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SeriesStore({str(self.file)!r}, resolutions="
                f"{[r.name for r in self.resolutions]})")


def open_store(path: str | Path, *, readonly: bool = False) -> SeriesStore:
    """Open an existing store with the config and resolutions it was created with."""
    return SeriesStore(path, readonly=readonly)


def load_series(path: str | Path, metric: str | Sequence[str] | None = None,
                **query: Any) -> pd.DataFrame:
    """One query against the store at ``path`` (read-only): ``load_series(p, "accuracy", model="churn")``."""
    with SeriesStore(path, readonly=True) as store:
        return store.query(metric, **query)
