"""Event time: the largest accepted event time, the watermark, the far-future guard and flush."""

from __future__ import annotations

import numpy as np

from kpistream.clock import Clock
from kpistream.engine.kernels import future_mask

I64_MIN = np.iinfo(np.int64).min
FAR_FUTURE = 1 << 62  # "end of input": later than any event, with room for arithmetic


class Watermark:
    """The largest accepted event time (``max_ts``) and the watermark it gives.

    The watermark is ``max_ts - lateness``.  Inside a batch it is computed per
    event (a running maximum, :meth:`before`), so a batch gives exactly what
    one-event-at-a-time processing gives.
    """

    def __init__(self, lateness_ms: int, max_future_ms: int, clock: Clock | None = None,
                 stream_seed_ms: int | None = None) -> None:
        self.lateness_ms = lateness_ms
        self.max_future_ms = max_future_ms
        self.clock = clock
        self.max_ts = I64_MIN           # largest accepted event time
        self._stream_now: int | None = stream_seed_ms
        self.flushed = False

    @property
    def watermark(self) -> int:
        if self.max_ts == I64_MIN:
            return I64_MIN
        return self.max_ts - self.lateness_ms

    @property
    def emit(self) -> int:
        """The watermark to hand downstream: far in the future once flushed."""
        return FAR_FUTURE if self.flushed else self.watermark

    def observe(self, ts: np.ndarray) -> int:
        """Accepted event times ``ts`` (non-empty) move ``max_ts``; returns the one before."""
        prior = self.max_ts
        self.max_ts = max(self.max_ts, int(ts.max()))
        return prior

    def advance(self, watermark_ms: int) -> None:
        """Move the watermark forward as if an event at ``watermark_ms + lateness`` was seen."""
        self.max_ts = max(self.max_ts, int(watermark_ms) + self.lateness_ms)

    def flush(self) -> None:
        """End of input: every window becomes final."""
        self.flushed = True

    def future_mask(self, ts: np.ndarray, invalid: np.ndarray) -> np.ndarray:
        """Events more than ``max_future`` ahead of the clock.

        With a clock (live): its time.  Without (replay): stream time, the
        largest accepted event time, event by event; it starts from
        ``stream_seed_ms`` (replay passes the median of the input's first
        chunk) or else the first batch's median, so that one bad first event
        cannot become the reference.
        """
        F = self.max_future_ms
        if self.clock is not None:
            return (ts > self.clock.now_ms() + F) & ~invalid
        if self._stream_now is None:
            ok = ts[~invalid]
            self._stream_now = int(np.median(ok)) if len(ok) else None
            if self._stream_now is None:
                return np.zeros(len(ts), dtype=bool)
        out = np.zeros(len(ts), dtype=bool)
        ref = max(self._stream_now, self.max_ts)
        self._stream_now = int(future_mask(ts, invalid, ref, F, out))
        return out

    def before(self, ts: np.ndarray, ok: np.ndarray, prior: int | None = None,
               include_self: bool = False) -> np.ndarray:
        """Per event: the watermark just before it (or just after, ``include_self``).

        Only accepted events (``ok``) move it; ``prior`` is the largest event
        time before the batch (default: ``max_ts``).
        """
        prior = self.max_ts if prior is None else prior
        acc = np.where(ok, ts, I64_MIN)
        run = np.maximum.accumulate(acc) if len(acc) else acc
        prev = np.empty_like(ts)
        if include_self:
            np.maximum(run, prior, out=prev)
        elif len(ts):
            prev[0] = prior
            np.maximum(run[:-1], prior, out=prev[1:])
        wm = prev - self.lateness_ms
        wm[prev == I64_MIN] = I64_MIN
        return wm

    def after(self, ts: np.ndarray, prior: int) -> np.ndarray:
        """Per accepted event of a batch: the watermark just after it (``prior``: before the batch)."""
        return self.before(ts, np.ones(len(ts), dtype=bool), prior=prior, include_self=True)
