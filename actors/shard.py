"""The shard (:class:`Shard`): one engine over the events whose ``hash(request_id) % N`` is its
index.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Mapping, Sequence

from kpistream.wire.batch import FeedbackBatch, InferenceBatch
from kpistream.clock import Clock, SystemClock
from kpistream.spec.metrics import EngineConfig, config_from_dict
from kpistream.engine import Engine, Partial
from kpistream.wire.schema import validate_rows


class Shard:
    """One engine over one shard of the requests.

    A plain class (no Ray import): :mod:`actors.remote` makes it a Ray actor, and
    tests drive it directly.  An inference, its feedback and the shadow's
    prediction for the same request all arrive at the same shard, so the join
    needs no shuffle.

    Live, event time and processing time meet here: when no event has arrived
    for ``lateness`` (processing time, an idle source), :meth:`Shard.collect`
    moves the watermark to ``now - lateness`` so that windows close when
    traffic stops; while events flow, event time alone drives it.  It returns
    the cumulative partial states of every pane touched since the last call,
    for the publisher to merge.

    With ``archive_dir`` every batch the engine accepted rows of is also kept
    for the raw event archive (:class:`actors.archive.EventArchive`: Parquet
    under ``archive_dir``); ``collect`` writes the files by size or age.
    """

    def __init__(self, index: int, config: EngineConfig | Mapping[str, Any] | None = None,
                 clock: Clock | None = None, processing_time_watermark: bool = True,
                 archive_dir: str | None = None, archive_options: Mapping[str, Any] | None = None,
                 ) -> None:
        if isinstance(config, Mapping):
            config = config_from_dict(config)
        self.index = index
        self.cfg = config or EngineConfig()
        self.clock = clock or SystemClock()
        self.engine = Engine(self.cfg, self.clock)
        self.processing_time_watermark = processing_time_watermark
        self.batches = Counter()
        self.busy_s = 0.0
        self.last_event_ms = self.clock.now_ms()
        self.emitters: dict[str, tuple[dict, int]] = {}
        self.archive = None
        if archive_dir:
            from actors.archive import EventArchive

            self.archive = EventArchive(archive_dir, index, clock=self.clock,
                                        **{"background": True, **(archive_options or {})})

    # ------------------------------------------------------------------ input
    def ingest_inference(self, batch: InferenceBatch) -> dict:
        t0 = time.perf_counter()
        rep = self.engine.ingest_inference(batch)
        if self.archive is not None and rep.accepted:
            self.archive.append("inference", batch)
        self.busy_s += time.perf_counter() - t0
        self.last_event_ms = self.clock.now_ms()
        self.batches["inference"] += 1
        return rep.as_dict()

    def ingest_feedback(self, batch: FeedbackBatch) -> dict:
        t0 = time.perf_counter()
        rep = self.engine.ingest_feedback(batch)
        if self.archive is not None and rep.accepted:
            self.archive.append("feedback", batch)
        self.busy_s += time.perf_counter() - t0
        self.last_event_ms = self.clock.now_ms()
        self.batches["feedback"] += 1
        return rep.as_dict()

    def ingest(self, batches: Sequence[tuple[str, Any]]) -> list[dict]:
        """Several ``("inference"|"feedback", batch)`` in one call (one actor round trip)."""
        return [self.ingest_inference(b) if k == "inference" else self.ingest_feedback(b)
                for k, b in batches]

    def ingest_rows(self, rows: list, expect: str | None = None) -> dict:
        """Wire rows (decoded JSON): validated here, then ingested in arrival order."""
        from kpistream.replay import iter_runs

        res = validate_rows(rows, now_ms=self.clock.now_ms(), max_future_ms=self.cfg.max_future_ms,
                            expect=expect)
        self.count_rejected(res.tally())
        out = {"accepted": 0, "rejected": [r.as_dict() for r in res.rejections]}
        for kind, recs in iter_runs(res):
            if kind == "inference":
                rep = self.ingest_inference(InferenceBatch.from_records(recs))
            else:
                rep = self.ingest_feedback(FeedbackBatch.from_records(recs))
            out["accepted"] += rep["accepted"]
        return out

    def count_rejected(self, tally: Sequence[tuple[str, str, str]]) -> None:
        """Rows refused before they reached the engine (wire validation here or in an HTTP
        replica): ``(type, field, reason)`` each (:meth:`ValidationResult.tally`).  Counted
        as received (by type; ``unknown`` when the row had none) and as rejected, like
        the rows the engine refuses itself."""
        for typ, fld, reason in tally:
            self.engine.counters[f"{typ}_in"] += 1
            self.engine.rejected[(fld, reason)] += 1

    # ----------------------------------------------------------------- output
    def collect(self) -> tuple[list[Partial], int, dict]:
        """(partials since the last call, watermark, stats) for the publisher."""
        t0 = time.perf_counter()
        now = self.clock.now_ms()
        if self.processing_time_watermark and now - self.last_event_ms >= self.cfg.lateness_ms:
            self.engine.advance(now - self.cfg.lateness_ms)
        parts = self.engine.collect()
        if self.archive is not None:
            self.archive.maybe_flush()
        self.busy_s += time.perf_counter() - t0
        return parts, self.engine.emit_watermark, self.stats()

    def flush(self) -> tuple[list[Partial], int, dict]:
        """End of input (tests, shutdown): every window becomes final."""
        self.engine.flush()
        if self.archive is not None:
            self.archive.flush()
        return self.collect()

    def stats(self) -> dict:
        st = self.engine.stats()
        st["shard"] = self.index
        st["batches"] = dict(self.batches)
        st["busy_s"] = self.busy_s
        st["late_by_series"] = {"|".join(k[:4]): n for k, n in self.engine.late_by_series.items()}
        # replicas silent for 10 minutes are gone (restarted or scaled down)
        now = self.clock.now_ms()
        for k in [k for k, (_, t) in self.emitters.items() if now - t > 600_000]:
            del self.emitters[k]
        st["emitters"] = {k: v for k, (v, _) in self.emitters.items()}
        if self.archive is not None:
            st["archive"] = self.archive.stats()
        return st

    def report_emitter(self, emitter: str, stats: dict) -> None:
        """A monitored replica's own counters (buffer drops, send errors), for /metrics."""
        self.emitters[emitter] = (dict(stats), self.clock.now_ms())

    def ping(self) -> int:
        return self.index
