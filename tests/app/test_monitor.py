"""The monitoring wrapper: unit tests with a fake sink, then a real Ray Serve deployment
sending to real shard actors."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
import urllib.request

import numpy as np
import pytest
from conftest import PREDICTION_CASES, kill_named_actors, sidecar_actor_names
from starlette.requests import Request

from app.monitor import AliasFollowingModel, ModelUnavailable, MonitoredModel
from kpistream.wire.batch import hash_id, hash_ids, shard_of
from kpistream.wire.schema import validate_rows


# ---------------------------------------------------------------------------
# helpers


def make_request(body: bytes = b"{}", headers: dict | None = None) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return Request(scope, receive)


async def call(m: MonitoredModel, payload=None, headers: dict | None = None,
               body: bytes | None = None):
    if body is None:
        body = json.dumps(payload if payload is not None else {}).encode()
    resp = await m(make_request(body, headers))
    hdrs = {k.decode(): v.decode() for k, v in resp.raw_headers}
    return resp.status_code, json.loads(resp.body), hdrs


class FakeSink:
    """Records what it is sent; replies like a shard (``accepted``)."""

    def __init__(self, n_shards: int = 1, reply: str = "none") -> None:
        self.n_shards = n_shards
        self.sent: list[tuple[str, object]] = []
        self.reply = reply
        self.is_ready = True

    def ready(self) -> bool:
        return self.is_ready

    def send(self, kind, batch):
        self.sent.append((kind, batch))
        if self.reply == "raise":
            raise ConnectionError("shard down")
        if self.reply == "report":
            async def report():
                return {"accepted": len(batch), "late": 0, "duplicates": 0, "rejected": []}
            return report()
        if self.reply == "fail":
            async def fail():
                raise RuntimeError("ingest failed")
            return fail()
        if self.reply == "never":
            return asyncio.get_running_loop().create_future()   # never resolves
        return None

    @property
    def rows(self) -> int:
        return sum(len(b) for _, b in self.sent)


class Echo(MonitoredModel):
    """Predicts ``payload["pred"]``; raises when the payload says so; may sleep."""

    def __init__(self, **kw) -> None:
        kw.setdefault("model", "churn")
        kw.setdefault("model_version", "7")
        super().__init__(**kw)

    async def predict(self, payload):
        if payload.get("sleep"):
            await asyncio.sleep(payload["sleep"])
        if payload.get("raise"):
            raise ValueError("boom")
        return payload.get("pred", "a")


class Segmented(Echo):
    def segments(self, payload):
        return {"region": payload.get("region", "eu")}

    def cost(self, payload, prediction):
        return {"usd": 0.002, "tokens": 12}


def run(coro):
    return asyncio.run(coro)


async def flushed(m: MonitoredModel, sink: FakeSink):
    """Everything buffered, sent."""
    await m.flush()
    return sink


def one_batch(sink: FakeSink):
    from kpistream.wire.batch import concat_inference

    assert all(k == "inference" for k, _ in sink.sent)
    return concat_inference([b for _, b in sink.sent])


# ---------------------------------------------------------------------------
# the request path


def test_request_id_is_honoured_or_made():
    async def go():
        sink = FakeSink()
        m = Echo(sink=sink)
        st, body, hdrs = await call(m, {"pred": "x"}, headers={"X-Request-Id": "req-42"})
        assert st == 200 and body == {"request_id": "req-42", "prediction": "x"}
        assert hdrs["x-request-id"] == "req-42"
        assert hdrs["content-type"] == "application/json"
        # made: unique, and carried by the reply header and body
        made = []
        for _ in range(5):
            st, body, hdrs = await call(m, {"pred": "x"})
            assert hdrs["x-request-id"] == body["request_id"]
            made.append(body["request_id"])
        assert len(set(made)) == 5
        # a per-replica prefix: another instance makes other ids
        _, other, _ = await call(Echo(sink=FakeSink()), {})
        assert other["request_id"] not in made
        assert other["request_id"].split("-")[0] != made[0].split("-")[0]
        # too long (or empty) is replaced, and counted
        _, body, hdrs = await call(m, {}, headers={"x-request-id": "x" * 257})
        assert body["request_id"] != "x" * 257 and hdrs["x-request-id"] == body["request_id"]
        _, body, _ = await call(m, {}, headers={"x-request-id": "y" * 256})
        assert body["request_id"] == "y" * 256
        assert m.monitor_stats()["ids_replaced"] == 1
        await m.flush()
        b = one_batch(sink)
        ids = ["req-42", *made, "y" * 256]
        assert set(hash_ids(np.array(ids, dtype=object)).tolist()) <= set(b.request_id.tolist())
        assert len(b) == 8
        # event_id = request id + ":" + variant
        assert hash_id("req-42:primary") in set(b.event_id.tolist())
        await m.aclose()

    run(go())


def test_error_is_a_500_and_an_error_event_with_its_latency():
    async def go():
        sink = FakeSink()
        m = Echo(sink=sink)
        st, body, hdrs = await call(m, {"raise": True, "sleep": 0.02},
                                    headers={"x-request-id": "bad-1"})
        assert st == 500
        assert body["request_id"] == "bad-1" and "ValueError: boom" in body["error"]
        assert hdrs["x-request-id"] == "bad-1"
        st, _, _ = await call(m, {"pred": "ok"})
        assert st == 200
        await m.flush()
        b = one_batch(sink)
        err = b.error.tolist()
        assert err.count(True) == 1
        i = err.index(True)
        assert b.latency_ms[i] >= 20.0
        assert b.pred_label[i] == -1 and math.isnan(b.pred_score[i])
        assert m.monitor_stats()["error_events"] == 1
        await m.aclose()

    run(go())


def test_unserializable_prediction_is_an_error():
    class Bad(Echo):
        async def predict(self, payload):
            return {1, 2}

    async def go():
        sink = FakeSink()
        m = Bad(sink=sink)
        st, body, _ = await call(m, {})
        assert st == 500 and "TypeError" in body["error"]
        await m.flush()
        assert one_batch(sink).error.tolist() == [True]
        assert m.monitor_stats()["reply_errors"] == 1
        await m.aclose()

    run(go())


def test_bad_json_body_is_a_400_without_an_event():
    async def go():
        sink = FakeSink()
        m = Echo(sink=sink)
        st, body, hdrs = await call(m, body=b"{not json")
        assert st == 400 and "not valid JSON" in body["error"]
        assert hdrs["x-request-id"] == body["request_id"]
        st, body, _ = await call(m, body=b"")      # empty body: payload {}
        assert st == 200 and body["prediction"] == "a"
        await m.flush()
        assert sink.rows == 1 and m.monitor_stats()["bad_requests"] == 1
        await m.aclose()

    run(go())


def test_latency_is_timed_around_predict():
    async def go():
        sink = FakeSink()
        m = Echo(sink=sink)
        t0 = time.time_ns() // 1_000_000
        await call(m, {"sleep": 0.03})
        await call(m, {})
        t1 = time.time_ns() // 1_000_000
        await m.flush()
        b = one_batch(sink)
        assert b.latency_ms[0] >= 30.0 and b.latency_ms[0] < 1000
        assert 0 <= b.latency_ms[1] < 30.0
        assert (t0 - 5 <= b.ts).all() and (b.ts <= t1 + 5).all()
        await m.aclose()

    run(go())


@pytest.mark.parametrize("pred,label,score,value,ranking", [
    ("cat", "cat", None, None, None),
    (3, "3", None, None, None),
    (True, "true", None, None, None),
    ({"label": "dog", "score": 0.75}, "dog", 0.75, None, None),
    ({"label": 1, "scores": {"0": 0.2, "1": 0.8}}, "1", 0.8, None, None),
    ({"ranking": ["i3", "i1", 7]}, None, None, None, ["i3", "i1", "7"]),
    (2.5, None, None, 2.5, None),
])
def test_batch_columns_for_each_prediction_form(pred, label, score, value, ranking):
    async def go():
        sink = FakeSink()
        m = Echo(sink=sink, model="recsys", model_version="v3", variant="shadow",
                 endpoint="rank")
        await call(m, {"pred": pred}, headers={"x-request-id": "r1"})
        await m.flush()
        b = one_batch(sink)
        assert len(b) == 1
        assert b.series_keys == [("recsys", "v3", "shadow", "rank", ())]
        assert b.request_id[0] == hash_id("r1") and b.event_id[0] == hash_id("r1:shadow")
        assert not b.error[0] and b.latency_ms[0] >= 0
        assert (b.labels[b.pred_label[0]] if b.pred_label[0] >= 0 else None) == label
        assert (None if math.isnan(b.pred_score[0]) else b.pred_score[0]) == score
        assert (None if math.isnan(b.pred_value[0]) else b.pred_value[0]) == value
        items = b.rank_items[b.rank_offsets[0]:b.rank_offsets[1]]
        if ranking is None:
            assert len(items) == 0
        else:
            assert items.tolist() == hash_ids(np.array(ranking, dtype=object)).tolist()
        await m.aclose()

    run(go())


def test_segments_cost_and_sampled_features():
    async def go():
        sink = FakeSink()
        m = Segmented(sink=sink, feature_sample=1.0)
        await call(m, {"pred": "a", "region": "us", "x": 1.5, "nested": [1, 2]})
        await m.flush()
        b = one_batch(sink)
        assert b.series_keys == [("churn", "7", "primary", "predict", (("region", "us"),))]
        assert b.cost_usd.tolist() == [0.002] and b.tokens.tolist() == [12.0]
        assert b.features == [{"pred": "a", "region": "us", "x": 1.5}]
        assert m.monitor_stats()["features_dropped"] == 1
        await m.aclose()

    run(go())


def test_hook_errors_are_counted_not_raised():
    class Broken(Echo):
        def segments(self, payload):
            raise KeyError("region")

    async def go():
        sink = FakeSink()
        m = Broken(sink=sink)
        st, _, _ = await call(m, {})
        assert st == 200
        await m.flush()
        assert sink.rows == 1 and m.monitor_stats()["hook_errors"] == 1
        await m.aclose()

    run(go())


def test_set_version_applies_to_later_requests():
    async def go():
        sink = FakeSink()
        m = Echo(sink=sink, flush_ms=10_000)
        await call(m, {}, headers={"x-request-id": "old"})
        m.set_version("8")                 # before the flush: the old event keeps "7"
        await call(m, {}, headers={"x-request-id": "new"})
        await m.flush()
        b = one_batch(sink)
        versions = {int(rid): b.series_keys[s][1] for rid, s in zip(b.request_id, b.series)}
        assert versions == {hash_id("old"): "7", hash_id("new"): "8"}
        assert m.monitor_stats()["model_version"] == "8"
        with pytest.raises(ValueError):
            m.set_version("")
        await m.aclose()

    run(go())


def test_flush_by_size():
    async def go():
        sink = FakeSink()
        m = Echo(sink=sink, flush_rows=10, flush_ms=60_000)
        for i in range(10):
            await call(m, {"pred": i})
            await asyncio.sleep(0)
        for _ in range(50):
            if sink.sent:
                break
            await asyncio.sleep(0.01)
        assert sink.rows == 10 and len(sink.sent) == 1
        for i in range(5):
            await call(m, {"pred": i})
        await asyncio.sleep(0.2)
        assert sink.rows == 10               # 5 < flush_rows, and not old enough yet
        st = m.monitor_stats()
        assert st["buffered"] == 5 and st["flushed_rows"] == 10 and st["flushed_batches"] == 1
        await m.aclose()                     # the last flush
        assert sink.rows == 15

    run(go())


def test_flush_by_age():
    async def go():
        sink = FakeSink()
        m = Echo(sink=sink, flush_rows=1000, flush_ms=30)
        for i in range(3):
            await call(m, {"pred": i})
        t0 = time.monotonic()
        while sink.rows < 3 and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.005)
        assert sink.rows == 3 and len(sink.sent) == 1
        await m.aclose()

    run(go())


def test_split_by_shard():
    async def go():
        sink = FakeSink(n_shards=3)
        m = Echo(sink=sink)
        for i in range(60):
            await call(m, {"pred": i})
        await m.flush()
        assert sink.rows == 60 and len(sink.sent) == 3
        for _, part in sink.sent:
            owners = shard_of(part.request_id, 3)
            assert (owners == owners[0]).all()
        assert sorted(int(shard_of(p.request_id[:1], 3)[0]) for _, p in sink.sent) == [0, 1, 2]
        await m.aclose()

    run(go())


def test_full_buffer_drops_and_counts():
    async def go():
        sink = FakeSink()
        sink.is_ready = False                # the sidecar is not there yet: rows wait
        m = Echo(sink=sink, buffer_rows=5, flush_ms=5)
        for i in range(8):
            st, _, _ = await call(m, {"pred": i})
            assert st == 200
        await asyncio.sleep(0.05)
        st = m.monitor_stats()
        assert st["buffered"] == 5 and st["dropped"] == 3 and sink.rows == 0
        sink.is_ready = True
        await m.flush()
        assert sink.rows == 5 and m.monitor_stats()["buffered"] == 0
        await m.aclose()

    run(go())


def test_a_sink_that_is_not_ready_never_spins_the_loop():
    async def go():
        sink = FakeSink()
        sink.is_ready = False
        m = Echo(sink=sink, flush_rows=2, buffer_rows=5, flush_ms=10)
        calls = 0
        ready = sink.ready

        def counting_ready():
            nonlocal calls
            calls += 1
            return ready()

        sink.ready = counting_ready
        for i in range(10):
            st, _, _ = await asyncio.wait_for(call(m, {"pred": i}), timeout=2.0)
            assert st == 200
        await asyncio.sleep(0.2)             # the loop gets to run: it must sleep, not spin
        assert calls < 100
        assert m.monitor_stats()["buffered"] == 5 and m.monitor_stats()["dropped"] == 5
        await m.aclose(timeout=0.1)

    run(go())


def test_a_blocked_sink_never_blocks_replies():
    async def go():
        sink = FakeSink(reply="never")
        m = Echo(sink=sink, flush_rows=1, flush_ms=5, max_in_flight=2, buffer_rows=20,
                 send_timeout_s=3600)
        t0 = time.monotonic()
        for i in range(100):
            st, body, _ = await asyncio.wait_for(call(m, {"pred": i}), timeout=2.0)
            assert st == 200 and body["prediction"] == i
            await asyncio.sleep(0.001)       # let the flush task run (and get stuck)
        assert time.monotonic() - t0 < 10
        st = m.monitor_stats()
        assert len(sink.sent) == 2 and st["in_flight"] == 2   # the third send waits
        assert st["dropped"] > 0 and st["buffered"] == 20
        await m.aclose(timeout=0.1)

    run(go())


def test_a_send_that_never_answers_is_given_up_on():
    async def go():
        sink = FakeSink(reply="never")
        m = Echo(sink=sink, flush_rows=1, flush_ms=5, max_in_flight=1, send_timeout_s=0.05,
                 send_retries=0)    # at most once here; retries: tests/wire/test_emitter.py
        for i in range(3):
            await call(m, {"pred": i})
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        st = m.monitor_stats()
        assert st["send_timeouts"] >= 1 and st["send_errors"] >= 1 and st["lost_rows"] >= 1
        assert "outstanding" in st["last_error"]
        await m.aclose(timeout=0.1)

    run(go())


def test_send_errors_are_counted():
    async def go():
        for reply in ("raise", "fail"):
            sink = FakeSink(reply=reply)
            m = Echo(sink=sink, send_retries=0)
            st, _, _ = await call(m, {})
            assert st == 200
            await m.flush()
            s = m.monitor_stats()
            assert s["send_errors"] == 1 and s["lost_rows"] == 1, reply
            assert s["in_flight"] == 0
            await m.aclose()

    run(go())


def test_shard_reports_are_counted():
    async def go():
        sink = FakeSink(n_shards=2, reply="report")
        m = Echo(sink=sink)
        for i in range(20):
            await call(m, {"pred": i})
        await m.flush()
        st = m.monitor_stats()
        assert st["accepted"] == 20 and st["sent_rows"] == 20 and st["in_flight"] == 0
        await m.aclose()

    run(go())


def test_invalid_predictions_are_rejected_like_the_schema():
    async def go():
        sink = FakeSink()
        m = Echo(sink=sink)
        st, _, _ = await call(m, {"pred": [1, 2]})       # JSON, but not a prediction
        assert st == 200
        await call(m, {"pred": None})                      # ok without a prediction
        await call(m, {"pred": "good"})
        await m.flush()
        st = m.monitor_stats()
        assert sink.rows == 1 and st["invalid"] == 2
        assert st["invalid_by_reason"] == {"prediction:wrong_type": 1, "prediction:missing": 1}
        await m.aclose()

    run(go())


_NOW = 1_750_000_000_000


@pytest.mark.parametrize("pred", PREDICTION_CASES)
def test_fast_normalizer_matches_the_schema(pred):
    m = Echo(sink=FakeSink())
    check_same(m, dict(pred=pred))


@pytest.mark.parametrize("segs,cost", [
    (None, None), ({"region": "eu"}, None), ({"region": ""}, None), ({"model": "x"}, None),
    ({"__x": "y"}, None), ({"9a": "y"}, None), ({"a": 1}, None), ({}, {}),
    ({f"k{i}": "v" for i in range(17)}, None), (None, {"usd": 0.1, "tokens": 3}),
    (None, {"usd": 1}), (None, {"usd": -1.0}), (None, {"usd": True}), (None, {"tokens": 1.0}),
    (None, {"tokens": -1}), (None, {"usd": None, "tokens": None}), (None, {"eur": 1.0}),
    (None, {"usd": float("inf")}),
])
def test_fast_normalizer_matches_the_schema_for_segments_and_cost(segs, cost):
    m = Echo(sink=FakeSink())
    check_same(m, dict(pred="a", segs=segs, cost=cost))


def check_same(m: MonitoredModel, kw: dict) -> None:
    pred, segs, cost = kw["pred"], kw.get("segs"), kw.get("cost")
    t0 = time.perf_counter_ns()
    row = (t0, "rid-1", 1_500_000, True, pred, segs, cost, None, "7")
    fast = m._records([row])
    ts = fast[0]["ts"] if fast else (t0 + time.time_ns() - time.perf_counter_ns()) // 1_000_000
    wire = m._wire("rid-1:primary", "rid-1", ts, "7", 1_500_000, True, pred, segs, cost, None)
    ref = validate_rows([wire], now_ms=ts, expect="inference")
    if ref.rejections:
        assert fast == [], (kw, ref.rejections)
        reasons = {f"{r.field}:{r.reason}" for r in ref.rejections}
        assert set(m.monitor_stats()["invalid_by_reason"]) == reasons
    else:
        assert fast == ref.inference, kw


# ---------------------------------------------------------------------------
# infer(): a caller's request id (the experiment ingress), and models that follow an alias


def _series(batch) -> list:
    """(model_version, variant, request-id hash, error) per row."""
    return [(batch.series_keys[s][1], batch.series_keys[s][2], int(r), bool(e))
            for s, r, e in zip(batch.series.tolist(), batch.request_id, batch.error.tolist())]


def test_infer_emits_the_callers_request_id_with_each_variants_label():
    async def go():
        sink = FakeSink()
        primary = Echo(sink=sink, variant="primary")
        shadow = Echo(sink=sink, variant="shadow", model_version="8")
        a = await primary.infer({"pred": "x"}, "req-1")
        b = await shadow.infer({"pred": "y"}, "req-1")
        assert a == {"request_id": "req-1", "prediction": "x", "variant": "primary",
                     "model_version": "7"}
        assert b == {"request_id": "req-1", "prediction": "y", "variant": "shadow",
                     "model_version": "8"}
        with pytest.raises(ValueError, match="boom"):          # recorded, then re-raised
            await shadow.infer({"raise": True}, "req-2")
        with pytest.raises(ValueError, match="request_id"):
            await shadow.infer({}, "x" * 300)
        made = await primary.infer({"pred": "z"})               # no id: one is made
        assert made["request_id"].startswith(primary._mon_id_prefix)
        await primary.flush()
        await shadow.flush()
        rows = _series(one_batch(sink))
        assert sorted(rows) == sorted([("7", "primary", hash_id("req-1"), False),
                                       ("8", "shadow", hash_id("req-1"), False),
                                       ("8", "shadow", hash_id("req-2"), True),
                                       ("7", "primary", hash_id(made["request_id"]), False)])
        assert primary.monitor_stats()["infer_calls"] == 2
        await primary.aclose()
        await shadow.aclose()

    run(go())


class NoModel(Echo):
    async def predict(self, payload):
        raise ModelUnavailable("no alias 'challenger' yet")


def test_an_unavailable_model_is_a_503_and_records_nothing():
    async def go():
        sink = FakeSink()
        m = NoModel(sink=sink)
        st, body, _ = await call(m, {}, headers={"x-request-id": "r-9"})
        assert st == 503 and body == {"request_id": "r-9",
                                      "error": "ModelUnavailable: no alias 'challenger' yet"}
        with pytest.raises(ModelUnavailable):
            await m.infer({}, "r-10")
        await m.flush()
        assert sink.rows == 0 and m.monitor_stats()["unavailable"] == 2
        await m.aclose()

    run(go())


class FakeRegistry:
    """The alias table and the 'models' a version loads to; loads can be made slow."""

    def __init__(self, version: str | None) -> None:
        self.version = version
        self.load_s = 0.0
        self.loads: list[str] = []
        self.fail_resolve = False


class Follower(AliasFollowingModel):
    def __init__(self, reg: FakeRegistry, **kw) -> None:
        self.reg = reg
        kw.setdefault("alias_poll_s", 0.02)
        super().__init__(registered_model="churn", alias="champion", **kw)

    def resolve_alias(self):
        if self.reg.fail_resolve:
            raise ConnectionError("registry down")
        return self.reg.version

    def load_version(self, version):
        time.sleep(self.reg.load_s)             # in a thread: the loop keeps serving
        self.reg.loads.append(version)
        return f"model-v{version}"

    async def predict(self, payload):
        model = self.loaded()
        await asyncio.sleep(payload.get("sleep", 0))
        return model


def test_alias_follower_swaps_without_dropping_requests():
    async def go():
        reg = FakeRegistry("1")
        sink = FakeSink()
        m = Follower(reg, sink=sink, variant="shadow")
        assert m.model_version == "1" and reg.loads == ["1"]
        # a slow request takes model 1; the alias moves (slow load) while it runs
        slow = asyncio.ensure_future(call(m, {"sleep": 0.3}, headers={"x-request-id": "slow"}))
        await asyncio.sleep(0.01)
        reg.version, reg.load_s = "2", 0.1
        answers = []
        t0 = time.monotonic()
        while m.model_version != "2" and time.monotonic() - t0 < 5:
            st, body, _ = await call(m, {})     # served all along, on model 1 until the swap
            assert st == 200
            answers.append(body["prediction"])
            await asyncio.sleep(0.005)
        assert m.model_version == "2" and reg.loads == ["1", "2"]
        st, body, _ = await slow
        assert st == 200 and body["prediction"] == "model-v1"   # finished on the old model
        assert answers and set(answers) <= {"model-v1", "model-v2"}
        assert "model-v1" in answers                            # the loop served during the load
        out = await m.infer({}, "after")
        assert out["prediction"] == "model-v2" and out["model_version"] == "2"
        await m.flush()
        rows = _series(one_batch(sink))
        by_rid = {r: v for v, _, r, _ in rows}
        assert by_rid[hash_id("slow")] == "1" and by_rid[hash_id("after")] == "2"
        st = m.alias_stats()
        assert st["swaps"] == 1 and st["version"] == "2" and st["polls"] >= 1

        # a registry error keeps the model; a removed alias keeps it too (the default)
        reg.fail_resolve = True
        await m.refresh_alias()
        assert m.alias_stats()["poll_errors"] >= 1
        assert (await m.infer({}, "x"))["model_version"] == "2"
        reg.fail_resolve = False
        reg.version = None
        await m.refresh_alias()
        assert m.alias_stats()["alias_exists"] is False
        assert (await m.infer({}, "y"))["prediction"] == "model-v2"
        await m.aclose(timeout=0.1)

    run(go())


def test_alias_follower_without_the_alias_answers_503_until_it_appears():
    async def go():
        reg = FakeRegistry(None)
        sink = FakeSink()
        m = Follower(reg, sink=sink, on_alias_removed="unavailable")
        assert m.model_version == "none" and reg.loads == []
        st, body, _ = await call(m, {})
        assert st == 503 and "no alias 'champion'" in body["error"]
        reg.version = "3"
        t0 = time.monotonic()
        while m.alias_stats()["version"] != "3" and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.01)
        st, body, _ = await call(m, {})
        assert st == 200 and body["prediction"] == "model-v3" and m.model_version == "3"
        reg.version = None                      # removed: this one stops answering
        await m.refresh_alias()
        st, _, _ = await call(m, {})
        assert st == 503
        reg.version = "3"                       # back: no second load of version 3
        await m.refresh_alias()
        assert (await m.infer({}, "z"))["prediction"] == "model-v3" and reg.loads == ["3"]
        await m.flush()
        assert sink.rows == 2 and m.monitor_stats()["unavailable"] == 2
        await m.aclose(timeout=0.1)

    run(go())


def test_bad_arguments():
    with pytest.raises(ValueError):
        Echo(model="")
    with pytest.raises(ValueError):
        Echo(flush_ms=0)
    with pytest.raises(ValueError):
        Echo(feature_sample=2.0)
    with pytest.raises(ValueError):
        Echo(buffer_rows=0)


def test_close_flushes_and_later_requests_still_reply():
    async def go():
        sink = FakeSink()
        m = Echo(sink=sink, flush_ms=60_000)
        await call(m, {})
        closing = m.__del__()          # what Serve awaits on a graceful shutdown
        assert asyncio.iscoroutine(closing)
        await closing
        assert sink.rows == 1
        st, _, _ = await call(m, {})              # shutting down: still answered
        assert st == 200
        assert m.__del__() is None

    run(go())


# ---------------------------------------------------------------------------
# with real Ray Serve and real shard actors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_app(request):
    """Ray (2 CPUs), two named shard actors, and a monitored deployment on a free port."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from actors.remote import NAMESPACE, ShardActor, shard_name

    own = not ray.is_initialized()
    if own:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    else:   # the session's Ray and Serve (tests/conftest.py)
        port = request.getfixturevalue("serve_port")
    kill_named_actors(*sidecar_actor_names())   # another module's leftovers mislead counts
    config = {"series": {"segments": ["region"]}}
    shards = [ShardActor.options(name=shard_name(i), namespace=NAMESPACE).remote(i, config)
              for i in range(2)]
    ray.get([s.ping.remote() for s in shards])

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Classifier(MonitoredModel):
        def __init__(self) -> None:
            super().__init__(model="toy", model_version="1", n_shards=2, flush_rows=64,
                             flush_ms=20)

        async def predict(self, payload: dict):
            if payload.get("raise"):
                raise RuntimeError("model failed")
            x = float(payload.get("x", 0.0))
            return {"label": int(x > 0.5), "score": x}

        def segments(self, payload):
            return {"region": payload.get("region", "eu")}

    handle = serve.run(Classifier.bind(), name="monitor-test", route_prefix="/monitored")
    yield {"url": f"http://127.0.0.1:{port}/monitored", "shards": shards, "handle": handle,
           "ray": ray}
    serve.delete("monitor-test")
    kill_named_actors(*sidecar_actor_names())
    if own:
        serve.shutdown()
        ray.shutdown()


