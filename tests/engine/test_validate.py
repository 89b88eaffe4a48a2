"""The validate step: row checks in order of precedence, far-future rows, counted rejections."""

from __future__ import annotations

import numpy as np

from kpistream.engine.validate import Rejections, feedback_checks, inference_checks
from kpistream.wire.batch import FeedbackBatch, InferenceBatch

T0 = 1_767_225_600_000


def _inf(i, **kw):
    r = {"event_id": f"i{i}", "request_id": f"r{i}", "ts": T0 + i, "model": "m",
         "model_version": "1", "variant": "primary", "endpoint": "predict", "latency_ms": 5.0,
         "status": "ok", "pred_label": "1"}
    r.update(kw)
    return r


def _fb(i, **kw):
    r = {"event_id": f"f{i}", "request_id": f"r{i}", "ts": T0 + i, "kind": "label", "label": "1"}
    r.update(kw)
    return r


def test_inference_checks_and_precedence():
    b = InferenceBatch.from_records([_inf(0), _inf(1), _inf(2), _inf(3), _inf(4), _inf(5)])
    b.latency_ms[1] = -1.0
    b.latency_ms[2] = np.nan
    b.cost_usd[3] = -2.0
    b.latency_ms[3] = np.inf        # latency comes first
    b.tokens[4] = np.inf
    b.pred_value[5] = np.inf
    invalid, checks = inference_checks(b)
    assert invalid.tolist() == [False, True, True, True, True, True]
    fut = np.zeros(6, dtype=bool)
    fut[0] = True
    r = Rejections(max_future_ms=300_000, max_kept_events=2)
    ok, rej = r.reject("inference", b, invalid, fut, checks)
    assert not ok.any()
    assert [(x.index, x.field, x.reason) for x in rej] == [
        (0, "ts", "future"), (1, "latency_ms", "negative"), (2, "latency_ms", "not_finite"),
        (3, "latency_ms", "not_finite"), (4, "cost.tokens", "negative"),
        (5, "prediction", "not_finite")]
    assert "300000 ms ahead" in rej[0].message and "got -1.0" in rej[1].message
    assert r.rejected[("latency_ms", "not_finite")] == 2 and sum(r.rejected.values()) == 6
    kind, kept, reps = r.events[-1]
    assert kind == "inference" and len(kept) == 6 and reps is rej


def test_nothing_bad_nothing_kept():
    b = InferenceBatch.from_records([_inf(0), _inf(1)])
    invalid, checks = inference_checks(b)
    r = Rejections(1_000)
    ok, rej = r.reject("inference", b, invalid, np.zeros(2, dtype=bool), checks)
    assert ok.all() and rej == [] and not r.rejected and not r.events


def test_feedback_checks():
    b = FeedbackBatch.from_records([
        _fb(0), _fb(1, kind="dwell", label=None, value=-3.0), _fb(2, kind="reward", label=None, value=1.0),
        _fb(3, kind="relevance", label=None, relevance={"a": 1.0, "b": 2.0}),
        _fb(4, kind="relevance", label=None, relevance={"a": 1.0})])
    b.value[2] = np.inf
    b.rel_grades[-1] = -1.0
    invalid, checks = feedback_checks(b)
    assert invalid.tolist() == [False, True, True, False, True]
    r = Rejections(1_000)
    ok, rej = r.reject("feedback", b, invalid, np.zeros(5, dtype=bool), checks)
    assert ok.tolist() == [True, False, False, True, False]
    assert [(x.index, x.field, x.reason) for x in rej] == [
        (1, "value", "negative"), (2, "value", "not_finite"), (4, "value", "bad_value")]
    assert len(r.events[0][1]) == 3
