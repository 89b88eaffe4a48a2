"""The engine end to end: windows against an oracle, and every edge case with exact counts."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, mean_absolute_error, ndcg_score, precision_recall_fscore_support

from kpistream.windows.aggregate import WindowAggregator, rows_frame
from kpistream.wire.batch import FeedbackBatch, InferenceBatch, hash_ids
from kpistream.clock import ManualClock
from kpistream.spec.metrics import config_from_dict
from kpistream.engine import OTHER, Engine

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
CFG = config_from_dict({"time": {"lateness": "5s", "label_delay": "60s", "max_future": "5m"},
                        "windows": [{"name": "10s", "type": "tumbling", "size": "10s"},
                                    {"name": "1m", "type": "sliding", "size": "60s", "step": "10s"}],
                        "series": {"segments": ["region"]},
                        "metrics": {"ranking": {"k": 5}}})


def inf(i, ts, *, rid=None, pred="1", model="m", version="1", variant="primary", lat=10.0,
        status="ok", region="eu", eid=None, **kw):
    r = {"event_id": eid or f"i-{variant}-{i}", "request_id": rid or f"r{i}", "ts": int(ts),
         "model": model, "model_version": version, "variant": variant, "endpoint": "predict",
         "latency_ms": float(lat), "status": status, "pred_label": pred, "segments": {"region": region}}
    r.update(kw)
    return r


def fb(i, ts, kind="label", *, rid=None, label=None, value=None, relevance=None, eid=None):
    return {"event_id": eid or f"f-{kind}-{i}", "request_id": rid or f"r{i}", "ts": int(ts),
            "kind": kind, "label": label, "value": value, "relevance": relevance}


def run(events, cfg=CFG, batch=10_000, clock=None, engines=None):
    """Feed a mixed list of ('i'|'f', record) in order; return (final rows frame, engine)."""
    eng = Engine(cfg, clock)
    buf, kind = [], None

    def flush_buf():
        if not buf:
            return
        if kind == "i":
            eng.ingest_inference(InferenceBatch.from_records(buf))
        else:
            eng.ingest_feedback(FeedbackBatch.from_records(buf))
        buf.clear()

    for k, rec in events:
        if k != kind or len(buf) >= batch:
            flush_buf()
            kind = k
        buf.append(rec)
    flush_buf()
    eng.flush()
    agg = WindowAggregator(cfg)
    agg.add(eng.collect(), watermark=eng.emit_watermark)
    return rows_frame(agg.pop_final_rows(), cfg.segments), eng


def value(df, metric, window="10s", start=T0, **labels):
    m = (df["metric"] == metric) & (df["window"] == window) & (
        df["window_start"] == pd.Timestamp(start, unit="ms", tz="UTC"))
    for k, v in labels.items():
        m &= df[k] == v
    sel = df[m]
    assert len(sel) == 1, (metric, window, start, labels, len(sel))
    return sel.iloc[0]


# ---------------------------------------------------------------- the oracle test

def _random_stream(seed, n=3000):
    """Classification, regression and ranking traffic with feedback, disorder within lateness."""
    rng = np.random.default_rng(seed)
    ts = T0 + np.sort(rng.integers(0, 150_000, n))
    model = rng.choice(["clf", "reg", "rank"], n, p=[.5, .3, .2])
    region = rng.choice(["eu", "us"], n)
    truth = rng.integers(0, 3, n)
    pred = np.where(rng.random(n) < 0.7, truth, rng.integers(0, 3, n))
    yreg, yhat = rng.normal(5, 2, n), rng.normal(5, 2, n)
    lat = rng.lognormal(3, 0.7, n)
    err = rng.random(n) < 0.05
    events = []
    truth_rows = []
    for i in range(n):
        base = dict(rid=f"q{i}", region=region[i], lat=lat[i], status="error" if err[i] else "ok",
                    cost_usd=float(rng.random() / 1000), tokens=int(rng.integers(1, 100)))
        if model[i] == "clf":
            rec = inf(i, ts[i], model="clf", pred=str(pred[i]), **base)
        elif model[i] == "reg":
            rec = inf(i, ts[i], model="reg", pred=None, pred_value=float(yhat[i]), **base)
        else:
            rank = [f"it{j}" for j in rng.permutation(30)[:8]]
            rec = inf(i, ts[i], model="rank", pred=None, ranking=rank, **base)
        arrival = ts[i] + rng.integers(0, 3000)  # out of order, within the 5 s lateness
        events.append((arrival, 0, "i", rec))
        if rng.random() < 0.8:  # feedback 1-40 s later
            fts = ts[i] + int(rng.integers(1000, 40_000))
            if model[i] == "clf":
                f = fb(i, fts, rid=f"q{i}", label=str(truth[i]))
            elif model[i] == "reg":
                f = fb(i, fts, rid=f"q{i}", value=float(yreg[i]))
            else:
                f = fb(i, fts, "relevance", rid=f"q{i}",
                       relevance={f"it{j}": float(rng.integers(0, 4)) for j in rng.permutation(30)[:5]})
            events.append((fts + rng.integers(0, 2000), 1, "f", f))
            truth_rows.append((i, f))
        if rng.random() < 0.3:
            events.append((ts[i] + 2000, 1, "f", fb(i, ts[i] + 1500, "click", rid=f"q{i}", value=1.0)))
    events.sort(key=lambda e: (e[0], e[1]))
    return [(k, r) for _, _, k, r in events], [r for _, _, k, r in events if k == "i"], truth_rows


def _oracle(infs, truths, window_start, window_end, model, region):
    sel = [r for r in infs if r["model"] == model and r["segments"]["region"] == region
           and window_start <= r["ts"] < window_end]
    fb_by_rid = {f["request_id"]: f for _, f in truths}
    out = {"requests": len(sel), "error_rate": np.mean([r["status"] == "error" for r in sel]),
           "latency_mean": np.mean([r["latency_ms"] for r in sel]),
           "cost_per_1k": 1000 * np.mean([r["cost_usd"] for r in sel]),
           "tokens_mean": np.mean([r["tokens"] for r in sel])}
    lat = np.array([r["latency_ms"] for r in sel])
    out["_lat"] = lat
    pairs = [(r, fb_by_rid[r["request_id"]]) for r in sel if r["request_id"] in fb_by_rid]
    if model == "clf" and pairs:
        yt = [f["label"] for _, f in pairs]
        yp = [r["pred_label"] for r, _ in pairs]
        out["accuracy"] = accuracy_score(yt, yp)
        for avg in ("macro", "weighted"):
            P, R, F, _ = precision_recall_fscore_support(yt, yp, average=avg, zero_division=0)
            out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = P, R, F
        P, R, F, _ = precision_recall_fscore_support(yt, yp, labels=["1"], average=None, zero_division=0)
        out["precision"], out["recall"], out["f1"] = P[0], R[0], F[0]
    if model == "reg" and pairs:
        out["mae"] = mean_absolute_error([f["value"] for _, f in pairs], [r["pred_value"] for r, _ in pairs])
    if model == "rank" and pairs:
        nd = []
        for r, f in pairs:
            rank, rel = r["ranking"][:5], f["relevance"]
            universe = list(dict.fromkeys(r["ranking"] + list(rel)))
            yt = np.array([[rel.get(x, 0.0) for x in universe]])
            ys = np.array([[len(universe) - r["ranking"].index(x) if x in r["ranking"] else -1.0
                            for x in universe]])
            nd.append(ndcg_score(yt, ys, k=5) if yt.sum() > 0 else 0.0)
            del rank
        out["ndcg_at_k"] = np.mean(nd)
    out["label_coverage"] = len(pairs) / len(sel) if sel else None
    return out


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_windows_equal_oracle(seed):
    events, infs, truths = _random_stream(seed)
    df, eng = run(events, batch=257)
    assert eng.counters["late_inference"] == 0 and eng.counters["duplicate_inference"] == 0
    checked = 0
    for wname, size, step in (("10s", 10_000, 10_000), ("1m", 60_000, 10_000)):
        for start in range(T0 - 50_000, T0 + 150_000, step):
            for model in ("clf", "reg", "rank"):
                for region in ("eu", "us"):
                    exp = _oracle(infs, truths, start, start + size, model, region)
                    if not exp["requests"]:
                        continue
                    lab = dict(model=model, region=region)
                    for metric in ("requests", "error_rate", "latency_mean", "cost_per_1k",
                                   "tokens_mean", "accuracy", "precision_macro", "recall_weighted",
                                   "f1_weighted", "precision", "recall", "f1", "mae", "ndcg_at_k",
                                   "label_coverage"):
                        if metric not in exp:
                            continue
                        row = value(df, metric, wname, start, **lab)
                        assert row["value"] == pytest.approx(exp[metric], rel=1e-9), (metric, wname, start, lab)
                        assert not row["provisional"]
                        checked += 1
                    lat = exp["_lat"]
                    for metric, q in (("latency_p50", .5), ("latency_p99", .99)):
                        ex = np.quantile(lat, q, method="lower")
                        got = value(df, metric, wname, start, **lab)["value"]
                        assert abs(got - ex) <= 0.01 * ex + 1e-9, (metric, start)
    assert checked > 500


@pytest.mark.parametrize("batch", [1, 7, 100, 100_000])
def test_batch_size_does_not_change_results(batch):
    events, _, _ = _random_stream(3, n=600)
    ref, _ = run(events, batch=100_000)
    got, _ = run(events, batch=batch)
    pd.testing.assert_frame_equal(ref, got, check_exact=False, rtol=1e-12)


@pytest.mark.slow
def test_shards_merged_equal_one_engine():
    """hash(request_id) % 3 shards, merged by the aggregator == one engine over everything."""
    events, _, _ = _random_stream(4, n=1500)
    ref, _ = run(events)
    shard_of = lambda r: int(hash_ids([r["request_id"]])[0] % np.uint64(3))  # noqa: E731
    agg = WindowAggregator(CFG)
    for s in range(3):
        part = [(k, r) for k, r in events if shard_of(r) == s]
        eng = Engine(CFG)
        for k, r in part:  # one event per call on purpose: order inside a shard is what counts
            (eng.ingest_inference(InferenceBatch.from_records([r])) if k == "i"
             else eng.ingest_feedback(FeedbackBatch.from_records([r])))
        eng.flush()
        agg.add(eng.collect(), source=s, watermark=eng.emit_watermark)
    got = rows_frame(agg.pop_final_rows(), CFG.segments)
    # each shard sees fewer events, so its watermark lags: nothing here is late either way
    pd.testing.assert_frame_equal(ref.drop(columns=[]), got, check_exact=False, rtol=1e-9)


# ---------------------------------------------------------------- edge cases, exact counts

def test_out_of_order_within_lateness_is_accepted():
    ev = [("i", inf(1, T0 + 4000)), ("i", inf(2, T0 + 1000)), ("i", inf(3, T0 + 9999))]
    df, eng = run(ev, batch=1)
    assert eng.counters["late_inference"] == 0
    assert value(df, "requests")["value"] == 3


def test_late_inference_is_counted_and_kept_not_lost():
    ev = [("i", inf(1, T0 + 20_000)), ("i", inf(2, T0 + 14_999)), ("i", inf(3, T0 + 15_000)),
          ("i", inf(4, T0 + 1000, region="us"))]
    df, eng = run(ev, batch=1)
    # watermark after the first event: 20 000 - 5 000 = 15 000
    assert eng.counters["late_inference"] == 2
    assert eng.counters["inference_accepted"] == 2
    assert sum(eng.late_by_series.values()) == 2
    late_ts = sorted(int(t) for _, b in eng.late_events for t in b.ts)
    assert late_ts == [T0 + 1000, T0 + 14_999]
    assert value(df, "requests", start=T0 + 10_000)["value"] == 1  # only 15 000
    # the late events were in the same batch too: same answer
    _, eng2 = run(ev, batch=100)
    assert eng2.counters["late_inference"] == 2


def test_duplicates_count_once():
    ev = [("i", inf(1, T0)), ("i", inf(1, T0)), ("f", fb(1, T0 + 100, label="1")),
          ("i", inf(1, T0)), ("f", fb(1, T0 + 100, label="1")), ("i", inf(2, T0 + 50))]
    df, eng = run(ev, batch=1)
    assert eng.counters["duplicate_inference"] == 2
    assert eng.counters["duplicate_feedback"] == 1
    assert value(df, "requests")["value"] == 2
    row = value(df, "accuracy")
    assert row["value"] == 1.0 and row["labelled"] == 1
    # duplicates inside one batch too
    _, eng2 = run(ev, batch=100)
    assert eng2.counters["duplicate_inference"] == 2


def test_early_feedback_joins_when_the_inference_arrives():
    ev = [("f", fb(1, T0 + 500, label="0")), ("f", fb(2, T0 + 600, label="1")),
          ("i", inf(1, T0 + 100, pred="1")), ("i", inf(2, T0 + 200, pred="1"))]
    df, eng = run(ev, batch=1)
    acc = value(df, "accuracy")
    assert acc["value"] == 0.5 and acc["labelled"] == 2
    assert value(df, "label_coverage")["value"] == 1.0
    assert eng.counters["feedback_unmatched"] == 0


def test_feedback_without_inference_expires_unmatched():
    ev = [("i", inf(1, T0)), ("f", fb(9, T0 + 500, label="1")), ("i", inf(2, T0 + 200_000))]
    _, eng = run(ev, batch=1)
    assert eng.counters["feedback_unmatched"] == 1
    assert eng.counters["inference_expired_unlabelled"] == 2


def test_far_future_is_rejected_and_does_not_move_the_watermark():
    clock = ManualClock(T0 + 10_000)
    ev = [("i", inf(1, T0 + 1000)), ("i", inf(2, T0 + 86_400_000)), ("i", inf(3, T0 + 2000))]
    df, eng = run(ev, batch=1, clock=clock)
    assert eng.counters["late_inference"] == 0
    assert eng.rejected[("ts", "future")] == 1
    assert value(df, "requests")["value"] == 2
    # stream time (no clock, replay): the same
    df, eng = run(ev, batch=100)
    assert eng.rejected[("ts", "future")] == 1 and value(df, "requests")["value"] == 2


def test_feedback_after_the_label_deadline_is_late():
    ev = [("i", inf(1, T0)), ("i", inf(2, T0 + 100_000)),
          ("f", fb(1, T0 + 30_000, label="1"))]  # 30 000 < 95 000 - 60 000
    df, eng = run(ev, batch=1)
    assert eng.counters["late_feedback"] == 1
    assert "accuracy" not in set(df[df["window_start"] == pd.Timestamp(T0, unit="ms", tz="UTC")]["metric"])


def test_label_after_window_end_within_label_delay_still_counts():
    ev = [("i", inf(1, T0, pred="1")), ("i", inf(2, T0 + 50_000)), ("f", fb(1, T0 + 55_000, label="1"))]
    df, eng = run(ev, batch=1)
    assert value(df, "accuracy")["labelled"] == 1


def test_several_feedback_kinds_per_request_all_count_once_each():
    ev = [("i", inf(1, T0)), ("i", inf(2, T0 + 1)),
          ("f", fb(1, T0 + 10, "click", value=1.0)),
          ("f", fb(1, T0 + 20, "click", value=1.0, eid="second-click")),
          ("f", fb(1, T0 + 30, "conversion", value=1.0)),
          ("f", fb(1, T0 + 40, "thumbs", value=1.0)), ("f", fb(2, T0 + 40, "thumbs", value=0.0)),
          ("f", fb(1, T0 + 50, "reward", value=2.0)), ("f", fb(1, T0 + 60, "reward", value=4.0, eid="r2")),
          ("f", fb(1, T0 + 70, "dwell", value=30.0)),
          ("f", fb(1, T0 + 80, label="1")), ("f", fb(1, T0 + 90, label="0", eid="relabel"))]
    df, eng = run(ev, batch=1)
    assert value(df, "ctr")["value"] == 0.5
    assert value(df, "conversion_rate")["value"] == 0.5
    assert value(df, "thumbs_up_rate")["value"] == 0.5
    assert value(df, "reward_mean")["value"] == 3.0 and value(df, "reward_mean")["count"] == 2
    assert value(df, "dwell_mean")["value"] == 30.0
    acc = value(df, "accuracy")
    assert acc["value"] == 1.0 and acc["labelled"] == 1  # the first label counts


def test_primary_and_shadow_share_one_label():
    ev = [("i", inf(1, T0, pred="1")), ("i", inf(1, T0 + 5, pred="0", variant="shadow", version="2")),
          ("f", fb(1, T0 + 100, label="1")),
          ("f", fb(2, T0 + 150, label="0")),  # early, for request 2
          ("i", inf(2, T0 + 110, pred="0")), ("i", inf(2, T0 + 120, pred="0", variant="shadow", version="2"))]
    df, _ = run(ev, batch=1)
    assert value(df, "accuracy", variant="primary")["value"] == 1.0
    assert value(df, "accuracy", variant="shadow")["value"] == 0.5
    assert value(df, "accuracy", variant="shadow")["labelled"] == 2


def test_bad_columnar_rows_are_rejected_with_field_and_reason_and_the_rest_kept():
    b = InferenceBatch.from_records([inf(1, T0), inf(2, T0, lat=-1), inf(3, T0, lat=float("nan")),
                                     inf(4, T0 + 1)])
    eng = Engine(CFG)
    rep = eng.ingest_inference(b)
    assert rep.accepted == 2
    assert [(r.index, r.field, r.reason) for r in rep.rejections] == [
        (1, "latency_ms", "negative"), (2, "latency_ms", "not_finite")]
    assert eng.rejected[("latency_ms", "negative")] == 1


def test_series_cap_sends_overflow_to_other():
    cfg = config_from_dict({"series": {"max_series": 2}})
    ev = [("i", inf(i, T0 + i, model=f"m{i}")) for i in range(5)]
    df, eng = run(ev, cfg=cfg)
    models = set(df["model"])
    assert OTHER in models and len(models) == 3
    assert value(df, "requests", model=OTHER)["value"] == 3
    assert eng.counters["series_overflow"] == 3


def test_pending_capacity_evictions_are_counted():
    cfg = config_from_dict({"join": {"max_pending": 16}})
    ev = [("i", inf(i, T0 + i)) for i in range(40)] + [("f", fb(0, T0 + 100, label="1"))]
    _, eng = run(ev, cfg=cfg, batch=8)
    assert eng.counters["pending_evicted"] >= 24
    assert eng.counters["join_pairs"] == 0  # request 0 was evicted: nothing to join


def test_provisional_values_carry_label_coverage():
    eng = Engine(CFG)
    eng.ingest_inference(InferenceBatch.from_records([inf(1, T0), inf(2, T0 + 1), inf(3, T0 + 2)]))
    eng.ingest_feedback(FeedbackBatch.from_records([fb(1, T0 + 100, label="1")]))
    eng.ingest_inference(InferenceBatch.from_records([inf(4, T0 + 20_000)]))  # closes the pane for ops
    agg = WindowAggregator(CFG)
    agg.add(eng.collect(), watermark=eng.emit_watermark)
    df = rows_frame(agg.current_rows(), CFG.segments)
    acc = value(df, "accuracy")
    assert bool(acc["provisional"]) and acc["labelled"] == 1
    cov = value(df, "label_coverage")
    assert cov["value"] == pytest.approx(1 / 3) and bool(cov["provisional"])
    assert not bool(value(df, "requests")["provisional"])
    # the label arrives, the deadline passes: final
    eng.ingest_feedback(FeedbackBatch.from_records([fb(2, T0 + 200, label="0")]))
    eng.advance(T0 + 10_000 + 60_000)
    agg.add(eng.collect(), watermark=eng.emit_watermark)
    df = rows_frame(agg.pop_final_rows(), CFG.segments)
    row = value(df, "accuracy")
    assert not row["provisional"] and row["labelled"] == 2 and row["value"] == 0.5


def test_count_windows():
    cfg = config_from_dict({"windows": [{"name": "10s", "type": "tumbling", "size": "10s"},
                                        {"name": "n4", "type": "count", "size": 4}]})
    ev = [("i", inf(i, T0 + 1000 * i, pred="1")) for i in range(10)]
    ev += [("f", fb(i, T0 + 1000 * i + 500, label="1" if i % 2 else "0")) for i in range(10)]
    df, _ = run(ev, cfg=cfg, batch=3)
    cw = df[(df["window"] == "n4") & (df["metric"] == "requests")]
    assert cw["value"].tolist() == [4.0, 4.0, 2.0]
    acc = df[(df["window"] == "n4") & (df["metric"] == "accuracy")]["value"].tolist()
    assert acc == [0.5, 0.5, 0.5]
    assert cw["window_start"].iloc[1] == pd.Timestamp(T0 + 4000, unit="ms", tz="UTC")


def test_engine_and_partials_pickle():
    events, _, _ = _random_stream(5, n=300)
    eng = Engine(CFG)
    for k, r in events[:200]:
        (eng.ingest_inference(InferenceBatch.from_records([r])) if k == "i"
         else eng.ingest_feedback(FeedbackBatch.from_records([r])))
    parts = eng.collect()
    back = pickle.loads(pickle.dumps(parts))
    assert [p.state.value() for p in back] == [p.state.value() for p in parts]
    eng2 = pickle.loads(pickle.dumps(eng))
    assert eng2.stats()["counters"] == eng.stats()["counters"]


# ---------------------------------------------------------------- regressions (review findings)

def test_stream_time_follows_a_long_batch():
    """A batch spanning many times max_future is not rejected as future (one pass, not rounds)."""
    cfg = config_from_dict({"time": {"max_future": "1m"},
                            "windows": [{"name": "10s", "type": "tumbling", "size": "10s"}]})
    ev = [("i", inf(i, T0 + 50_000 * i)) for i in range(30)]
    for b in (1, 1000):
        _, eng = run(ev, cfg=cfg, batch=b)
        assert eng.counters["inference_accepted"] == 30 and not eng.rejected


def test_class_vocabularies_are_per_series():
    """A regressor's integer truths or another model's labels never crowd out a classifier's."""
    cfg = config_from_dict({"windows": [{"name": "10s", "type": "tumbling", "size": "10s"}],
                            "metrics": {"classification": {"max_classes": 8}}})
    ev = []
    for i in range(100):
        ev.append(("i", inf(i, T0 + i, model="reg", pred=None, pred_value=float(i) + 0.5)))
        ev.append(("f", fb(i, T0 + 10 + i, label=str(i), value=float(i))))
    for j, (p, t) in enumerate([("cat", "cat"), ("dog", "dog"), ("cat", "dog"), ("dog", "cat")]):
        ev.append(("i", inf(1000 + j, T0 + 500 + j, model="clf", pred=p)))
        ev.append(("f", fb(1000 + j, T0 + 600 + j, label=t)))
    df, eng = run(ev, cfg=cfg, batch=1)
    assert value(df, "accuracy", model="clf")["value"] == 0.5
    assert value(df, "mae", model="reg")["value"] == pytest.approx(0.5)
    assert eng.counters["label_overflow"] == 0


