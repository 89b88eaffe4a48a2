"""Row checks: invalid or far-future rows become counted rejections (field, reason, message)."""

from __future__ import annotations

from collections import Counter, deque

import numpy as np

from kpistream.errors import Rejection
from kpistream.wire.batch import KIND_DWELL, FeedbackBatch, InferenceBatch


def inference_checks(batch: InferenceBatch) -> tuple[np.ndarray, list]:
    """The invalid rows of an inference batch and the checks that say why.

    Columns from trusted builders still get checked.
    """
    lat = batch.latency_ms
    bad_lat = ~np.isfinite(lat) | (lat < 0)
    bad_cost = (batch.cost_usd < 0) | np.isinf(batch.cost_usd)
    bad_tok = (batch.tokens < 0) | np.isinf(batch.tokens)
    bad_val = np.isinf(batch.pred_value) | np.isinf(batch.pred_score)
    invalid = bad_lat | bad_cost | bad_tok | bad_val
    return invalid, [
        (bad_lat, "latency_ms", lambda i: "negative" if lat[i] < 0 else "not_finite",
         lambda i: f"latency_ms must be a finite number >= 0, got {lat[i]}"),
        (bad_cost, "cost.usd", "negative", "cost.usd must be finite and >= 0"),
        (bad_tok, "cost.tokens", "negative", "cost.tokens must be >= 0"),
        (bad_val, "prediction", "not_finite", "prediction must be finite")]


def feedback_checks(batch: FeedbackBatch) -> tuple[np.ndarray, list]:
    """The invalid rows of a feedback batch and the checks that say why."""
    n = len(batch)
    v = batch.value
    bad_val = np.isinf(v) | ((batch.kind == KIND_DWELL) & (v < 0))
    bad_grade = np.zeros(n, dtype=bool)
    if len(batch.rel_grades):
        g_bad = ~np.isfinite(batch.rel_grades) | (batch.rel_grades < 0)
        if g_bad.any():
            owner = np.repeat(np.arange(n), np.diff(batch.rel_offsets))
            bad_grade[owner[g_bad]] = True
    invalid = bad_val | bad_grade
    return invalid, [
        (bad_val, "value", lambda i: "not_finite" if np.isinf(v[i]) else "negative",
         lambda i: f"value must be finite (and >= 0 for dwell), got {v[i]}"),
        (bad_grade, "value", "bad_value", "relevance grades must be finite and >= 0")]


class Rejections:
    """Counts rejected rows by (field, reason) and keeps the last rejected batches."""

    def __init__(self, max_future_ms: int, max_kept_events: int = 10_000) -> None:
        self.max_future_ms = max_future_ms
        self.rejected: Counter = Counter()            # (field, reason) -> n
        self.events: deque = deque(maxlen=max_kept_events)

    def reject(self, kind: str, batch, invalid: np.ndarray, fut: np.ndarray,
               checks: list) -> tuple[np.ndarray, list[Rejection]]:
        """Rows failing a check, or too far in the future (``fut``), become counted rejections.

        ``checks``: ``(mask, field, reason, message)`` in order of precedence;
        reason and message are strings or functions of the row index.
        Returns the mask of the rows that go on, and the rejections.
        """
        rejections: list[Rejection] = []
        ts = batch.ts
        bad = invalid | fut
        if bad.any():
            for i in np.flatnonzero(bad).tolist():
                for mask, field, reason, message in checks:
                    if mask[i]:
                        r = Rejection(i, field, reason(i) if callable(reason) else reason,
                                      message(i) if callable(message) else message)
                        break
                else:
                    r = Rejection(i, "ts", "future", f"ts {int(ts[i])} is more than "
                                  f"{self.max_future_ms} ms ahead of the clock")
                rejections.append(r)
                self.rejected[(r.field, r.reason)] += 1
            self.events.append((kind, batch.take(bad), rejections))
        return ~bad, rejections
