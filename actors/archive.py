"""The raw event archive (:class:`EventArchive`): what a shard accepted, as Parquet files, for
replay and retraining (:func:`read_archive`, :func:`inference_batch_from_table`,
:func:`feedback_batch_from_table`).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from kpistream.wire.batch import (FEEDBACK_KINDS, FeedbackBatch, InferenceBatch, concat_feedback,
                             concat_inference)
from kpistream.clock import Clock, SystemClock

__all__ = ["EventArchive", "KINDS", "inference_table", "feedback_table",
           "inference_batch_from_table", "feedback_batch_from_table", "read_archive"]

KINDS = ("inference", "feedback")
DAY_MS = 86_400_000
_ARRIVAL_SHIFT = 24          # rows per flush stay far below 2**24 (2 * max_rows)
_NAME = re.compile(r"^shard-(\d+)-(\d+)\.parquet$")


def _json(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), default=str)


# ------------------------------------------------------------------ batch <-> Arrow

#: low-cardinality string columns: dictionary-encoded in memory and in the file (read back
#: as plain strings)
STRING_COLUMNS = ("model", "model_version", "variant", "endpoint", "segments", "status",
                  "pred_label", "kind", "label")


def _vocab_column(codes: np.ndarray, vocab: list):
    """Strings ``vocab[codes]`` (code -1 -> null) as an Arrow dictionary array (no copy of
    the strings per row: the Parquet writer takes the dictionary as it is)."""
    import pyarrow as pa

    if not vocab:
        return pa.nulls(len(codes), pa.string())
    none = [i for i, v in enumerate(vocab) if v is None]
    if none:                                  # nulls live in the indices, never in the dictionary
        is_none = np.zeros(len(vocab) + 1, dtype=bool)
        is_none[none] = True
        codes = np.where(is_none[codes], -1, codes)
        vocab = ["" if v is None else v for v in vocab]
    mask = codes < 0
    idx = pa.array(codes, type=pa.int32(), mask=mask if mask.any() else None)
    return pa.DictionaryArray.from_arrays(idx, pa.array(vocab, pa.string()))


def _plain(col):
    """A column with dictionary arrays decoded (tables built in memory hold them)."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.dictionary_decode() if pa.types.is_dictionary(col.type) else col


def _opt(arr: np.ndarray):
    """float64 with NaN -> null."""
    import pyarrow as pa

    return pa.array(arr, type=pa.float64(), from_pandas=True)


def _lists(offsets: np.ndarray, values: np.ndarray, value_type):
    """CSR (offsets, values) -> list array; rows with no items are null."""
    import pyarrow as pa

    lens = np.diff(offsets)
    empty = lens == 0
    if empty.all():
        return pa.nulls(len(lens), pa.list_(value_type))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                    pa.array(values, type=value_type),
                                    mask=pa.array(empty) if empty.any() else None)


def inference_table(b: InferenceBatch, arrival: np.ndarray | None = None):
    """An :class:`InferenceBatch` as an Arrow table (columns: :class:`EventArchive`)."""
    import pyarrow as pa

    keys = b.series_keys
    col = {
        "event_id_hash": pa.array(b.event_id, pa.uint64()),
        "request_id_hash": pa.array(b.request_id, pa.uint64()),
        "ts": pa.array(b.ts, pa.int64()),
        "model": _vocab_column(b.series, [k[0] for k in keys]),
        "model_version": _vocab_column(b.series, [k[1] for k in keys]),
        "variant": _vocab_column(b.series, [k[2] for k in keys]),
        "endpoint": _vocab_column(b.series, [k[3] for k in keys]),
        "segments": _vocab_column(b.series, [_json(dict(k[4])) if k[4] else None
                                             for k in keys]),
        "latency_ms": pa.array(b.latency_ms, pa.float64()),
        "status": _vocab_column(b.error.astype(np.int32), ["ok", "error"]),
        "pred_label": _vocab_column(b.pred_label, list(b.labels)),
        "pred_score": _opt(b.pred_score),
        "pred_value": _opt(b.pred_value),
        "ranking": _lists(b.rank_offsets, b.rank_items, pa.uint64()),
        "cost_usd": _opt(b.cost_usd),
        "tokens": _opt(b.tokens),
        "features": (pa.nulls(len(b), pa.string()) if b.features is None else
                     pa.array([None if f is None else _json(f) for f in b.features],
                              pa.string())),
    }
    if arrival is not None:
        col["arrival"] = pa.array(arrival, pa.int64())
    return pa.table(col)