def test_label_overflow_is_per_series_and_counted_per_event():
    cfg = config_from_dict({"windows": [{"name": "10s", "type": "tumbling", "size": "10s"}],
                            "metrics": {"classification": {"max_classes": 3}}})
    ev = [("i", inf(i, T0 + i, pred=f"c{i % 5}")) for i in range(50)]
    df, eng = run(ev, cfg=cfg)
    assert eng._series_labels[0] == ["c0", "c1", OTHER]
    assert eng.counters["label_overflow"] == 30


def test_binary_metrics_depend_only_on_the_window():
    """P/R/F1 of the positive label only where it occurs; another model's "1" changes nothing."""
    animals = [("i", inf(i, T0 + i, model="animals", pred=p)) for i, p in enumerate("ccdd")]
    animals += [("f", fb(i, T0 + 100 + i, label=t)) for i, t in enumerate("cdcd")]
    churn = [("i", inf(10 + i, T0 + i, model="churn", pred="1")) for i in range(3)]
    churn += [("f", fb(10 + i, T0 + 100 + i, label=t)) for i, t in enumerate("101")]
    alone, _ = run(animals)
    both, _ = run(churn + animals)
    a = alone[alone["model"] == "animals"].set_index(["window", "window_start", "metric"])["value"]
    b = both[both["model"] == "animals"].set_index(["window", "window_start", "metric"])["value"]
    pd.testing.assert_series_equal(a, b)
    assert "precision_macro" in set(alone["metric"]) and "precision" not in set(alone["metric"])
    assert value(both, "precision", model="churn")["value"] == pytest.approx(2 / 3)


