"""The store's SQLite file: where it lives, its tables and pragmas, the meta table that
remembers its config and resolutions, and its transactions."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from kpistream.errors import ConfigError
from kpistream.spec.metrics import EngineConfig
from kpistream.store.codec import (
    config_from_json, config_to_json, resolutions_from_json, resolutions_to_json)
from kpistream.store.resolutions import Resolution, check_resolutions, default_resolutions

__all__ = ["DB_NAME", "I64_MAX", "I64_MIN", "MAX_IN", "SCHEMA_VERSION", "StoreDB", "clamp", "db_file",
           "store_files"]

DB_NAME = "kpistream.sqlite"
SCHEMA_VERSION = 1
I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1
MAX_IN = 900          # most values bound in one ``IN (...)``; longer lists are chunked or filtered

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
CREATE TABLE IF NOT EXISTS checkpoints(
    name TEXT PRIMARY KEY, watermark INTEGER NOT NULL, saved_ms INTEGER NOT NULL,
    body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS pending(
    res TEXT NOT NULL, start INTEGER NOT NULL, PRIMARY KEY(res, start)) WITHOUT ROWID;
"""


def clamp(x: int) -> int:
    """``x`` within SQLite's 64-bit integers."""
    return min(max(int(x), I64_MIN), I64_MAX)


def db_file(path: str | Path) -> Path:
    """The database file of a store: ``path`` itself if it names a file, else ``path/kpistream.sqlite``."""
    p = Path(path)
    if p.suffix in (".sqlite", ".sqlite3", ".db") or p.is_file():
        return p
    return p / DB_NAME


def store_files(file: str | Path) -> list[Path]:
    """The database file and its WAL and shared-memory files (whether they exist or not)."""
    return [Path(str(file) + suffix) for suffix in ("", "-wal", "-shm")]


class StoreDB:
    """One connection to the store's file, opened with the config and resolutions it keeps.

    A new file needs ``config``; an existing one remembers its config and
    resolutions (``config=None`` reads them; a given config must agree on the
    pane, the segments and the sketch accuracy).  ``lock`` serializes every
    use of the connection.  Callbacks in ``on_stale`` run when another
    connection has committed since this one's last write transaction, those in
    ``on_rollback`` when a write transaction fails: both drop what callers cached.
    """

    def __init__(self, path: str | Path, config: EngineConfig | None = None,
                 resolutions: Sequence[Resolution] | None = None, *,
                 readonly: bool = False, timeout: float = 30.0) -> None:
        self.file = db_file(path)
        self.readonly = readonly
        self.lock = threading.RLock()
        self.on_stale: list[Callable[[], None]] = []
        self.on_rollback: list[Callable[[], None]] = []
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
        self.conn = conn
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
        self.closed = False

    def _settle_meta(self, meta: Mapping[str, str], config: EngineConfig | None,
                     resolutions: Sequence[Resolution] | None):
        stored_cfg = config_from_json(meta["config"]) if "config" in meta else None
        stored_res = resolutions_from_json(meta["resolutions"]) if "resolutions" in meta else None
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
        res = check_resolutions(resolutions, config)
        if stored_res is not None and stored_res != res:
            raise ConfigError("resolutions", f"the store at {self.file} has resolutions "
                                             f"{[dataclasses.astuple(r) for r in stored_res]}; "
                                             f"given {[dataclasses.astuple(r) for r in res]}")
        if not self.readonly:
            cfg_json = config_to_json(config)
            updates = {"schema_version": str(SCHEMA_VERSION),
                       "resolutions": resolutions_to_json(res)}
            if meta.get("config") != cfg_json:
                updates["config"] = cfg_json   # the latest writer's config (compatible, checked)
            updates = {k: v for k, v in updates.items() if meta.get(k) != v}
            if updates:
                with self._tx():
                    self.conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                          list(updates.items()))
        return config, res

    def resolution(self, name: str | None = None) -> Resolution:
        """The resolution called ``name`` (None: the base)."""
        if name is None:
            return self.base
        try:
            return self._by_name[name]
        except KeyError:
            raise ValueError(f"unknown resolution {name!r} (this store has "
                             f"{', '.join(self._by_name)})") from None

    # -------------------------------------------------------- transactions
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise PermissionError(f"{self.file} is open read-only")
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        # another connection committed since our last transaction: forget what was cached
        dv = c.execute("PRAGMA data_version").fetchone()[0]
        if dv != self._data_version:
            self._data_version = dv
            for forget in self.on_stale:
                forget()
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            # what was cached during the transaction may not be in the database
            for forget in self.on_rollback:
                forget()
            raise
        c.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock: all of it is committed, or none."""
        with self.lock, self._tx() as c:
            yield c

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """A read transaction under the lock: the reads inside see one snapshot."""
        with self.lock:
            self.conn.execute("BEGIN")
            try:
                yield
            finally:
                self.conn.execute("COMMIT")

    def vacuum(self) -> None:
        """Give freed pages back to the file system, then checkpoint without waiting."""
        with self.lock:
            # executescript runs the pragma to completion (execute() would free one
            # page); a passive checkpoint never waits for readers
            self.conn.executescript("PRAGMA incremental_vacuum;")
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    # ------------------------------------------------------------ the file
    def nbytes(self) -> int:
        """Bytes on disk: the database file plus its WAL and shared-memory files."""
        return sum(p.stat().st_size for p in store_files(self.file) if p.exists())

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.conn.close()
