"""Test helpers: the engine's steps as :class:`Engine` wires them, fed batch by batch."""

from __future__ import annotations

from kpistream.engine import Engine
from kpistream.engine.join import Join
from kpistream.wire.batch import FeedbackBatch, InferenceBatch

_ENGINES: dict[int, Engine] = {}   # id(join) -> the engine that wired it


def wire(cfg) -> Join:
    """The :class:`Join` step of a fresh engine, with its vocabulary, panes, watermark (and
    pairing if configured), wired by the engine itself."""
    eng = Engine(cfg)
    _ENGINES[id(eng.join)] = eng
    return eng.join


def add_inferences(join: Join, recs: list[dict]) -> tuple[int, int]:
    """Inference records through the engine that owns ``join``: (duplicates, pairs used)."""
    rep = _ENGINES[id(join)].ingest_inference(InferenceBatch.from_records(recs))
    assert not rep.rejections and not rep.late, rep.as_dict()
    return rep.duplicates, rep.matched_pairs


def add_feedback(join: Join, recs: list[dict]) -> tuple[int, int]:
    """Feedback records through the engine that owns ``join``: (duplicates, pairs used)."""
    rep = _ENGINES[id(join)].ingest_feedback(FeedbackBatch.from_records(recs))
    assert not rep.rejections and not rep.late, rep.as_dict()
    return rep.duplicates, rep.matched_pairs


def inf(i, ts, *, rid=None, variant="primary", model="m", eid=None, **kw):
    r = {"event_id": eid or f"i-{variant}-{i}", "request_id": rid or f"r{i}", "ts": int(ts),
         "model": model, "model_version": "1", "variant": variant, "endpoint": "p",
         "latency_ms": 10.0, "status": "ok", "pred_label": "1"}
    r.update(kw)
    return r


def fb(i, ts, kind="label", *, rid=None, label="1", eid=None, **kw):
    r = {"event_id": eid or f"f-{kind}-{i}", "request_id": rid or f"r{i}", "ts": int(ts),
         "kind": kind, "label": label}
    r.update(kw)
    return r
