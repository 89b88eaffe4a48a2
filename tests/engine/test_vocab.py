"""The vocabulary step: series ids (projected, capped), paired roles, labels, per-series classes."""

from __future__ import annotations

from collections import Counter

import numpy as np

from kpistream.engine.paired import ROLE_CHALLENGER, ROLE_NONE, ROLE_PRIMARY
from kpistream.engine.states import (
    TASK_CLASSIFICATION, TASK_NONE, TASK_RANKING, TASK_REGRESSION,
)
from kpistream.engine.vocab import OTHER, Vocab
from kpistream.spec.metrics import config_from_dict
from kpistream.wire.batch import InferenceBatch


def _vocab(**metrics):
    cfg = config_from_dict({"series": {"segments": ["region"], "max_series": 3},
                            "metrics": {"classification": {"max_classes": 3}, **metrics}})
    return Vocab(cfg, Counter())


def key(model, variant="primary", region="eu", extra=()):
    return (model, "1", variant, "predict", (("region", region), *extra))


def test_series_are_projected_capped_and_cached():
    v = _vocab()
    keys = [key("a", extra=(("tier", "x"),)), key("a", extra=(("tier", "y"),)), key("b"),
            key("c", "shadow"), key("d")]
    used = np.array([True, True, True, False, True])
    out = v.series_map(keys, used)
    # the tier segment is not configured: both "a" keys are one series
    assert out.tolist() == [0, 0, 1, -1, 2]
    assert v.series_keys[0] == ("a", "1", "primary", "predict", (("region", "eu"),))
    # the cap: further series go to __other__ (one series, registered once)
    out = v.series_map(keys, np.ones(5, dtype=bool))
    assert out.tolist() == [0, 0, 1, 3, 2]
    assert v.series_keys[3] == (OTHER, OTHER, OTHER, OTHER, (("region", OTHER),))
    assert v.series_map([key("e"), key("f", region="us")], np.ones(2, dtype=bool)).tolist() == [3, 3]
    assert v.role.tolist() == [ROLE_PRIMARY, ROLE_PRIMARY, ROLE_PRIMARY, ROLE_NONE]
    assert v.series_labels(0) == {"model": "a", "model_version": "1", "variant": "primary",
                                  "endpoint": "predict", "region": "eu"}


def test_roles_and_pairable():
    cfg = config_from_dict({"metrics": {"paired": {"primary_variant": "prod"}}})
    v = Vocab(cfg, Counter())
    keys = [("m", "1", "prod", "p", ()), ("n", "1", "prod", "p", ()), ("m", "2", "canary", "p", ())]
    assert v.series_map(keys, np.ones(3, dtype=bool)).tolist() == [0, 1, 2]
    assert v.role.tolist() == [ROLE_PRIMARY, ROLE_PRIMARY, ROLE_CHALLENGER]
    assert v.model.tolist() == [0, 1, 0]
    assert v.model_has_ch.tolist() == [True, False]
    assert v.pairable.tolist() == [True, False, True]


def test_labels_interned_and_capped():
    v = _vocab()
    assert v.label_map(["x", "y", "x"]).tolist() == [0, 1, 0, -1]
    v.MAX_INTERNED = 3
    assert v.label_map(["z", "w", "y"]).tolist() == [2, 3, 1, -1]
    assert v.labels == ["x", "y", "z", OTHER]
    assert v.label_map(["q"]).tolist() == [3, -1]


def test_local_codes_per_series_with_overflow():
    v = _vocab()
    v.series_map([key("a"), key("b")], np.ones(2, dtype=bool))
    g = v.label_map(["c0", "c1", "c2", "c3"])[:4]
    sids = np.array([0, 0, 0, 1, 0, 1])
    codes = v.local_codes(sids, g[[0, 1, 2, 3, 3, 0]])
    # max_classes 3: two classes each (new ones in code order), the rest __other__
    assert v.classes[0] == ["c0", "c1", OTHER] and v.classes[1] == ["c0", "c3"]
    assert codes.tolist() == [0, 1, 2, 1, 2, 0]
    assert v.counters["label_overflow"] == 2
    v.local_codes(np.array([1]), g[[0]])
    assert v.counters["label_overflow"] == 2


def test_inference_codes_task_and_predictions():
    cfg = config_from_dict({"series": {"max_series": 1}})
    v = Vocab(cfg, Counter())
    recs = [
        {"pred_label": "a"}, {"pred_value": 2.5}, {"ranking": ["x", "y"]}, {},
        {"pred_label": "b", "pred_value": 1.0}, {"pred_label": "a", "model": "other"}]
    b = InferenceBatch.from_records([
        {"event_id": f"e{i}", "request_id": f"r{i}", "ts": 1000 + i, "model": "m",
         "model_version": "1", "variant": "primary", "endpoint": "p", "latency_ms": 1.0,
         "status": "ok", **r} for i, r in enumerate(recs)])
    smap = v.series_map(b.series_keys, np.ones(len(b.series_keys), dtype=bool))
    series, task, pred = v.inference_codes(b, smap)
    assert task.tolist() == [TASK_CLASSIFICATION, TASK_REGRESSION, TASK_RANKING, TASK_NONE,
                             TASK_CLASSIFICATION, TASK_CLASSIFICATION]
    assert series.tolist() == [0, 0, 0, 0, 0, 1]
    assert v.counters["series_overflow"] == 1
    assert pred.tolist() == [0, -1, -1, -1, 1, 0]
    assert v.classes[0] == ["a", "b"] and v.classes[1] == ["a"]


def test_batch_series_registers_only_rows_used():
    v = _vocab()
    b = InferenceBatch.from_records([
        {"event_id": f"e{i}", "request_id": f"r{i}", "ts": 1000 + i, "model": m,
         "model_version": "1", "variant": "primary", "endpoint": "p", "latency_ms": 1.0,
         "status": "ok"} for i, m in enumerate(["a", "b", "a", "c"])])
    smap = v.batch_series(b, np.array([2, 3]))
    assert [v.series_keys[s][0] for s in smap[b.series[[2, 3]]]] == ["a", "c"]
    assert smap[b.series[1]] == -1 and len(v.series_keys) == 2
