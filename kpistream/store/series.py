"""The store's front door: :class:`SeriesStore` (pane states and tidy rows per resolution in
one SQLite file), and :func:`open_store` / :func:`load_series` for notebooks."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pandas as pd

from kpistream.engine import Partial
from kpistream.spec.metrics import EngineConfig
from kpistream.store.catalog import SeriesCatalog
from kpistream.store.codec import decode_checkpoint, encode_checkpoint
from kpistream.store.db import DB_NAME, StoreDB, clamp
from kpistream.store.query import SeriesReader, StoredState
from kpistream.store.resolutions import Resolution, default_resolutions
from kpistream.store.rollup import Rollup, SettledCache
from kpistream.store.write import StateWriter
from kpistream.wire.batch import BASE_LABELS

__all__ = ["DB_NAME", "Resolution", "SeriesStore", "StoredState", "default_resolutions",
           "load_series", "open_store"]


class SeriesStore:
    """Pane states and tidy rows per resolution, in one SQLite file (WAL).

    ``path`` is a directory (the file is ``<path>/kpistream.sqlite``) or a
    ``.sqlite`` / ``.db`` file.  A new store needs ``config``; an existing
    one remembers its config and resolutions (``config=None`` reads them).
    ``readonly`` opens an existing store for queries only.

    The live publisher writes every closed or updated time pane of the
    engine (:class:`~kpistream.engine.Partial`, cumulative, possibly
    provisional); notebooks read DataFrames shaped exactly like ``kpistream
    replay`` output.  Per resolution (``10s`` = the engine's pane, ``1m``,
    ``1h``; :mod:`.resolutions`), bucket start, series and metric family it
    keeps the mergeable **state** with a ``final`` flag and a ``deadline``
    (:mod:`.write`; encoded by :mod:`.codec`), the state's **tidy rows**
    beside it so that a query never decodes a state (:mod:`.query`), and the
    series once, by integer id (:mod:`.catalog`); the config and resolutions
    live in the file (:mod:`.db`), so a notebook opens it by path alone.
    Coarse buckets are merges of finer states, never averages of values, and
    each resolution has a retention (:mod:`.rollup`).

    Why SQLite: embedded, one file, no server, no new dependency; in WAL mode
    one writer and any number of reader processes work at once and readers
    never block the writer (they read a snapshot); a transaction per
    :meth:`write` makes a batch atomic.  Parquet would need rewriting to
    replace a provisional pane by its final state; DuckDB's file lock keeps
    a notebook out while the publisher holds the file; Prometheus's TSDB
    cannot hold mergeable sketches.

    Concurrency contract: one writer process (the publisher) and many
    readers.  A ``SeriesStore`` may be shared between threads (a lock
    serializes its use).  States are pickles: open only store files you trust.

    Example::

        from kpistream.store import load_series
        df = load_series("data/store", metric=["accuracy", "latency_p99"],
                         resolution="1m", model="churn", start="2026-01-01T00:00Z")
    """

    def __init__(self, path: str | Path, config: EngineConfig | None = None,
                 resolutions: Sequence[Resolution] | None = None, *,
                 readonly: bool = False, timeout: float = 30.0) -> None:
        db = StoreDB(path, config, resolutions, readonly=readonly, timeout=timeout)
        self._db = db
        self.file = db.file
        self.readonly = readonly
        self.config = db.config
        self.resolutions = db.resolutions
        self.base = db.base
        catalog = SeriesCatalog(db.conn, list(BASE_LABELS) + list(self.config.segments))
        # writer-side roll-up cache, per coarse resolution and open bucket: the
        # merge of its settled (final, unchangeable) finer buckets up to a mark
        settled = SettledCache(self.resolutions)
        self._writer = StateWriter(db, catalog, on_put=settled.invalidate)
        self._rollup = Rollup(db, self._writer, catalog, settled)
        self._reader = SeriesReader(db, catalog)
        db.on_stale.append(settled.clear)
        db.on_rollback.extend((catalog.forget, settled.clear))

    def resolution(self, name: str | None = None) -> Resolution:
        """The resolution called ``name`` (None: the base)."""
        return self._db.resolution(name)

    @property
    def watermark(self) -> int | None:
        """The highest publisher watermark written (None: none yet): every window final
        at it is stored final."""
        with self._db.lock:
            row = self._db.conn.execute(
                "SELECT value FROM meta WHERE key = 'watermark'").fetchone()
        return None if row is None else int(row[0])

    # --------------------------------------------------------- checkpoints
    def save_checkpoint(self, name: str, data: Any, watermark: int, saved_ms: int) -> int:
        """Keep ``data`` (JSON-able) as checkpoint ``name``, replacing the last one; it
        covers the windows final at ``watermark``.  Returns its size in bytes."""
        blob = encode_checkpoint(data)
        with self._db.transaction() as c:
            c.execute("INSERT OR REPLACE INTO checkpoints(name, watermark, saved_ms, body) "
                      "VALUES (?, ?, ?, ?)", (name, clamp(watermark), int(saved_ms), blob))
        return len(blob)

    def load_checkpoint(self, name: str) -> tuple[Any, int] | None:
        """``(data, watermark)`` of checkpoint ``name``, or None."""
        with self._db.lock:
            row = self._db.conn.execute("SELECT body, watermark FROM checkpoints WHERE name = ?",
                                        (name,)).fetchone()
        return None if row is None else (decode_checkpoint(row[0]), int(row[1]))

    # -------------------------------------------------------------- write
    def write(self, partials: Iterable[Partial], watermark: int | None = None) -> int:
        """Upsert the base-resolution states of time panes; returns rows written.

        A later state of a pane replaces the earlier one; a final state is
        never replaced.  ``watermark`` (the publisher's,
        over all shards) makes states final whose deadline it has passed, and
        flips stored base rows that it has made final.  Count-window partials
        are ignored.  One transaction.
        """
        return self._writer.write(partials, watermark)

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
        return self._rollup.rollup(watermark, provisional=provisional)

    def apply_retention(self, now_ms: int) -> int:
        """Delete buckets that ended more than their resolution's retention before ``now_ms``.

        Returns the number of stored states (bucket x series x family) deleted.
        Series not seen for longer than every retention are forgotten too.
        """
        return self._rollup.apply_retention(now_ms)

    # --------------------------------------------------------------- read
    def query(self, metric: str | Sequence[str] | None = None, *, start: Any = None,
              end: Any = None, resolution: str | None = None, **labels: Any) -> pd.DataFrame:
        """Tidy rows as :func:`kpistream.windows.aggregate.rows_frame` makes them.

        ``window`` is the resolution's name; ``start`` / ``end`` (epoch ms,
        ISO strings, datetime or pd.Timestamp; naive means UTC) select
        ``start <= window_start < end``; label keywords match exactly (a list
        matches any of its values); an unknown label name is a ValueError.
        """
        return self._reader.query(metric, start=start, end=end, resolution=resolution, **labels)

    def states(self, start: Any = None, end: Any = None, *, resolution: str | None = None,
               family: str | Sequence[str] | None = None, **labels: Any) -> list[StoredState]:
        """The stored states with ``start <= bucket start < end``, in time order.

        For callers that merge further (an arbitrary window, say): each state is
        a fresh, decoded object the caller owns.
        """
        return self._reader.states(start, end, resolution=resolution, family=family, **labels)

    @contextmanager
    def snapshot(self) -> Iterator["SeriesStore"]:
        """Queries inside see one consistent snapshot (a read transaction).

        The writer is not blocked (WAL); it only cannot checkpoint past the
        snapshot until it ends, so keep snapshots short.
        """
        with self._db.snapshot():
            yield self

    # ------------------------------------------------------------- reports
    def nbytes(self) -> int:
        """Bytes on disk: the database file plus its WAL and shared-memory files."""
        return self._db.nbytes()

    def info(self) -> dict[str, Any]:
        """Per resolution: states, rows, provisional rows, first and last bucket; and totals."""
        return self._reader.info()

    # ----------------------------------------------------------- lifecycle
    def close(self) -> None:
        self._db.close()

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
