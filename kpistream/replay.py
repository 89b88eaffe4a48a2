"""Replay: an events file through the same engine as the live path, to tidy windows
(:func:`replay_file`).
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from kpistream.windows.aggregate import WindowAggregator, rows_frame
from kpistream.wire.batch import FeedbackBatch, InferenceBatch
from kpistream.clock import Clock, SystemClock
from kpistream.spec.metrics import EngineConfig
from kpistream.engine import Engine
from kpistream.errors import InputError
from kpistream.wire.schema import parse_payload, validate_rows


#: rejected events the replay report quotes (with their number in the input)
MAX_EXAMPLES = 5


@dataclass
class ReplaySummary:
    events: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    rows: int = 0
    seconds: float = 0.0
    engine: dict = field(default_factory=dict)
    #: the first rejected rows: (event number in the input, 1-based; field; reason; message)
    examples: list = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report: totals (each event counted once), rejections by field and reason
        (schema and stream-time checks together), and the first rejected events."""
        c = self.engine.get("counters", {})
        out = [f"events {self.events:,}: accepted {self.accepted:,}, "
               f"rejected {sum(self.rejected.values()):,}, "
               f"late {c.get('late_inference', 0) + c.get('late_feedback', 0):,}, "
               f"duplicates {c.get('duplicate_inference', 0) + c.get('duplicate_feedback', 0):,}"]
        for (fld, reason), n in self.rejected.most_common(10):
            out.append(f"  rejected {n:,} x {fld or '<row>'}: {reason}")
        for num, fld, reason, msg in self.examples:
            out.append(f"  event {num:,} ({fld or '<row>'}: {reason}): {msg}")
        out.append(f"windows: {self.rows:,} rows in {self.seconds:.2f} s "
                   f"({self.events / max(self.seconds, 1e-9):,.0f} events/s)")
        return out


#: Fields whose type varies by event; Parquet files hold them as JSON text
#: (or as native struct / list values, which pass through).
JSON_FIELDS = ("prediction", "value", "segments", "cost", "features")


def write_events_parquet(records: Iterable[dict], path: str | Path) -> int:
    """Wire events to Parquet, one row per event, varying fields as JSON text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for r in records:
        row = dict(r)
        for k in JSON_FIELDS:
            if k in row:
                row[k] = json.dumps(row[k])
        rows.append(row)
    keys = list(dict.fromkeys(k for r in rows for k in r))  # every field of every row
    table = pa.table({k: [r.get(k) for r in rows] for k in keys})
    pq.write_table(table, path)
    return len(rows)


def _clean(row: Any) -> Any:
    """Drop null fields (Parquet fills absent ones with null)."""
    if isinstance(row, dict):
        return {k: _clean(v) for k, v in row.items() if v is not None}
    return row


def read_event_chunks(path: str | Path, chunk_rows: int = 50_000) -> Iterator[list]:
    """Decoded rows of an events file, in chunks, in file order."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    name = p.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(p)
        except Exception as e:  # pyarrow raises several types here
            raise InputError(f"{p}: not a readable Parquet file: {e}") from None
        for rb in pf.iter_batches(batch_size=chunk_rows):
            rows = [_clean(r) for r in rb.to_pylist()]
            for r in rows:
                for k in JSON_FIELDS:
                    v = r.get(k)
                    if isinstance(v, str):
                        try:
                            r[k] = json.loads(v)
                        except ValueError:
                            pass  # a plain string label
            yield rows
        return
    opener: Callable[..., Any] = gzip.open if name.endswith(".gz") else open
    with opener(p, "rb") as fh:
        head = fh.read(1 << 16)
        first = head.lstrip()[:1]
        if first == b"[" and not name.endswith((".ndjson", ".jsonl", ".ndjson.gz", ".jsonl.gz")):
            data = head + fh.read()
            yield parse_payload(data)
            return
        buf = io.BufferedReader(_Prefixed(head, fh)) if head else fh
        lines: list[bytes] = []
        for line in buf:
            lines.append(line)
            if len(lines) >= chunk_rows:
                yield parse_payload(b"".join(lines))
                lines = []
        if lines:
            yield parse_payload(b"".join(lines))


class _Prefixed(io.RawIOBase):
    """A raw stream that first returns ``head`` and then the rest of ``fh``."""

    def __init__(self, head: bytes, fh: Any) -> None:
        self._head = memoryview(head)
        self._fh = fh

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._fh.read(len(b))
        b[: len(data)] = data
        return len(data)


def iter_runs(result) -> Iterator[tuple[str, list[dict]]]:
    """Runs of consecutive inference / feedback records, in input order."""
    i = j = 0
    inf, fb = result.inference, result.feedback
    ii, fi = result.inference_index, result.feedback_index
    while i < len(inf) or j < len(fb):
        if j >= len(fb) or (i < len(inf) and ii[i] < fi[j]):
            k = i
            while k < len(inf) and (j >= len(fb) or ii[k] < fi[j]):
                k += 1
            yield "inference", inf[i:k]
            i = k
        else:
            k = j
            while k < len(fb) and (i >= len(inf) or fi[k] < ii[i]):
                k += 1
            yield "feedback", fb[j:k]
            j = k


