"""The join step: dedup on insert, eviction counts, matching in either order, applying pairs."""

from __future__ import annotations

import numpy as np

from kpistream.engine.join import ERR_BIT, ONCE_BITS, _subset_csr
from kpistream.engine.panes import TIME
from kpistream.engine.watermark import FAR_FUTURE
from kpistream.spec.metrics import config_from_dict
from kpistream.wire.batch import KIND_CLICK, KIND_LABEL, InferenceBatch
from tests.engine.steps import add_feedback, add_inferences, fb, inf, wire

T0 = 1_767_225_600_000
CFG = config_from_dict({
    "time": {"lateness": "1s", "label_delay": "10s"},
    "windows": [{"name": "10s", "type": "tumbling", "size": "10s"}],
    "join": {"max_pending": 16, "max_feedback": 16},
    "metrics": {"families": ["traffic", "classification", "regression", "ranking", "feedback"],
                "ranking": {"k": 3}}})


def test_duplicates_within_and_across_batches():
    j = wire(CFG)
    b = InferenceBatch.from_records([inf(0, T0), inf(0, T0 + 1), inf(1, T0 + 2),
                                     inf(0, T0 + 3, eid="other")])
    ok = np.array([True, True, True, False])
    slots, ndup = j.insert_inferences(b, ok)
    assert ndup == 1 and ok.tolist() == [True, False, True, False]
    assert (slots[[0, 2]] >= 0).all() and slots[3] == -1
    assert j.counters["duplicate_inference"] == 1
    # a different event of the same request is no duplicate; a re-delivery is
    j = wire(CFG)
    assert add_inferences(j, [inf(0, T0), inf(0, T0 + 1), inf(1, T0 + 2)]) == (1, 0)
    assert add_inferences(j, [inf(0, T0 + 4, eid="other"), inf(1, T0 + 5)]) == (1, 0)
    assert j.counters["duplicate_inference"] == 2 and len(j.pending) == 3
    assert add_feedback(j, [fb(0, T0), fb(0, T0)]) == (1, 2)   # both inferences of r0
    assert j.counters["duplicate_feedback"] == 1


def test_expiry_of_entries_by_label_deadline():
    j = wire(CFG)
    add_inferences(j, [inf(0, T0 + 500), inf(1, T0 + 600)])
    entry = j.pending.col["expiry"][j.pending.lookup_multi(np.array(
        InferenceBatch.from_records([inf(0, T0)]).request_id))[1]]
    assert entry.tolist() == [T0 + 10_000 + 10_000]        # pane end + label delay
    add_feedback(j, [fb(0, T0 + 700), fb(9, T0 + 700)])    # r9: no inference
    j.expire(T0 + 20_000)
    assert len(j.pending) == 0 and len(j.fb_store) == 0
    assert j.counters["inference_expired_unlabelled"] == 1
    assert j.counters["feedback_unmatched"] == 1


def test_capacity_evictions_are_counted():
    j = wire(CFG)
    add_inferences(j, [inf(i, T0 + i) for i in range(20)])
    assert len(j.pending) == 16 and j.counters["pending_evicted"] == 4
    add_feedback(j, [fb(100 + i, T0 + i) for i in range(18)])
    assert len(j.fb_store) == 16 and j.counters["feedback_evicted"] == 2


def test_either_order_and_once_per_inference():
    j = wire(CFG)
    # feedback first: kept, matched when the inference comes
    assert add_feedback(j, [fb(0, T0, eid="a"), fb(0, T0 + 1, eid="b", label="0")]) == (0, 0)
    assert add_inferences(j, [inf(0, T0 + 2)]) == (0, 1)     # the second label is not used
    _, slot = j.pending.lookup_multi(InferenceBatch.from_records([inf(0, T0)]).request_id)
    assert j.pending.col["labelled"][slot].all()
    assert j.pending.col["seen"][slot].tolist() == [ONCE_BITS[KIND_LABEL]]
    # the first label (arrival order) counts: accuracy 1 on one labelled inference
    parts = [p for p in j.panes.collect(FAR_FUTURE, True) if p.family == "classification"]
    assert len(parts) == 1 and parts[0].space == TIME
    v = parts[0].state.value()
    assert v["accuracy"][0] == 1.0 and v["accuracy"][1] == 1
    # inference first; clicks count once, and only a positive one
    add_inferences(j, [inf(1, T0 + 3)])
    assert add_feedback(j, [fb(1, T0 + 4, "click", label=None, value=0.0, eid="c0"),
                            fb(1, T0 + 5, "click", label=None, value=1.0, eid="c1"),
                            fb(1, T0 + 6, "click", label=None, value=1.0, eid="c2")]) == (0, 1)
    _, slot = j.pending.lookup_multi(InferenceBatch.from_records([inf(1, T0)]).request_id)
    assert j.pending.col["seen"][slot].tolist() == [ONCE_BITS[KIND_CLICK]]
    assert j.counters["join_pairs"] == 1 + 1


def test_type_mismatch_is_counted_not_used():
    j = wire(CFG)
    add_inferences(j, [inf(0, T0, pred_label=None, pred_value=2.0),
                       inf(1, T0, pred_label=None, ranking=["a", "b", "c", "d"])])
    n = add_feedback(j, [fb(0, T0, label="x"), fb(0, T0, label=None, value=1.5, eid="v"),
                         fb(1, T0, "relevance", label=None, relevance={"a": 1.0, "d": 2.0}),
                         fb(1, T0, label="1", eid="l1")])[1]
    assert j.counters["feedback_type_mismatch"] == 2 and n == 2
    # ranking: top k = 3 of the ranking kept, so "d" is not among them
    parts = {p.family: p.state.value() for p in j.panes.collect(FAR_FUTURE, True)
             if p.family in ("regression", "ranking")}
    assert parts["regression"]["mae"][0] == 0.5
    assert parts["ranking"]["recall_at_k"][0] == 0.5


def test_error_bit_only_with_the_paired_family():
    cfg = config_from_dict({"metrics": {"families": ["traffic", "paired"]}})
    j = wire(cfg)
    add_inferences(j, [inf(0, T0, status="error"), inf(1, T0)])
    assert sorted(j.pending.col["seen"][j.pending.live_slots()].tolist()) == [0, ERR_BIT]
    j = wire(CFG)
    add_inferences(j, [inf(0, T0, status="error")])
    assert j.pending.col["seen"][j.pending.live_slots()].tolist() == [0]


def test_subset_csr_against_python():
    rng = np.random.default_rng(3)
    lens = rng.integers(0, 4, 20)
    offs = np.r_[0, np.cumsum(lens)].astype(np.int64)
    items = rng.integers(0, 1000, offs[-1]).astype(np.uint64)
    grades = rng.random(offs[-1])
    rows = np.flatnonzero(rng.random(20) < 0.5)
    noffs, it, gr = _subset_csr(rows, offs, items, grades)
    exp_i = [items[offs[r]:offs[r + 1]].tolist() for r in rows]
    assert [it[noffs[k]:noffs[k + 1]].tolist() for k in range(len(rows))] == exp_i
    assert gr.tolist() == [g for r in rows for g in grades[offs[r]:offs[r + 1]].tolist()]