def test_early_feedback_join_does_not_depend_on_batching():
    ev = [("f", fb(1, T0 + 1000, label="1")),
          ("i", inf(1, T0 + 500, pred="1")), ("i", inf(2, T0 + 70_000, pred="1"))]
    for b in (1, 100):
        df, eng = run(ev, batch=b)
        assert value(df, "accuracy")["value"] == 1.0 and eng.counters["join_pairs"] == 1


def test_feedback_redelivered_at_the_late_boundary_is_a_duplicate():
    f = fb(1, T0 + 1000, "thumbs", value=1.0)
    ev = [("i", inf(1, T0)), ("f", f), ("i", inf(2, T0 + 66_000)), ("f", dict(f))]
    eng = Engine(CFG)
    for k, r in ev:
        (eng.ingest_inference(InferenceBatch.from_records([r])) if k == "i"
         else eng.ingest_feedback(FeedbackBatch.from_records([r])))
        eng.collect()  # expiry runs between every event
    assert eng.counters["duplicate_feedback"] == 1 and eng.counters["late_feedback"] == 0


def test_first_label_is_the_first_to_arrive_whatever_the_table_layout():
    ev = [("f", fb(1, T0 + 100, "click", value=1.0)),
          ("f", fb(1, T0 + 20_000, label="0")),
          ("i", inf(9, T0 + 66_000)),
          ("f", fb(1, T0 + 62_000, label="1", eid="second-label")),
          ("i", inf(1, T0 + 66_000, pred="1"))]
    for collect in (False, True):
        eng = Engine(CFG)
        for k, r in ev:
            (eng.ingest_inference(InferenceBatch.from_records([r])) if k == "i"
             else eng.ingest_feedback(FeedbackBatch.from_records([r])))
            if collect:
                eng.collect()
        eng.flush()
        agg = WindowAggregator(CFG)
        agg.add(eng.collect(), watermark=eng.emit_watermark)
        df = rows_frame(agg.pop_final_rows(), CFG.segments)
        assert value(df, "accuracy", start=T0 + 60_000)["value"] == 0.0


