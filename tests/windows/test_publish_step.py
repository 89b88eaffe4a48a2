"""The publish step and /metrics: what the publisher gave when the outputs were recorded
(names, labels and order exactly, values to 12 digits), the step usable without Ray, a store or a
watcher (replay), and the aggregator's public pane methods."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kpistream.clock import ManualClock
from kpistream.engine import Engine
from kpistream.spec.metrics import config_from_dict
from kpistream.wire.batch import FeedbackBatch, InferenceBatch
from kpistream.wire.schema import validate_rows
from kpistream.windows.aggregate import WindowAggregator
from kpistream.windows.exposition import Family, kpi_families, pipeline_families
from kpistream.windows.publish import PublishStep
from kpistream.replay import iter_runs, replay_batches

import publisher_scenario as scenario
from conftest import same, same_number

CFG = config_from_dict(scenario.METRICS)


@pytest.fixture(scope="module")
def pub(tmp_path_factory):
    p = scenario.build(tmp_path_factory.mktemp("pub") / "store")
    yield p
    p.notifier.close()


def test_metrics_text_is_the_recorded_one(pub):
    """Names, label sets, help strings, order and values on /metrics are the recorded ones
    (values to 12 significant digits).  Recorded again on purpose when the gauges moved to
    the latest closed window (a sliding 1m gauge is no longer its newest pane)."""
    want = (scenario.DATA / "metrics_before.txt").read_text().splitlines()
    got = pub.metrics_text().splitlines()
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if g.startswith("#") or w.startswith("#"):
            assert g == w
            continue
        (gk, gv), (wk, wv) = g.rsplit(" ", 1), w.rsplit(" ", 1)
        assert gk == wk and same_number(float(gv), float(wv)), (g, w)


def test_paired_summary_and_stored_series_are_the_recorded_ones(pub):
    out = scenario.outputs(pub)
    for name in ("paired", "series"):
        want = json.loads((scenario.DATA / f"{name}_before.json").read_text())
        assert same(json.loads(out[name]), want), name


def test_every_catalogue_kpi_is_on_metrics(pub):
    from kpistream.windows.catalogue import CATALOGUE

    text = pub.metrics_text()
    for k in CATALOGUE:
        assert f"# HELP {k.prom} {k.help}\n# TYPE {k.prom} gauge\n{k.prom}{{" in text, k.name


def _batches(events):
    res = validate_rows(events, now_ms=scenario.T0 + 3_600_000, max_future_ms=CFG.max_future_ms)
    for kind, recs in iter_runs(res):
        yield kind, (InferenceBatch if kind == "inference" else FeedbackBatch).from_records(recs)


def _scenario_events(n=160):
    rng = np.random.default_rng(5)
    return [e for i in range(n) for e in _events_at(i, rng)]


def _events_at(i, rng):
    return scenario._events(i, scenario.T0 + 50 * i, rng)


def test_step_without_store_or_watcher_gives_replays_rows():
    """Replay through the step (no Ray, no store, no watcher) == replay_batches."""
    events = _scenario_events()
    want, _ = replay_batches(_batches(events), CFG, collect_every=10**9)
    eng = Engine(CFG)
    step = PublishStep(CFG, clock=ManualClock(scenario.T0))
    got = []
    for kind, b in _batches(events):
        (eng.ingest_inference if kind == "inference" else eng.ingest_feedback)(b)
    eng.flush()
    assert step.run([(eng.collect(), eng.emit_watermark, {})]) > 0
    got += step.final_rows
    assert got == want and want
    assert step.ticks == 1 and not step.errors
    # the snapshot holds the latest window of every KPI and series, for /metrics
    fams = {f.name: f for f in kpi_families(step.snapshot, step.label_names())}
    assert "kpistream_accuracy_ratio" in fams and "kpistream_latency_p99_seconds" in fams
    assert all(f.labels[0] == "window" for f in fams.values())


def test_gauges_and_rules_see_the_latest_closed_window_equal_to_replay():
    """Rounds over an interleaved stream (no flush): every gauge shows the latest window
    whose end the watermark has passed (a sliding 1m window whole, never the one opened
    on the pane in progress), with replay's value for that window; operational KPIs are
    final there, quality ones provisional until the label deadline.  Alert rules are fed
    the same windows."""
    events = _scenario_events(1200)            # 60 s of traffic, interleaved
    want_rows, _ = replay_batches(_batches(events), CFG, collect_every=10**9)
    want = {(r["window"], r["window_start"], r["model"], r["variant"], r["region"],
             r["metric"]): r for r in want_rows}

    class Rules:
        feature_windows = ()
        seen: list = []

        def observe(self, rows):
            self.seen.extend(rows)

        def evaluate(self):
            return []

        def observe_features(self, *a):
            return None

    watcher = Rules()
    eng = Engine(CFG)
    step = PublishStep(CFG, clock=ManualClock(scenario.T0), watcher=watcher)
    names = step.label_names()
    checked = {"1m": 0, "10s": 0}
    fed = 0
    batches = list(_batches(events))
    for i, (kind, b) in enumerate(batches):
        (eng.ingest_inference if kind == "inference" else eng.ingest_feedback)(b)
        if i % 97 or i < 200:
            continue
        watcher.seen.clear()
        step.run([(eng.collect(), eng.emit_watermark, {})])
        wm = step.agg.watermark
        assert all(r["window_end"] <= wm for r in watcher.seen if r["window"] in checked)
        fed += len(watcher.seen)
        size = {"10s": 10_000, "1m": 60_000}
        for (win, labels, metric), (value, count, _, prov, start, _) in step.snapshot.items():
            if win not in checked:
                continue
            lab = dict(zip(names, (v for _, v in labels)))
            assert start + size[win] <= wm                      # closed, never in progress
            w = want[(win, start, lab["model"], lab["variant"], lab["region"], metric)]
            if not prov:
                assert value == w["value"] or (np.isnan(value) and np.isnan(w["value"])), \
                    (win, start, metric)
                assert count == w["count"]
                checked[win] += 1
            if metric == "requests":   # operational: final as soon as it is closed
                assert not prov and value == w["value"]
    assert checked["1m"] > 100 and checked["10s"] > 100 and fed > 1000
    # the 1m gauge covers six panes: more requests than the 10 s one of the same series
    reqs = {(k[0], k[1]): v[0] for k, v in step.snapshot.items() if k[2] == "requests"}
    assert all(reqs[("1m", lab)] > reqs[("10s", lab)] for (w, lab) in reqs
               if w == "10s" and ("1m", lab) in reqs)


def test_step_with_two_sources_waits_for_both_watermarks():
    events = _scenario_events(80)
    engines = [Engine(CFG), Engine(CFG)]
    for kind, b in _batches(events):
        for s, eng in enumerate(engines):
            rows = np.flatnonzero(np.arange(len(b.request_id)) % 2 == s)
            part = b.take(rows)
            (eng.ingest_inference if kind == "inference" else eng.ingest_feedback)(part)
    step = PublishStep(CFG, clock=ManualClock(scenario.T0), sources=2)
    engines[0].flush()
    step.run([(engines[0].collect(), engines[0].emit_watermark, {"shard": 0})])
    assert step.final_rows == []          # shard 1 has not reported
    engines[1].flush()
    step.run([(engines[1].collect(), engines[1].emit_watermark, {"shard": 1})])
    assert step.final_rows and not any(r["provisional"] for r in step.final_rows)
    assert sorted(step.shard_stats) == [0, 1]


def test_aggregator_pane_methods():
    eng_a, eng_b = Engine(CFG), Engine(CFG)
    rng = np.random.default_rng(9)
    evs = [e for i in range(120) for e in _events_at(i, rng)]
    half = len(evs) // 2
    for eng, part in ((eng_a, evs[:half]), (eng_b, evs[half:])):
        for kind, b in _batches(part):
            (eng.ingest_inference if kind == "inference" else eng.ingest_feedback)(b)
    agg = WindowAggregator(CFG, sources=2)
    pa, pb = eng_a.collect(), eng_b.collect()
    agg.add(pa, source="a", watermark=eng_a.emit_watermark)
    assert not agg.is_final("traffic", scenario.T0)          # b has not reported
    agg.add(pb, source="b", watermark=eng_b.emit_watermark)
    wm = agg.watermark
    assert agg.horizon("traffic") == 0 and agg.horizon("classification") == CFG.label_delay_ms
    assert agg.is_final("traffic", wm) and not agg.is_final("classification", wm)
    by_key: dict = {}
    for p in (*pa, *pb):
        if p.space == "time":
            by_key.setdefault((p.key, p.series, p.family), []).append(p.state)
    assert by_key
    for (start, series, family), states in by_key.items():
        want = states[0].copy()
        for st in states[1:]:
            want.merge(st)
        got = agg.merged_pane(start, series, family)
        assert got is not states[0] and got.value() == want.value()
    assert agg.merged_pane(-1, next(iter(by_key))[1], "traffic") is None
    dflt = next(iter(by_key.values()))[0]
    assert agg.merged_pane(-1, next(iter(by_key))[1], "traffic", default=dflt).value() \
        == dflt.value()


def test_exposition_families_are_plain_data():
    snap = {("10s", (("model", "m"),), "latency_p99"): (250.0, 10, None, False, 0, 0),
            ("10s", (("model", "m"),), "paired_requests"): (3.0, 3, None, False, 0, 0),
            ("1m", (("model", "m"),), "accuracy"): (0.5, 10, 10, True, 0, 0)}
    fams = kpi_families(snap, ["model"])
    assert [f.name for f in fams] == ["kpistream_accuracy_ratio", "kpistream_latency_p99_seconds"]
    assert fams[1].samples == [(["10s", "m"], 0.25)] and fams[1].kind == "gauge"
    assert fams[1].labels == ["window", "model"]
    out = pipeline_families({"counters": {"inference_in": 4}, "rejected": {"ts:future": 2},
                             "emitters": {}}, {3: {"watermark": 2000, "pending": 1}}, 7)
    by = {f.name: f for f in out}
    assert by["kpistream_events"].samples[0] == (["inference", "received"], 4)
    assert by["kpistream_rejected"].samples == [(["ts", "future"], 2)]
    assert by["kpistream_watermark_seconds"].samples == [(["3"], 2.0)]
    assert by["kpistream_publisher_ticks"].samples == [([], 7)]
    assert all(isinstance(f, Family) for f in out)


def test_counters_include_rows_refused_before_a_shard():
    """A monitored replica's normaliser reports the events it refused (emitter stats);
    an HTTP replica's go to a shard's count_rejected: both reach the counters."""
    from actors.shard import Shard

    shard = Shard(0, scenario.METRICS, clock=ManualClock(scenario.T0),
                  processing_time_watermark=False)
    shard.count_rejected([("inference", "ts", "future"), ("unknown", "", "bad_json")])
    shard.report_emitter("replica-1", {"model": "m", "variant": "primary",
                                       "invalid_by_reason": {"prediction:not_finite": 3}})
    step = PublishStep(CFG, clock=ManualClock(scenario.T0))
    step.run([shard.collect()])
    c = step.counters()
    assert c["rejected"] == {"ts:future": 1, ":bad_json": 1, "prediction:not_finite": 3}
    assert c["counters"]["inference_in"] == 4 and c["counters"]["unknown_in"] == 1
    fams = {f.name: f for f in pipeline_families(c, step.shard_stats, step.ticks)}
    assert (["unknown", "received"], 1) in fams["kpistream_events"].samples
    assert (["row", "bad_json"], 1) in fams["kpistream_rejected"].samples