def replay_batches(batches: Iterable[tuple[str, Any]], config: EngineConfig,
                   clock: Clock | None = None, collect_every: int = 16,
                   on_rows: Callable[[list[dict]], None] | None = None,
                   stream_seed_ms: int | None = None,
                   totals: bool = False) -> tuple[list[dict], Engine]:
    """Columnar ``("inference"|"feedback", batch)`` pairs → final tidy rows (dicts).

    ``totals``: also rows with every segment merged (segment value ``*``; see
    :class:`~kpistream.windows.aggregate.WindowAggregator`).

    ``stream_seed_ms`` starts stream time for the far-future guard (see
    :class:`~kpistream.engine.engine.Engine`); :func:`replay_file` passes the median
    event time of the input's first chunk.
    """
    engine = Engine(config, clock, stream_seed_ms=stream_seed_ms)
    agg = WindowAggregator(config, totals=totals)
    rows: list[dict] = []

    def drain() -> None:
        agg.add(engine.collect(), watermark=engine.emit_watermark)
        new = agg.pop_final_rows()
        if on_rows is not None:
            on_rows(new)
        rows.extend(new)

    for n, (kind, b) in enumerate(batches, 1):
        if kind == "inference":
            engine.ingest_inference(b)
        else:
            engine.ingest_feedback(b)
        if n % collect_every == 0:
            drain()
    engine.flush()
    drain()
    return rows, engine


def replay_file(path: str | Path, config: EngineConfig, *, batch_rows: int = 50_000,
                clock: Clock | None = None, progress: Callable[[str], None] | None = None,
                totals: bool = False) -> tuple[pd.DataFrame, ReplaySummary]:
    """An events file → (tidy DataFrame of final windows, summary).

    Input: JSON (one object or an array), NDJSON (``.ndjson`` / ``.jsonl``, also
    gzip-compressed), or Parquet (one row per wire event; nested fields as
    structs or JSON strings).  Rows are validated with the wire schema, kept in
    arrival order (runs of inference and feedback rows go to the engine in the
    order they came), and windowed in event time.  Far-future rows are judged
    against the wall clock (schema) and against stream time (engine).
    ``totals``: also rows with every segment merged (segment value ``*``).
    """
    summary = ReplaySummary()
    t0 = time.perf_counter()
    wall = SystemClock()
    last = [t0]

    chunks = read_event_chunks(path, batch_rows)
    first = next(chunks, [])
    first_res = validate_rows(first, now_ms=wall.now_ms(), max_future_ms=config.max_future_ms)
    seed_ts = [r["ts"] for r in (*first_res.inference, *first_res.feedback)]
    seed = int(np.median(seed_ts)) if seed_ts else None

    def batches() -> Iterator[tuple[str, Any]]:
        for n, chunk in enumerate(itertools.chain([first], chunks)):
            res = first_res if n == 0 else validate_rows(
                chunk, now_ms=wall.now_ms(), max_future_ms=config.max_future_ms)
            for r in res.rejections[:MAX_EXAMPLES - len(summary.examples)]:
                summary.examples.append((summary.events + r.index + 1, r.field, r.reason,
                                         r.message))
            summary.events += len(chunk)
            summary.rejected.update(res.counts())
            for kind, recs in iter_runs(res):
                if kind == "inference":
                    yield kind, InferenceBatch.from_records(recs)
                else:
                    yield kind, FeedbackBatch.from_records(recs)
            now = time.perf_counter()
            if progress is not None and now - last[0] >= 2.0:
                last[0] = now
                progress(f"replay: {summary.events:,} events, "
                         f"{summary.events / (now - t0):,.0f} events/s")

    rows, engine = replay_batches(batches(), config, clock, stream_seed_ms=seed, totals=totals)
    summary.seconds = time.perf_counter() - t0
    summary.engine = engine.stats()
    c = engine.counters
    summary.accepted = c["inference_accepted"] + c["feedback_accepted"]
    for (fld, reason), n in engine.rejected.items():
        summary.rejected[(fld, reason)] += n
    summary.rows = len(rows)
    return rows_frame(rows, config.segments), summary


def check_output(out: str | Path) -> Path:
    """``out`` as a Path if it names a format :func:`write_rows` writes, else InputError
    (checked before a replay, not after it)."""
    out = Path(out)
    if out.suffix == ".parquet" or out.suffix == ".csv" or out.name.endswith(".csv.gz"):
        return out
    raise InputError(f"{out}: output must end in .csv, .csv.gz or .parquet")


def write_rows(df: pd.DataFrame, out: str | Path) -> None:
    out = check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        df.to_parquet(out, index=False)
    else:
        df.to_csv(out, index=False)


def progress_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
