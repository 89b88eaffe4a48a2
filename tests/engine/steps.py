"""Test helpers: the engine's steps wired as the engine wires them, fed batch by batch."""

from __future__ import annotations

from collections import Counter

import numpy as np

from kpistream.engine.families import FAMILY_CLASSES
from kpistream.engine.join import Join
from kpistream.engine.pairing import Pairing
from kpistream.engine.panes import Panes
from kpistream.engine.vocab import Vocab
from kpistream.engine.watermark import Watermark
from kpistream.wire.batch import FeedbackBatch, InferenceBatch


def wire(cfg) -> Join:
    """A :class:`Join` with its vocabulary, panes, watermark (and pairing if configured)."""
    counters = Counter()
    wm = Watermark(cfg.lateness_ms, cfg.max_future_ms)
    vocab = Vocab(cfg, counters)
    fams = tuple(f for f in FAMILY_CLASSES if f in cfg.families)
    panes = Panes(cfg, fams, vocab)
    join = Join(cfg, counters, vocab, panes, wm, fams)
    if "paired" in fams:
        join.pairing = Pairing(cfg, counters, vocab, panes, wm, join.pending)
    return join


def add_inferences(join: Join, recs: list[dict]) -> tuple[int, int]:
    """Insert, code, count in panes, store, pair and join inference records.

    Returns (duplicates, pairs used).
    """
    b = InferenceBatch.from_records(recs)
    ok = np.ones(len(b), dtype=bool)
    slots, ndup = join.insert_inferences(b, ok)
    idx = np.flatnonzero(ok)
    smap = join.vocab.batch_series(b, idx)
    b, slots = b.take(idx), slots[idx]
    prior = join.wm.observe(b.ts)
    series, task, pred = join.vocab.inference_codes(b, smap)
    cw = join.panes.count_keys(series)
    arms = join.pairing.add_arms(b) if join.pairing is not None else None
    join.panes.add_inferences(b, series, task, b.ts - b.ts % join.pane_ms, cw, arms)
    kept, s_ = join.store_inferences(b, slots, series, task, pred, cw)
    if join.pairing is not None:
        join.pairing.add_inferences(b, kept, s_, series[kept], prior)
    n = join.meet_early_feedback(b, kept, s_, prior)
    join.trim_pending()
    return ndup, n


def add_feedback(join: Join, recs: list[dict]) -> tuple[int, int]:
    """Insert, join and store feedback records; (duplicates, pairs used)."""
    b = FeedbackBatch.from_records(recs)
    ok = np.ones(len(b), dtype=bool)
    wm = join.wm.before(b.ts, ok)
    slots, ndup = join.insert_feedback(b, ok)
    idx = np.flatnonzero(ok)
    b, slots, wm = b.take(idx), slots[idx], wm[idx]
    join.wm.observe(b.ts)
    label = join.vocab.label_map(b.labels)[b.label]
    matched, n = join.meet_inferences(b, label, wm)
    join.store_feedback(b, slots, label, matched)
    return ndup, n


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
