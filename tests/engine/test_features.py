"""Family ``features``: the bottom-k sample against a direct oracle, merge == concatenation,
uniformity, pickling, mixed and missing values, and the engine's partials."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from scipy import stats

from kpistream.wire.batch import InferenceBatch, hash_ids
from kpistream.spec.metrics import config_from_dict
from kpistream.engine import Engine
from kpistream.engine.features import FeatureSampleState

T0 = 1_767_225_600_000


def rows(seed: int, n: int):
    """(event ids, feature dicts or None): numeric, categorical, boolean, mixed, missing."""
    rng = np.random.default_rng(seed)
    ids = [f"e{seed}-{i}" for i in range(n)]
    feats = []
    for i in range(n):
        if rng.random() < 0.1:
            feats.append(None)
            continue
        d = {}
        if rng.random() < 0.9:
            d["x"] = float(rng.normal())
        if rng.random() < 0.7:
            d["n"] = int(rng.integers(0, 5))
        if rng.random() < 0.8:
            d["city"] = str(rng.choice(["paris", "lima", "oslo"]))
        if rng.random() < 0.5:
            d["flag"] = bool(rng.random() < 0.5)
        if rng.random() < 0.3:
            d["mixed"] = "na" if rng.random() < 0.3 else float(rng.normal())
        if rng.random() < 0.05:
            d["rare"] = 1.5
        if rng.random() < 0.05:
            d["none"] = None
        feats.append(d)
    return ids, feats


def state_of(ids, feats, k=16, max_features=64, parts=1, seed=0) -> FeatureSampleState:
    """One state updated with the rows in ``parts`` consecutive batches."""
    st = FeatureSampleState(k, max_features)
    h = hash_ids(np.array(ids, dtype=object))
    cuts = sorted(np.random.default_rng(seed).choice(np.arange(1, len(ids)), parts - 1,
                                                      replace=False)) if parts > 1 else []
    for lo, hi in zip([0, *cuts], [*cuts, len(ids)]):
        st.update({"hash": h[lo:hi], "features": feats[lo:hi]})
    return st


def expected(ids, feats, k, max_features=64):
    """The oracle: the k featured rows of smallest hash, as columns."""
    h = hash_ids(np.array(ids, dtype=object))
    keep = [i for i in np.argsort(h, kind="stable") if feats[i] is not None][:k]
    kept = []
    for i in keep:
        d = feats[i]
        if len(d) > max_features:
            d = {n: d[n] for n in sorted(d)[:max_features]}
        kept.append({n: v for n, v in d.items() if v is not None})
    names = sorted({n for d in kept for n in d})
    out = {}
    for n in names:
        vals = [d.get(n) for d in kept]
        if all(v is None or isinstance(v, (int, float)) for v in vals):
            out[n] = np.array([np.nan if v is None else float(v) for v in vals])
        else:
            out[n] = np.array([float(v) if isinstance(v, (int, float)) else v for v in vals],
                              dtype=object)
    return h[keep], out


def assert_sample_equal(got: dict, exp: dict):
    assert list(got) == list(exp)
    for n in exp:
        assert got[n].dtype == exp[n].dtype, n
        if exp[n].dtype == object:
            assert got[n].tolist() == exp[n].tolist(), n
        else:
            np.testing.assert_array_equal(got[n], exp[n])


@pytest.mark.parametrize("seed,n,k", [(0, 200, 16), (1, 50, 64), (2, 500, 5), (3, 300, 1)])
def test_sample_equals_the_oracle(seed, n, k):
    ids, feats = rows(seed, n)
    st = state_of(ids, feats, k=k, parts=4, seed=seed)
    h, exp = expected(ids, feats, k)
    np.testing.assert_array_equal(st.hashes, h)
    assert_sample_equal(st.sample(), exp)
    assert st.n_seen == sum(f is not None for f in feats) and len(st) == min(k, st.n_seen)
    v = st.value()
    assert v["features_seen"] == (float(st.n_seen), st.n_seen, None)
    assert v["features_sampled"] == (float(len(st)), st.n_seen, None)


@pytest.mark.parametrize("seed", range(6))
def test_merge_equals_concatenation(seed):
    rng = np.random.default_rng(100 + seed)
    ids, feats = rows(seed, 400)
    whole = state_of(ids, feats, k=32, parts=1)
    # a random partition of the rows (not contiguous), each part in random batches,
    # merged in a random order and tree shape
    part = rng.integers(0, 5, len(ids))
    states = [state_of([ids[i] for i in np.flatnonzero(part == p)],
                       [feats[i] for i in np.flatnonzero(part == p)], k=32,
                       parts=int(rng.integers(1, 4)), seed=seed)
              for p in range(5)]
    rng.shuffle(states)
    left = states[0].copy().merge(states[1]).merge(states[2])
    right = states[3].copy().merge(states[4])
    merged = right.merge(left)
    assert merged == whole
    assert_sample_equal(merged.sample(), whole.sample())
    assert merged.n_seen == whole.n_seen
    # merging is idempotent on the rows (the same events twice are kept once)
    again = whole.copy().merge(whole)
    np.testing.assert_array_equal(again.hashes, whole.hashes)
    assert_sample_equal(again.sample(), whole.sample())


def test_sample_is_uniform_without_replacement():
    """Over many seeds (event ids), each of N rows is kept k/N of the time: chi-square."""
    N, k, trials = 40, 10, 3000
    counts = np.zeros(N)
    sizes = set()
    for t in range(trials):
        ids = [f"t{t}-r{i}" for i in range(N)]
        st = FeatureSampleState(k)
        h = hash_ids(np.array(ids, dtype=object))
        st.update({"hash": h, "features": [{"row": i} for i in range(N)]})
        kept = st.sample()["row"].astype(int)
        assert len(set(kept)) == len(kept)    # without replacement
        sizes.add(len(kept))
        counts[kept] += 1
    assert sizes == {k}
    expected_count = trials * k / N
    chi2 = ((counts - expected_count) ** 2 / expected_count).sum()
    # per trial the inclusions of two rows covary by -p(1-p)/(N-1) (p = k/N, a fixed
    # sample size), so Pearson's statistic is ~ (1-p) N/(N-1) chi2(N-1)
    scale = (1 - k / N) * N / (N - 1)
    p = stats.chi2.sf(chi2 / scale, N - 1)
    assert p > 1e-3, (chi2, p)
    assert counts.sum() == trials * k


def test_mixed_types_and_missing_keys():
    st = FeatureSampleState(8)
    ids = [f"m{i}" for i in range(6)]
    feats = [{"x": 1, "c": "a", "b": True, "mix": 2.5},
             {"x": 2.5, "c": None},
             {"c": "b", "mix": "text", "b": False},
             None,
             {},
             {"x": float("nan"), "only": "z"}]
    st.update({"hash": hash_ids(np.array(ids, dtype=object)), "features": feats})
    s = st.sample()
    order = np.argsort(hash_ids(np.array([ids[i] for i in (0, 1, 2, 4, 5)], dtype=object)))
    rows_ = [feats[i] for i in (0, 1, 2, 4, 5)]
    by = [rows_[i] for i in order]
    assert set(s) == {"x", "c", "b", "mix", "only"}
    assert s["x"].dtype == np.float64 and s["b"].dtype == np.float64
    assert s["c"].dtype == object and s["mix"].dtype == object and s["only"].dtype == object
    for j, r in enumerate(by):
        x = r.get("x")
        if x is None or x != x:
            assert np.isnan(s["x"][j])
        else:
            assert s["x"][j] == float(x)
        assert s["c"][j] == r.get("c")
        assert (np.isnan(s["b"][j]) if "b" not in r else s["b"][j] == float(r["b"]))
        mix = r.get("mix")
        assert s["mix"][j] == (float(mix) if isinstance(mix, float) else mix)
    assert st.n_seen == 5 and len(st) == 5


def test_a_column_returns_to_numeric_when_its_strings_leave_the_sample():
    ids = [f"q{i}" for i in range(50)]
    h = hash_ids(np.array(ids, dtype=object))
    top = int(np.argmax(h))                   # the row that will be pushed out
    feats = [{"v": "str" if i == top else float(i)} for i in range(50)]
    st = FeatureSampleState(49)
    st.update({"hash": h[[top]], "features": [feats[top]]})
    assert st.sample()["v"].dtype == object
    rest = [i for i in range(50) if i != top]
    st.update({"hash": h[rest], "features": [feats[i] for i in rest]})
    assert st.sample()["v"].dtype == np.float64 and len(st) == 49
    whole = FeatureSampleState(49)
    whole.update({"hash": h, "features": feats})
    assert st == whole


def test_rows_with_too_many_features_keep_the_first_names():
    ids = ["a", "b"]
    wide = {f"f{j:03d}": float(j) for j in range(70)}
    st = FeatureSampleState(4, max_features=64)
    st.update({"hash": hash_ids(np.array(ids, dtype=object)), "features": [wide, {"zzz": 1.0}]})
    s = st.sample()
    assert set(s) == {f"f{j:03d}" for j in range(64)} | {"zzz"}
    assert st.n_capped == 1
    h, exp = expected(ids, [wide, {"zzz": 1.0}], 4, 64)
    assert_sample_equal(s, exp)


def test_pickling_and_empty_states():
    ids, feats = rows(7, 120)
    st = state_of(ids, feats, k=20, parts=3)
    back = pickle.loads(pickle.dumps(st))
    assert back == st and back.sample().keys() == st.sample().keys()
    empty = FeatureSampleState()
    assert empty.value() == {} and empty.sample() == {} and len(empty) == 0
    assert pickle.loads(pickle.dumps(empty)) == empty
    assert empty.copy().merge(st) == st
    st.update({"hash": np.zeros(0, np.uint64), "features": []})
    st.update({"hash": hash_ids(np.array(["n1"], dtype=object)), "features": None})
    assert back == st


# ------------------------------------------------------------------ in the engine

CFG = config_from_dict({"windows": [{"name": "10s", "type": "tumbling", "size": "10s"},
                                    {"name": "n50", "type": "count", "size": 50}],
                        "series": {"segments": ["region"]},
                        "metrics": {"features": {"sample_size": 8, "max_features": 3}}})


def inf(i, ts, model="m", region="eu", features=None):
    return {"event_id": f"e{i}", "request_id": f"r{i}", "ts": int(ts), "model": model,
            "model_version": "1", "variant": "primary", "endpoint": "", "latency_ms": 5.0,
            "status": "ok", "pred_label": "1", "segments": {"region": region},
            "features": features}


def events(n=400, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        f = None if rng.random() < 0.3 else {"a": float(rng.normal()), "b": str(rng.integers(3)),
                                             "c": 1.0, "d": 2.0}
        out.append(inf(i, T0 + int(rng.integers(0, 30_000)), region=str(rng.choice(["eu", "us"])),
                       features=f))
    out.sort(key=lambda r: r["ts"])
    return out


def feature_states(eng_runs):
    out = {}
    for eng in eng_runs:
        eng.flush()
        for p in eng.collect():
            if p.family == "features" and p.space == "time":
                key = (p.key, p.series)
                out[key] = p.state.copy() if key not in out else out[key].merge(p.state)
    return out


def test_engine_partials_per_series_and_pane_merge_across_shards():
    ev = events()
    one = Engine(CFG)
    for lo in range(0, len(ev), 37):
        one.ingest_inference(InferenceBatch.from_records(ev[lo:lo + 37]))
    shards = [Engine(CFG) for _ in range(3)]
    for r in ev:
        s = int(hash_ids([r["request_id"]])[0] % np.uint64(3))
        shards[s].ingest_inference(InferenceBatch.from_records([r]))
    a, b = feature_states([one]), feature_states(shards)
    assert a.keys() == b.keys() and len(a) == 6          # 3 panes x 2 regions
    for key in a:
        assert a[key] == b[key]
        pane, series = key
        sel = [r for r in ev if r["features"] is not None and r["segments"]["region"] == series[4][0][1]
               and pane <= r["ts"] < pane + 10_000]
        h, exp = expected([r["event_id"] for r in sel], [r["features"] for r in sel], 8, 3)
        np.testing.assert_array_equal(a[key].hashes, h)
        assert_sample_equal(a[key].sample(), exp)
        assert set(a[key].sample()) == {"a", "b", "c"}    # max_features 3: the first names
        assert a[key].n_capped == a[key].n_seen == len(sel)


def test_count_windows_sample_too_and_no_features_costs_no_state():
    eng = Engine(CFG)
    eng.ingest_inference(InferenceBatch.from_records([inf(i, T0 + i) for i in range(60)]))
    eng.flush()
    assert not [p for p in eng.collect() if p.family == "features"]
    eng = Engine(CFG)
    eng.ingest_inference(InferenceBatch.from_records(
        [inf(i, T0 + i, features={"a": float(i)} if i % 2 else None) for i in range(60)]))
    eng.flush()
    parts = [p for p in eng.collect() if p.family == "features"]
    spaces = {p.space: p for p in parts if p.final}
    assert set(spaces) == {"time", "n50"}
    assert spaces["time"].state.n_seen == 30
    cw = [p for p in parts if p.space == "n50" and p.final]
    assert sorted(p.state.n_seen for p in cw) == [5, 25]
    cfg = config_from_dict({"metrics": {"families": ["traffic"]}})
    eng = Engine(cfg)
    eng.ingest_inference(InferenceBatch.from_records([inf(1, T0, features={"a": 1.0})]))
    eng.flush()
    assert {p.family for p in eng.collect()} == {"traffic"}


def test_config_keys():
    cfg = config_from_dict({"metrics": {"features": {"sample_size": 100, "max_features": 10},
                                        "paired": {"primary_variant": "champion"}},
                            "join": {"max_paired": 500}})
    assert (cfg.feature_sample_size, cfg.max_features, cfg.primary_variant, cfg.max_paired) == (
        100, 10, "champion", 500)
    from kpistream.errors import ConfigError
    for bad, path in (({"metrics": {"features": {"sample_size": 0}}}, "metrics.features.sample_size"),
                      ({"metrics": {"features": {"max_features": 1000}}}, "metrics.features.max_features"),
                      ({"metrics": {"features": {"size": 3}}}, "metrics.features.size"),
                      ({"metrics": {"paired": {"primary_variant": ""}}}, "metrics.paired.primary_variant"),
                      ({"join": {"max_paired": 2}}, "join.max_paired")):
        with pytest.raises(ConfigError) as e:
            config_from_dict(bad)
        assert e.value.path == path
