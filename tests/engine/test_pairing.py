"""The pairing step: challengers meet the primary's inference in either order, labels, expiry."""

from __future__ import annotations

from kpistream.engine.paired import ARM_INFERENCE_COLS, ROLE_CHALLENGER, ROLE_PRIMARY, PairedTable
from kpistream.engine.pairing import R_HASP
from kpistream.engine.panes import TIME
from kpistream.engine.watermark import FAR_FUTURE
from kpistream.spec.metrics import config_from_dict
from tests.engine.steps import add_feedback, add_inferences, fb, inf, wire

T0 = 1_767_225_600_000
CFG = config_from_dict({
    "time": {"lateness": "1s", "label_delay": "10s"},
    "windows": [{"name": "10s", "type": "tumbling", "size": "10s"}],
    "join": {"max_paired": 16},
    "metrics": {"families": ["traffic", "classification", "paired"]}})


def _paired_values(j):
    out = {}
    for p in j.panes.collect(FAR_FUTURE, True):
        if p.family == "paired" and p.series[2] == "shadow":
            out[p.key] = p.state.value()
    return out


def test_primary_first_then_challenger():
    j = wire(CFG)
    P = j.pairing
    add_inferences(j, [inf(0, T0), inf(1, T0 + 1)])
    assert len(P.tab) == 0 and P.waiting == 0            # no challenger series yet
    add_inferences(j, [inf(0, T0 + 2, variant="shadow", pred_label="0")])
    assert j.counters["paired_challengers"] == 1 and j.counters["paired_requests"] == 1
    assert P.waiting == 0 and len(P.tab) == 1
    assert (P.tab.col["flags"][P.tab.live_slots()] & R_HASP).all()
    # both labelled: the labelled pair is emitted, attributed to the primary's pane
    add_feedback(j, [fb(0, T0 + 3, label="1")])
    assert j.counters["paired_labelled"] == 1
    v = _paired_values(j)[T0]
    assert v["paired_requests"][0] == 1 and v["paired_labelled"][0] == 1
    assert v["accuracy_diff"][0] == -1.0           # primary right, challenger wrong


def test_challenger_waits_for_its_primary():
    j = wire(CFG)
    P = j.pairing
    add_inferences(j, [inf(0, T0, variant="shadow"), inf(1, T0, variant="shadow")])
    assert P.waiting == 2 and j.counters["paired_requests"] == 0
    add_inferences(j, [inf(0, T0 + 5), inf(0, T0 + 6, eid="again")])   # the first primary pairs
    assert P.waiting == 1 and j.counters["paired_requests"] == 1
    # the other challenger's deadline passes: counted as unmatched
    P.expire(T0 + 20_000)
    assert j.counters["paired_unmatched"] == 1 and P.waiting == 0 and len(P.tab) == 0


def test_other_models_and_dead_primaries_do_not_pair():
    j = wire(CFG)
    P = j.pairing
    add_inferences(j, [inf(0, T0, variant="shadow"), inf(1, T0, model="n")])
    add_inferences(j, [inf(0, T0 + 1, model="n", eid="n0")])       # same request, other model
    assert j.counters["paired_requests"] == 0 and P.waiting == 1
    # a primary arriving after the challenger's label deadline passed (watermark) does not pair
    add_inferences(j, [inf(5, T0 + 30_000)])
    add_inferences(j, [inf(0, T0 + 30_001, eid="late-primary")])
    assert j.counters["paired_requests"] == 0


def test_capacity_evictions_keep_waiting_right():
    j = wire(CFG)
    P = j.pairing
    add_inferences(j, [inf(0, T0)])
    add_inferences(j, [inf(i, T0 + i, variant="shadow") for i in range(20)])
    assert len(P.tab) == 16 and j.counters["paired_evicted"] == 4
    assert P.waiting == int(((P.tab.col["flags"][P.tab.live_slots()] & R_HASP) == 0).sum())


def test_arm_sums_skip_series_without_a_role():
    j = wire(config_from_dict({"series": {"max_series": 2},
                               "metrics": {"families": ["traffic", "paired"]}}))
    add_inferences(j, [inf(0, T0), inf(1, T0, variant="shadow"), inf(2, T0, model="x")])
    assert j.vocab.role.tolist() == [ROLE_PRIMARY, ROLE_CHALLENGER, -1]   # x: the overflow series
    t = j.panes.panes[TIME][T0 - T0 % j.panes.pane_ms].tables["paired"]
    assert isinstance(t, PairedTable)
    assert sorted(t.sids()) == [0, 1]
    sums = t.state(0).s[ARM_INFERENCE_COLS]
    assert sums[0] == 1                                      # one primary request
