"""The watermark step: per-event watermarks, the far-future guard, advance and flush."""

from __future__ import annotations

import numpy as np
import pytest

from kpistream.clock import ManualClock
from kpistream.engine.watermark import FAR_FUTURE, I64_MIN, Watermark


def _oracle_before(ts, ok, prior, lateness, include_self):
    out, mx = [], prior
    for t, o in zip(ts.tolist(), ok.tolist()):
        if include_self and o:
            mx = max(mx, t)
        out.append(I64_MIN if mx == I64_MIN else mx - lateness)
        if not include_self and o:
            mx = max(mx, t)
    return np.array(out, dtype=np.int64)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("include_self", [False, True])
def test_before_matches_one_event_at_a_time(seed, include_self):
    rng = np.random.default_rng(seed)
    ts = rng.integers(1_000, 100_000, 300).astype(np.int64)
    ok = rng.random(300) < 0.8
    w = Watermark(lateness_ms=5_000, max_future_ms=60_000)
    for prior in (I64_MIN, 50_000):
        w.max_ts = prior
        got = w.before(ts, ok, include_self=include_self)
        assert np.array_equal(got, _oracle_before(ts, ok, prior, 5_000, include_self))
        assert np.array_equal(w.before(ts, ok, prior=7, include_self=include_self),
                              _oracle_before(ts, ok, 7, 5_000, include_self))
    assert np.array_equal(w.after(ts, 3), _oracle_before(ts, np.ones(300, bool), 3, 5_000, True))
    assert len(w.before(ts[:0], ok[:0])) == 0


def test_watermark_observe_advance_flush():
    w = Watermark(lateness_ms=5_000, max_future_ms=60_000)
    assert w.watermark == I64_MIN and w.emit == I64_MIN
    assert w.observe(np.array([10_000, 30_000, 20_000])) == I64_MIN
    assert w.max_ts == 30_000 and w.watermark == 25_000
    assert w.observe(np.array([12_000])) == 30_000 and w.max_ts == 30_000
    w.advance(40_000)
    assert w.max_ts == 45_000 and w.watermark == 40_000
    w.advance(1_000)            # never backwards
    assert w.watermark == 40_000
    assert w.emit == 40_000 and not w.flushed
    w.flush()
    assert w.emit == FAR_FUTURE and w.watermark == 40_000


def test_future_mask_with_a_clock():
    clock = ManualClock(1_000_000)
    w = Watermark(lateness_ms=0, max_future_ms=1_000, clock=clock)
    ts = np.array([1_000_500, 1_001_000, 1_001_001, 5_000_000], dtype=np.int64)
    invalid = np.array([False, False, False, True])
    assert w.future_mask(ts, invalid).tolist() == [False, False, True, False]


def _oracle_future(ts, invalid, ref, F):
    out = []
    for t, bad in zip(ts.tolist(), invalid.tolist()):
        if bad:
            out.append(False)
            continue
        out.append(t > ref + F)
        if not out[-1]:
            ref = max(ref, t)
    return out, ref


def test_future_mask_in_stream_time():
    # seeded: the reference is the seed, then the largest accepted event time
    w = Watermark(lateness_ms=0, max_future_ms=100, stream_seed_ms=1_000)
    ts = np.array([1_050, 1_200, 1_090, 1_180, 1_500, 1_281], dtype=np.int64)
    invalid = np.zeros(len(ts), dtype=bool)
    exp, _ = _oracle_future(ts, invalid, 1_000, 100)
    assert w.future_mask(ts, invalid).tolist() == exp
    # unseeded: the first batch's median of the valid rows; a bad first event is no reference
    w = Watermark(lateness_ms=0, max_future_ms=100)
    ts = np.array([9_999_999, 1_000, 1_010, 1_020], dtype=np.int64)
    got = w.future_mask(ts, np.zeros(4, dtype=bool))
    assert got.tolist() == [True, False, False, False]
    # no valid row at all: nothing flagged, no reference yet
    w = Watermark(lateness_ms=0, max_future_ms=100)
    assert not w.future_mask(ts, np.ones(4, dtype=bool)).any() and w._stream_now is None
    # max_ts moves the reference too
    w = Watermark(lateness_ms=0, max_future_ms=100, stream_seed_ms=0)
    w.max_ts = 5_000
    assert w.future_mask(np.array([5_050, 5_200]), np.zeros(2, dtype=bool)).tolist() == [False, True]