def test_rejected_and_late_rows_do_not_use_up_series():
    cfg = config_from_dict({"series": {"max_series": 2},
                            "windows": [{"name": "10s", "type": "tumbling", "size": "10s"}]})
    clock = ManualClock(T0 + 10_000)
    ev = [("i", inf(1, T0 + 86_400_000, model="broken-clock")), ("i", inf(2, T0 + 5000, model="x")),
          ("i", inf(3, T0 - 60_000, model="late-one")), ("i", inf(4, T0 + 5000, model="good"))]
    df, eng = run(ev, cfg=cfg, batch=1, clock=clock)
    assert [k[0] for k in eng.series_keys] == ["x", "good"]
    assert eng.late_by_series and OTHER not in set(df["model"])


def test_capacity_holds_even_for_a_batch_larger_than_it():
    cfg = config_from_dict({"join": {"max_pending": 16, "max_feedback": 16}})
    eng = Engine(cfg)
    eng.ingest_inference(InferenceBatch.from_records([inf(i, T0 + i) for i in range(40)]))
    eng.ingest_feedback(FeedbackBatch.from_records([fb(i, T0 + 100 + i, "click", value=1.0)
                                                    for i in range(40)]))
    assert len(eng.pending) == 16 and len(eng.fb_store) == 16
    assert eng.counters["pending_evicted"] == 24 and eng.counters["feedback_evicted"] == 24


