"""The panes step: (pane, series) groups, count-window sequences, state updates and collect."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from kpistream.engine.panes import TIME, Panes
from kpistream.engine.states import TASK_CLASSIFICATION, TASK_NONE, LatencyState, SumsTable
from kpistream.engine.vocab import Vocab
from kpistream.spec.metrics import config_from_dict
from kpistream.wire.batch import InferenceBatch

CFG = config_from_dict({
    "time": {"lateness": "1s", "label_delay": "20s"},
    "windows": [{"name": "10s", "type": "tumbling", "size": "10s"},
                {"name": "3", "type": "count", "size": 3}],
    "metrics": {"families": ["traffic", "latency", "feedback"]}})


def _panes(cfg=CFG, n_series=4):
    v = Vocab(cfg, Counter())
    v.series_map([(f"m{i}", "1", "primary", "p", ()) for i in range(n_series)],
                 np.ones(n_series, dtype=bool))
    fams = tuple(f for f in ("traffic", "latency", "cost", "feedback") if f in cfg.families)
    return Panes(cfg, fams, v)


@pytest.mark.parametrize("spread", [10_000, 10**9])   # dense bincount and sparse unique paths
def test_groups_against_unique_pairs(spread):
    P = _panes()
    rng = np.random.default_rng(1)
    ts = rng.integers(0, spread, 500).astype(np.int64)
    keys = ts - ts % P.pane_ms
    series = rng.integers(0, 4, 500).astype(np.int64)
    gid, panes, sids = P.groups(TIME, keys, series)
    pairs = sorted(set(zip(keys.tolist(), series.tolist())))
    assert [(p.start, s) for p, s in zip(panes, sids.tolist())] == pairs
    for i in range(500):
        assert (panes[gid[i]].start, sids[gid[i]]) == (keys[i], series[i])
    assert all(p.end == p.start + P.pane_ms for p in panes)
    # panes are shared by key
    gid2, panes2, _ = P.groups(TIME, keys[:1], series[:1])
    assert panes2[0] is panes[gid[0]]
    # count spaces: keyed by (series, window index)
    gid, panes, sids = P.groups("3", np.array([0, 0, 1, 5]), np.array([1, 2, 1, 1]))
    assert sorted(P.panes["3"]) == [(1, 0), (1, 1), (1, 5), (2, 0)]
    assert [(p.start, p.end) for p in panes] == [(0, 3), (0, 3), (3, 6), (15, 18)]


def test_count_keys_are_per_series_arrival_sequences():
    P = _panes()
    rng = np.random.default_rng(2)
    seen: dict[int, int] = {}
    for _ in range(5):
        series = rng.integers(0, 4, int(rng.integers(1, 12))).astype(np.int32)
        got = P.count_keys(series)["3"]
        exp = []
        for s in series.tolist():
            exp.append(seen.get(s, 0) // 3)
            seen[s] = seen.get(s, 0) + 1
        assert got.tolist() == exp


def _batch(ts, lat, models):
    return InferenceBatch.from_records([
        {"event_id": f"e{i}", "request_id": f"r{i}", "ts": int(t), "model": m,
         "model_version": "1", "variant": "primary", "endpoint": "p", "latency_ms": float(x),
         "status": "ok"} for i, (t, x, m) in enumerate(zip(ts, lat, models))])


def test_add_inferences_and_collect_finality():
    P = _panes()
    ts = np.array([1_000, 2_000, 12_000, 3_000], dtype=np.int64)
    b = _batch(ts, [1, 2, 3, 4], ["m0", "m0", "m0", "m1"])
    series = np.array([0, 0, 0, 1])
    task = np.array([TASK_CLASSIFICATION, TASK_NONE, TASK_NONE, TASK_NONE], dtype=np.int8)
    cw = P.count_keys(series)
    calls = []
    P.add_inferences(b, series, task, ts - ts % P.pane_ms, cw,
                     arms=lambda gid, panes, sids: calls.append(len(panes)))
    assert calls == [3]          # time panes only: (0, s0), (0, s1), (10000, s0)
    t0 = P.panes[TIME][0]
    assert isinstance(t0.tables["traffic"], SumsTable)
    assert isinstance(t0.states[("latency", 0)], LatencyState)
    c3 = P.panes["3"][(0, 0)]
    assert (c3.n, c3.min_ts, c3.max_ts) == (3, 1_000, 12_000)
    # before the end: every touched state, not final (but for the complete count window's
    # operational states)
    parts = P.collect(wm=5_000, flushed=False)
    assert parts and not any(p.final for p in parts if p.space == TIME)
    assert {p.family for p in parts if p.final} == {"traffic", "latency"}
    assert {(p.space, p.key) for p in parts if p.final} == {("3", 0)}
    assert {(p.space, p.key, p.family) for p in parts} >= {
        (TIME, 0, "traffic"), (TIME, 0, "latency"), (TIME, 0, "feedback"), ("3", 0, "traffic")}
    assert P.collect(wm=5_000, flushed=False) == []       # nothing touched since
    # past the end: operational final; quality (feedback) final after the label delay
    parts = P.collect(wm=10_000, flushed=False)
    fin = {(p.key, p.family, p.series[0]): p.final for p in parts if p.space == TIME}
    assert fin[(0, "traffic", "m0")] and fin[(0, "latency", "m1")]
    assert (0, "feedback", "m0") not in fin      # not touched, not final: not handed out
    assert 0 in P.panes[TIME]
    parts = P.collect(wm=30_000, flushed=False)
    assert all(p.final for p in parts if p.space == TIME and p.key == 0)
    assert 0 not in P.panes[TIME]
    # count windows: the complete one (3 events) waits for its quality states until its
    # last event's pane end plus the label delay; flush ends the rest
    assert sorted(P.panes["3"]) == [(0, 0), (1, 0)]
    P.collect(wm=40_000, flushed=False)
    assert sorted(P.panes["3"]) == [(1, 0)]
    parts = P.collect(wm=30_000, flushed=True)
    assert parts and all(p.final for p in parts)
    assert P.open_count() == 0 and P.active_series() == 0 and P.state_nbytes() == 0


def test_nbytes_and_active_series():
    P = _panes()
    ts = np.array([1_000, 2_000], dtype=np.int64)
    P.add_inferences(_batch(ts, [1, 2], ["m0", "m2"]), np.array([0, 2]),
                     np.zeros(2, dtype=np.int8), ts - ts % P.pane_ms, P.count_keys(np.array([0, 2])))
    assert P.active_series() == 2
    assert 0 < P.state_nbytes() <= P.state_nbytes(deep=True)
    assert P.open_count() == 3    # one time pane, two count panes