def feedback_table(b: FeedbackBatch, arrival: np.ndarray | None = None):
    """A :class:`FeedbackBatch` as an Arrow table (columns: :class:`EventArchive`)."""
    import pyarrow as pa

    col = {
        "event_id_hash": pa.array(b.event_id, pa.uint64()),
        "request_id_hash": pa.array(b.request_id, pa.uint64()),
        "ts": pa.array(b.ts, pa.int64()),
        "kind": _vocab_column(b.kind.astype(np.int32), list(FEEDBACK_KINDS)),
        "label": _vocab_column(b.label, list(b.labels)),
        "value": _opt(b.value),
        "relevance_items": _lists(b.rel_offsets, b.rel_items, pa.uint64()),
        "relevance_grades": _lists(b.rel_offsets, b.rel_grades, pa.float64()),
    }
    if arrival is not None:
        col["arrival"] = pa.array(arrival, pa.int64())
    return pa.table(col)


def _codes(col) -> tuple[np.ndarray, list]:
    """(int32 codes, vocabulary) of a string column (null -> -1)."""
    import pyarrow.compute as pc

    d = pc.dictionary_encode(_plain(col))
    codes = d.indices.to_numpy(zero_copy_only=False)
    codes = np.where(d.indices.is_null().to_numpy(zero_copy_only=False), -1, codes)
    return codes.astype(np.int32), d.dictionary.to_pylist()


def _csr_back(col, dtype) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lens = np.asarray(arr.value_lengths().fill_null(0), dtype=np.int64)
    offsets = np.zeros(len(arr) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    vals = arr.flatten().to_numpy(zero_copy_only=False).astype(dtype)
    return offsets, vals


def _floats(col) -> np.ndarray:
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)


def inference_batch_from_table(t) -> InferenceBatch:
    """The :class:`InferenceBatch` an archived inference table holds (replay, tests)."""
    series_cols = ["model", "model_version", "variant", "endpoint", "segments"]
    parts = [_plain(t.column(c)).to_pylist() for c in series_cols]
    keys: dict = {}
    series = np.empty(t.num_rows, dtype=np.int32)
    for i, (m, v, var, ep, seg) in enumerate(zip(*parts)):
        k = (m, v, var, ep or "", tuple(sorted(json.loads(seg).items())) if seg else ())
        series[i] = keys.setdefault(k, len(keys))
    pred, labels = _codes(t.column("pred_label"))
    ro, ri = _csr_back(t.column("ranking"), np.uint64)
    feats = t.column("features").to_pylist()
    return InferenceBatch(
        ts=t.column("ts").to_numpy().astype(np.int64),
        event_id=t.column("event_id_hash").to_numpy().astype(np.uint64),
        request_id=t.column("request_id_hash").to_numpy().astype(np.uint64),
        series=series, latency_ms=_floats(t.column("latency_ms")),
        error=np.asarray(_plain(t.column("status")).to_numpy(zero_copy_only=False) == "error"),
        pred_label=pred, pred_score=_floats(t.column("pred_score")),
        pred_value=_floats(t.column("pred_value")), cost_usd=_floats(t.column("cost_usd")),
        tokens=_floats(t.column("tokens")), rank_offsets=ro, rank_items=ri,
        series_keys=list(keys), labels=labels,
        features=([None if f is None else json.loads(f) for f in feats]
                  if any(f is not None for f in feats) else None))


