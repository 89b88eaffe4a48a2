"""Wire schema: validation, normalization, rejections, payload decoding, JSON Schema."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pytest run without the project installed
    sys.path.insert(0, str(ROOT))

from kpistream.wire.batch import (KIND_CODE, FeedbackBatch, InferenceBatch,  # noqa: E402
                             hash_ids)
from kpistream.errors import EventError, Rejection  # noqa: E402
from kpistream.wire.schema import (MAX_FEATURES, MAX_RANKING, MAX_RELEVANCE,  # noqa: E402
                              MAX_SEGMENTS, MAX_STR, REASONS, SCHEMA_ID, SCHEMA_VERSION,
                              FeedbackEvent, InferenceEvent, UndecodableLine,
                              ValidationResult, json_schema, parse_payload, schema_text,
                              validate_event, validate_rows)

NOW = 1_717_000_000_000  # 2024-05-29T16:26:40Z
NOW_ISO = "2024-05-29T16:26:40Z"
SCHEMA_FILE = ROOT / "schema" / "events.v1.json"
DROP = object()


def inf(**kw) -> dict:
    row = {"type": "inference", "event_id": "e1", "request_id": "r1", "ts": NOW,
           "model": "churn", "model_version": "7", "variant": "primary", "endpoint": "/predict",
           "latency_ms": 12.5, "status": "ok", "prediction": "cat"}
    for k, v in kw.items():
        if v is DROP:
            row.pop(k, None)
        else:
            row[k] = v
    return row


def fb(**kw) -> dict:
    row = {"type": "feedback", "event_id": "f1", "request_id": "r1", "ts": NOW,
           "kind": "label", "value": "cat"}
    for k, v in kw.items():
        if v is DROP:
            row.pop(k, None)
        else:
            row[k] = v
    return row


def check(rows: list, **kw) -> ValidationResult:
    return validate_rows(rows, now_ms=NOW, **kw)


def assert_rejected(bad, field: str, reason: str, *, words: tuple[str, ...] = (),
                    **kw) -> Rejection:
    """``bad`` between two good rows: exactly it is rejected, the good rows keep their indexes."""
    res = check([inf(event_id="good-0"), bad, fb(event_id="good-2")], **kw)
    assert len(res.rejections) == 1, res.rejections
    r = res.rejections[0]
    assert (r.index, r.field, r.reason) == (1, field, reason), r
    assert r.reason in REASONS
    assert r.message and r.message[0].isalpha() and r.message.endswith("."), r.message
    for w in words:
        assert w in r.message, (w, r.message)
    assert [x["event_id"] for x in res.inference] == ["good-0"]
    assert res.inference_index == [0]
    assert [x["event_id"] for x in res.feedback] == ["good-2"]
    assert res.feedback_index == [2]
    assert res.counts() == {(field, reason): 1}
    return r


# ---------------------------------------------------------------------------
# bad rows: one test per kind, exact field and reason


def test_missing_field():
    assert_rejected(inf(model_version=DROP), "model_version", "missing", words=("required",))
    assert_rejected(fb(request_id=DROP), "request_id", "missing")


def test_missing_prediction_when_ok_but_not_when_error():
    assert_rejected(inf(prediction=DROP), "prediction", "missing", words=("status",))
    assert_rejected(inf(prediction=None), "prediction", "missing")
    res = check([inf(prediction=DROP, status="error")])
    assert not res.rejections
    rec = res.inference[0]
    assert rec["status"] == "error" and rec["pred_label"] is None and rec["pred_value"] is None


def test_wrong_type():
    assert_rejected(inf(latency_ms="12"), "latency_ms", "wrong_type", words=("number", "string"))
    assert_rejected(inf(latency_ms=True), "latency_ms", "wrong_type")
    assert_rejected(inf(event_id=5), "event_id", "wrong_type")
    assert_rejected(inf(cost={"tokens": 1.5}), "cost.tokens", "wrong_type", words=("integer",))
    assert_rejected(inf(segments=["a"]), "segments", "wrong_type", words=("object",))
    assert_rejected(inf(prediction=[1, 2]), "prediction", "wrong_type", words=("label",))
    assert_rejected(inf(prediction={"label": 1.5}), "prediction.label", "wrong_type")
    assert_rejected(inf(status=1), "status", "wrong_type")


def test_bad_enum_values():
    assert_rejected(inf(status="okay"), "status", "bad_value", words=("'ok'", "'error'"))
    assert_rejected(inf(event_id=""), "event_id", "bad_value", words=("empty",))


@pytest.mark.parametrize("x", [float("nan"), float("inf"), float("-inf")])
def test_not_finite_latency(x):
    assert_rejected(inf(latency_ms=x), "latency_ms", "not_finite", words=("finite",))


@pytest.mark.parametrize("x", [float("nan"), float("inf")])
def test_not_finite_nested(x):
    assert_rejected(inf(prediction={"label": "cat", "score": x}), "prediction.score", "not_finite")
    assert_rejected(inf(prediction={"label": "cat", "scores": {"cat": 0.5, "dog": x}}),
                    "prediction.scores.dog", "not_finite")
    assert_rejected(inf(features={"age": 3, "income": x}), "features.income", "not_finite")
    assert_rejected(inf(prediction=x), "prediction", "not_finite")
    assert_rejected(inf(cost={"usd": x}), "cost.usd", "not_finite")
    assert_rejected(fb(kind="reward", value=x), "value", "not_finite", words=("reward",))
    assert_rejected(fb(kind="relevance", value={"a": x}), "value.a", "not_finite")


def test_nan_from_json_text_is_not_finite():
    rows = parse_payload('{"type": "inference", "event_id": "e", "request_id": "r", "ts": %d, '
                         '"model": "m", "model_version": "1", "variant": "p", "latency_ms": NaN, '
                         '"status": "ok", "prediction": 1}' % NOW)
    res = check(rows)
    assert [(r.field, r.reason) for r in res.rejections] == [("latency_ms", "not_finite")]


def test_negative_numbers():
    assert_rejected(inf(latency_ms=-0.5), "latency_ms", "negative", words=(">= 0",))
    assert_rejected(inf(cost={"usd": -1}), "cost.usd", "negative")
    assert_rejected(inf(cost={"tokens": -1}), "cost.tokens", "negative")
    assert_rejected(fb(kind="dwell", value=-3), "value", "negative", words=("dwell",))
    assert_rejected(fb(kind="relevance", value={"a": 1, "b": -1}), "value.b", "negative")
    assert check([inf(latency_ms=0, cost={"usd": 0, "tokens": 0})]).rejections == []


def test_oversized_string():
    ok = "x" * MAX_STR
    assert check([inf(event_id=ok, model=ok, segments={"region": ok})]).rejections == []
    long = "x" * (MAX_STR + 1)
    assert_rejected(inf(event_id=long), "event_id", "too_long", words=("257", "256"))
    assert_rejected(inf(endpoint=long), "endpoint", "too_long")
    assert_rejected(inf(prediction=long), "prediction", "too_long")
    assert_rejected(inf(segments={"region": long}), "segments.region", "too_long")
    r = assert_rejected(inf(segments={long: "eu"}), f"segments.{'x' * 63}…", "too_long")
    assert "key" in r.message
    assert_rejected(inf(prediction={"ranking": ["a", long]}), "prediction.ranking[1]", "too_long")
    assert_rejected(inf(features={"f": long}), "features.f", "too_long")
    assert_rejected(fb(value=long), "value", "too_long", words=("label",))


def test_too_many_segments():
    segs = {f"k{i}": "v" for i in range(MAX_SEGMENTS)}
    assert check([inf(segments=segs)]).rejections == []
    segs["one_more"] = "v"
    assert_rejected(inf(segments=segs), "segments", "too_many", words=("17", "16"))


def test_too_many_ranking_items():
    items = [f"i{i}" for i in range(MAX_RANKING)]
    assert check([inf(prediction={"ranking": items})]).rejections == []
    assert_rejected(inf(prediction={"ranking": items + ["one more"]}), "prediction.ranking",
                    "too_many", words=(str(MAX_RANKING + 1),))


def test_too_many_relevance_items_and_features():
    items = [f"i{i}" for i in range(MAX_RELEVANCE + 1)]
    assert_rejected(fb(kind="relevance", value=items), "value", "too_many")
    assert_rejected(fb(kind="relevance", value=dict.fromkeys(items, 1)), "value", "too_many")
    feats = {f"f{i}": 1.0 for i in range(MAX_FEATURES + 1)}
    assert_rejected(inf(features=feats), "features", "too_many")


def test_duplicate_ranking_items():
    assert_rejected(inf(prediction={"ranking": ["a", "b", "a"]}), "prediction.ranking",
                    "bad_value", words=("'a'", "distinct"))


def test_far_future_ts():
    assert_rejected(inf(ts=NOW + 300_001), "ts", "future", words=("ahead",))
    assert_rejected(fb(ts="2024-05-29T16:31:41Z"), "ts", "future")
    assert check([inf(ts=NOW + 300_000)]).rejections == []  # exactly at the limit
    # the limit is a parameter
    assert check([inf(ts=NOW + 10_000)], max_future_ms=5_000).rejections[0].reason == "future"
    assert check([inf(ts=NOW + 3_600_000)], max_future_ms=3_600_000).rejections == []
    # the past is fine (late events are the window's business)
    assert check([inf(ts=NOW - 86_400_000 * 365)]).rejections == []


def test_ts_out_of_range():
    r = assert_rejected(inf(ts=NOW // 1000), "ts", "bad_value", words=("2000-01-01",))
    assert "seconds" in r.message  # hints at the usual mistake
    assert_rejected(inf(ts=NOW * 1000), "ts", "bad_value", words=("microseconds",))
    assert_rejected(inf(ts="1999-12-31T23:59:59Z"), "ts", "bad_value")
    assert_rejected(inf(ts="2200-01-01T00:00:00Z"), "ts", "bad_value")
    assert check([inf(ts="2000-01-01T00:00:00Z")], max_future_ms=10**13).rejections == []


def test_naive_rfc3339_ts():
    assert_rejected(inf(ts="2024-05-29T16:26:40"), "ts", "bad_value", words=("timezone",))
    assert_rejected(inf(ts="2024-05-29T16:26:40.123"), "ts", "bad_value", words=("timezone",))


def test_unparseable_ts():
    for bad in ("yesterday", "2024-05-29", "2024-13-01T00:00:00Z", "2024-05-29T16:26:40+25:00",
                "", "2024-05-29T16:26:40ZZ"):
        assert_rejected(inf(ts=bad), "ts", "bad_value")
    assert_rejected(inf(ts=1.717e12), "ts", "wrong_type", words=("float",))
    assert_rejected(inf(ts=True), "ts", "wrong_type")
    assert_rejected(inf(ts=None), "ts", "wrong_type")
    assert_rejected(inf(ts=DROP), "ts", "missing")


def test_unknown_field():
    r = assert_rejected(inf(latency=3.0, latency_ms=DROP), "latency", "unknown_field",
                        words=("did you mean 'latency_ms'",))
    assert "latency_ms is required" in r.message  # the consequence is listed too
    assert_rejected(inf(cost={"usd": 1, "dollars": 2}), "cost.dollars", "unknown_field")
    assert_rejected(inf(prediction={"label": "a", "confidence": 0.4}),
                    "prediction.confidence", "unknown_field")
    assert_rejected(fb(model="m"), "model", "unknown_field")


def test_unknown_feedback_kind():
    assert_rejected(fb(kind="like", value=True), "kind", "bad_value", words=("'like'", "'thumbs'"))
    assert_rejected(fb(kind=DROP), "kind", "missing")


@pytest.mark.parametrize("kind,value,reason", [
    ("label", [1], "wrong_type"),
    ("label", {"a": 1}, "wrong_type"),
    ("label", "", "bad_value"),
    ("reward", "1.0", "wrong_type"),
    ("reward", True, "wrong_type"),
    ("thumbs", 1, "wrong_type"),
    ("thumbs", "meh", "bad_value"),
    ("click", 1, "wrong_type"),
    ("click", "yes", "wrong_type"),
    ("conversion", 0.0, "wrong_type"),
    ("dwell", "3s", "wrong_type"),
    ("dwell", False, "wrong_type"),
    ("relevance", "a", "wrong_type"),
    ("relevance", 3, "wrong_type"),
])
def test_wrong_value_for_kind(kind, value, reason):
    assert_rejected(fb(kind=kind, value=value), "value", reason, words=(repr(kind),))


@pytest.mark.parametrize("kind", ["label", "reward", "thumbs", "dwell", "relevance"])
def test_value_required_except_click_and_conversion(kind):
    assert_rejected(fb(kind=kind, value=DROP), "value", "missing", words=(repr(kind),))


def test_bad_relevance_items():
    assert_rejected(fb(kind="relevance", value=["a", None]), "value[1]", "wrong_type")
    assert_rejected(fb(kind="relevance", value=["a", ""]), "value[1]", "bad_value")
    assert_rejected(fb(kind="relevance", value={"a": "high"}), "value.a", "wrong_type")


@pytest.mark.parametrize("row,got", [([1, 2], "array"), ("event", "string"), (3, "integer"),
                                     (None, "null")])
def test_non_object_row(row, got):
    assert_rejected(row, "", "not_an_object", words=("object", got))


def test_undecodable_ndjson_line():
    good = json.dumps(inf(event_id="good-0"))
    body = f"{good}\n{{\"type\": \"inference\", oops}}\n\n{json.dumps(fb(event_id='good-2'))}\n"
    rows = parse_payload(body.encode())
    assert len(rows) == 3 and isinstance(rows[1], UndecodableLine) and rows[1].line == 2
    res = check(rows)
    assert [(r.index, r.field, r.reason) for r in res.rejections] == [(1, "", "bad_json")]
    assert "line 2" in res.rejections[0].message
    assert res.inference_index == [0] and res.feedback_index == [2]
    assert res.inference[0]["event_id"] == "good-0" and res.feedback[0]["event_id"] == "good-2"


def test_invalid_utf8_line():
    body = (json.dumps(inf()) + "\n").encode() + b'{"event_id": "\xff\xfe"}\n' + \
        json.dumps(fb()).encode()
    rows = parse_payload(body)
    assert isinstance(rows[1], UndecodableLine) and "UTF-8" in rows[1].error
    res = check(rows)
    assert [(r.index, r.reason) for r in res.rejections] == [(1, "bad_json")]
    assert len(res.inference) == 1 and len(res.feedback) == 1


def test_type_missing_unknown_or_wrong():
    assert_rejected(inf(type=DROP), "type", "missing")
    assert_rejected(inf(type="prediction"), "type", "bad_value", words=("'inference'",))
    assert_rejected(inf(type=1), "type", "wrong_type")


def test_expect_rejects_the_other_type_and_lets_type_be_omitted():
    rows = [inf(type=DROP), fb(), inf()]
    res = check(rows, expect="inference")
    assert [(r.index, r.field, r.reason) for r in res.rejections] == [(1, "type", "wrong_type")]
    assert res.inference_index == [0, 2] and res.feedback == []
    res = check([fb(type=DROP), inf(), fb()], expect="feedback")
    assert [(r.index, r.field, r.reason) for r in res.rejections] == [(1, "type", "wrong_type")]
    assert res.feedback_index == [0, 2]
    assert "type" not in rows[0]  # the caller's row is not modified
    with pytest.raises(ValueError):
        check([], expect="bogus")


def test_schema_version():
    assert check([inf(schema_version=SCHEMA_VERSION), fb(schema_version=1)]).rejections == []
    assert_rejected(inf(schema_version=2), "schema_version", "bad_value")
    assert_rejected(inf(schema_version=True), "schema_version", "wrong_type")
    assert_rejected(fb(schema_version="1"), "schema_version", "wrong_type")


def test_segment_keys_must_be_label_names():
    assert_rejected(inf(segments={"model": "x"}), "segments.model", "bad_value",
                    words=("reserved",))
    assert_rejected(inf(segments={"user-tier": "x"}), "segments.user-tier", "bad_value")
    assert_rejected(inf(segments={"__name__": "x"}), "segments.__name__", "bad_value")
    assert_rejected(inf(segments={"": "x"}), 'segments.""', "bad_value", words=("empty",))
    assert_rejected(inf(segments={"region": ""}), "segments.region", "bad_value")
    assert_rejected(inf(segments={"region": 1}), "segments.region", "wrong_type")


def test_several_errors_one_rejection_all_in_message():
    r = assert_rejected(inf(event_id=7, latency_ms=-1, status="fine"), "event_id", "wrong_type")
    assert "latency_ms" in r.message and "status" in r.message


def test_counts_and_one_rejection_per_row():
    rows = [inf(latency_ms=-1), inf(latency_ms=-2), inf(), "x", fb(kind="nope"), fb()]
    res = check(rows)
    assert res.counts() == {("latency_ms", "negative"): 2, ("", "not_an_object"): 1,
                            ("kind", "bad_value"): 1}
    assert [r.index for r in res.rejections] == [0, 1, 3, 4]
    assert res.inference_index == [2] and res.feedback_index == [5]
    assert res.accepted == 2
    assert all(isinstance(r.as_dict(), dict) for r in res.rejections)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.inference = []  # type: ignore[misc]


def test_validate_event_raises_event_error():
    assert isinstance(validate_event(inf()), InferenceEvent)
    assert isinstance(validate_event(fb(), now_ms=NOW), FeedbackEvent)
    with pytest.raises(EventError) as ei:
        validate_event(inf(latency_ms=-1))
    assert ei.value.field == "latency_ms" and "negative" in ei.value.reason
    with pytest.raises(EventError):
        validate_event(inf(ts=NOW + 10**6), now_ms=NOW)
    validate_event(inf(ts=NOW + 10**6))  # no clock, no future guard


# ---------------------------------------------------------------------------
# timestamps


@pytest.mark.parametrize("text,ms", [
    ("2024-05-29T16:26:40Z", NOW),
    ("2024-05-29T16:26:40.000Z", NOW),
    ("2024-05-29T18:26:40+02:00", NOW),
    ("2024-05-29T18:26:40.123+02:00", NOW + 123),
    ("2024-05-29T11:26:40.123456-05:00", NOW + 123),
    ("2024-05-29T16:26:40.5Z", NOW + 500),
    ("2024-05-29T16:26:40.999999999Z", NOW + 999),
    ("2024-05-29t16:26:40z", NOW),
    ("2024-05-29 16:26:40+00:00", NOW),
    ("2024-05-30T00:26:40+08:00", NOW),
])
def test_rfc3339_equals_epoch_ms(text, ms):
    res = check([inf(ts=text), inf(ts=ms), fb(ts=text), fb(ts=ms)])
    assert not res.rejections
    assert [r["ts"] for r in res.inference + res.feedback] == [ms] * 4
    assert all(type(r["ts"]) is int for r in res.inference + res.feedback)


@settings(max_examples=200, deadline=None)
@given(st.datetimes(min_value=datetime(2000, 1, 2), max_value=datetime(2199, 12, 30)),
       st.integers(-14 * 60, 14 * 60), st.booleans())
def test_rfc3339_roundtrip_property(naive, offset_min, with_fraction):
    naive = naive.replace(microsecond=(naive.microsecond // 1000) * 1000 if with_fraction else 0)
    tz = timezone(timedelta(minutes=offset_min))
    aware = naive.replace(tzinfo=tz)
    ms = (aware - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(milliseconds=1)
    text = aware.isoformat(timespec="milliseconds" if with_fraction else "seconds")
    if offset_min == 0 and with_fraction:
        text = text.replace("+00:00", "Z")
    res = validate_rows([inf(ts=text), inf(ts=ms)], now_ms=ms)
    assert not res.rejections, res.rejections
    assert res.inference[0]["ts"] == res.inference[1]["ts"] == ms


def test_aware_datetime_from_python_callers():
    dt = datetime(2024, 5, 29, 18, 26, 40, tzinfo=timezone(timedelta(hours=2)))
    assert check([inf(ts=dt)]).inference[0]["ts"] == NOW
    assert check([inf(ts=dt.replace(tzinfo=None))]).rejections[0].reason == "bad_value"


# ---------------------------------------------------------------------------
# normalization and the batch loaders


def test_prediction_forms_normalize():
    rows = [
        inf(event_id="a", prediction="cat"),
        inf(event_id="b", prediction=1),
        inf(event_id="c", prediction=True),
        inf(event_id="d", prediction={"label": "dog", "score": 0.9}),
        inf(event_id="e", prediction={"label": 0, "scores": {"0": 0.7, "1": 0.3}}),
        inf(event_id="f", prediction={"label": "x", "scores": {"y": 1.0}}),
        inf(event_id="g", prediction={"ranking": ["i1", 42, "i3"]}),
        inf(event_id="h", prediction=2.5),
        inf(event_id="i", prediction=-3.0),
    ]
    res = check(rows)
    assert not res.rejections
    got = {r["event_id"]: (r["pred_label"], r["pred_score"], r["pred_value"], r["ranking"])
           for r in res.inference}
    assert got == {
        "a": ("cat", None, None, None),
        "b": ("1", None, None, None),
        "c": ("true", None, None, None),
        "d": ("dog", 0.9, None, None),
        "e": ("0", 0.7, None, None),  # score taken from scores[label]
        "f": ("x", None, None, None),
        "g": (None, None, None, ["i1", "42", "i3"]),
        "h": (None, None, 2.5, None),
        "i": (None, None, -3.0, None),
    }


def test_inference_records_load_into_batch():
    rows = [
        inf(event_id="a", request_id="r1", prediction="cat", segments={"region": "eu"},
            cost={"usd": 0.002, "tokens": 40}, features={"age": 31, "plan": "pro", "x": None}),
        inf(event_id="b", request_id="r2", prediction={"label": 1, "score": 0.25},
            endpoint=DROP, latency_ms=3),
        inf(event_id="c", request_id="r3", prediction={"ranking": ["p", "q"]}, status="error"),
        inf(event_id="d", request_id="r4", prediction=7.5, variant="shadow", ts=NOW_ISO),
    ]
    res = check(rows)
    assert not res.rejections
    rec = res.inference[0]
    assert set(rec) == {"event_id", "request_id", "ts", "model", "model_version", "variant",
                        "endpoint", "latency_ms", "status", "pred_label", "pred_score",
                        "pred_value", "ranking", "segments", "cost_usd", "tokens", "features"}
    assert rec["segments"] == {"region": "eu"} and res.inference[1]["segments"] == {}
    assert res.inference[1]["endpoint"] == ""
    assert isinstance(res.inference[1]["latency_ms"], float)
    b = InferenceBatch.from_records(res.inference)
    assert len(b) == 4
    assert b.ts.tolist() == [NOW] * 4
    assert b.latency_ms.tolist() == [12.5, 3.0, 12.5, 12.5]
    assert b.error.tolist() == [False, False, True, False]
    assert [b.labels[i] if i >= 0 else None for i in b.pred_label] == ["cat", "1", None, None]
    np.testing.assert_array_equal(b.pred_score, [np.nan, 0.25, np.nan, np.nan])
    np.testing.assert_array_equal(b.pred_value, [np.nan, np.nan, np.nan, 7.5])
    np.testing.assert_array_equal(b.cost_usd, [0.002, np.nan, np.nan, np.nan])
    np.testing.assert_array_equal(b.tokens, [40, np.nan, np.nan, np.nan])
    assert b.rank_offsets.tolist() == [0, 0, 0, 2, 2]
    assert b.rank_items.tolist() == hash_ids(["p", "q"]).tolist()
    assert b.series_keys[b.series[0]] == ("churn", "7", "primary", "/predict", (("region", "eu"),))
    assert b.series_keys[b.series[1]] == ("churn", "7", "primary", "", ())
    assert b.series_keys[b.series[3]][2] == "shadow"
    assert b.request_id.tolist() == hash_ids(["r1", "r2", "r3", "r4"]).tolist()
    assert b.features is not None and b.features[0] == {"age": 31, "plan": "pro", "x": None}


FEEDBACK_CASES = [
    # kind, value, expected (label, value, relevance)
    ("label", "cat", ("cat", None, None)),
    ("label", 3, ("3", 3.0, None)),
    ("label", 0, ("0", 0.0, None)),
    ("label", True, ("true", None, None)),
    ("label", 2.75, (None, 2.75, None)),
    ("reward", 1, (None, 1.0, None)),
    ("reward", -0.5, (None, -0.5, None)),
    ("thumbs", True, (None, 1.0, None)),
    ("thumbs", False, (None, 0.0, None)),
    ("thumbs", "up", (None, 1.0, None)),
    ("thumbs", "down", (None, 0.0, None)),
    ("click", True, (None, 1.0, None)),
    ("click", False, (None, 0.0, None)),
    ("click", DROP, (None, 1.0, None)),
    ("conversion", False, (None, 0.0, None)),
    ("conversion", DROP, (None, 1.0, None)),
    ("dwell", 12, (None, 12.0, None)),
    ("dwell", 0.0, (None, 0.0, None)),
    ("relevance", ["a", "b", 7], (None, None, {"a": 1.0, "b": 1.0, "7": 1.0})),
    ("relevance", {"a": 3, "b": 0.5, "c": 0}, (None, None, {"a": 3.0, "b": 0.5, "c": 0.0})),
    ("relevance", [], (None, None, {})),
]


@pytest.mark.parametrize("kind,value,expected", FEEDBACK_CASES)
def test_feedback_kinds_normalize(kind, value, expected):
    res = check([fb(kind=kind, value=value)])
    assert not res.rejections, res.rejections
    rec = res.feedback[0]
    assert set(rec) == {"event_id", "request_id", "ts", "kind", "label", "value", "relevance"}
    assert rec["kind"] == kind
    assert (rec["label"], rec["value"], rec["relevance"]) == expected
    if rec["value"] is not None:
        assert type(rec["value"]) is float


def test_feedback_records_load_into_batch():
    rows = [fb(event_id=f"f{i}", request_id=f"r{i}", kind=k, value=v)
            for i, (k, v, _) in enumerate(FEEDBACK_CASES)]
    res = check(rows)
    assert not res.rejections
    b = FeedbackBatch.from_records(res.feedback)
    assert len(b) == len(FEEDBACK_CASES)
    assert b.kind.tolist() == [KIND_CODE[k] for k, _, _ in FEEDBACK_CASES]
    exp_values = [np.nan if e[1] is None else e[1] for _, _, e in FEEDBACK_CASES]
    np.testing.assert_array_equal(b.value, exp_values)
    assert [b.labels[i] if i >= 0 else None for i in b.label] == [e[0] for _, _, e in FEEDBACK_CASES]
    n_rel = [len(e[2]) if e[2] else 0 for _, _, e in FEEDBACK_CASES]
    assert np.diff(b.rel_offsets).tolist() == n_rel
    assert b.rel_grades.tolist() == [1.0, 1.0, 1.0, 3.0, 0.5, 0.0]


def test_integer_item_ids_join_ranking_and_relevance():
    res = check([inf(prediction={"ranking": [42, 7]}),
                 fb(kind="relevance", value={"42": 2}), fb(kind="relevance", value=[7])])
    assert not res.rejections
    ib = InferenceBatch.from_records(res.inference)
    fbb = FeedbackBatch.from_records(res.feedback)
    assert ib.rank_items.tolist() == fbb.rel_items.tolist()


def test_models_are_usable_directly():
    ev = InferenceEvent.model_validate(inf(ts=NOW_ISO, prediction={"label": 1, "score": 0.5}))
    assert ev.ts == NOW and ev.to_record()["pred_label"] == "1"
    f = FeedbackEvent.model_validate(fb(kind="thumbs", value="down"))
    assert f.to_record()["value"] == 0.0


# ---------------------------------------------------------------------------
# payload decoding


def test_parse_payload_forms():
    a, b = inf(), fb()
    assert parse_payload(json.dumps(a)) == [a]
    assert parse_payload(json.dumps([a, b]).encode()) == [a, b]
    assert parse_payload(f"{json.dumps(a)}\n\n  \r\n{json.dumps(b)}\r\n") == [a, b]
    assert parse_payload(b"\xef\xbb\xbf" + json.dumps(a).encode()) == [a]  # UTF-8 BOM
    assert parse_payload(b"") == [] and parse_payload("  \n\n") == []
    assert parse_payload(json.dumps(a, indent=2)) == [a]  # one pretty-printed object
    assert parse_payload("[]") == []
    assert parse_payload("5") == [5]  # then rejected as not_an_object


def test_broken_array_is_one_rejection():
    rows = parse_payload('[{"a": 1},\n {"b": 2]\n')
    assert len(rows) == 1 and isinstance(rows[0], UndecodableLine)
    res = check(rows)
    assert [(r.field, r.reason) for r in res.rejections] == [("", "bad_json")]


# ---------------------------------------------------------------------------
# robustness: any row gives exactly one outcome, never an exception

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8)
_fields = ["type", "event_id", "request_id", "ts", "model", "model_version", "variant",
           "endpoint", "latency_ms", "status", "prediction", "segments", "cost", "features",
           "kind", "value", "schema_version", "latency"]


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.dictionaries(st.sampled_from(_fields), _json,
                                                         max_size=3)), max_size=8))
def test_mutated_rows_never_raise(mutations):
    rows = []
    for is_inf, patch in mutations:
        row = inf() if is_inf else fb()
        row.update(patch)
        rows.append(row)
    res = check(rows)
    seen = sorted(res.inference_index + res.feedback_index + [r.index for r in res.rejections])
    assert seen == list(range(len(rows)))
    assert len(res.inference) == len(res.inference_index)
    assert len(res.feedback) == len(res.feedback_index)
    for r in res.rejections:
        assert r.reason in REASONS and r.message
    InferenceBatch.from_records(res.inference)
    FeedbackBatch.from_records(res.feedback)
    for rec in res.inference:
        for k in ("latency_ms", "pred_score", "pred_value", "cost_usd"):
            assert rec[k] is None or math.isfinite(rec[k])


# ---------------------------------------------------------------------------
# JSON Schema


def test_committed_schema_is_current():
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_text(), (
        "schema/events.v1.json is stale: run `python -m kpistream.wire.schema --write "
        "schema/events.v1.json`")
    assert json.loads(SCHEMA_FILE.read_text(encoding="utf-8")) == json_schema()
    s = json_schema()
    assert s["$id"] == SCHEMA_ID
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert len(s["oneOf"]) == 2 and s["discriminator"]["propertyName"] == "type"


def test_module_main_prints_schema():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "kpistream.wire.schema"], capture_output=True,
                         text=True, check=True, cwd=ROOT, env=env).stdout
    assert out == schema_text()


SCHEMA_GOOD = [
    inf(), inf(ts=NOW_ISO, prediction={"label": 1, "score": 0.3, "scores": {"1": 0.3}}),
    inf(prediction={"ranking": ["a", 3]}, segments={"region": "eu"},
        cost={"usd": 0.1, "tokens": 4}, features={"a": 1.5, "b": "x"}, schema_version=1),
    inf(prediction=2.5), inf(prediction=DROP, status="error"),
    fb(), fb(kind="click", value=DROP), fb(kind="thumbs", value="up"),
    fb(kind="relevance", value={"a": 2}), fb(kind="relevance", value=["a", "b"]),
    fb(kind="dwell", value=3.5),
]
SCHEMA_BAD = [
    inf(latency=1), inf(latency_ms=-1), inf(ts="2024-05-29T16:26:40"), inf(ts=NOW // 1000),
    inf(model=DROP), inf(segments={"model": "x"}), inf(segments={"a-b": "x"}),
    inf(prediction={"ranking": ["a", "a"]}), inf(type="other"), inf(schema_version=2),
    fb(kind="like"), fb(kind="thumbs", value=3), fb(kind="dwell", value=-1),
    fb(kind="reward", value=DROP), fb(kind="relevance", value={"a": -1}),
]


def test_json_schema_agrees_with_validator():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schema())
    jsonschema.Draft202012Validator.check_schema(json_schema())
    for row in SCHEMA_GOOD:
        assert not check([row]).rejections, row
        assert validator.is_valid(row), (row, list(validator.iter_errors(row))[:1])
    for row in SCHEMA_BAD:
        assert check([row]).rejections, row
        assert not validator.is_valid(row), row
