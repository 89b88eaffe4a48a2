"""The wire schema: validation and normalization of inference and feedback events
(:func:`parse_payload`, :func:`validate_rows`; the pydantic contract :class:`InferenceEvent`,
:class:`FeedbackEvent`, exported by :func:`json_schema`).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import functools
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field as dc_field
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal, Sequence, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, PlainValidator,
                      StringConstraints, Tag, TypeAdapter, ValidationError,
                      ValidationInfo, WithJsonSchema, field_validator)
from pydantic_core import PydanticCustomError

from kpistream.wire.batch import FEEDBACK_KINDS, BASE_LABELS, canonical_label
from kpistream.errors import EventError, Rejection

# ---------------------------------------------------------------------------
# version, limits, reasons

SCHEMA_VERSION = 1
SCHEMA_ID = "https://kpistream.dev/schema/events.v1.json"

MAX_STR = 256            #: longest id, name, label, segment key/value, item id, feature string
MAX_SEGMENTS = 16        #: keys in ``segments``
MAX_RANKING = 1000       #: items in ``prediction.ranking``
MAX_RELEVANCE = 1000     #: items in a relevance feedback value
MAX_FEATURES = 256       #: keys in ``features``
MAX_SCORES = 1000        #: entries in ``prediction.scores``
TS_MIN_MS = 946_684_800_000      #: 2000-01-01T00:00:00Z (inclusive)
TS_MAX_MS = 7_258_118_400_000    #: 2200-01-01T00:00:00Z (exclusive)
DEFAULT_MAX_FUTURE_MS = 300_000  #: how far ahead of the clock an event may be

REASONS: tuple[str, ...] = (
    "not_an_object", "bad_json", "missing", "unknown_field", "wrong_type", "not_finite",
    "negative", "too_long", "too_many", "future", "bad_value")
_REASON_SET = frozenset(REASONS)

EVENT_TYPES: tuple[str, ...] = ("inference", "feedback")
#: where each type is posted (named in a wrong-type rejection)
ENDPOINTS = {"inference": "POST /v1/events", "feedback": "POST /v1/feedback or /v1/events"}

_MSG = "kps_msg"      # ctx key of our custom errors' sentence
_FIELD = "kps_field"  # ctx key that overrides the error's location


def _err(reason: str, msg: str, field: str | None = None) -> PydanticCustomError:
    """A pydantic error whose type is one of our reason codes.

    ``msg`` is a predicate that follows the field name ("must be ..."); the
    template is fixed so braces in user input can never break formatting.
    """
    ctx: dict[str, Any] = {_MSG: msg}
    if field is not None:
        ctx[_FIELD] = field
    return PydanticCustomError(reason, "{" + _MSG + "}", ctx)


def _jtype(x: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "boolean"
    if isinstance(x, int):
        return "integer"
    if isinstance(x, float):
        return "number"
    if isinstance(x, str):
        return "string"
    if isinstance(x, (list, tuple)):
        return "array"
    if isinstance(x, dict):
        return "object"
    return type(x).__name__


def _short(x: Any, n: int = 40) -> str:
    r = repr(x)
    return r if len(r) <= n else r[: n - 1] + "…"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------
# scalar types

_Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STR)]
_OptStr = Annotated[str, StringConstraints(max_length=MAX_STR)]
_NonNeg = Annotated[float, Field(ge=0)]
_SEGMENT_KEY_RE = r"^[A-Za-z_][A-Za-z0-9_]*$"


def _check_str(v: str, what: str = "") -> str:
    if not v:
        raise _err("bad_value", f"{what}must not be empty")
    if len(v) > MAX_STR:
        raise _err("too_long", f"{what}is {len(v)} characters long; at most {MAX_STR} are allowed")
    return v


def _label(v: Any) -> str:
    """A class label (str, int or bool) -> its canonical string."""
    if isinstance(v, str):
        return _check_str(v)
    if isinstance(v, int):  # bool included
        if not isinstance(v, bool) and v.bit_length() > 850:  # > 256 decimal digits
            raise _err("too_long", f"is an integer with more than {MAX_STR} digits")
        return _check_str(canonical_label(v))
    if isinstance(v, float):
        raise _err("wrong_type", "must be a class label (string, integer or boolean), got a "
                   "float (a float is a regression value, not a label)")
    raise _err("wrong_type",
               f"must be a class label (string, integer or boolean), got {_jtype(v)}")


def _item_id(v: Any) -> str:
    """An item id: a non-empty string, or an integer (-> decimal string)."""
    if isinstance(v, str):
        return _check_str(v)
    if isinstance(v, int) and not isinstance(v, bool):
        if v.bit_length() > 850:  # > 256 decimal digits
            raise _err("too_long", f"is an integer with more than {MAX_STR} digits")
        return _check_str(str(v))
    raise _err("wrong_type", f"must be an item id (string or integer), got {_jtype(v)}")


def _feature_value(v: Any) -> Any:
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            raise _err("not_finite", f"must be a finite number, got {v!r}")
        return v
    if isinstance(v, str):
        if len(v) > MAX_STR:
            raise _err("too_long", f"is {len(v)} characters long; at most {MAX_STR} are allowed")
        return v
    raise _err("wrong_type", f"must be a number, string, boolean or null, got {_jtype(v)}")


_LABEL_SCHEMA = {"type": ["string", "integer", "boolean"], "minLength": 1, "maxLength": MAX_STR,
                 "description": "A class label; an integer or boolean is the same label as "
                                "its decimal / 'true' / 'false' string."}
_ITEM_SCHEMA = {"type": ["string", "integer"], "minLength": 1, "maxLength": MAX_STR}
_Label = Annotated[Any, PlainValidator(_label), WithJsonSchema(_LABEL_SCHEMA)]
_ItemId = Annotated[Any, PlainValidator(_item_id), WithJsonSchema(_ITEM_SCHEMA)]
_FeatureValue = Annotated[Any, PlainValidator(_feature_value), WithJsonSchema(
    {"type": ["number", "string", "boolean", "null"], "maxLength": MAX_STR})]

# ---------------------------------------------------------------------------
# timestamps

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})?")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)
_TS_PATTERN = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
_TS_SCHEMA = {
    "description": "Event time: an RFC 3339 date-time with a timezone offset (Z or +HH:MM), "
                   "or integer milliseconds since the Unix epoch.",
    "anyOf": [
        {"type": "string", "format": "date-time", "pattern": _TS_PATTERN},
        {"type": "integer", "minimum": TS_MIN_MS, "exclusiveMaximum": TS_MAX_MS},
    ]}


def parse_rfc3339(s: str) -> int:
    """An RFC 3339 date-time -> int epoch milliseconds UTC (floored).

    Raises a pydantic custom error (reason ``bad_value``) when ``s`` is not an
    RFC 3339 date-time or has no timezone.
    """
    m = _RFC3339.fullmatch(s) if len(s) <= 64 else None
    if m is None:
        raise _err("bad_value", f"must be an RFC 3339 date-time such as "
                   f"'2024-05-01T12:00:00Z' or integer epoch milliseconds, got {_short(s)}")
    y, mo, d, h, mi, sec, frac, tz = m.groups()
    if tz is None:
        raise _err("bad_value", f"has no timezone: a timezone is required (append Z for UTC "
                   f"or an offset such as +02:00), got {_short(s)}")
    try:
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(sec), tzinfo=timezone.utc)
    except ValueError as e:
        raise _err("bad_value", f"is not a valid date-time ({e}), got {_short(s)}") from None
    ms = (dt - _EPOCH) // _ONE_MS
    if frac:
        ms += int((frac[1:] + "00")[:3])
    if tz not in ("Z", "z"):
        off = int(tz[1:3]) * 60 + int(tz[4:6])
        if int(tz[1:3]) > 23 or int(tz[4:6]) > 59:
            raise _err("bad_value", f"has an invalid timezone offset {tz!r}")
        ms -= (off if tz[0] == "+" else -off) * 60_000
    return ms


def _ts(v: Any, info: ValidationInfo) -> int:
    if isinstance(v, bool):
        raise _err("wrong_type", "must be an RFC 3339 string or integer epoch milliseconds, "
                   "got boolean")
    if isinstance(v, int):
        ms = v
    elif isinstance(v, str):
        ms = parse_rfc3339(v)
    elif isinstance(v, datetime):  # Python callers
        if v.tzinfo is None or v.utcoffset() is None:
            raise _err("bad_value", "is a naive datetime: a timezone is required")
        try:
            ms = (v - _EPOCH) // _ONE_MS
        except OverflowError:
            raise _err("bad_value", "is out of range") from None
    elif isinstance(v, float):
        raise _err("wrong_type", f"must be an RFC 3339 string or integer epoch milliseconds, "
                   f"got a float ({_short(v)}); send whole milliseconds")
    else:
        raise _err("wrong_type", f"must be an RFC 3339 string or integer epoch milliseconds, "
                   f"got {_jtype(v)}")
    if not TS_MIN_MS <= ms < TS_MAX_MS:
        hint = ""
        if isinstance(v, int):
            if 0 < ms < 10**11:
                hint = " (this looks like epoch seconds; ts takes milliseconds)"
            elif 10**14 <= ms < 10**17:
                hint = " (this looks like epoch microseconds; ts takes milliseconds)"
            elif ms >= 10**17:
                hint = " (this looks like epoch nanoseconds; ts takes milliseconds)"
        raise _err("bad_value", f"must lie between 2000-01-01 and 2200-01-01, got {ms} ms{hint}")
    ctx = info.context
    if ctx:
        now = ctx.get("now_ms")
        if now is not None:
            limit = ctx.get("max_future_ms", DEFAULT_MAX_FUTURE_MS)
            if ms > now + limit:
                raise _err("future", f"is {(ms - now) / 1000:.3f} s ahead of the receiver's clock; "
                           f"at most {limit / 1000:g} s is allowed (check the sender's clock)")
    return ms


_Ts = Annotated[Any, PlainValidator(_ts), WithJsonSchema(_TS_SCHEMA)]


def _schema_version(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        if v == SCHEMA_VERSION:
            return v
        raise _err("bad_value", f"must be {SCHEMA_VERSION} (this receiver speaks schema "
                   f"version {SCHEMA_VERSION}), got {v}")
    raise _err("wrong_type", f"must be the integer {SCHEMA_VERSION}, got {_jtype(v)}")


_SchemaVersion = Annotated[Any, PlainValidator(_schema_version),
                           WithJsonSchema({"const": SCHEMA_VERSION, "type": "integer"})]

# ---------------------------------------------------------------------------
# models

_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class Cost(BaseModel):
    """What a request cost."""

    model_config = _CONFIG
    usd: _NonNeg | None = None
    tokens: Annotated[int, Field(ge=0)] | None = None


class ScoredPrediction(BaseModel):
    """A class label with an optional score and optional per-class scores."""

    model_config = _CONFIG
    label: _Label
    score: float | None = None
    scores: Annotated[dict[_Id, float], Field(max_length=MAX_SCORES)] | None = None


class RankingPrediction(BaseModel):
    """An ordered list of item ids, best first."""

    model_config = _CONFIG
    ranking: Annotated[list[_ItemId], Field(max_length=MAX_RANKING)]

    @field_validator("ranking")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            seen: set[str] = set()
            dup = next(x for x in v if x in seen or seen.add(x))  # type: ignore[func-returns-value]
            raise _err("bad_value", f"lists item {_short(dup)} more than once; items must be distinct")
        return v


def _prediction_tag(v: Any) -> str | None:
    if isinstance(v, (str, int)):  # bool is an int
        return "label"
    if isinstance(v, float):
        return "number"
    if isinstance(v, dict):
        return "ranking" if "ranking" in v else "scored"
    return None


_PREDICTION_TAGS = frozenset({"label", "number", "scored", "ranking"})
_PREDICTION_SCHEMA = {
    "description": "A class label (string, integer or boolean); an object with a label and "
                   "optional score / per-class scores; an object with a ranking of item ids; "
                   "or a float (regression value).",
    "anyOf": [
        _LABEL_SCHEMA,
        {"type": "number"},
        {"type": "object", "additionalProperties": False, "required": ["label"],
         "properties": {
             "label": _LABEL_SCHEMA,
             "score": {"type": ["number", "null"]},
             "scores": {"type": ["object", "null"], "maxProperties": MAX_SCORES,
                        "propertyNames": {"minLength": 1, "maxLength": MAX_STR},
                        "additionalProperties": {"type": "number"}}}},
        {"type": "object", "additionalProperties": False, "required": ["ranking"],
         "properties": {"ranking": {"type": "array", "maxItems": MAX_RANKING,
                                    "uniqueItems": True, "items": _ITEM_SCHEMA}}},
    ]}
_Prediction = Annotated[
    Union[Annotated[_Label, Tag("label")], Annotated[float, Tag("number")],
          Annotated[ScoredPrediction, Tag("scored")], Annotated[RankingPrediction, Tag("ranking")]],
    Discriminator(_prediction_tag, custom_error_type="wrong_type",
                  custom_error_message="must be a class label (string, integer or boolean), an "
                                       "object with 'label' or 'ranking', or a float"),
    WithJsonSchema(_PREDICTION_SCHEMA)]


_SEGMENT_KEY_MATCH = re.compile(_SEGMENT_KEY_RE).fullmatch
_GOOD_SEGMENT_KEYS: set[str] = set()  # keys seen valid (few in practice; bounded below)


def _segment_key(v: Any) -> str:
    if v in _GOOD_SEGMENT_KEYS:
        return v
    if not isinstance(v, str):
        raise _err("wrong_type", f"must be a string, got {_jtype(v)}")
    _check_str(v, "key ")
    if not _SEGMENT_KEY_MATCH(v) or v.startswith("__"):
        raise _err("bad_value", f"key {_short(v)} is not a valid label name (letters, digits and "
                   "'_', not starting with a digit or '__')")
    if v in BASE_LABELS:
        raise _err("bad_value", f"key {v!r} is reserved (it is a base series label)")
    if len(_GOOD_SEGMENT_KEYS) < 4096:
        _GOOD_SEGMENT_KEYS.add(v)
    return v


_SegmentKey = Annotated[Any, PlainValidator(_segment_key)]
_SEGMENTS_SCHEMA = {
    "description": "Segment labels of the series (each key becomes a series label).",
    "type": "object", "maxProperties": MAX_SEGMENTS,
    "propertyNames": {"type": "string", "minLength": 1, "maxLength": MAX_STR,
                      "pattern": _SEGMENT_KEY_RE,
                      "not": {"anyOf": [{"enum": list(BASE_LABELS)}, {"pattern": "^__"}]}},
    "additionalProperties": {"type": "string", "minLength": 1, "maxLength": MAX_STR}}
_Segments = Annotated[dict[_SegmentKey, _Id], Field(max_length=MAX_SEGMENTS),
                      WithJsonSchema(_SEGMENTS_SCHEMA)]


class InferenceEvent(BaseModel):
    """One request served by a model (DESIGN.md, "Wire events")."""

    model_config = ConfigDict(**_CONFIG, title="InferenceEvent")
    type: Literal["inference"]
    event_id: _Id
    request_id: _Id
    ts: _Ts
    model: _Id
    model_version: _Id
    variant: _Id = Field(description="primary | shadow | canary | any arm name")
    endpoint: _OptStr | None = None
    latency_ms: _NonNeg
    status: Literal["ok", "error"]
    prediction: _Prediction | None = Field(
        default=None, validate_default=True,
        description="Required when status is 'ok'; may be omitted when it is 'error'.")
    segments: _Segments | None = None
    cost: Cost | None = None
    features: Annotated[dict[_Id, _FeatureValue], Field(max_length=MAX_FEATURES)] | None = None
    schema_version: _SchemaVersion | None = None

    @field_validator("prediction")
    @classmethod
    def _prediction_required(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None and info.data.get("status") == "ok":
            raise _err("missing", "is required when status is 'ok'")
        return v

    def to_record(self) -> dict:
        """The normalized record (see :mod:`kpistream.wire.batch`)."""
        p = self.prediction
        pred_label = pred_score = pred_value = ranking = None
        if isinstance(p, str):
            pred_label = p
        elif isinstance(p, float):
            pred_value = p
        elif isinstance(p, ScoredPrediction):
            pred_label = p.label
            pred_score = p.score
            if pred_score is None and p.scores:
                pred_score = p.scores.get(p.label)
        elif isinstance(p, RankingPrediction):
            ranking = list(p.ranking)
        cost = self.cost
        return {
            "event_id": self.event_id, "request_id": self.request_id, "ts": self.ts,
            "model": self.model, "model_version": self.model_version, "variant": self.variant,
            "endpoint": self.endpoint or "", "latency_ms": self.latency_ms,
            "status": self.status, "pred_label": pred_label, "pred_score": pred_score,
            "pred_value": pred_value, "ranking": ranking,
            "segments": dict(self.segments) if self.segments else {},
            "cost_usd": cost.usd if cost is not None else None,
            "tokens": cost.tokens if cost is not None else None,
            "features": dict(self.features) if self.features is not None else None,
        }


_VALUE_EXPECT = {
    "label": "a class label (string, integer or boolean) or a float (regression truth)",
    "reward": "a finite number",
    "thumbs": "a boolean or \"up\"/\"down\"",
    "click": "a boolean (omitted means true)",
    "conversion": "a boolean (omitted means true)",
    "dwell": "a number of seconds >= 0",
    "relevance": "an array of item ids or an object {item_id: grade >= 0}",
}


def _relevance(v: Any) -> dict[str, float]:
    if isinstance(v, list):
        if len(v) > MAX_RELEVANCE:
            raise _err("too_many", f"for kind 'relevance' has {len(v)} items; at most "
                       f"{MAX_RELEVANCE} are allowed")
        out: dict[str, float] = {}
        for i, item in enumerate(v):
            try:
                out[_item_id(item)] = 1.0
            except PydanticCustomError as e:
                raise _err(e.type, f"(an item of kind 'relevance') {e.context[_MSG]}",
                           f"value[{i}]") from None
        return out
    if isinstance(v, dict):
        if len(v) > MAX_RELEVANCE:
            raise _err("too_many", f"for kind 'relevance' has {len(v)} items; at most "
                       f"{MAX_RELEVANCE} are allowed")
        out = {}
        for k, g in v.items():
            path = f"value.{_path_part(k)}"
            try:
                _item_id(k)
            except PydanticCustomError as e:
                raise _err(e.type, f"(an item id of kind 'relevance') {e.context[_MSG]}",
                           path) from None
            if not _is_number(g):
                raise _err("wrong_type", f"(a relevance grade) must be a number >= 0, "
                           f"got {_jtype(g)}", path)
            if not math.isfinite(g):
                raise _err("not_finite", f"(a relevance grade) must be finite, got {g!r}", path)
            if g < 0:
                raise _err("negative", f"(a relevance grade) must be >= 0, got {g!r}", path)
            out[str(k)] = float(g)
        return out
    raise _err("wrong_type", f"for kind 'relevance' must be {_VALUE_EXPECT['relevance']}, "
               f"got {_jtype(v)}")


def _check_value(kind: str, v: Any) -> Any:
    """Validate a feedback value for its kind; returns it (relevance: as a dict)."""
    def wrong() -> PydanticCustomError:
        return _err("wrong_type", f"for kind {kind!r} must be {_VALUE_EXPECT[kind]}, "
                    f"got {_jtype(v)}{'' if v is None else ' ' + _short(v, 30)}")

    if v is None:
        if kind in ("click", "conversion"):
            return None
        raise _err("missing", f"is required for kind {kind!r} ({_VALUE_EXPECT[kind]})")
    if kind == "label":
        if isinstance(v, float):
            if not math.isfinite(v):
                raise _err("not_finite", f"for kind 'label' must be finite, got {v!r}")
            return v
        if isinstance(v, (str, int)):
            try:
                _label(v)  # checks emptiness and length; the raw value is kept
            except PydanticCustomError as e:
                raise _err(e.type, f"for kind 'label' {e.context[_MSG]}") from None
            return v
        raise wrong()
    if kind in ("reward", "dwell"):
        if not _is_number(v):
            raise wrong()
        if not math.isfinite(v):
            raise _err("not_finite", f"for kind {kind!r} must be finite, got {v!r}")
        if kind == "dwell" and v < 0:
            raise _err("negative", f"for kind 'dwell' must be >= 0 seconds, got {v!r}")
        return v
    if kind == "thumbs":
        if isinstance(v, bool):
            return v
        if isinstance(v, str):
            if v in ("up", "down"):
                return v
            raise _err("bad_value", f"for kind 'thumbs' must be {_VALUE_EXPECT['thumbs']}, "
                       f"got {_short(v, 30)}")
        raise wrong()
    if kind in ("click", "conversion"):
        if isinstance(v, bool):
            return v
        raise wrong()
    if kind == "relevance":
        return _relevance(v)
    raise wrong()  # pragma: no cover - kind is a Literal


_VALUE_SCHEMA = {
    "description": "Depends on kind: label -> class label or float; reward -> number; "
                   "thumbs -> boolean or 'up'/'down'; click, conversion -> boolean (omitted "
                   "means true); dwell -> seconds >= 0; relevance -> array of item ids or "
                   "{item_id: grade >= 0}.",
    "type": ["string", "number", "boolean", "array", "object"]}
_RELEVANCE_SCHEMA = {"anyOf": [
    {"type": "array", "maxItems": MAX_RELEVANCE, "items": _ITEM_SCHEMA},
    {"type": "object", "maxProperties": MAX_RELEVANCE,
     "propertyNames": {"minLength": 1, "maxLength": MAX_STR},
     "additionalProperties": {"type": "number", "minimum": 0}}]}
_KIND_VALUE_SCHEMAS: dict[str, dict] = {
    "label": {"anyOf": [_LABEL_SCHEMA, {"type": "number"}]},
    "reward": {"type": "number"},
    "thumbs": {"anyOf": [{"type": "boolean"}, {"enum": ["up", "down"]}]},
    "click": {"type": "boolean"},
    "conversion": {"type": "boolean"},
    "dwell": {"type": "number", "minimum": 0},
    "relevance": _RELEVANCE_SCHEMA,
}


def _feedback_schema_extra(schema: dict, cls: type) -> None:
    rules = []
    for kind, value_schema in _KIND_VALUE_SCHEMAS.items():
        then: dict = {"properties": {"value": value_schema}}
        if kind not in ("click", "conversion"):
            then["required"] = ["value"]
        rules.append({"if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]},
                      "then": then})
    schema["allOf"] = rules


class FeedbackEvent(BaseModel):
    """User feedback on one request (DESIGN.md, "Wire events")."""

    model_config = ConfigDict(**_CONFIG, title="FeedbackEvent",
                              json_schema_extra=_feedback_schema_extra)
    type: Literal["feedback"]
    event_id: _Id
    request_id: _Id
    ts: _Ts
    kind: Literal[FEEDBACK_KINDS]  # type: ignore[valid-type]
    value: Annotated[Any, WithJsonSchema(_VALUE_SCHEMA)] = Field(default=None,
                                                                 validate_default=True)
    schema_version: _SchemaVersion | None = None

    @field_validator("value")
    @classmethod
    def _value_for_kind(cls, v: Any, info: ValidationInfo) -> Any:
        kind = info.data.get("kind")
        if kind is None:  # the kind itself is wrong: that error is reported
            return v
        return _check_value(kind, v)

    def to_record(self) -> dict:
        """The normalized record (see :mod:`kpistream.wire.batch`)."""
        kind, v = self.kind, self.value
        label = value = relevance = None
        if kind == "label":
            if isinstance(v, float):
                value = v
            else:
                label = canonical_label(v)
                if not isinstance(v, bool):
                    value = float(v) if isinstance(v, int) else None
        elif kind in ("click", "conversion"):
            value = 0.0 if v is False else 1.0
        elif kind == "thumbs":
            value = 1.0 if v is True or v == "up" else 0.0
        elif kind == "relevance":
            relevance = dict(v)
        else:
            value = float(v)
        return {"event_id": self.event_id, "request_id": self.request_id, "ts": self.ts,
                "kind": kind, "label": label, "value": value, "relevance": relevance}


Event = Annotated[Union[InferenceEvent, FeedbackEvent], Field(discriminator="type")]
EVENT_ADAPTER: TypeAdapter = TypeAdapter(Event)

_KNOWN_FIELDS: dict[tuple, tuple[str, ...]] = {
    ("inference",): tuple(InferenceEvent.model_fields),
    ("feedback",): tuple(FeedbackEvent.model_fields),
    ("inference", "cost"): tuple(Cost.model_fields),
    ("inference", "prediction"): tuple(ScoredPrediction.model_fields)
    + tuple(RankingPrediction.model_fields),
}

# ---------------------------------------------------------------------------
# errors -> rejections

_EXPECTED = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
             "bool_type": "a boolean", "dict_type": "an object", "model_type": "an object",
             "model_attributes_type": "an object", "list_type": "an array",
             "none_required": "null", "int_from_float": "an integer"}


def _path_part(p: Any) -> str:
    s = str(p)
    if not s:
        return '""'
    return s if len(s) <= 64 else s[:63] + "…"


def _path(loc: Sequence[Any]) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + _path_part(p)
    return out


def _describe(err: dict) -> tuple[str, str, str]:
    """One pydantic error -> (field, reason, sentence)."""
    typ = err["type"]
    ctx = err.get("ctx") or {}
    inp = err.get("input")
    loc = list(err["loc"])
    event_type = None
    if loc and loc[0] in EVENT_TYPES:
        event_type = loc.pop(0)
    if len(loc) > 1 and loc[0] == "prediction" and loc[1] in _PREDICTION_TAGS:
        del loc[1]
    is_key = bool(loc) and loc[-1] == "[key]"
    if is_key:
        loc.pop()
    field = _path(loc)
    if _MSG in ctx:  # ours
        field = ctx.get(_FIELD, field)
        reason = typ if typ in _REASON_SET else "bad_value"
        pred = ctx[_MSG]
        if is_key and not pred.startswith("key"):
            pred = "key " + pred
        return field, reason, f"{field or 'row'} {pred}"
    name = field or "row"
    if typ == "union_tag_not_found":
        return "type", "missing", "type is required ('inference' or 'feedback')"
    if typ == "union_tag_invalid":
        tag = inp.get("type") if isinstance(inp, dict) else None
        reason = "bad_value" if isinstance(tag, str) else "wrong_type"
        return "type", reason, f"type must be 'inference' or 'feedback', got {_short(tag)}"
    if typ == "missing":
        return field, "missing", f"{name} is required"
    if typ == "wrong_type":  # the prediction discriminator's custom error
        return field, "wrong_type", f"{name} {err.get('msg', 'has the wrong type')}"
    if typ == "extra_forbidden":
        msg = f"{name} is not a known field"
        known = _KNOWN_FIELDS.get((event_type, *loc[:-1]))
        if known and loc:
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            if close:
                msg += f" (did you mean {close[0]!r}?)"
        return field, "unknown_field", msg
    if typ in _EXPECTED:
        return field, "wrong_type", (f"{name}{' key' if is_key else ''} must be "
                                     f"{_EXPECTED[typ]}, got {_jtype(inp)}")
    if typ == "finite_number":
        return field, "not_finite", f"{name} must be a finite number, got {inp!r}"
    if typ in ("greater_than_equal", "greater_than"):
        return field, "negative", f"{name} must be >= 0, got {inp!r}"
    if typ == "string_too_long":
        n = len(inp) if isinstance(inp, str) else "?"
        return field, "too_long", (f"{name}{' key' if is_key else ''} is {n} characters long; "
                                   f"at most {ctx.get('max_length')} are allowed")
    if typ == "too_long":
        if isinstance(inp, str):
            return field, "too_long", (f"{name} is {len(inp)} characters long; at most "
                                       f"{ctx.get('max_length')} are allowed")
        n = len(inp) if hasattr(inp, "__len__") else ctx.get("actual_length")
        return field, "too_many", (f"{name} has {n} entries; at most "
                                   f"{ctx.get('max_length')} are allowed")
    if typ == "string_too_short":
        return field, "bad_value", f"{name}{' key' if is_key else ''} must not be empty"
    if typ == "literal_error":
        expected = ctx.get("expected", "")
        reason = "bad_value" if isinstance(inp, str) else "wrong_type"
        return field, reason, f"{name} must be {expected}, got {_short(inp)}"
    return field, "bad_value", f"{name}: {err.get('msg', typ)}"


def _rejection(index: int, e: ValidationError) -> Rejection:
    described = [_describe(err) for err in e.errors(include_url=False)]
    # the most relevant error: an unknown field usually explains the rest (a typo)
    first = next((d for d in described if d[1] == "unknown_field"), described[0])
    others = [d[2] for d in described if d is not first]
    msg = first[2]
    if others:
        msg += ". Also: " + "; ".join(others[:5])
        if len(others) > 5:
            msg += f"; and {len(others) - 5} more"
    return Rejection(index, first[0], first[1], msg + ".")


# ---------------------------------------------------------------------------
# batch validation


@dataclass(frozen=True, slots=True)
class UndecodableLine:
    """Placeholder row for a payload line that is not JSON (rejected as ``bad_json``)."""

    line: int
    error: str


@dataclass(frozen=True)
class ValidationResult:
    """Normalized good rows (with their input positions) and the rejections."""

    inference: list[dict] = dc_field(default_factory=list)
    feedback: list[dict] = dc_field(default_factory=list)
    rejections: list[Rejection] = dc_field(default_factory=list)
    inference_index: list[int] = dc_field(default_factory=list)
    feedback_index: list[int] = dc_field(default_factory=list)
    #: the type of each rejected row (its ``type`` field, the endpoint's, or ``unknown``)
    rejected_types: list[str] = dc_field(default_factory=list)

    @property
    def accepted(self) -> int:
        return len(self.inference) + len(self.feedback)

    def tally(self) -> list[tuple[str, str, str]]:
        """``(type, field, reason)`` of every rejection, for the pipeline counters."""
        return [(t, r.field, r.reason) for t, r in zip(self.rejected_types, self.rejections)]

    def counts(self) -> dict[tuple[str, str], int]:
        """Rejections per (field, reason)."""
        return dict(Counter((r.field, r.reason) for r in self.rejections))


def validate_rows(rows: Sequence[Any], *, now_ms: int,
                  max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
                  expect: str | None = None) -> ValidationResult:
    """Validate and normalize a batch of decoded wire events.

    ``now_ms`` is the receiver's clock (epoch ms): an event more than
    ``max_future_ms`` ahead of it is rejected (``future``).  ``expect``
    ("inference" / "feedback") makes an endpoint accept one type only; rows
    may then omit ``type``.  Never raises for bad rows.

    Events arrive as JSON (one object, a JSON array, or NDJSON lines; see
    :func:`parse_payload`) and are checked by :func:`validate_rows`, which returns
    *normalized records* (the format :mod:`kpistream.wire.batch` documents and
    ``InferenceBatch.from_records`` / ``FeedbackBatch.from_records`` take) for the
    good rows and one :class:`~kpistream.errors.Rejection` per bad row.  One bad
    row never sinks a batch.

    The pydantic models :class:`InferenceEvent` and :class:`FeedbackEvent` are the
    contract of DESIGN.md ("Wire events"); :func:`json_schema` exports them as a
    JSON Schema (draft 2020-12), committed as ``schema/events.v1.json``
    (``python -m kpistream.wire.schema`` prints it, ``--write PATH`` writes it).

    Rules beyond the field types:
    * Unknown fields are rejected (``unknown_field``), so a typo such as
      ``"latency"`` is an error, not silently dropped.
    * ``ts`` is an RFC 3339 string with a timezone (``Z`` or ``+HH:MM``) or integer
      epoch milliseconds; it becomes int epoch ms UTC, must lie in
      [2000-01-01, 2200-01-01) and not beyond ``now_ms + max_future_ms``.
    * Numbers are finite everywhere (also inside ``prediction.scores``,
      ``features`` and relevance grades); strings are at most ``MAX_STR`` chars.
    * Class labels: a JSON int, bool or str is a label (``canonical_label``: 1,
      "1" -> "1", true -> "true"); a JSON float is a regression value.
    * ``prediction`` may be omitted (or null) only when ``status`` is ``"error"``.
    * Item ids (ranking, relevance) are strings or integers; integers become their
      decimal string so a ranking ``[42]`` joins with relevance ``{"42": 1}``.
    * Segment keys become series (and Prometheus) labels: they must match
      ``[A-Za-z_][A-Za-z0-9_]*``, must not start with ``__`` and must not be one of
      the base labels ``model``, ``model_version``, ``variant``, ``endpoint``.
    * Feedback ``value`` per ``kind``: label -> a class label (str/int/bool) or a
      float (regression truth); reward -> a number; thumbs -> bool or "up"/"down";
      click, conversion -> bool (omitted means true); dwell -> seconds >= 0;
      relevance -> ``[item_id, ...]`` (grade 1) or ``{item_id: grade >= 0}``.

    Rejection reasons (``Rejection.reason``) are one of :data:`REASONS`.
    """
    if expect is not None and expect not in EVENT_TYPES:
        raise ValueError(f"expect must be None, 'inference' or 'feedback', not {expect!r}")
    ctx = {"now_ms": now_ms, "max_future_ms": max_future_ms}
    inf: list[dict] = []
    fb: list[dict] = []
    inf_idx: list[int] = []
    fb_idx: list[int] = []
    rej: list[Rejection] = []
    types: list[str] = []
    for i, row in enumerate(rows):
        ev = _validate_one(i, row, expect, ctx)
        if isinstance(ev, Rejection):
            rej.append(ev)
            t = row.get("type") if isinstance(row, dict) else None
            types.append(t if t in EVENT_TYPES else expect or "unknown")
        elif ev.type == "inference":
            inf.append(ev.to_record())
            inf_idx.append(i)
        else:
            fb.append(ev.to_record())
            fb_idx.append(i)
    return ValidationResult(inf, fb, rej, inf_idx, fb_idx, types)


def _validate_one(i: int, row: Any, expect: str | None, ctx: dict) -> Any:
    """Row ``i`` of :func:`validate_rows`: the validated event or its :class:`Rejection`."""
    if not isinstance(row, dict):
        if isinstance(row, UndecodableLine):
            return Rejection(i, "", "bad_json", f"line {row.line} is not valid JSON: {row.error}.")
        return Rejection(i, "", "not_an_object",
                         f"row {i} must be a JSON object, got {_jtype(row)}.")
    if expect is not None:
        t = row.get("type")
        if t is None and "type" not in row:
            row = {**row, "type": expect}
        elif t != expect and t in EVENT_TYPES:
            return Rejection(i, "type", "wrong_type", f"type must be {expect!r} here, got {t!r} "
                                                      f"(send {t} events to {ENDPOINTS[t]}).")
    try:
        return EVENT_ADAPTER.validate_python(row, context=ctx)
    except ValidationError as e:
        return _rejection(i, e)


def validate_event(row: Any, *, now_ms: int | None = None,
                   max_future_ms: int = DEFAULT_MAX_FUTURE_MS) -> InferenceEvent | FeedbackEvent:
    """One event -> its model; raises :class:`~kpistream.errors.EventError` if bad.

    Without ``now_ms`` the far-future guard is skipped.
    """
    if not isinstance(row, dict):
        raise EventError("", f"not_an_object: an event must be a JSON object, got {_jtype(row)}")
    ctx = {"now_ms": now_ms, "max_future_ms": max_future_ms} if now_ms is not None else None
    try:
        return EVENT_ADAPTER.validate_python(row, context=ctx)
    except ValidationError as e:
        r = _rejection(0, e)
        raise EventError(r.field, f"{r.reason}: {r.message}") from None


# ---------------------------------------------------------------------------
# payload decoding


def _decode_lines(lines: Sequence[str | bytes]) -> list:
    rows: list = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except UnicodeDecodeError:
            rows.append(UndecodableLine(n, "it is not UTF-8"))
        except json.JSONDecodeError as e:
            rows.append(UndecodableLine(n, f"{e.msg} at column {e.colno}"))
        except (ValueError, RecursionError) as e:
            rows.append(UndecodableLine(n, str(e) or type(e).__name__))
    return rows


def parse_payload(data: bytes | str) -> list:
    """A request body -> a list of rows for :func:`validate_rows`.

    Accepts one JSON object, a JSON array of objects, or NDJSON (one value per
    line, blank lines skipped).  A line that does not decode becomes an
    :class:`UndecodableLine` placeholder, which ``validate_rows`` rejects as
    ``bad_json``; the other lines still count.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            return _decode_lines(raw.split(b"\n"))
    else:
        text = data[1:] if data.startswith("\ufeff") else data
    body = text.strip()
    if not body:
        return []
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        if body[0] == "[":  # a broken array, not NDJSON: one rejection, not one per line
            return [UndecodableLine(e.lineno, f"{e.msg} at column {e.colno}")]
    except (ValueError, RecursionError):
        pass
    else:
        return obj if isinstance(obj, list) else [obj]
    return _decode_lines(text.split("\n"))