def feedback_batch_from_table(t) -> FeedbackBatch:
    """The :class:`FeedbackBatch` an archived feedback table holds (replay, tests)."""
    from kpistream.wire.batch import KIND_CODE

    label, labels = _codes(t.column("label"))
    ro, ri = _csr_back(t.column("relevance_items"), np.uint64)
    _, rg = _csr_back(t.column("relevance_grades"), np.float64)
    return FeedbackBatch(
        ts=t.column("ts").to_numpy().astype(np.int64),
        event_id=t.column("event_id_hash").to_numpy().astype(np.uint64),
        request_id=t.column("request_id_hash").to_numpy().astype(np.uint64),
        kind=np.array([KIND_CODE[k] for k in _plain(t.column("kind")).to_pylist()],
                      dtype=np.int8),
        label=label, value=_floats(t.column("value")), rel_offsets=ro, rel_items=ri,
        rel_grades=rg, labels=labels)


def is_uri(root: str | os.PathLike) -> bool:
    """Whether an archive root is a filesystem URI (``s3://``, ``gs://``, ``file://`` ...)
    rather than a local path."""
    return "://" in str(root)


def _filesystem(root: str | os.PathLike):
    """(pyarrow filesystem, base path) of a URI root."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(str(root))
    return fs, path.rstrip("/")


def archive_files(root: str | os.PathLike, kind: str, shard: int | None = None) -> list[str]:
    """The Parquet files of ``kind`` under ``root`` (a local path or a URI), sorted; of one
    shard if ``shard`` is given.  Local paths come back as paths, URI files as paths
    within the URI's filesystem."""
    pattern = f"shard-{'*' if shard is None else shard}-*.parquet"
    if not is_uri(root):
        return sorted(str(p) for p in Path(root, kind).glob(f"date=*/{pattern}"))
    import pyarrow.fs as pafs

    fs, base = _filesystem(root)
    infos = fs.get_file_info(pafs.FileSelector(f"{base}/{kind}", recursive=True,
                                               allow_not_found=True))
    out = []
    for info in infos:
        m = _NAME.match(info.base_name)
        if info.type == pafs.FileType.File and m and "/date=" in info.path and (
                shard is None or int(m.group(1)) == shard):
            out.append(info.path)
    return sorted(out)


