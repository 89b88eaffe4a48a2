"""Family ``paired``: every field of summary() against a numpy/pandas oracle on the same
random events; batching, sharding and pickling change nothing; bounds are counted."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pandas as pd
import pytest

from kpistream.windows.aggregate import WindowAggregator, rows_frame
from kpistream.wire.batch import FeedbackBatch, InferenceBatch, hash_ids
from kpistream.spec.metrics import config_from_dict
from kpistream.engine import Engine
from kpistream.engine.paired import (PairedState, comparison, empty_summary, merge_summaries,
                              MIN_LATENCY_MS)

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
PANE = 10_000
CFG = config_from_dict({"time": {"lateness": "5s", "label_delay": "60s", "max_future": "5m"},
                        "windows": [{"name": "10s", "type": "tumbling", "size": "10s"}],
                        "series": {"segments": ["region"]}})
VERSION = {"primary": "1", "shadow": "2", "canary": "3"}


def inf(eid, rid, ts, model, variant, *, lat=10.0, err=False, region="eu", pred=None,
        pred_value=None, ranking=None):
    return {"event_id": eid, "request_id": rid, "ts": int(ts), "model": model,
            "model_version": VERSION.get(variant, "9"), "variant": variant, "endpoint": "predict",
            "latency_ms": float(lat), "status": "error" if err else "ok", "pred_label": pred,
            "pred_value": pred_value, "ranking": ranking, "segments": {"region": region}}


def fb(eid, rid, ts, kind="label", *, label=None, value=None, relevance=None):
    return {"event_id": eid, "request_id": rid, "ts": int(ts), "kind": kind, "label": label,
            "value": value, "relevance": relevance}


# ------------------------------------------------------------------ the stream

def random_stream(seed: int, n: int = 1200):
    """(arrival-ordered [(kind, record)], {event_id: arrival index}).

    Classification, regression and ranking models; the primary answers most
    requests, a shadow answers 60 % of them (5 ms - 3 s later, sometimes
    arriving first), a canary answers requests of its own; now and then the
    primary answers twice; labels arrive before or after either inference,
    some twice (the first counts); rewards; duplicates; late events.
    """
    rng = np.random.default_rng(seed)
    t = T0 + np.sort(rng.integers(0, 150_000, n))
    model = rng.choice(["clf", "reg", "rk"], n, p=[.5, .3, .2])
    region = rng.choice(["eu", "us"], n)
    truth = rng.integers(0, 3, n)
    yreg = rng.normal(5, 2, n)
    ev = []  # (arrival, tiebreak, kind, record)

    def emit(arr, kind, rec):
        ev.append((float(arr), float(rng.random()), kind, rec))

    def pred_of(i, m, variant):
        good = 0.75 if variant == "primary" else 0.6
        if m == "clf":
            return {"pred": str(truth[i] if rng.random() < good else rng.integers(0, 3))}
        if m == "reg":
            return {"pred_value": float(yreg[i] + rng.normal(0, 1 if variant == "primary" else 1.5))}
        return {"ranking": [f"it{j}" for j in rng.permutation(20)[:5]]}

    for i in range(n):
        rid, m, reg = f"q{i}", model[i], region[i]
        canary = rng.random() < 0.1
        variants = []
        if canary:
            variants.append(("canary", 0))
        else:
            if rng.random() < 0.97:
                variants.append(("primary", 0))
            if rng.random() < 0.6:
                variants.append(("shadow", int(rng.integers(5, 3000))))
            if rng.random() < 0.05:
                variants.append(("primary", int(rng.integers(0, 2000))))   # a retry
        for k, (v, dt) in enumerate(variants):
            lat = 0.0 if rng.random() < 0.02 else float(rng.lognormal(3, 0.6))
            rec = inf(f"i{i}-{k}", rid, t[i] + dt, m, v, lat=lat, err=bool(rng.random() < 0.1),
                      region=reg, **pred_of(i, m, v))
            arr = t[i] + dt + rng.integers(0, 3000)
            emit(arr, "i", rec)
            if rng.random() < 0.03:
                emit(arr + rng.integers(1, 2000), "i", dict(rec))     # duplicate delivery
        if rng.random() < 0.8:
            lts = t[i] + int(rng.integers(0, 30_000))
            arr = lts + (0 if rng.random() < 0.3 else rng.integers(0, 2000))
            if m == "clf":
                f = fb(f"l{i}", rid, lts, label=str(truth[i]))
            elif m == "reg":
                f = fb(f"l{i}", rid, lts, value=float(yreg[i]))
            else:
                f = fb(f"l{i}", rid, lts, "relevance",
                       relevance={f"it{j}": 1.0 for j in rng.permutation(20)[:4]})
            emit(arr, "f", f)
            if rng.random() < 0.03:
                emit(arr + 500, "f", dict(f))
            if rng.random() < 0.05 and m != "rk":   # a second label: ignored
                f2 = fb(f"l{i}b", rid, lts + 1000, label="2" if m == "clf" else None,
                        value=None if m == "clf" else 0.0)
                emit(arr + 1500, "f", f2)
        for k in range(int(rng.integers(0, 3)) if rng.random() < 0.3 else 0):
            rts = t[i] + int(rng.integers(0, 20_000))
            emit(rts + rng.integers(0, 1000), "f", fb(f"r{i}-{k}", rid, rts, "reward",
                                                       value=float(rng.normal(1, 0.5))))
    # late events: far behind the stream when they arrive
    for j in range(8):
        i = int(rng.integers(200, n))
        emit(t[i] + 10, "i", inf(f"late{j}", f"q{i}", t[i] - 60_000, model[i], "shadow",
                                 region=region[i], **pred_of(i, model[i], "shadow")))
    ev.sort(key=lambda e: (e[0], e[1]))
    return [(k, r) for _, _, k, r in ev]


# ------------------------------------------------------------------ the oracle

def _series(r):
    return (r["model"], r["model_version"], r["variant"], r["endpoint"],
            (("region", r["segments"]["region"]),))


def oracle(events, cfg=CFG) -> dict:
    """{(pane start, series key): summary} computed with pandas, event by event rules:
    lateness from the running watermark, dedup by event id, each inference's first
    label, every reward, the pairing rule."""
    lateness, delay = cfg.lateness_ms, cfg.label_delay_ms
    max_ts = None
    seen: set = set()
    infs, fbs = [], []
    for arrival, (kind, r) in enumerate(events):
        wm = None if max_ts is None else max_ts - lateness
        ts = r["ts"]
        late = wm is not None and (ts < wm if kind == "i" else ts < wm - delay)
        if late:
            continue
        max_ts = ts if max_ts is None else max(max_ts, ts)
        if (r["request_id"], r["event_id"]) in seen:
            continue
        seen.add((r["request_id"], r["event_id"]))
        (infs if kind == "i" else fbs).append(dict(r, arrival=arrival))
    I = pd.DataFrame(infs)
    F = pd.DataFrame(fbs) if fbs else pd.DataFrame(columns=["request_id", "kind", "arrival"])
    I["series"] = [_series(r) for r in infs]
    I["pane"] = I["ts"] - I["ts"] % PANE
    I["role"] = np.where(I["variant"] == "primary", "primary", "challenger")
    I["task"] = np.select([I["pred_label"].notna(), I["pred_value"].notna()], ["cls", "reg"], "rank")
    I["ll"] = np.log(np.maximum(I["latency_ms"], MIN_LATENCY_MS))
    I["hash"] = hash_ids(I["event_id"].to_numpy(dtype=object))
    # each inference's first label: the request's first (in arrival) label of its kind
    labels = F[F["kind"] == "label"].sort_values("arrival").drop_duplicates("request_id")
    labels = labels.rename(columns={"label": "true_label", "value": "true_value"})
    lab = I.merge(labels[["request_id", "true_label", "true_value"]], on="request_id", how="left")
    I["correct"] = np.where((lab["task"] == "cls") & lab["true_label"].notna(),
                            (lab["pred_label"] == lab["true_label"]).astype(float), np.nan)
    I["abs_error"] = np.where((lab["task"] == "reg") & lab["true_value"].notna(),
                              (lab["pred_value"] - lab["true_value"]).abs(), np.nan)
    I["labelled"] = I["correct"].notna() | I["abs_error"].notna()
    rewards = F[F["kind"] == "reward"]
    out: dict = {}

    def get(pane, series):
        return out.setdefault((int(pane), series), empty_summary())

    for r in I.itertuples():
        arm = get(r.pane, r.series)["arms"][r.role]
        arm["requests"] += 1
        arm["errors"] += int(r.status == "error")
        arm["log_latency"] = [arm["log_latency"][0] + 1, arm["log_latency"][1] + r.ll,
                              arm["log_latency"][2] + r.ll ** 2]
        arm["labelled"] += int(r.labelled)
        if not math.isnan(r.correct):
            arm["correct"] += int(r.correct)
        if not math.isnan(r.abs_error):
            a = arm["abs_error"]
            arm["abs_error"] = [a[0] + 1, a[1] + r.abs_error, a[2] + r.abs_error ** 2]
        for v in rewards[rewards["request_id"] == r.request_id]["value"]:
            a = arm["reward"]
            arm["reward"] = [a[0] + 1, a[1] + v, a[2] + v * v]
    # pairs: each challenger inference with one primary of the same request and model
    prim = I[I["role"] == "primary"]
    for c in I[I["role"] == "challenger"].itertuples():
        cand = prim[(prim["request_id"] == c.request_id) & (prim["model"] == c.model)]
        if not len(cand):
            continue
        before = cand[cand["arrival"] < c.arrival]
        p = (before.sort_values("hash").iloc[0] if len(before)
             else cand.sort_values("arrival").iloc[0])
        pr = get(p["pane"], c.series)["paired"]
        pr["requests"] += 1
        pr["error"][f"n{int(p['status'] == 'error')}{int(c.status == 'error')}"] += 1
        d = c.ll - p["ll"]
        pr["log_latency"] = [pr["log_latency"][0] + 1, pr["log_latency"][1] + d,
                             pr["log_latency"][2] + d * d]
        if p["labelled"] and c.labelled:
            pr["labelled"] += 1
            if p["task"] == "cls" and c.task == "cls":
                pr["correct"][f"n{int(p['correct'])}{int(c.correct)}"] += 1
            if p["task"] == "reg" and c.task == "reg":
                d = c.abs_error - p["abs_error"]
                a = pr["abs_error"]
                pr["abs_error"] = [a[0] + 1, a[1] + d, a[2] + d * d]
    return out


# ------------------------------------------------------------------ running the engine

def feed(eng: Engine, events, rng=None, sizes=(1, 3, 17, 64, 300), sink=None) -> list:
    """Events in order, in batches of random sizes (each batch one kind), collecting
    now and then; returns the partials collected (and extends ``sink``)."""
    sink = [] if sink is None else sink
    rng = rng or np.random.default_rng(0)
    i = 0
    while i < len(events):
        size = int(rng.choice(sizes))
        kind = events[i][0]
        j = i
        while j < len(events) and j - i < size and events[j][0] == kind:
            j += 1
        recs = [r for _, r in events[i:j]]
        if kind == "i":
            eng.ingest_inference(InferenceBatch.from_records(recs))
        else:
            eng.ingest_feedback(FeedbackBatch.from_records(recs))
        if rng.random() < 0.2:
            sink.extend(eng.collect())
        i = j
    return sink


def final_states(partials) -> dict:
    """{(pane, series): PairedState}: the last (cumulative) paired state of each pane."""
    out = {}
    for p in partials:
        if p.family == "paired" and p.space == "time":
            out[(p.key, p.series)] = p.state
    return out


def run_engine(events, cfg=CFG, seed=0, sizes=(1, 3, 17, 64, 300)):
    eng = Engine(cfg)
    parts = feed(eng, events, np.random.default_rng(seed), sizes)
    eng.flush()
    parts += eng.collect()
    return final_states(parts), eng


def assert_summary_equal(got: dict, exp: dict, where=""):
    assert got.keys() == exp.keys(), where
    for k in exp:
        a, b = got[k], exp[k]
        if isinstance(b, dict):
            assert_summary_equal(a, b, f"{where}.{k}")
        elif isinstance(b, list):
            assert a[0] == b[0] and isinstance(a[0], int), (where, k, a, b)
            assert a[1:] == pytest.approx(b[1:], rel=1e-9, abs=1e-9), (where, k, a, b)
        else:
            assert a == b and isinstance(a, int), (where, k, a, b)


def assert_states_match(states: dict, exp: dict):
    assert set(states) == set(exp)
    for key, summ in exp.items():
        assert_summary_equal(states[key].summary(), summ, str(key))


# ------------------------------------------------------------------ tests

@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summary_equals_oracle(seed):
    events = random_stream(seed)
    states, eng = run_engine(events, seed=seed)
    exp = oracle(events)
    assert_states_match(states, exp)
    c = eng.counters
    # the stream has everything the test is about
    tot = merge_summaries(exp.values())
    assert tot["paired"]["requests"] > 300 and tot["paired"]["labelled"] > 150
    assert min(tot["paired"]["correct"].values()) > 5 and tot["paired"]["abs_error"][0] > 20
    assert tot["arms"]["challenger"]["reward"][0] > 10
    assert c["late_inference"] >= 5 and c["duplicate_inference"] > 5
    assert c["paired_requests"] == tot["paired"]["requests"]
    assert c["paired_labelled"] == tot["paired"]["labelled"]
    assert c["paired_unmatched"] > 0          # shadows of requests the primary never answered
    assert eng.stats()["paired_kept"] == 0    # flushed: every record expired


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [(1,), (2, 5), (1000,)])
def test_batch_sizes_do_not_change_the_states(sizes):
    events = random_stream(3, n=500)
    ref, _ = run_engine(events, sizes=(7,))
    got, _ = run_engine(events, sizes=sizes)
    assert set(got) == set(ref)
    for k in ref:
        assert_summary_equal(got[k].summary(), ref[k].summary(), str(k))


@pytest.mark.slow
def test_three_engines_merged_equal_one_engine_and_the_oracle():
    events = random_stream(4)
    one, _ = run_engine(events)
    exp = oracle(events)
    shard = lambda r: int(hash_ids([r["request_id"]])[0] % np.uint64(3))  # noqa: E731
    merged: dict = {}
    summaries: dict = {}
    for s in range(3):
        part = [(k, r) for k, r in events if shard(r) == s]
        st, _ = run_engine(part, seed=s)
        for key, state in st.items():
            merged[key] = state.copy() if key not in merged else merged[key].merge(state)
            summaries.setdefault(key, []).append(state.summary())
    assert_states_match(merged, exp)
    assert_states_match(one, exp)
    for key, lst in summaries.items():   # merging summaries == summary of merged states
        assert_summary_equal(merge_summaries(lst), merged[key].summary(), str(key))


@pytest.mark.slow
def test_states_and_engine_survive_pickling():
    events = random_stream(5, n=600)
    half = len(events) // 2
    ref, _ = run_engine(events)
    eng = Engine(CFG)
    parts = feed(eng, events[:half])
    parts += eng.collect()
    eng = pickle.loads(pickle.dumps(eng))
    feed(eng, events[half:], sink=parts)
    eng.flush()
    parts += eng.collect()
    got = final_states(parts)
    assert set(got) == set(ref)
    for k, st in got.items():
        back = pickle.loads(pickle.dumps(st))
        assert back == st and type(back) is PairedState
        assert_summary_equal(back.summary(), ref[k].summary(), str(k))


def test_tidy_rows_of_a_shadow():
    ev = [("i", inf("a", "r1", T0, "m", "primary", lat=10, pred="1")),
          ("i", inf("b", "r1", T0 + 5, "m", "shadow", lat=20, pred="0", err=True)),
          ("f", fb("l1", "r1", T0 + 100, label="1")),
          ("f", fb("l2", "r2", T0 + 150, label="0")),             # before both inferences
          ("i", inf("d", "r2", T0 + 120, "m", "shadow", lat=5, pred="0")),   # before the primary
          ("i", inf("c", "r2", T0 + 110, "m", "primary", lat=5, pred="1"))]
    eng = Engine(CFG)
    for k, r in ev:
        (eng.ingest_inference(InferenceBatch.from_records([r])) if k == "i"
         else eng.ingest_feedback(FeedbackBatch.from_records([r])))
    eng.flush()
    parts = eng.collect()
    agg = WindowAggregator(CFG)
    agg.add(parts, watermark=eng.emit_watermark)
    df = rows_frame(agg.pop_final_rows(), CFG.segments)
    sh = df[df["variant"] == "shadow"].set_index("metric")
    assert sh.loc["paired_requests", "value"] == 2 and sh.loc["paired_labelled", "labelled"] == 2
    assert sh.loc["accuracy_diff", "value"] == 0.0            # each got one right
    assert sh.loc["error_rate_diff", "value"] == 0.5
    assert sh.loc["latency_log_ratio", "value"] == pytest.approx(math.log(2) / 2)
    assert not {"paired_requests", "accuracy_diff"} & set(df[df["variant"] == "primary"]["metric"])
    s = comparison(parts, "shadow", model="m")
    assert s["paired"]["correct"] == {"n11": 0, "n10": 1, "n01": 1, "n00": 0}
    assert s["paired"]["error"] == {"n11": 0, "n10": 0, "n01": 1, "n00": 1}
    assert s["arms"]["primary"]["requests"] == 2 and s["arms"]["challenger"]["errors"] == 1
    assert s["arms"]["primary"]["correct"] == 1 and s["arms"]["challenger"]["labelled"] == 2


def test_retried_primary_pairs_once_whatever_the_batching():
    """The challenger pairs with one primary: one that came before it, else the first after."""
    ev = [("i", inf("s", "r", T0 + 10, "m", "shadow", lat=8, pred="1")),
          ("i", inf("p2", "r", T0 + 20, "m", "primary", lat=2, pred="1")),
          ("i", inf("p1", "r", T0 + 5, "m", "primary", lat=4, pred="1"))]
    for sizes in ((1,), (3,)):
        st, eng = run_engine(ev, sizes=sizes)
        s = merge_summaries(x.summary() for x in st.values())
        assert s["paired"]["requests"] == 1
        assert s["paired"]["log_latency"][1] == pytest.approx(math.log(8 / 2))  # p2 came first
        assert s["arms"]["primary"]["requests"] == 2
    # two primaries there before the challenger: the smallest event-id hash
    ev2 = [ev[1], ev[2], ev[0]]
    h = dict(zip(["p1", "p2"], hash_ids(["p1", "p2"])))
    lat = {"p1": 4, "p2": 2}[min(h, key=h.get)]
    for sizes in ((1,), (3,)):
        st, _ = run_engine(ev2, sizes=sizes)
        s = merge_summaries(x.summary() for x in st.values())
        assert s["paired"]["log_latency"][1] == pytest.approx(math.log(8 / lat))


def test_canary_arms_without_pairs_and_other_models_apart():
    ev = [("i", inf(f"p{i}", f"r{i}", T0 + i, "m", "primary", lat=10, err=i % 4 == 0)) for i in range(8)]
    ev += [("i", inf(f"c{i}", f"k{i}", T0 + i, "m", "canary", lat=20)) for i in range(4)]
    ev += [("i", inf("o", "r1", T0 + 3, "other", "shadow", lat=1))]     # another model: no pair
    ev += [("f", fb(f"w{i}", f"k{i}", T0 + 50, "reward", value=float(i))) for i in range(4)]
    st, eng = run_engine(ev, sizes=(5,))
    s = comparison([(k[1], v) for k, v in st.items()], "canary", model="m")
    assert s["arms"]["primary"]["requests"] == 8 and s["arms"]["primary"]["errors"] == 2
    assert s["arms"]["challenger"]["requests"] == 4
    assert s["arms"]["challenger"]["reward"] == [4, 6.0, 14.0]
    assert s["arms"]["challenger"]["log_latency"][1] == pytest.approx(4 * math.log(20))
    assert s["paired"]["requests"] == 0
    assert eng.counters["paired_unmatched"] == 5 and eng.counters["paired_requests"] == 0
    # the primary config key renames the primary
    cfg = config_from_dict({"windows": [{"name": "10s", "type": "tumbling", "size": "10s"}],
                            "metrics": {"paired": {"primary_variant": "canary"}}})
    st, _ = run_engine(ev, cfg=cfg, sizes=(5,))
    s = comparison([(k[1], v) for k, v in st.items()], "primary", primary="canary", model="m")
    assert s["arms"]["primary"]["requests"] == 4 and s["arms"]["challenger"]["requests"] == 8


def test_pairing_table_capacity_evictions_are_counted():
    cfg = config_from_dict({"windows": [{"name": "10s", "type": "tumbling", "size": "10s"}],
                            "join": {"max_paired": 16}})
    eng = Engine(cfg)
    eng.ingest_inference(InferenceBatch.from_records(
        [inf(f"s{i}", f"r{i}", T0 + i, "m", "shadow") for i in range(40)]))
    assert len(eng.pair_tab) == 16 and eng.counters["paired_evicted"] == 24
    assert eng.stats()["paired_kept"] == 16
    # the primaries come: only the kept challengers are paired
    eng.ingest_inference(InferenceBatch.from_records(
        [inf(f"p{i}", f"r{i}", T0 + 100 + i, "m", "primary") for i in range(40)]))
    assert eng.counters["paired_requests"] == 16
    eng.flush()
    parts = eng.collect()
    s = merge_summaries(p.state.summary() for p in parts if p.family == "paired")
    assert s["paired"]["requests"] == 16 and s["arms"]["challenger"]["requests"] == 40
    assert eng._pair_waiting == 0 and len(eng.pair_tab) == 0


def test_pairing_ttl_is_the_label_deadline():
    eng = Engine(CFG)
    eng.ingest_inference(InferenceBatch.from_records([inf("s1", "r1", T0 + 1000, "m", "shadow")]))
    # the watermark passes the shadow's pane end + label delay: its record expires unpaired
    eng.ingest_inference(InferenceBatch.from_records([inf("x", "rx", T0 + 76_000, "m", "primary")]))
    eng.collect()
    assert eng.counters["paired_unmatched"] == 1 and len(eng.pair_tab) == 0
    # a primary for r1 now is late anyway; one for a live shadow pairs
    eng.ingest_inference(InferenceBatch.from_records([inf("s2", "r2", T0 + 72_000, "m", "shadow")]))
    eng.ingest_inference(InferenceBatch.from_records([inf("p2", "r2", T0 + 72_500, "m", "primary")]))
    assert eng.counters["paired_requests"] == 1
    # a label within the primary's deadline counts for the pair; the record then lives
    # until the primary's pane deadline, and is dropped after it
    eng.ingest_feedback(FeedbackBatch.from_records([fb("l2", "r2", T0 + 73_000, label="1")]))
    eng.advance(T0 + 80_000 + 60_000)
    eng.collect()
    assert len(eng.pair_tab) == 0 and eng.counters["paired_unmatched"] == 1


def test_summary_shape_and_merge_summaries():
    st = PairedState()
    s = st.summary()
    assert set(s) == {"arms", "paired"} and set(s["arms"]) == {"primary", "challenger"}
    arm_keys = {"requests", "errors", "labelled", "correct", "log_latency", "reward", "abs_error"}
    assert set(s["arms"]["primary"]) == arm_keys == set(s["arms"]["challenger"])
    assert set(s["paired"]) == {"requests", "labelled", "correct", "error", "log_latency",
                                "abs_error"}
    assert set(s["paired"]["correct"]) == {"n11", "n10", "n01", "n00"}
    assert merge_summaries([]) == empty_summary() == s
    assert st.value() == {}
    # the standalone update API
    a, b = PairedState(), PairedState()
    a.update({"arm": np.array([0, 1, 1]), "error": np.array([True, False, False]),
              "latency": np.array([10.0, 20.0, 0.0])})
    b.update({"arm": np.array([1, 0]), "correct": np.array([1.0, np.nan]),
              "abs_error": np.array([np.nan, 2.0]), "reward": np.array([0.5, np.nan])})
    b.update({"p_error": np.array([True]), "c_error": np.array([False]),
              "p_latency": np.array([10.0]), "c_latency": np.array([20.0])})
    b.update({"p_correct": np.array([1.0, np.nan]), "c_correct": np.array([0.0, np.nan]),
              "p_abs_error": np.array([np.nan, 1.0]), "c_abs_error": np.array([np.nan, 3.0])})
    m = a.copy().merge(b).summary()
    assert m == merge_summaries([a.summary(), b.summary()])
    assert m["arms"]["primary"]["requests"] == 1 and m["arms"]["primary"]["errors"] == 1
    assert m["arms"]["challenger"]["log_latency"][0] == 2
    assert m["arms"]["challenger"]["log_latency"][1] == pytest.approx(math.log(20) + math.log(1e-3))
    assert m["arms"]["challenger"]["correct"] == 1 and m["arms"]["challenger"]["reward"] == [1, 0.5, 0.25]
    assert m["arms"]["primary"]["abs_error"] == [1, 2.0, 4.0]
    assert m["paired"]["error"] == {"n11": 0, "n10": 1, "n01": 0, "n00": 0}
    assert m["paired"]["correct"] == {"n11": 0, "n10": 1, "n01": 0, "n00": 0}
    assert m["paired"]["abs_error"] == [1, 2.0, 4.0] and m["paired"]["labelled"] == 2
    v = b.value()
    assert v["accuracy_diff"] == (-1.0, 1, 1) and v["mae_diff"] == (2.0, 1, 1)
