"""The streaming engine: one shard's data path, validate → watermark → dedup → join → panes → collect.

Each step is a module beside this one; :class:`Engine` runs them in order on
columnar batches (:mod:`kpistream.wire.batch`) and is what a shard runs (and
what ``kpistream replay`` runs alone).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from kpistream.clock import Clock
from kpistream.engine import validate
from kpistream.engine.families import FAMILY_CLASSES
from kpistream.engine.join import Join
from kpistream.engine.pairing import Pairing
from kpistream.engine.panes import Partial, Panes
from kpistream.engine.vocab import OTHER, Vocab
from kpistream.engine.watermark import FAR_FUTURE, I64_MIN, Watermark
from kpistream.errors import Rejection
from kpistream.spec.metrics import EngineConfig
from kpistream.wire.batch import FeedbackBatch, InferenceBatch

__all__ = ["Engine", "Partial", "IngestReport", "FAR_FUTURE", "OTHER"]


@dataclass
class IngestReport:
    accepted: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    late: int = 0
    duplicates: int = 0
    matched_pairs: int = 0

    def as_dict(self) -> dict:
        return {"accepted": self.accepted, "late": self.late, "duplicates": self.duplicates,
                "matched_pairs": self.matched_pairs,
                "rejected": [r.as_dict() for r in self.rejections]}


class Engine:
    """One shard's worth of windowed, joined, mergeable KPI state.

    Per event, in order: invalid (rejected, with field and reason) → far
    future → late → duplicate; nothing is dropped silently: every outcome is
    a counter, late and rejected events are kept (bounded) for output.
    Quality and feedback metrics are attributed to the inference's pane.
    :meth:`collect` hands out cumulative, detached partial states of every
    pane touched since the last call, marking final ones (and forgetting them).
    """

    def __init__(self, config: EngineConfig | None = None, clock: Clock | None = None,
                 max_kept_events: int = 10_000, stream_seed_ms: int | None = None) -> None:
        self.cfg = cfg = config or EngineConfig()
        self.clock = clock
        self.pane_ms = cfg.pane_ms
        self.families = tuple(f for f in FAMILY_CLASSES if f in cfg.families)
        self.counters: Counter = Counter()
        self.late_by_series: Counter = Counter()
        self.late_events: deque = deque(maxlen=max_kept_events)
        # the steps, in data-path order
        self.checks = validate.Rejections(cfg.max_future_ms, max_kept_events)
        self.wm = Watermark(cfg.lateness_ms, cfg.max_future_ms, clock, stream_seed_ms)
        self.vocab = Vocab(cfg, self.counters)
        self.panes = Panes(cfg, self.families, self.vocab)
        self.join = Join(cfg, self.counters, self.vocab, self.panes, self.wm, self.families)
        self.pairing = (Pairing(cfg, self.counters, self.vocab, self.panes, self.wm,
                                self.join.pending) if "paired" in self.families else None)
        self.join.pairing = self.pairing

    # ------------------------------------------------------------- inference
    def ingest_inference(self, batch: InferenceBatch) -> IngestReport:
        rep = IngestReport()
        n = len(batch)
        if n == 0:
            return rep
        c = self.counters
        c["inference_in"] += n
        ts = batch.ts
        # 1. validity, and the far-future guard
        invalid, checks = validate.inference_checks(batch)
        ok, rep.rejections = self.checks.reject("inference", batch, invalid,
                                                self.wm.future_mask(ts, invalid), checks)
        # 2. late: before the watermark as it stood when the event arrived
        late = ok & (ts < self.wm.before(ts, ok))
        ok &= ~late
        # 3. duplicates: the inference table remembers each request's event ids
        # for as long as a re-delivery would not be late
        slots_all, rep.duplicates = self.join.insert_inferences(batch, ok)
        if late.any():
            rep.late = int(late.sum())
            c["late_inference"] += rep.late
            codes, counts = np.unique(batch.series[late], return_counts=True)
            for code, m in zip(codes.tolist(), counts.tolist()):
                self.late_by_series[self.vocab.project(batch.series_keys[code])] += int(m)
            self.late_events.append(("inference", batch.take(late)))
        idx = np.flatnonzero(ok)
        rep.accepted = len(idx)
        c["inference_accepted"] += len(idx)
        if not len(idx):
            return rep
        # 4. the accepted rows in engine codes (series, task, class prediction)
        smap = self.vocab.batch_series(batch, idx)
        if len(idx) == n:
            b, slots = batch, slots_all
        else:
            b, slots = batch.take(idx), slots_all[idx]
        prior_max = self.wm.observe(b.ts)
        series, task, pred = self.vocab.inference_codes(b, smap)
        # 5. operational and denominator updates of the panes, per space
        cw_keys = self.panes.count_keys(series)
        arms = self.pairing.add_arms(b) if self.pairing is not None else None
        self.panes.add_inferences(b, series, task, b.ts - b.ts % self.pane_ms, cw_keys, arms)
        # 6. the join entry, kept for feedback until the pane's label deadline;
        # challengers meet the primary's inference of the same request
        kept, s_ = self.join.store_inferences(b, slots, series, task, pred, cw_keys)
        if self.pairing is not None:
            self.pairing.add_inferences(b, kept, s_, series[kept], prior_max)
        # 7. feedback that came first
        rep.matched_pairs += self.join.meet_early_feedback(b, kept, s_, prior_max)
        self.join.trim_pending()
        return rep

    # -------------------------------------------------------------- feedback
    def ingest_feedback(self, batch: FeedbackBatch) -> IngestReport:
        rep = IngestReport()
        n = len(batch)
        if n == 0:
            return rep
        c = self.counters
        c["feedback_in"] += n
        ts = batch.ts
        # 1. validity, and the far-future guard
        invalid, checks = validate.feedback_checks(batch)
        ok, rep.rejections = self.checks.reject("feedback", batch, invalid,
                                                self.wm.future_mask(ts, invalid), checks)
        # 2. late: after the label delay too
        wm = self.wm.before(ts, ok)
        late = ok & (wm != I64_MIN) & (ts < wm - self.cfg.label_delay_ms)
        ok &= ~late
        # 3. duplicates: the feedback table remembers event ids until a
        # re-delivery would be late
        fslots_all, rep.duplicates = self.join.insert_feedback(batch, ok)
        if late.any():
            rep.late = int(late.sum())
            c["late_feedback"] += rep.late
            self.late_events.append(("feedback", batch.take(late)))
        idx = np.flatnonzero(ok)
        rep.accepted = len(idx)
        c["feedback_accepted"] += len(idx)
        if not len(idx):
            return rep
        b = batch if len(idx) == n else batch.take(idx)
        slots = fslots_all[idx]
        wm = wm[idx]
        self.wm.observe(b.ts)
        label = self.vocab.label_map(b.labels)[b.label]
        # 4. join with the inferences already here, into their panes
        matched, n_pairs = self.join.meet_inferences(b, label, wm)
        rep.matched_pairs += n_pairs
        # 5. keep every feedback for inferences that arrive later
        self.join.store_feedback(b, slots, label, matched)
        return rep

    # ------------------------------------------------------------ collecting
    def advance(self, watermark_ms: int) -> None:
        """Move the watermark forward as if an event at ``watermark_ms + lateness`` was seen.

        The live path calls it from processing time so that idle windows
        close; replay calls ``flush()`` at the end of the input.
        """
        self.wm.advance(watermark_ms)

    def flush(self) -> None:
        """End of input: every window becomes final."""
        self.wm.flush()

    def held_partials(self) -> list[Partial]:
        """Every state held now, as partials (nothing changes: see :meth:`Panes.held`)."""
        return self.panes.held()

    def collect(self) -> list[Partial]:
        """Cumulative partials of the panes touched since the last call; final ones are dropped."""
        wm = self.emit_watermark
        self.join.expire(wm)
        if self.pairing is not None:
            self.pairing.expire(wm)
        return self.panes.collect(wm, self.wm.flushed)

    # ------------------------------------------------------------------ state
    @property
    def watermark(self) -> int:
        return self.wm.watermark

    @property
    def emit_watermark(self) -> int:
        """The watermark to hand downstream: far in the future once flushed."""
        return self.wm.emit

    @property
    def max_ts(self) -> int:
        """The largest accepted event time."""
        return self.wm.max_ts

    @property
    def pending(self):
        return self.join.pending

    @property
    def fb_store(self):
        return self.join.fb_store

    @property
    def pair_tab(self):
        return self.pairing.tab if self.pairing is not None else None

    @property
    def _pair_waiting(self) -> int:
        return self.pairing.waiting if self.pairing is not None else 0

    @property
    def series_keys(self) -> list:
        return self.vocab.series_keys

    @property
    def labels(self) -> list[str]:
        return self.vocab.labels

    @property
    def _series_labels(self) -> list[list[str]]:
        return self.vocab.classes

    def series_labels(self, sid: int) -> dict[str, str]:
        return self.vocab.series_labels(sid)

    @property
    def rejected(self) -> Counter:
        return self.checks.rejected

    @property
    def rejected_events(self) -> deque:
        return self.checks.events

    # --------------------------------------------------------------- reports
    def stats(self) -> dict:
        return {
            "watermark": self.watermark, "max_ts": self.max_ts,
            "series": len(self.series_keys), "labels": len(self.labels),
            "pending": len(self.pending), "feedback_kept": len(self.fb_store),
            "paired_kept": len(self.pair_tab) if self.pair_tab is not None else 0,
            "open_panes": self.panes.open_count(),
            "counters": dict(self.counters),
            "rejected": {f"{f}:{r}": n for (f, r), n in self.rejected.items()},
            "state_bytes": self.state_nbytes(), "table_bytes": self.table_nbytes(),
        }

    def state_nbytes(self, deep: bool = False) -> int:
        """Bytes of metric state held: the arrays' data, or (``deep``) with object overhead."""
        return self.panes.state_nbytes(deep)

    def table_nbytes(self) -> int:
        return self.join.nbytes + (self.pair_tab.nbytes if self.pair_tab is not None else 0)

    def active_series(self) -> int:
        return self.panes.active_series()