# ---------------------------------------------------------------------------
# JSON Schema


@functools.lru_cache(maxsize=1)
def _json_schema() -> dict:
    body = EVENT_ADAPTER.json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": f"kpistream wire event, schema version {SCHEMA_VERSION}",
        "description": "One inference or feedback event. A request body holds one event, a "
                       "JSON array of events, or NDJSON (one event per line). An endpoint "
                       "that accepts one type only lets 'type' be omitted.",
        **body,
    }


def json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of one wire event (either type)."""
    return copy.deepcopy(_json_schema())


def schema_text() -> str:
    """``json_schema()`` as committed: indented, sorted keys, trailing newline."""
    return json.dumps(_json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kpistream.wire.schema",
                                 description="Print (or write) the wire-event JSON Schema.")
    ap.add_argument("--write", metavar="PATH", help="write the schema to PATH instead")
    args = ap.parse_args(argv)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as f:
            f.write(schema_text())
    else:
        sys.stdout.write(schema_text())
    return 0


__all__ = [
    "SCHEMA_VERSION", "SCHEMA_ID", "REASONS", "EVENT_TYPES", "MAX_STR", "MAX_SEGMENTS",
    "MAX_RANKING", "MAX_RELEVANCE", "MAX_FEATURES", "MAX_SCORES", "TS_MIN_MS", "TS_MAX_MS",
    "DEFAULT_MAX_FUTURE_MS", "InferenceEvent", "FeedbackEvent", "Cost", "ScoredPrediction",
    "RankingPrediction", "Event", "EVENT_ADAPTER", "ValidationResult", "UndecodableLine",
    "validate_rows", "validate_event", "parse_payload", "parse_rfc3339", "json_schema",
    "schema_text", "main",
]

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
