"""The fast normalizer: a monitored replica's buffered rows -> normalized inference records.

It gives exactly what :func:`kpistream.wire.schema.validate_rows` gives for
the common shapes, without pydantic, and hands anything unusual (or invalid)
to ``validate_rows`` so that the schema stays the one judge.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections import Counter
from typing import Any, Callable

from kpistream.wire.batch import BASE_LABELS
from kpistream.wire.schema import (MAX_FEATURES, MAX_RANKING, MAX_SCORES, MAX_SEGMENTS, MAX_STR,
                                   validate_rows)

#: what one buffered row holds (a plain tuple, in this order): start (perf_counter ns),
#: request id, latency (ns), ok, prediction, segments, cost, sampled features, model version
ROW = ("t0_ns", "request_id", "latency_ns", "ok", "prediction", "segments", "cost", "features",
       "model_version")

_SEG_KEY_MATCH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*").fullmatch
_BASE = frozenset(BASE_LABELS)
_GOOD_SEG_KEYS: set[str] = set()
UNSUPPORTED = object()    # "ask the schema": an unusual or invalid shape
_FLOAT_INT_BITS = 53      # ints that are exactly a float
_perf_ns = time.perf_counter_ns


def label(v: Any) -> Any:
    t = type(v)
    if t is str:
        return v if 0 < len(v) <= MAX_STR else UNSUPPORTED
    if t is bool:
        return "true" if v else "false"
    if t is int:
        if v.bit_length() <= 850:
            s = str(v)
            if len(s) <= MAX_STR:
                return s
    return UNSUPPORTED


def number(v: Any) -> Any:
    """A finite float (pydantic strict float: float, or an int)."""
    t = type(v)
    if t is float:
        return v if math.isfinite(v) else UNSUPPORTED
    if t is int and v.bit_length() <= _FLOAT_INT_BITS:
        return float(v)
    return UNSUPPORTED


def prediction(p: Any) -> Any:
    """(pred_label, pred_score, pred_value, ranking), or UNSUPPORTED."""
    t = type(p)
    if t is str or t is bool or t is int:
        lab = label(p)
        return UNSUPPORTED if lab is UNSUPPORTED else (lab, None, None, None)
    if t is float:
        return (None, None, p, None) if math.isfinite(p) else UNSUPPORTED
    if t is not dict:
        return UNSUPPORTED
    if "ranking" in p:
        r = p["ranking"]
        if len(p) != 1 or type(r) is not list or len(r) > MAX_RANKING:
            return UNSUPPORTED
        items = []
        for x in r:
            tx = type(x)
            if tx is str:
                if not 0 < len(x) <= MAX_STR:
                    return UNSUPPORTED
                items.append(x)
            elif tx is int and x.bit_length() <= 850:
                s = str(x)
                if len(s) > MAX_STR:
                    return UNSUPPORTED
                items.append(s)
            else:
                return UNSUPPORTED
        if len(set(items)) != len(items):
            return UNSUPPORTED
        return (None, None, None, items)
    if "label" not in p:
        return UNSUPPORTED
    lab = label(p["label"])
    if lab is UNSUPPORTED:
        return UNSUPPORTED
    score = scores = None
    for k, v in p.items():
        if k == "label":
            continue
        if k == "score":
            if v is not None:
                score = number(v)
                if score is UNSUPPORTED:
                    return UNSUPPORTED
        elif k == "scores":
            if v is not None:
                if type(v) is not dict or len(v) > MAX_SCORES:
                    return UNSUPPORTED
                scores = {}
                for sk, sv in v.items():
                    if type(sk) is not str or not 0 < len(sk) <= MAX_STR:
                        return UNSUPPORTED
                    f = number(sv)
                    if f is UNSUPPORTED:
                        return UNSUPPORTED
                    scores[sk] = f
        else:
            return UNSUPPORTED
    if score is None and scores:
        score = scores.get(lab)
    return (lab, score, None, None)


def segments(s: Any) -> Any:
    if s is None:
        return {}
    if type(s) is not dict or len(s) > MAX_SEGMENTS:
        return UNSUPPORTED
    good = _GOOD_SEG_KEYS
    for k, v in s.items():
        if k not in good:
            if (type(k) is not str or not 0 < len(k) <= MAX_STR or not _SEG_KEY_MATCH(k)
                    or k.startswith("__") or k in _BASE):
                return UNSUPPORTED
            if len(good) < 4096:
                good.add(k)
        if type(v) is not str or not 0 < len(v) <= MAX_STR:
            return UNSUPPORTED
    return s


def cost(c: Any) -> Any:
    """(usd, tokens) or UNSUPPORTED."""
    if c is None:
        return (None, None)
    if type(c) is not dict:
        return UNSUPPORTED
    usd = tokens = None
    for k, v in c.items():
        if v is None:
            continue
        if k == "usd":
            usd = number(v)
            if usd is UNSUPPORTED or usd < 0:
                return UNSUPPORTED
        elif k == "tokens":
            if type(v) is not int or v < 0:
                return UNSUPPORTED
            tokens = v
        else:
            return UNSUPPORTED
    return (usd, tokens)


def features(f: Any) -> tuple[dict | None, int]:
    """Sampled inputs, reduced to what the wire format allows: (features, entries dropped).

    Features are optional context, so an entry the schema would reject (a
    nested value, a long string, a non-finite number, a bad key) is dropped,
    not the whole event.
    """
    if f is None:
        return None, 0
    if type(f) is not dict:
        return None, 1
    out: dict = {}
    dropped = 0
    for k, v in f.items():
        if len(out) >= MAX_FEATURES or type(k) is not str or not 0 < len(k) <= MAX_STR:
            dropped += 1
            continue
        t = type(v)
        if v is None or t is bool or t is int or t is str and len(v) <= MAX_STR \
                or t is float and math.isfinite(v):
            out[k] = v
        else:
            dropped += 1
    return out, dropped


class RowNormalizer:
    """Rows (:data:`ROW`) of one deployment (``model``, ``variant``, ``endpoint``) -> records.

    Counts error events, rejected events (by ``field:reason``) and dropped
    feature entries; ``on_error`` hears of each batch's last rejection.
    """

    def __init__(self, model: str, variant: str, endpoint: str,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.model = model
        self.variant = variant
        self.endpoint = endpoint
        self.on_error = on_error
        self.counts: Counter = Counter()      # error_events, invalid, features_dropped
        self.rejections: Counter = Counter()  # (field, reason) -> events

    def records(self, rows: list) -> list[dict]:
        offset = time.time_ns() - _perf_ns()   # perf_counter -> wall clock, now
        model, variant, endpoint = self.model, self.variant, self.endpoint
        suffix = ":" + variant
        out: list[dict] = []
        slow: list[dict] = []
        errors = feats_dropped = 0
        _prediction, _segments, _cost = prediction, segments, cost
        for t0, rid, lat_ns, ok, pred, segs, co, feats, version in rows:
            ts = (t0 + offset) // 1_000_000
            eid = rid + suffix
            if len(eid) > MAX_STR:
                eid = hashlib.blake2b(eid.encode(), digest_size=16).hexdigest()
            if feats is not None:
                feats, d = features(feats)
                feats_dropped += d
            if ok:
                p = _prediction(pred)
            else:
                errors += 1
                p = (None, None, None, None)
            s = _segments(segs)
            c = _cost(co)
            if p is UNSUPPORTED or s is UNSUPPORTED or c is UNSUPPORTED:
                slow.append(self.wire(eid, rid, ts, version, lat_ns, ok, pred, segs, co, feats))
                continue
            out.append({
                "event_id": eid, "request_id": rid, "ts": ts, "model": model,
                "model_version": version, "variant": variant, "endpoint": endpoint,
                "latency_ms": lat_ns / 1e6, "status": "ok" if ok else "error",
                "pred_label": p[0], "pred_score": p[1], "pred_value": p[2], "ranking": p[3],
                "segments": s, "cost_usd": c[0], "tokens": c[1], "features": feats})
        counts = self.counts
        counts["error_events"] += errors
        counts["features_dropped"] += feats_dropped
        if slow:
            res = validate_rows(slow, now_ms=time.time_ns() // 1_000_000, expect="inference")
            out.extend(res.inference)
            if res.rejections:
                counts["invalid"] += len(res.rejections)
                for r in res.rejections:
                    self.rejections[(r.field, r.reason)] += 1
                if self.on_error is not None:
                    self.on_error(f"event rejected: {res.rejections[-1].message}")
        return out

    def wire(self, eid: str, rid: str, ts: int, version: str, lat_ns: int, ok: bool,
             pred: Any, segs: Any, cost: Any, feats: Any) -> dict:
        """The wire event of one row (what the schema validates)."""
        return {"type": "inference", "event_id": eid, "request_id": rid, "ts": ts,
                "model": self.model, "model_version": version,
                "variant": self.variant, "endpoint": self.endpoint,
                "latency_ms": lat_ns / 1e6, "status": "ok" if ok else "error",
                "prediction": pred if ok else None, "segments": segs, "cost": cost,
                "features": feats}

    def stats(self) -> dict:
        c = self.counts
        return {"error_events": c["error_events"], "invalid": c["invalid"],
                "invalid_by_reason": {f"{f}:{r}": n for (f, r), n in dict(self.rejections).items()},
                "features_dropped": c["features_dropped"]}


__all__ = ["RowNormalizer", "ROW", "UNSUPPORTED", "label", "number", "prediction", "segments",
           "cost", "features"]
