"""Metric states against scikit-learn / numpy, merge == concatenation, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.metrics import (
    accuracy_score, mean_absolute_error, mean_squared_error, ndcg_score,
    precision_recall_fscore_support,
)

from kpistream.wire.batch import (KIND_CLICK, KIND_CONVERSION, KIND_DWELL, KIND_LABEL, KIND_REWARD,
                             KIND_THUMBS)
from kpistream.engine.join import ranking_metrics
from kpistream.engine.states import (
    ClassificationState, CostState, FeedbackState, LatencyState, RankingState, RegressionState,
    TrafficState,
)

REL = 1e-9


def close(a, b, rel=REL):
    return a == pytest.approx(b, rel=rel, abs=1e-12)


def cls_state(true, pred, labels, positive="1"):
    s = ClassificationState(list(labels), positive)
    s.update({"true": np.asarray(true), "pred": np.asarray(pred)})
    return s


@pytest.mark.parametrize("n_classes,seed", [(2, 0), (2, 1), (3, 2), (5, 3), (7, 4)])
def test_classification_against_sklearn(n_classes, seed):
    rng = np.random.default_rng(seed)
    labels = [str(i) for i in range(n_classes)]
    n = 500
    t = rng.integers(0, n_classes, n)
    p = np.where(rng.random(n) < 0.7, t, rng.integers(0, n_classes, n))
    # check at every prefix length in a few places (River's habit)
    for m in (1, 2, 7, 50, n):
        v = cls_state(t[:m], p[:m], labels, positive="1").value()
        yt, yp = [labels[i] for i in t[:m]], [labels[i] for i in p[:m]]
        assert close(v["accuracy"][0], accuracy_score(yt, yp))
        present = sorted(set(yt) | set(yp))
        if "1" in present:  # the positive label occurs in the window: binary P / R / F1
            P, R, F, _ = precision_recall_fscore_support(yt, yp, labels=["1"], average=None,
                                                         zero_division=0)
            assert close(v["precision"][0], P[0]) and close(v["recall"][0], R[0])
            assert close(v["f1"][0], F[0])
        else:
            assert "precision" not in v and "precision_macro" in v
        if len(present) > 2 or "1" not in present:
            for avg in ("macro", "micro", "weighted"):
                P, R, F, _ = precision_recall_fscore_support(yt, yp, average=avg, zero_division=0)
                assert close(v[f"precision_{avg}"][0], P), avg
                assert close(v[f"recall_{avg}"][0], R), avg
                assert close(v[f"f1_{avg}"][0], F), avg
        assert v["accuracy"][1] == m and v["accuracy"][2] == m


def test_classification_without_positive_label_reports_averages():
    v = cls_state([0, 1, 1, 0], [0, 1, 0, 0], ["a", "b"], positive=None).value()
    P, R, F, _ = precision_recall_fscore_support(list("abba"), list("abaa"), average="macro",
                                                 zero_division=0)
    assert close(v["precision_macro"][0], P) and "precision" not in v


def test_classification_merge_aligns_different_vocabularies():
    a = cls_state([0, 1], [0, 0], ["x", "y"])
    b = cls_state([0, 1, 1], [1, 1, 0], ["y", "z"])  # y=0, z=1 here
    merged = a.copy().merge(b.detach())
    yt = ["x", "y", "y", "z", "z"]
    yp = ["x", "x", "z", "z", "y"]
    assert close(merged.value()["accuracy"][0], accuracy_score(yt, yp))
    P, R, F, _ = precision_recall_fscore_support(yt, yp, average="weighted", zero_division=0)
    assert close(merged.value()["f1_weighted"][0], F)


def test_regression_against_sklearn():
    rng = np.random.default_rng(5)
    y, yh = rng.normal(10, 3, 1000), rng.normal(10, 3, 1000)
    s = RegressionState()
    s.update({"pred": yh, "true": y})
    v = s.value()
    assert close(v["mae"][0], mean_absolute_error(y, yh))
    assert close(v["rmse"][0], np.sqrt(mean_squared_error(y, yh)))
    assert v["mae"][1] == 1000


def _hash(items):
    from kpistream.wire.batch import hash_ids
    return hash_ids(np.asarray(items, dtype=object))


def test_ranking_metrics_against_sklearn_ndcg_and_numpy():
    rng = np.random.default_rng(7)
    k = 5
    rankings, rels = [], []
    for _ in range(300):
        items = [f"i{j}" for j in rng.permutation(40)[: rng.integers(k, 15)]]
        rel = {f"i{j}": float(rng.integers(0, 4)) for j in rng.permutation(40)[: rng.integers(0, 8)]}
        rankings.append(items)
        rels.append(rel)
    # the engine's top-k arena layout
    arena = np.concatenate([_hash(r[:k]) for r in rankings])
    lens = np.array([min(len(r), k) for r in rankings])
    offs = np.r_[0, np.cumsum(lens)[:-1]]
    rel_offs = np.r_[0, np.cumsum([len(r) for r in rels])]
    rel_items = np.concatenate([_hash(list(r)) if r else np.zeros(0, np.uint64) for r in rels])
    rel_grades = np.concatenate([np.array(list(r.values()), float) for r in rels])
    out = ranking_metrics(offs, lens, arena, rel_offs, rel_items, rel_grades, k)
    for i, (r, rel) in enumerate(zip(rankings, rels)):
        top = r[:k]
        g = np.array([rel.get(x, 0.0) for x in top])
        n_rel = sum(1 for v in rel.values() if v > 0)
        assert close(out["p_at_k"][i], (g > 0).sum() / k)
        if n_rel:
            assert close(out["r_at_k"][i], (g > 0).sum() / n_rel)
        else:
            assert np.isnan(out["r_at_k"][i])
        first = np.flatnonzero(g > 0)
        assert close(out["rr"][i], 1.0 / (first[0] + 1) if len(first) else 0.0)
        # sklearn: every item of the ranking and of the relevance set; the
        # ranking's items score by position, the rest below them
        universe = list(dict.fromkeys(r + list(rel)))
        y_true = np.array([[rel.get(x, 0.0) for x in universe]])
        y_score = np.array([[len(r) - r.index(x) if x in r else -1.0 for x in universe]])
        if y_true.sum() == 0:
            assert out["ndcg"][i] == 0.0
            continue
        # items outside the ranking tie at the bottom; with >= k ranked items
        # they never reach the top k, so sklearn's tie handling does not matter
        assert close(out["ndcg"][i], ndcg_score(y_true, y_score, k=k)), i
    s = RankingState()
    s.update(out)
    v = s.value()
    assert close(v["ndcg_at_k"][0], out["ndcg"].mean())
    assert close(v["recall_at_k"][0], np.nanmean(out["r_at_k"]))


def test_feedback_and_cost_and_traffic():
    f = FeedbackState()
    kind = np.array([KIND_THUMBS, KIND_THUMBS, KIND_CLICK, KIND_DWELL, KIND_REWARD, KIND_REWARD,
                     KIND_CONVERSION])
    val = np.array([1.0, 0.0, 1.0, 12.5, 0.5, 1.5, 1.0])
    has_task = np.array([True] * 8 + [False] * 2)
    FeedbackState.observe_grouped([f], np.zeros(10, dtype=np.intp), {"has_task": has_task})
    f.update({"kind": kind, "value": val})
    f.update({"kind": np.array([KIND_LABEL, KIND_LABEL]), "value": np.array([1.0, 0.0])})
    v = f.value()
    assert v["label_coverage"][:3] == (0.25, 8, 2)
    assert v["thumbs_up_rate"][:2] == (0.5, 2)
    assert v["ctr"][:2] == (0.1, 10) and v["conversion_rate"][:2] == (0.1, 10)
    assert v["dwell_mean"][0] == 12.5 and v["reward_mean"][0] == 1.0
    c = CostState()
    c.update({"cost_usd": np.array([0.001, np.nan, 0.003]), "tokens": np.array([10, 20, np.nan])})
    assert close(c.value()["cost_per_1k"][0], 2.0) and c.value()["tokens_mean"][:2] == (15.0, 2)
    t = TrafficState()
    t.update({"error": np.array([True, False, False, False])})
    assert t.value()["error_rate"][:2] == (0.25, 4)


def test_latency_quantiles_within_sketch_bound_and_exact_mean():
    rng = np.random.default_rng(9)
    x = rng.lognormal(3, 1, 20000)
    s = LatencyState()
    s.update({"latency": x})
    v = s.value()
    assert close(v["latency_mean"][0], x.mean())
    for name, q in (("latency_p50", .5), ("latency_p90", .9), ("latency_p99", .99),
                    ("latency_p999", .999)):
        exact = np.quantile(x, q, method="lower")
        assert abs(v[name][0] - exact) <= 0.01 * exact * (1 + 1e-12), name


# -- merge == concatenation, for every state, under random partitions ---------------

def _inputs(rng, n):
    t = rng.integers(0, 4, n)
    return {
        TrafficState: {"error": rng.random(n) < 0.1},
        LatencyState: {"latency": rng.lognormal(2, 1, n)},
        CostState: {"cost_usd": np.where(rng.random(n) < .8, rng.random(n) / 100, np.nan),
                    "tokens": np.where(rng.random(n) < .5, rng.integers(1, 500, n), np.nan)},
        ClassificationState: {"true": t, "pred": np.where(rng.random(n) < .6, t, rng.integers(0, 4, n))},
        RegressionState: {"pred": rng.normal(size=n), "true": rng.normal(size=n)},
        RankingState: {"p_at_k": rng.random(n), "r_at_k": np.where(rng.random(n) < .7, rng.random(n), np.nan),
                       "ndcg": rng.random(n), "rr": rng.random(n)},
        FeedbackState: {"kind": rng.choice([KIND_THUMBS, KIND_CLICK, KIND_DWELL, KIND_REWARD,
                                            KIND_CONVERSION], n), "value": rng.random(n)},
    }


def _new(cls):
    return cls(["0", "1", "2", "3"], "1") if cls is ClassificationState else cls()


def _values_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][1:] == b[k][1:], k
        assert a[k][0] == pytest.approx(b[k][0], rel=1e-9, abs=1e-12), k


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 400), parts=st.integers(1, 6))
def test_merge_equals_concatenation(seed, n, parts):
    rng = np.random.default_rng(seed)
    data = _inputs(rng, n)
    assign = rng.integers(0, parts, n)
    order = rng.permutation(parts)
    for cls, cols in data.items():
        whole = _new(cls)
        whole.update(cols)
        pieces = []
        for p in range(parts):
            m = assign == p
            s = _new(cls)
            s.update({k: v[m] for k, v in cols.items()})
            pieces.append(s)
        merged = _new(cls)
        for p in order:
            merged.merge(pieces[p])
        _values_equal(merged.value(), whole.value())
        if cls is not ClassificationState:
            assert merged == whole or cls in (LatencyState, RegressionState, RankingState,
                                              FeedbackState, CostState)


@pytest.mark.parametrize("cls", [TrafficState, LatencyState, CostState, ClassificationState,
                                 RegressionState, RankingState, FeedbackState])
def test_states_survive_pickle(cls):
    rng = np.random.default_rng(1)
    s = _new(cls)
    s.update(_inputs(rng, 300)[cls])
    back = pickle.loads(pickle.dumps(s))
    assert back == s
    _values_equal(back.value(), s.value())


def test_grouped_update_equals_separate_updates():
    rng = np.random.default_rng(3)
    n = 2000
    group = rng.integers(0, 5, n)
    for cls, cols in _inputs(rng, n).items():
        gs = [_new(cls) for _ in range(5)]
        cls.update_grouped(gs, group, cols)
        for g in range(5):
            s = _new(cls)
            s.update({k: v[group == g] for k, v in cols.items()})
            _values_equal(gs[g].value(), s.value())
