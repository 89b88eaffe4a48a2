"""The synthetic demo stream (records and batches agree, disorder rates) and the per-event baseline."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kpistream.wire.batch import (
    FeedbackBatch, InferenceBatch, canonical_label, concat_feedback, concat_inference)
from kpistream.synthetic import CHURN_PRIMARY, CHURN_SHADOW, ETA, RECS, DemoStream, generate_stream

ROOT = Path(__file__).resolve().parents[2]


def _load_baseline():
    spec = importlib.util.spec_from_file_location("kpistream_bench_baseline", ROOT / "bench" / "baseline.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------
# wire record -> normalized record (the form batch.py documents)

def _normalize(r: dict) -> dict:
    if r["type"] == "inference":
        p = r["prediction"]
        cost = r.get("cost") or {}
        out = {k: r[k] for k in ("event_id", "request_id", "ts", "model", "model_version", "variant")}
        out.update(endpoint=r.get("endpoint") or "", latency_ms=float(r["latency_ms"]),
                   status=r["status"], pred_label=None, pred_score=None, pred_value=None,
                   ranking=None, segments=r.get("segments") or {}, cost_usd=cost.get("usd"),
                   tokens=cost.get("tokens"), features=None)
        if isinstance(p, dict):
            if "ranking" in p:
                out["ranking"] = [str(x) for x in p["ranking"]]
            else:
                out["pred_label"] = canonical_label(p["label"])
                out["pred_score"] = p.get("score")
        elif isinstance(p, float):
            out["pred_value"] = p
        else:
            out["pred_label"] = canonical_label(p)
        return out
    kind, v = r["kind"], r["value"]
    out = {k: r[k] for k in ("event_id", "request_id", "ts", "kind")}
    out.update(label=None, value=None, relevance=None)
    if kind == "relevance":
        out["relevance"] = {str(i): float(g) for i, g in v.items()}
    elif kind == "label" and not isinstance(v, float):
        out["label"] = canonical_label(v)
    else:
        out["value"] = float(v)
    return out


def _with_arrival(s: DemoStream, recs: list[dict]) -> list[dict]:
    return [dict(r, arrival=a) for r, a in zip(recs, s.ev_arrival.tolist())]


def _labels(codes: np.ndarray, vocab: list) -> list:
    return [None if c < 0 else vocab[c] for c in codes.tolist()]


def _assert_same_inference(a: InferenceBatch, b: InferenceBatch) -> None:
    assert len(a) == len(b)
    for c in ("ts", "event_id", "request_id", "latency_ms", "error", "pred_score", "pred_value",
              "cost_usd", "tokens", "rank_offsets", "rank_items"):
        np.testing.assert_array_equal(getattr(a, c), getattr(b, c), err_msg=c)
    assert [a.series_keys[i] for i in a.series] == [b.series_keys[i] for i in b.series]
    assert _labels(a.pred_label, a.labels) == _labels(b.pred_label, b.labels)
    assert a.features is None and b.features is None


def _assert_same_feedback(a: FeedbackBatch, b: FeedbackBatch) -> None:
    assert len(a) == len(b)
    for c in ("ts", "event_id", "request_id", "kind", "value", "rel_offsets", "rel_items",
              "rel_grades"):
        np.testing.assert_array_equal(getattr(a, c), getattr(b, c), err_msg=c)
    assert _labels(a.label, a.labels) == _labels(b.label, b.labels)


@pytest.fixture(scope="module")
def small() -> DemoStream:
    # disorder boosted so that every kind shows up in a small stream
    return generate_stream(20_000, seed=7, duplicate_rate=0.02, late_rate=0.01,
                           early_rate=0.05, future_rate=0.005)


@pytest.mark.parametrize("batch_size", [65536, 5])
def test_records_and_batches_describe_the_same_events(small, batch_size):
    recs = list(small.records())
    assert len(recs) == len(small) == small.n_inference + small.n_feedback
    got = list(small.batches(batch_size))
    assert all(len(b) <= batch_size and len(b) > 0 for _, b in got)
    # the interleaving of types is exactly the arrival order
    assert [r["type"] for r in recs] == [t for t, b in got for _ in range(len(b))]
    # consecutive batches of one type only when the run was cut at batch_size
    for (t1, b1), (t2, _) in zip(got, got[1:]):
        if t1 == t2:
            assert len(b1) == batch_size
    inf = InferenceBatch.from_records([_normalize(r) for r in recs if r["type"] == "inference"])
    fb = FeedbackBatch.from_records([_normalize(r) for r in recs if r["type"] == "feedback"])
    _assert_same_inference(inf, concat_inference([b for t, b in got if t == "inference"]))
    _assert_same_feedback(fb, concat_feedback([b for t, b in got if t == "feedback"]))


def test_unordered_batches_keep_order_within_each_type(small):
    got = list(small.batches(1000, exact_order=False))
    exact = list(small.batches())
    _assert_same_inference(concat_inference([b for t, b in got if t == "inference"]),
                           concat_inference([b for t, b in exact if t == "inference"]))
    _assert_same_feedback(concat_feedback([b for t, b in got if t == "feedback"]),
                          concat_feedback([b for t, b in exact if t == "feedback"]))
    assert len(got) <= 2 * math.ceil(len(small) / 1000)


def test_records_are_wire_json(small, tmp_path):
    recs = list(small.records())
    for r in recs[:2000] + recs[-2000:]:
        assert json.loads(json.dumps(r)) == r
        assert type(r["ts"]) is int
    by_series = {}
    for r in recs:
        if r["type"] == "inference":
            by_series.setdefault((r["model"], r["model_version"], r["variant"]), r)
            assert r["endpoint"] == "predict"
            assert r["segments"]["region"] in ("eu", "us", "apac")
            assert isinstance(r["cost"]["usd"], float) and isinstance(r["cost"]["tokens"], int)
    assert set(by_series) == {("churn", "3", "primary"), ("churn", "4", "shadow"),
                              ("recs", "7", "primary"), ("eta", "2", "primary")}
    assert type(by_series["churn", "3", "primary"]["prediction"]["label"]) is int
    assert 10 <= len(by_series["recs", "7", "primary"]["prediction"]["ranking"]) <= 20
    assert type(by_series["eta", "2", "primary"]["prediction"]) is float
    kinds = Counter((r["kind"], type(r["value"]).__name__) for r in recs if r["type"] == "feedback")
    assert set(kinds) == {("label", "int"), ("label", "float"), ("thumbs", "bool"), ("click", "bool"),
                          ("conversion", "bool"), ("reward", "float"), ("dwell", "float"),
                          ("relevance", "dict")}
    path = tmp_path / "demo.ndjson"
    assert small.to_ndjson(path) == len(small)
    lines = path.read_text().splitlines()
    assert len(lines) == len(small)
    assert json.loads(lines[0]) == recs[0] and json.loads(lines[-1]) == recs[-1]


def test_shadow_scores_the_same_requests(small):
    recs = list(small.records())
    first = {}
    for r in recs:
        if r["type"] == "inference" and r["model"] == "churn":
            first.setdefault((r["request_id"], r["variant"]), r)
    prim = {q: r for (q, v), r in first.items() if v == "primary"}
    shad = {q: r for (q, v), r in first.items() if v == "shadow"}
    assert prim.keys() == shad.keys()
    for q in list(prim)[:3000]:
        p, s = prim[q], shad[q]
        if small.inf_future[int(p["event_id"][1:])] or small.inf_future[int(s["event_id"][1:])]:
            continue
        assert 5 <= s["ts"] - p["ts"] <= 50
        assert p["event_id"] != s["event_id"] and p["segments"] == s["segments"]


@pytest.mark.slow
def test_disorder_counts_match_the_records():
    s = generate_stream(50_000, seed=11)
    recs = list(s.records())
    ids = Counter(r["event_id"] for r in recs)
    assert sum(c - 1 for c in ids.values()) == s.n_duplicates
    future_rows = np.flatnonzero(s.inf_future)
    assert len(future_rows) == s.n_future
    assert {r["event_id"] for r in recs if r["ts"] > s.now_ms} == {f"e{i}" for i in future_rows}
    assert s.now_ms == max(r["ts"] for r in recs if r["ts"] <= s.now_ms)
    late_rows = np.flatnonzero(s.inf_late)
    assert len(late_rows) == s.n_late
    late_ids = {f"e{i}" for i in late_rows}
    assert all(r["arrival"] - r["ts"] >= 180_000 for r in _with_arrival(s, recs)
               if r["event_id"] in late_ids)
    # early feedback: arrives before its request's primary inference
    primary_seen, early, late_req = set(), 0, set()
    for i in np.flatnonzero(s.inf_late):
        late_req.add(f"r{s.inf_req[i]}")
    seen_ids = set()
    for r in recs:
        if r["event_id"] in seen_ids:
            continue
        seen_ids.add(r["event_id"])
        if r["type"] == "inference":
            if r["variant"] == "primary":
                primary_seen.add(r["request_id"])
        elif r["request_id"] not in primary_seen and r["request_id"] not in late_req:
            early += 1
    assert early == s.n_early
    # events are out of order in event time, but mostly only slightly
    ts = np.array([r["ts"] for r in recs])
    inversions = np.count_nonzero(np.diff(ts) < 0)
    assert inversions > 0.01 * len(recs)


@pytest.mark.slow
def test_rates_near_the_requested_fractions():
    s = generate_stream(1_000_000, seed=1)
    n_inf_rows, n_fb_rows = len(s.inf_ts), len(s.fb_ts)
    assert s.n_duplicates / (len(s) - s.n_duplicates) == pytest.approx(0.005, rel=0.1)
    assert s.n_late / n_inf_rows == pytest.approx(0.001, rel=0.15)
    assert s.n_early / n_fb_rows == pytest.approx(0.01, rel=0.15)
    assert s.n_future / n_inf_rows == pytest.approx(0.0001, rel=0.5)
    # traffic mix: 50 / 30 / 20, the shadow mirrors churn
    counts = np.bincount(s.inf_series, minlength=4)
    assert counts[CHURN_PRIMARY] == counts[CHURN_SHADOW]
    assert counts[CHURN_PRIMARY] / 1e6 == pytest.approx(0.5, abs=0.01)
    assert counts[RECS] / 1e6 == pytest.approx(0.3, abs=0.01)
    assert counts[ETA] / 1e6 == pytest.approx(0.2, abs=0.01)
    # latency medians, errors
    for code, med in ((CHURN_PRIMARY, 20), (CHURN_SHADOW, 25), (RECS, 40), (ETA, 8)):
        assert np.median(s.inf_latency[s.inf_series == code]) == pytest.approx(med, rel=0.03)
    assert s.inf_error.mean() == pytest.approx(0.02, rel=0.1)
    # feedback delays within [1 s, 30 s] of the request
    req_ts = s.inf_ts[: s.n_requests].copy()
    fut = s.inf_future[: s.n_requests]
    req_ts[fut] -= 86_400_000
    delay = s.fb_ts - req_ts[s.fb_req]
    assert delay.min() >= 1000 and delay.max() <= 30_000
    # accuracy of the two churn models
    y = np.full(s.n_requests, -1)
    lab = s.fb_kind == 0
    y[s.fb_req[lab & (s.fb_label >= 0)]] = s.fb_label[lab & (s.fb_label >= 0)]
    for code, acc in ((CHURN_PRIMARY, 0.85), (CHURN_SHADOW, 0.87)):
        rows = np.flatnonzero((s.inf_series == code) & (y[s.inf_req] >= 0))
        assert np.mean(s.inf_label[rows] == y[s.inf_req[rows]]) == pytest.approx(acc, abs=0.005)


@pytest.mark.slow
def test_generation_speed(capsys):
    t = time.perf_counter()
    s = generate_stream(1_000_000, seed=2)
    dt = time.perf_counter() - t
    with capsys.disabled():
        print(f"\ngenerate_stream(1_000_000): {len(s):,} events in {dt:.2f} s "
              f"= {len(s) / dt:,.0f} events/s")
    assert len(s) > 2_000_000


def test_empty_and_tiny_streams():
    s = generate_stream(0)
    assert len(s) == 0 and list(s.records()) == [] and list(s.batches()) == []
    s = generate_stream(3, seed=5)
    assert len(list(s.records())) == len(s)


# ---------------------------------------------------------------------------
# the baseline

@pytest.fixture(scope="module")
def baseline_run():
    mod = _load_baseline()
    s = generate_stream(30_000, seed=3)
    res = mod.run_baseline(list(s.records()), now_ms=s.now_ms)
    return s, res


def _agg(frame, window, model, variant, metric):
    d = frame[(frame.window == window) & (frame.model == model) & (frame.variant == variant)
              & (frame.metric == metric)]
    return float((d.value * d["count"]).sum()), int(d["count"].sum()), d


@pytest.mark.slow
def test_baseline_counters(baseline_run):
    s, res = baseline_run
    c = res.counters
    assert res.events == len(s)
    inf_rows = s.ev_row[s.ev_type == 0]
    late_deliveries = int(np.count_nonzero(s.inf_late[inf_rows]))
    future_deliveries = int(np.count_nonzero(s.inf_future[inf_rows]))
    # every delivery of a late inference is late (its repeats too, the late check comes first);
    # a repeat of an inference may itself come after the watermark (rare)
    assert late_deliveries <= c["late"] <= late_deliveries + 3
    assert future_deliveries == c["future"]
    assert c["duplicate"] + (c["late"] - late_deliveries) == s.n_duplicates - (
        late_deliveries - s.n_late) - (future_deliveries - s.n_future)
    assert c["late_feedback"] == 0
    assert c["accepted"] + c["late"] + c["duplicate"] + c["future"] + c["late_feedback"] == len(s)


def test_baseline_values_are_sane(baseline_run):
    s, res = baseline_run
    f = res.frame
    assert list(f.columns) == ["window", "window_start", "window_end", "model", "model_version",
                               "variant", "endpoint", "region", "metric", "value", "count"]
    assert set(f.window) == {"10s", "1m"}
    assert ((f.window_end - f.window_start) == np.where(f.window == "10s", 10_000, 60_000)).all()
    # every inference is in 1 tumbling and 6 sliding windows
    tum = f[(f.window == "10s") & (f.metric == "requests")]["value"].sum()
    sli = f[(f.window == "1m") & (f.metric == "requests")]["value"].sum()
    assert sli == 6 * tum

    def mean(model, variant, metric, window="10s"):
        tot, n, _ = _agg(f, window, model, variant, metric)
        return tot / n

    assert mean("churn", "primary", "accuracy") == pytest.approx(0.85, abs=0.02)
    assert mean("churn", "shadow", "accuracy") == pytest.approx(0.87, abs=0.02)
    assert mean("churn", "primary", "accuracy", "1m") == pytest.approx(0.85, abs=0.02)
    assert 0.5 < mean("churn", "primary", "precision") < 1
    assert 0.5 < mean("churn", "primary", "recall") < 1
    assert mean("churn", "primary", "error_rate") == pytest.approx(0.02, abs=0.006)
    assert mean("churn", "primary", "label_coverage") == pytest.approx(0.70, abs=0.02)
    assert mean("recs", "primary", "label_coverage") == pytest.approx(0.60, abs=0.02)
    assert mean("eta", "primary", "label_coverage") == pytest.approx(0.80, abs=0.02)
    assert mean("churn", "primary", "ctr") == pytest.approx(0.20, abs=0.02)
    assert mean("churn", "shadow", "ctr") == pytest.approx(0.20, abs=0.02)
    assert mean("recs", "primary", "ctr") == pytest.approx(0.25, abs=0.02)
    assert mean("churn", "primary", "conversion_rate") == pytest.approx(0.05, abs=0.01)
    assert mean("churn", "primary", "thumbs_up_rate") == pytest.approx(0.725, abs=0.05)
    assert mean("churn", "primary", "reward_mean") == pytest.approx(0.725, abs=0.03)
    assert mean("churn", "primary", "dwell_mean") == pytest.approx(40, rel=0.1)
    assert 1.0 < mean("eta", "primary", "mae") < 5.0
    assert mean("eta", "primary", "rmse") > mean("eta", "primary", "mae")
    for m in ("precision_at_k", "recall_at_k", "ndcg_at_k", "mrr"):
        assert 0.02 < mean("recs", "primary", m) < 1.0, m
    for variant, model, med in (("primary", "churn", 20), ("shadow", "churn", 25),
                                ("primary", "recs", 40), ("primary", "eta", 8)):
        _, _, d = _agg(f, "1m", model, variant, "latency_p50")
        assert d.value.median() == pytest.approx(med, rel=0.1)
        _, _, d99 = _agg(f, "1m", model, variant, "latency_p99")
        assert (d99.value.to_numpy() > d.value.to_numpy()).all()
    assert mean("churn", "primary", "tokens_mean") == pytest.approx(120, rel=0.05)
    assert mean("churn", "primary", "cost_per_1k") == pytest.approx(1000 * (120 * 2e-6 + 1e-5), rel=0.05)
    assert not f.value.isna().any()


def test_baseline_quality_matches_the_generated_truth(baseline_run):
    """With every label inside the label delay, the windows hold exactly the accepted, labelled inferences."""
    s, res = baseline_run
    f = res.frame
    accepted = ~s.inf_late & ~s.inf_future
    y = np.full(s.n_requests, -1)
    lab = (s.fb_kind == 0) & (s.fb_label >= 0)
    y[s.fb_req[lab]] = s.fb_label[lab]
    for code, variant in ((CHURN_PRIMARY, "primary"), (CHURN_SHADOW, "shadow")):
        rows = np.flatnonzero((s.inf_series == code) & accepted & (y[s.inf_req] >= 0))
        correct = int(np.sum(s.inf_label[rows] == y[s.inf_req[rows]]))
        tot, n, _ = _agg(f, "10s", "churn", variant, "accuracy")
        assert n == len(rows)
        assert round(tot) == correct
        tot6, n6, _ = _agg(f, "1m", "churn", variant, "accuracy")
        assert n6 == 6 * len(rows) and round(tot6) == 6 * correct
    yv = np.full(s.n_requests, np.nan)
    reg = (s.fb_kind == 0) & (s.fb_label < 0)
    yv[s.fb_req[reg]] = s.fb_value[reg]
    rows = np.flatnonzero((s.inf_series == ETA) & accepted & ~np.isnan(yv[s.inf_req]))
    tot, n, _ = _agg(f, "10s", "eta", "primary", "mae")
    assert n == len(rows)
    assert tot == pytest.approx(np.abs(s.inf_value[rows] - yv[s.inf_req[rows]]).sum(), rel=1e-9)
    req = f[(f.window == "10s") & (f.metric == "requests")]
    assert int(req.value.sum()) == int(np.count_nonzero(accepted))