def test_one_label_coverage_row_per_series_even_with_mixed_tasks():
    ev = [("i", inf(1, T0, pred="1")), ("i", inf(2, T0 + 1, pred=None, ranking=["a", "b"])),
          ("f", fb(1, T0 + 10, label="1"))]
    df, _ = run(ev)
    cov = df[(df["metric"] == "label_coverage") & (df["window"] == "10s")]
    assert len(cov) == 1 and cov["value"].iloc[0] == 0.5


def test_pickled_engine_keeps_class_vocabularies_shared():
    cfg = config_from_dict({"windows": [{"name": "10s", "type": "tumbling", "size": "10s"},
                                        {"name": "n4", "type": "count", "size": 4}]})
    eng = Engine(cfg)
    eng.ingest_inference(InferenceBatch.from_records([inf(0, T0, pred="0")]))
    eng = pickle.loads(pickle.dumps(eng))
    eng.ingest_inference(InferenceBatch.from_records(
        [inf(i, T0 + i, pred=p) for i, p in ((1, "cat"), (2, "dog"), (3, "cat"))]))
    eng.ingest_feedback(FeedbackBatch.from_records(
        [fb(i, T0 + 10 + i, label=t) for i, t in ((0, "0"), (1, "dog"), (2, "dog"), (3, "cat"))]))
    eng.flush()
    agg = WindowAggregator(cfg)
    agg.add(eng.collect(), watermark=eng.emit_watermark)
    df = rows_frame(agg.pop_final_rows(), cfg.segments)
    acc = df[(df["metric"] == "accuracy")]
    assert set(acc["value"]) == {0.75}


def test_aggregator_never_emits_a_window_twice():
    eng_a, eng_b = Engine(CFG), Engine(CFG)
    agg = WindowAggregator(CFG, sources=2)
    eng_a.ingest_inference(InferenceBatch.from_records([inf(1, T0), inf(2, T0 + 30_000)]))
    agg.add(eng_a.collect(), source="a", watermark=eng_a.emit_watermark)
    assert agg.pop_final_rows() == []  # shard b has not reported: nothing is final
    eng_b.ingest_inference(InferenceBatch.from_records([inf(3, T0 + 1), inf(4, T0 + 30_000)]))
    agg.add(eng_b.collect(), source="b", watermark=eng_b.emit_watermark)
    rows = agg.pop_final_rows()
    first = [r for r in rows if r["metric"] == "requests" and r["window"] == "10s"
             and r["window_start"] == T0]
    assert len(first) == 1 and first[0]["value"] == 2.0
    agg.add([], source="c", watermark=T0)  # a newcomer with an old watermark
    assert agg.pop_final_rows() == []