def read_archive(root: str | os.PathLike, kind: str, *, columns: list[str] | None = None):
    """Every archived row of ``kind`` as one Arrow table, in arrival order per shard.

    ``root``: a local path or a URI pyarrow reads (``s3://bucket/prefix`` ...).  Without
    Ray (tests, notebooks); :mod:`actors.retrain` reads with Ray Data.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = archive_files(root, kind)
    if not files:
        return None
    fs = _filesystem(root)[0] if is_uri(root) else None
    t = pa.concat_tables([pq.read_table(f, columns=columns, filesystem=fs) for f in files])
    if "arrival" in t.column_names:
        t = t.sort_by("arrival")
    return t


# ------------------------------------------------------------------------ archive

class EventArchive:
    """One shard's archive writer.

    ``background=True`` converts and writes in a daemon thread of its own:
    :meth:`maybe_flush` then only hands the buffer over (the Parquet encoder
    releases the GIL, so ingest goes on meanwhile); :meth:`flush` always
    writes before it returns.

    A plain class (no Ray import), owned by one shard (:class:`actors.shard.Shard`
    with ``archive_dir``).  :meth:`EventArchive.append` is the only call in the
    ingest path and only keeps a reference to the columnar batch (O(1), no copy,
    no conversion); :meth:`EventArchive.maybe_flush` (called by the shard's
    ``collect``, i.e. on every publisher tick) converts and writes when the
    buffer holds ``max_rows`` rows or its oldest row is ``max_age_s`` old.

    Layout (Hive-style partitions, readable by ``ray.data.read_parquet``,
    ``pyarrow.dataset`` and pandas)::

        <root>/inference/date=YYYY-MM-DD/shard-<i>-<seq>.parquet
        <root>/feedback/date=YYYY-MM-DD/shard-<i>-<seq>.parquet

    ``date`` is the UTC day of the events' event time (a flush that spans
    midnight writes one file per day).  ``seq`` (8+ digits, zero-padded) grows
    per shard across the whole archive, also across restarts (the first flush
    finds the largest one on disk), and a file never holds more than
    ``max_rows`` rows.  A file appears atomically: it is written as
    ``.shard-<i>-<seq>.parquet.tmp`` in the same folder (hidden, and without the
    ``.parquet`` extension, so readers skip it) and then hard-linked to its final
    name, which fails rather than overwrites if that name exists.

    Columns are the batch columns (:mod:`kpistream.wire.batch`), so a replay rebuilds
    exactly the live batches (:func:`inference_batch_from_table`,
    :func:`feedback_batch_from_table`): identifiers are the 64-bit hashes the
    engine joins and deduplicates on (``event_id_hash``, ``request_id_hash``,
    uint64; the original strings never reach a shard), time is ``ts`` (epoch ms,
    event time), and ``arrival`` (int64) orders the rows of one shard in the
    order the shard received them (``seq << 24`` of the flush's first file plus
    the position in the flush).  Variable fields are JSON text (``segments``,
    ``features``), as in :func:`kpistream.replay.write_events_parquet`.

    inference: ``event_id_hash, request_id_hash, ts, model, model_version,
    variant, endpoint, segments, latency_ms, status ("ok" | "error"),
    pred_label, pred_score, pred_value, ranking (list<uint64> item hashes),
    cost_usd, tokens, features, arrival``

    feedback: ``event_id_hash, request_id_hash, ts, kind, label, value,
    relevance_items (list<uint64>), relevance_grades (list<double>), arrival``

    A batch the engine accepted in part (late rows, re-delivered duplicates,
    invalid rows) is archived whole; a batch it accepted nothing of is not
    archived.  Readers deduplicate by ``event_id_hash`` when it matters.

    Failure: nothing here raises into the caller.  A failed conversion or write
    is counted (``errors``, ``last_error``), the unwritten rows stay buffered
    and are retried (no sooner than ``retry_s`` later); past ``2 * max_rows``
    buffered rows the oldest are dropped and counted (``dropped``), so memory
    stays bounded whatever the disk does.  Rows still buffered when the process
    dies are lost (at most ``max_age_s`` of traffic): :meth:`flush` on shutdown.
    """

    def __init__(self, root: str | os.PathLike, shard_index: int, max_rows: int = 50_000,
                 max_age_s: float = 30.0, clock: Clock | None = None, retry_s: float = 5.0,
                 compression: str = "snappy", background: bool = False) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        # a URI (s3://, gs://, file:// ...) goes through its pyarrow filesystem
        self.fs, self._base = _filesystem(root) if is_uri(root) else (None, "")
        self.root = Path(root) if self.fs is None else str(root).rstrip("/")
        self.shard = int(shard_index)
        self.max_rows = int(max_rows)
        self.max_age_ms = int(max_age_s * 1000)
        self.retry_ms = int(retry_s * 1000)
        self.compression = compression
        self.clock = clock or SystemClock()
        self.background = background
        self._lock = threading.Lock()          # buffers and counters
        self._drain_lock = threading.Lock()    # one writer at a time
        self._buf: dict[str, deque] = {k: deque() for k in KINDS}   # (batch, rows)
        self._unwritten: deque = deque()       # converted, not yet written: (kind, day, table, seq)
        self.buffered = 0                      # rows in _buf and _unwritten
        self._oldest_ms: int | None = None     # first append into an empty _buf
        self._next_try_ms = 0
        self._seq: int | None = None           # next file number (found on disk lazily)
        self._kick: threading.Event | None = None
        self.counters = {"rows_in": 0, "rows": 0, "files": 0, "errors": 0, "dropped": 0,
                         "flush_s": 0.0}
        self.last_error = ""

    # ---------------------------------------------------------------- ingest path
    def append(self, kind: str, batch: InferenceBatch | FeedbackBatch) -> None:
        """Keep ``batch`` for the next file (no copy, no conversion). Never raises."""
        try:
            n = len(batch)
            if not n:
                return
            with self._lock:
                self._buf[kind].append((batch, n))
                self.buffered += n
                self.counters["rows_in"] += n
                if self._oldest_ms is None:
                    self._oldest_ms = self.clock.now_ms()
                over = self.buffered >= 2 * self.max_rows
            if over:                                   # collect() is not keeping up
                if self.clock.now_ms() >= self._next_try_ms:
                    self._start() if self.background else self._drain()
                with self._lock:
                    self._bound_buffer()
        except Exception as e:  # noqa: BLE001 - the archive never sinks an ingest
            self._error(e)

    # ---------------------------------------------------------------- flushing
    def due(self) -> bool:
        """Rows to write, and the buffer full or old enough (and no error retry pending)."""
        now = self.clock.now_ms()
        if not self.buffered or now < self._next_try_ms:
            return False
        return self.buffered >= self.max_rows or bool(self._unwritten) or (
            self._oldest_ms is not None and now - self._oldest_ms >= self.max_age_ms)

    def maybe_flush(self) -> int:
        """Write (or, in background mode, start writing) if :meth:`due`; files written."""
        if not self.due():
            return 0
        if self.background:
            self._start()
            return 0
        return self._drain()

    def flush(self) -> int:
        """Write everything buffered now; returns the number of files written. Never raises."""
        return self._drain()

    def _start(self) -> None:
        """Wake the writer thread (started on first use)."""
        if self._kick is None:
            self._kick = threading.Event()
            threading.Thread(target=self._writer, name=f"kpistream-archive-{self.shard}",
                             daemon=True).start()
        self._kick.set()

    def _writer(self) -> None:
        while True:
            self._kick.wait()
            self._kick.clear()
            self._drain()

    def _drain(self) -> int:
        t0 = time.perf_counter()
        files = 0
        with self._drain_lock:
            try:
                with self._lock:
                    take = {k: list(self._buf[k]) for k in KINDS}
                    for k in KINDS:
                        self._buf[k].clear()
                    self._oldest_ms = None
                for kind in KINDS:
                    if take[kind]:
                        self._convert(kind, [b for b, _ in take[kind]],
                                      sum(n for _, n in take[kind]))
                while True:
                    with self._lock:
                        if not self._unwritten:
                            break
                        kind, day, table, seq = self._unwritten[0]
                    self._write(kind, day, table, seq)
                    with self._lock:
                        self._unwritten.popleft()
                        self.buffered -= table.num_rows
                        self.counters["rows"] += table.num_rows
                        self.counters["files"] += 1
                    files += 1
            except Exception as e:  # noqa: BLE001 - counted, retried later, never raised
                self._error(e)
                self._next_try_ms = self.clock.now_ms() + self.retry_ms
                with self._lock:
                    cap = 2 * self.max_rows
                    while self.buffered > cap and self._unwritten:
                        _, _, table, _ = self._unwritten.popleft()
                        self.buffered -= table.num_rows
                        self.counters["dropped"] += table.num_rows
                    self._bound_buffer()
            with self._lock:
                self.counters["flush_s"] += time.perf_counter() - t0
        return files

    def _convert(self, kind: str, batches: list, n: int) -> None:
        """Batches -> Arrow tables in _unwritten, one per (UTC day, <= max_rows rows)."""
        try:
            if kind == "inference":
                batch, to_table = concat_inference(batches), inference_table
            else:
                batch, to_table = concat_feedback(batches), feedback_table
            plan = self._plan_files(batch.ts)
            first = self._take_seq(len(plan))
            arrival = (np.int64(first) << _ARRIVAL_SHIFT) + np.arange(len(batch), dtype=np.int64)
            table = to_table(batch, arrival)
            parts = [(kind, day, table if idx is None else table.take(idx), first + j)
                     for j, (day, idx) in enumerate(plan)]
        except Exception as e:  # noqa: BLE001 - rows that cannot convert never will: dropped
            with self._lock:
                self.buffered -= n
                self.counters["dropped"] += n
            self._error(e)
            return
        with self._lock:
            self._unwritten.extend(parts)

    def _plan_files(self, ts: np.ndarray) -> list[tuple[int, Any]]:
        """[(day, row indices or None for all rows)] with at most max_rows rows each."""
        days = ts // DAY_MS
        lo, hi = int(days.min()), int(days.max())
        groups = ([(lo, None)] if lo == hi else
                  [(int(d), np.flatnonzero(days == d)) for d in np.unique(days)])
        out = []
        for day, idx in groups:
            n = len(ts) if idx is None else len(idx)
            if n <= self.max_rows:
                out.append((day, idx))
                continue
            rows = np.arange(len(ts)) if idx is None else idx
            for k in range(0, n, self.max_rows):
                out.append((day, rows[k:k + self.max_rows]))
        return out

    def _take_seq(self, n: int) -> int:
        if self._seq is None:
            self._seq = self._max_seq_on_disk() + 1
        first = self._seq
        self._seq += n
        return first

    def _max_seq_on_disk(self) -> int:
        best = -1
        if self.fs is not None:
            for kind in KINDS:
                for f in archive_files(self.root, kind, self.shard):
                    best = max(best, int(_NAME.match(f.rsplit("/", 1)[-1]).group(2)))
            return best
        for kind in KINDS:
            base = self.root / kind
            if not base.is_dir():
                continue
            for d in base.iterdir():
                if not d.name.startswith("date="):
                    continue
                for f in os.listdir(d):
                    m = _NAME.match(f)
                    if m and int(m.group(1)) == self.shard:
                        best = max(best, int(m.group(2)))
                    elif f.startswith(f".shard-{self.shard}-") and f.endswith(".tmp"):
                        (d / f).unlink(missing_ok=True)   # left by a crash mid-write
        return best

    def _write_fs(self, kind: str, date: str, table, seq: int) -> str:
        """A file through a pyarrow filesystem: written under its final name (an object
        store's put is atomic: readers see all of it or nothing); a name that exists is
        never overwritten (the next sequence number is taken)."""
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        folder = f"{self._base}/{kind}/date={date}"
        self.fs.create_dir(folder, recursive=True)
        while True:
            final = f"{folder}/shard-{self.shard}-{seq:08d}.parquet"
            if self.fs.get_file_info(final).type == pafs.FileType.NotFound:
                break
            seq = self._take_seq(1)
        pq.write_table(table, final, filesystem=self.fs, compression=self.compression,
                       store_schema=False,
                       use_dictionary=[c for c in table.column_names if c in STRING_COLUMNS])
        return final

    def _write(self, kind: str, day: int, table, seq: int) -> Path | str:
        import pyarrow.parquet as pq

        date = datetime.fromtimestamp(day * 86_400, tz=timezone.utc).strftime("%Y-%m-%d")
        if self.fs is not None:
            return self._write_fs(kind, date, table, seq)
        folder = self.root / kind / f"date={date}"
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            final = folder / f"shard-{self.shard}-{seq:08d}.parquet"
            tmp = folder / f".{final.name}.tmp"
            try:
                # dictionaries for the strings only (hashes and floats would gain nothing
                # and cost half the write time); no Arrow schema: readers get plain strings
                pq.write_table(table, tmp, compression=self.compression, store_schema=False,
                               use_dictionary=[c for c in table.column_names
                                               if c in STRING_COLUMNS])
                try:
                    os.link(tmp, final)       # atomic, and never replaces an existing file
                except FileExistsError:
                    raise
                except OSError:               # no hard links here: rename (still atomic)
                    if final.exists():
                        raise FileExistsError(final) from None
                    os.replace(tmp, final)
                break
            except FileExistsError:           # another writer with this shard index
                seq = self._take_seq(1)
            finally:
                tmp.unlink(missing_ok=True)
        return final

    def _bound_buffer(self) -> None:
        """Drop the oldest unconverted rows beyond 2 * max_rows (counted; lock held)."""
        cap = 2 * self.max_rows
        for kind in KINDS:
            buf = self._buf[kind]
            while self.buffered > cap and buf:
                _, n = buf.popleft()
                self.buffered -= n
                self.counters["dropped"] += n

    def _error(self, e: BaseException) -> None:
        with self._lock:
            self.counters["errors"] += 1
            self.last_error = f"{type(e).__name__}: {e}"[:500]

    # ---------------------------------------------------------------- reporting
    def stats(self) -> dict:
        with self._lock:
            return {**self.counters, "buffered": self.buffered, "last_error": self.last_error,
                    "root": str(self.root)}

    def files(self, kind: str | None = None) -> list[Path] | list[str]:
        """This shard's files (paths; for a URI root, paths within its filesystem)."""
        kinds = KINDS if kind is None else (kind,)
        out = sorted(f for k in kinds for f in archive_files(self.root, k, self.shard))
        return out if self.fs is not None else [Path(f) for f in out]
