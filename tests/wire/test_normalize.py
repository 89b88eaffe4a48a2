"""The fast normalizer gives what the schema gives (records, or the same rejections)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import PREDICTION_CASES, inference_batch

from kpistream.wire.batch import hash_ids, route, shard_of, split_by_shard
from kpistream.wire.normalize import RowNormalizer, features
from kpistream.wire.schema import MAX_FEATURES, validate_rows


def check_same(pred, segs=None, cost=None, ok=True, rid="rid-1", variant="primary") -> None:
    norm = RowNormalizer("churn", variant, "predict")
    t0 = time.perf_counter_ns()
    row = (t0, rid, 1_500_000, ok, pred, segs, cost, None, "7")
    fast = norm.records([row])
    ts = fast[0]["ts"] if fast else (t0 + time.time_ns() - time.perf_counter_ns()) // 1_000_000
    eid = fast[0]["event_id"] if fast else f"{rid}:{variant}"
    wire = norm.wire(eid, rid, ts, "7", 1_500_000, ok, pred, segs, cost, None)
    ref = validate_rows([wire], now_ms=ts, expect="inference")
    if ref.rejections:
        assert fast == []
        assert set(norm.stats()["invalid_by_reason"]) == {
            f"{r.field}:{r.reason}" for r in ref.rejections}
        assert norm.stats()["invalid"] == len(ref.rejections)
    else:
        assert fast == ref.inference
        assert norm.stats()["invalid"] == 0


@pytest.mark.parametrize("pred", [
    *PREDICTION_CASES, {"label": "a", "score": 2**60}, {"label": 10**80},
])
def test_predictions_match_the_schema(pred):
    check_same(pred)


@pytest.mark.parametrize("segs,cost", [
    (None, None), ({"region": "eu"}, None), ({"region": ""}, None), ({"model": "x"}, None),
    ({"__x": "y"}, None), ({"9a": "y"}, None), ({"a": 1}, None), ({}, {}),
    ({f"k{i}": "v" for i in range(17)}, None), (None, {"usd": 0.1, "tokens": 3}),
    (None, {"usd": 1}), (None, {"usd": -1.0}), (None, {"usd": True}), (None, {"tokens": 1.0}),
    (None, {"tokens": -1}), (None, {"usd": None, "tokens": None}), (None, {"eur": 1.0}),
    (None, {"usd": float("inf")}), ("eu", None), (None, 3),
])
def test_segments_and_cost_match_the_schema(segs, cost):
    check_same("a", segs, cost)


def test_error_rows_and_long_event_ids():
    check_same(None, ok=False)
    check_same("a", rid="r" * 256)        # event id over 256 characters: hashed, like the schema
    norm = RowNormalizer("m", "primary", "")
    recs = norm.records([(time.perf_counter_ns(), "r" * 256, 0, False, None, None, None, None,
                          "1")])
    assert len(recs[0]["event_id"]) == 32 and recs[0]["status"] == "error"
    assert norm.stats()["error_events"] == 1


def test_features_keep_what_the_schema_allows():
    assert features(None) == (None, 0)
    assert features([1]) == (None, 1)
    f, dropped = features({"a": 1, "b": "x", "c": None, "d": True, "e": 1.5,
                           "n": [1], "f": float("nan"), "s": "y" * 257, "": 1, 3: 1})
    assert f == {"a": 1, "b": "x", "c": None, "d": True, "e": 1.5} and dropped == 5
    big, dropped = features({f"k{i}": i for i in range(MAX_FEATURES + 3)})
    assert len(big) == MAX_FEATURES and dropped == 3
    # what is kept passes the schema
    now = 1_750_000_000_000
    ev = {"type": "inference", "event_id": "e", "request_id": "r", "ts": now, "model": "m",
          "model_version": "1", "variant": "primary", "latency_ms": 1.0, "status": "ok",
          "prediction": "a", "features": f}
    assert not validate_rows([ev], now_ms=now, expect="inference").rejections


def test_rejections_reach_on_error():
    seen = []
    norm = RowNormalizer("m", "primary", "", on_error=seen.append)
    norm.records([(time.perf_counter_ns(), "r", 0, True, [1, 2], None, None, None, "1")])
    assert len(seen) == 1 and seen[0].startswith("event rejected: ")


# ---------------------------------------------------------------------------
# shard routing (batch.route): the same owners as shard_of, every row once


@pytest.mark.parametrize("n_shards", [1, 2, 3, 7])
def test_route_matches_shard_of(n_shards):
    ids = [f"req-{i}" for i in range(50)]
    b = inference_batch(ids)
    owner = shard_of(hash_ids(np.array(ids, dtype=object)), n_shards)
    parts = route(b, n_shards)
    assert [s for s, _, _ in parts] == sorted(set(owner.tolist()))
    seen = np.concatenate([rows for _, rows, _ in parts])
    assert sorted(seen.tolist()) == list(range(50))
    for s, rows, part in parts:
        assert (owner[rows] == s).all()
        assert part.request_id.tolist() == b.request_id[rows].tolist()
    # the same rows as split_by_shard, shard by shard
    by_split = {i: p.request_id.tolist() for i, p in enumerate(split_by_shard(b, n_shards))
                if len(p)}
    assert {s: p.request_id.tolist() for s, _, p in parts} == by_split


def test_route_passes_a_one_shard_batch_on_and_skips_empty_ones():
    b = inference_batch(["only"])
    [(s, rows, part)] = route(b, 5)
    assert part is b and rows.tolist() == [0] and s == int(shard_of(b.request_id, 5)[0])
    assert route(b.take(np.zeros(0, dtype=np.int64)), 3) == []