def _post(url: str, payload: dict, headers: dict | None = None):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, body, hdrs = r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        status, body, hdrs = e.code, json.loads(e.read()), e.headers
    ids = hdrs.get_all("x-request-id")
    assert ids is not None and len(ids) == 1, ids   # the proxy's echo, no second header
    return status, body, ids[0]


@pytest.mark.integration
def test_serve_events_reach_the_right_shards(serve_app):
    ray = serve_app["ray"]
    url = serve_app["url"]
    ids = []
    n_err = 3
    for i in range(60):
        payload = {"x": (i % 10) / 10, "region": "us" if i % 2 else "eu"}
        headers = {"x-request-id": f"it-{i}"} if i % 3 == 0 else None
        st, body, rid = _post(url, payload, headers)
        assert st == 200 and rid == body["request_id"]
        assert body["prediction"] == {"label": int(payload["x"] > 0.5), "score": payload["x"]}
        if headers:
            assert rid == f"it-{i}"
        ids.append(rid)
    for i in range(n_err):
        st, body, rid = _post(url, {"raise": True})
        assert st == 500 and "model failed" in body["error"]
        ids.append(rid)
    assert len(set(ids)) == len(ids)

    # the flush (20 ms) and the sends are asynchronous: wait until the shards have it all
    expected = np.bincount(shard_of(hash_ids(np.array(ids, dtype=object)), 2), minlength=2)
    deadline = time.time() + 60
    while True:
        stats = ray.get([s.stats.remote() for s in serve_app["shards"]])
        got = [st["counters"].get("inference_in", 0) for st in stats]
        if sum(got) >= len(ids) or time.time() > deadline:
            break
        time.sleep(0.2)
    assert got == expected.tolist()
    mon = serve_app["handle"].monitor_stats.remote().result()
    assert mon["accepted"] == len(ids) and mon["sent_rows"] == len(ids)
    assert mon["error_events"] == n_err and mon["dropped"] == 0 and mon["send_errors"] == 0
    assert mon["invalid"] == 0

    # the shards' partials hold the requests with their series and errors
    parts = ray.get([s.flush.remote() for s in serve_app["shards"]])
    series = {p.series for partials, _, _ in parts for p in partials}
    assert ("toy", "1", "primary", "predict", (("region", "eu"),)) in series
    assert ("toy", "1", "primary", "predict", (("region", "us"),)) in series


@pytest.mark.integration
def test_shard_sink_discovers_and_routes(serve_app, monkeypatch):
    from app.monitor import SHARDS_ENV, ShardSink
    from kpistream.wire.batch import InferenceBatch

    monkeypatch.delenv(SHARDS_ENV, raising=False)
    sink = ShardSink(retry_s=0)
    assert sink.n_shards is None
    assert not sink.ready()           # no publisher: the count must hold on a second probe
    assert sink.ready() and sink.n_shards == 2
    monkeypatch.setenv(SHARDS_ENV, "2")
    assert ShardSink().n_shards == 2
    assert not ShardSink(5, retry_s=0).ready()   # kpistream-shard-2.. do not exist

    now = time.time_ns() // 1_000_000
    recs = [{"event_id": f"sink-{i}:primary", "request_id": f"sink-{i}", "ts": now,
             "model": "toy", "model_version": "1", "variant": "primary", "endpoint": "",
             "latency_ms": 1.0, "status": "ok", "pred_label": "1", "pred_score": None,
             "pred_value": None, "ranking": None, "segments": {}, "cost_usd": None,
             "tokens": None, "features": None} for i in range(40)]
    batch = InferenceBatch.from_records(recs)

    async def send_mixed():             # rows of both shards in one batch: split by the sink
        return await sink.send("inference", batch)

    reports = asyncio.run(send_mixed())
    assert sum(r["accepted"] for r in reports) == 40
