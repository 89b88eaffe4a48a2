"""Alert rules: exact state semantics on a manual clock, config errors, Prometheus export."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from kpistream.alerts.rules import (PROM_METRICS, AlertEngine, Notification, load_rules,
                              to_prometheus_rules)
from kpistream.clock import ManualClock
from kpistream.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
S = 1000
SERIES = {"model": "churn", "model_version": "7", "variant": "primary", "endpoint": "/p"}


def row(value, start=0, count=100, metric="accuracy", window="10s", size=10 * S, labelled="auto",
        provisional=False, **labels):
    lab = {**SERIES, **labels}
    if labelled == "auto":
        labelled = count if metric in ("accuracy", "mae", "f1") else None
    return {"window": window, "window_start": start, "window_end": start + size, "metric": metric,
            "value": value, "count": count, "labelled": labelled, "provisional": provisional, **lab}


def engine(*rules, now=0):
    clock = ManualClock(now)
    return AlertEngine(load_rules({"rules": list(rules)}), clock), clock


ACC = {"name": "acc_low", "metric": "accuracy", "window": "10s", "match": {"model": "churn"},
       "condition": {"op": "<", "value": 0.95}, "for": "30s"}


def states(ns):
    return [n.state for n in ns]


# ------------------------------------------------------------------ `for`, blips, resolve
def test_fires_only_after_holding_for_the_whole_duration():
    e, clock = engine(ACC)
    e.observe([row(0.90)])
    n = e.evaluate()
    assert states(n) == ["pending"] and n[0].since == 0
    for t in (10, 20, 29.999):
        clock.set(int(t * S))
        e.observe([row(0.90, start=int(t * S))])
        assert e.evaluate() == []
    assert e.active()[0]["state"] == "pending"
    clock.set(30 * S)
    n = e.evaluate()
    assert states(n) == ["firing"] and n[0].previous == "pending" and n[0].since == 30 * S
    assert n[0].evidence["active_at"] == 0
    assert e.active()[0]["state"] == "firing"


def test_a_blip_resets_the_pending_timer():
    e, clock = engine(ACC)
    e.observe([row(0.90)])
    assert states(e.evaluate()) == ["pending"]
    clock.set(20 * S)
    e.observe([row(0.97, start=20 * S)])          # the condition stops holding once
    assert states(e.evaluate()) == ["inactive"]
    assert e.active() == []
    clock.set(25 * S)
    e.observe([row(0.90, start=30 * S)])
    n = e.evaluate()
    assert states(n) == ["pending"] and n[0].since == 25 * S
    clock.set(50 * S)                              # 25 s after the new start: not yet
    assert e.evaluate() == []
    clock.set(55 * S)
    assert states(e.evaluate()) == ["firing"]


def test_for_zero_fires_at_once_and_resolves_once():
    e, clock = engine({**ACC, "for": 0})
    e.observe([row(0.5)])
    assert states(e.evaluate()) == ["firing"]
    e.observe([row(0.99, start=10 * S)])
    clock.set(10 * S)
    n = e.evaluate()
    assert states(n) == ["resolved"] and n[0].previous == "firing"
    assert e.active() == [] and e.evaluate() == []


def test_hysteresis_clear_condition():
    e, clock = engine({**ACC, "for": 0, "clear": {"op": ">=", "value": 0.97}})
    e.observe([row(0.90)])
    assert states(e.evaluate()) == ["firing"]
    for i, v in enumerate((0.955, 0.96, 0.969), start=1):   # in the band: still firing
        clock.set(i * 10 * S)
        e.observe([row(v, start=i * 10 * S)])
        assert e.evaluate() == []
        assert e.active()[0]["state"] == "firing"
    clock.set(40 * S)
    e.observe([row(0.97, start=40 * S)])
    assert states(e.evaluate()) == ["resolved"]


def test_default_clear_is_the_negated_condition():
    (rule,) = load_rules({"rules": [ACC]})
    assert (rule.clear.op, rule.clear.value) == (">=", 0.95)


# ------------------------------------------------------------------ thin data
def test_min_count_never_starts_or_advances_pending():
    e, clock = engine({**ACC, "min_count": 50})
    e.observe([row(0.1, count=49)])
    assert e.evaluate() == [] and e.active() == []
    e.observe([row(0.9, count=50)])               # same window, updated (provisional) value
    assert states(e.evaluate()) == ["pending"]
    clock.set(30 * S)
    e.observe([row(0.9, start=30 * S, count=10)])  # thin: no firing, state kept
    assert e.evaluate() == []
    act = e.active()
    assert act[0]["state"] == "pending"
    # the evidence stays that of the last window with enough data; the thin one is noted
    assert act[0]["evidence"]["value"] == 0.9 and act[0]["evidence"]["count"] == 50
    assert "count 10 < min_count 50" in act[0]["evidence"]["latest_thin"]["thin"]
    e.observe([row(0.9, start=30 * S, count=80)])
    assert states(e.evaluate()) == ["firing"]
    # thin data does not resolve either
    clock.set(40 * S)
    e.observe([row(0.99, start=40 * S, count=5)])
    assert e.evaluate() == [] and e.active()[0]["state"] == "firing"


def test_default_min_count_is_30():
    e, _ = engine({**ACC, "for": 0})
    e.observe([row(0.1, count=29)])
    assert e.evaluate() == []
    e.observe([row(0.1, count=30)])
    assert states(e.evaluate()) == ["firing"]


def test_label_coverage_floor():
    e, _ = engine({**ACC, "for": 0, "min_label_coverage": 0.5})
    e.observe([row(0.5)])                          # coverage unknown: thin
    assert e.evaluate() == []
    assert next(iter(e._inst["acc_low"].values())).evidence["thin"] == "label coverage unknown"
    e.observe([row(0.4, metric="label_coverage", count=200, labelled=80)])
    assert e.evaluate() == []                      # 0.4 < 0.5
    e.observe([row(0.6, metric="label_coverage", count=200, labelled=120)])
    n = e.evaluate()
    assert states(n) == ["firing"] and n[0].evidence["label_coverage"] == 0.6


# ------------------------------------------------------------------ dedup, hooks, evidence
def test_one_notification_per_transition_and_subscribers():
    e, clock = engine(ACC)
    got: list[Notification] = []
    unsubscribe = e.subscribe(got.append)
    e.subscribe(lambda n: 1 / 0)                   # a failing hook does not stop the others
    all_n = []
    for t in range(0, 61, 5):
        clock.set(t * S)
        e.observe([row(0.9, start=(t // 10) * 10 * S)])
        for _ in range(3):
            all_n += e.evaluate()
    assert states(all_n) == ["pending", "firing"]
    assert got == all_n and len(e.callback_errors) == 2
    assert len({n.key for n in all_n}) == 2
    unsubscribe()
    clock.set(70 * S)
    e.observe([row(0.99, start=70 * S)])
    assert states(e.evaluate()) == ["resolved"] and len(got) == 2


def test_evidence_content():
    e, clock = engine({**ACC, "for": 0, "severity": "critical", "labels": {"team": "ml"},
                       "annotations": {"summary": "{rule}: {metric} {value:.2f} on {series} "
                                                  "({model}, n={count}) {nope}"}})
    e.observe([row(0.9, start=20 * S, count=120, provisional=True)])
    clock.set(31 * S)
    (n,) = e.evaluate()
    ev = n.evidence
    assert n.rule == "acc_low" and n.series == SERIES and n.severity == "critical"
    assert n.labels == {"team": "ml"} and n.since == 31 * S
    assert ev["value"] == 0.9 and ev["count"] == 120 and ev["labelled"] == 120
    assert (ev["window"], ev["window_start"], ev["window_end"]) == ("10s", 20 * S, 30 * S)
    assert ev["provisional"] is True and ev["threshold"] == "< 0.95"
    assert ev["condition"] == {"op": "<", "value": 0.95} and ev["clear"] == {"op": ">=", "value": 0.95}
    assert ev["since"] == 31 * S and ev["series"] == SERIES and ev["thin"] is None
    assert n.annotations["summary"] == (
        "acc_low: accuracy 0.90 on model=churn,model_version=7,variant=primary,endpoint=/p "
        "(churn, n=120) {nope}")
    assert n.as_dict()["evidence"] is ev
    (a,) = e.active()
    assert a["rule"] == "acc_low" and a["state"] == "firing" and a["evidence"]["value"] == 0.9
    with pytest.raises(dataclasses.FrozenInstanceError):
        n.state = "x"  # type: ignore[misc]


def test_rows_for_other_metrics_windows_and_models_are_ignored():
    e, _ = engine({**ACC, "for": 0})
    e.observe([row(0.1, window="1m", size=60 * S), row(0.1, metric="f1"),
               row(0.1, model="other"), row(0.1, metric="requests", labelled=None)])
    assert e.evaluate() == [] and e.active() == []


# ------------------------------------------------------------------ instances and group_by
def test_each_series_is_its_own_instance_by_default():
    e, _ = engine({**ACC, "for": 0})
    e.observe([row(0.9, region="eu"), row(0.99, region="us"), row(0.8, region="ap")])
    n = e.evaluate()
    assert [x.series["region"] for x in n] == ["ap", "eu"]
    assert all(x.state == "firing" for x in n)


def test_group_by_combines_series_count_weighted():
    e, _ = engine({**ACC, "for": 0, "group_by": ["model", "variant"]})
    e.observe([row(0.90, count=100, region="eu"), row(1.0, count=300, region="us"),
               row(0.5, count=40, variant="canary", region="eu")])
    n = e.evaluate()
    # primary: (0.9*100 + 1.0*300) / 400 = 0.975 -> no alert; canary alone 0.5
    assert [(x.series, x.state) for x in n] == [({"model": "churn", "variant": "canary"}, "firing")]
    e2, _ = engine({**ACC, "for": 0, "group_by": ["model"]})
    e2.observe([row(0.80, count=100, region="eu"), row(1.0, count=100, region="us")])
    (n,) = e2.evaluate()
    assert n.series == {"model": "churn"} and n.evidence["value"] == pytest.approx(0.9)
    assert n.evidence["count"] == 200 and len(n.evidence["members"]) == 2


def test_latency_quantiles_group_by_max_and_requests_sum():
    e, _ = engine({"name": "p99", "metric": "latency_p99", "window": "10s", "group_by": ["model"],
                   "condition": {"op": ">", "value": 500}},
                  {"name": "traffic", "metric": "requests", "window": "10s", "min_count": 0,
                   "group_by": ["model"], "condition": {"op": "<", "value": 100}})
    e.observe([row(300, metric="latency_p99", region="eu"), row(600, metric="latency_p99", region="us"),
               row(40, metric="requests", count=40, region="eu"),
               row(50, metric="requests", count=50, region="us")])
    n = {x.rule: x for x in e.evaluate()}
    assert n["p99"].evidence["value"] == 600 and n["traffic"].evidence["value"] == 90


# ------------------------------------------------------------------ relative drop
def test_relative_drop_against_the_preceding_baseline():
    rule = {"name": "drop", "metric": "accuracy", "window": "10s", "for": 0, "min_count": 50,
            "condition": {"relative_drop": 0.1, "baseline": "1m"}}
    e, clock = engine(rule)
    e.observe([row(0.5)])                          # no baseline yet: thin
    assert e.evaluate() == []
    assert e.active() == []
    assert "baseline has 0 events" in next(iter(e._inst["drop"].values())).evidence["thin"]
    # baseline: 6 windows [0, 60 s): mean (count-weighted) 0.9
    e.observe([row(v, start=i * 10 * S, count=c)
               for i, (v, c) in enumerate([(0.95, 100), (0.85, 100), (0.9, 100), (0.9, 100),
                                           (0.9, 50), (0.9, 50)])])
    e.observe([row(0.82, start=60 * S)])           # 0.82 > 0.81 = 0.9 * 0.9: holds not
    assert e.evaluate() == []
    e.observe([row(0.80, start=60 * S)])
    (n,) = e.evaluate()
    assert n.state == "firing"
    b = n.evidence["baseline"]
    assert b["mean"] == pytest.approx(0.9) and b["count"] == 500 and b["windows"] == 6
    assert (b["start"], b["end"]) == (0, 60 * S)
    # the window 70 s: baseline [10 s, 70 s) includes the 0.80 window -> mean drops
    clock.set(70 * S)
    e.observe([row(0.83, start=70 * S)])
    (n,) = e.evaluate()
    assert n.state == "resolved"
    # windows older than the baseline are forgotten
    inst = next(iter(e._inst["drop"].values()))
    assert min(inst.windows) >= 0


def test_relative_drop_overlapping_sliding_windows_use_only_preceding_ones():
    rule = {"name": "drop", "metric": "accuracy", "window": "1m", "for": 0,
            "condition": {"relative_drop": 0.5, "baseline": "2m"}}
    e, _ = engine(rule)
    e.observe([row(0.2, start=s * S, window="1m", size=60 * S) for s in (0, 10, 20, 30, 40)])
    e.observe([row(0.9, start=0, window="1m", size=60 * S)])
    e.observe([row(0.4, start=60 * S, window="1m", size=60 * S)])
    (n,) = e.evaluate()   # baseline: only [0, 60 s) ends by 60 s -> 0.9; 0.4 < 0.45
    assert n.evidence["baseline"]["windows"] == 1 and n.state == "firing"


def test_relative_drop_thin_baseline():
    rule = {"name": "drop", "metric": "accuracy", "window": "10s", "for": 0, "min_count": 50,
            "condition": {"relative_drop": 0.1, "baseline": "1m"}}
    e, _ = engine(rule)
    e.observe([row(0.9, start=0, count=20), row(0.9, start=10 * S, count=20),
               row(0.1, start=20 * S, count=100)])
    assert e.evaluate() == []
    inst = next(iter(e._inst["drop"].values()))
    assert "baseline has 40 events in 2 windows" in inst.evidence["thin"]


# ------------------------------------------------------------------ detectors
def test_detector_rules():
    e, clock = engine({"name": "drift", "condition": {"detector": "psi"}, "for": "10s",
                       "group_by": ["model"], "match": {"model": "churn"}})
    e.observe_detector("drift", {**SERIES, "region": "eu"}, True, {"psi": 0.31})
    e.observe_detector("drift", {**SERIES, "model": "other"}, True, {"psi": 0.9})  # filtered out
    assert states(e.evaluate()) == ["pending"]
    clock.set(10 * S)
    (n,) = e.evaluate()
    assert n.state == "firing" and n.series == {"model": "churn"}
    assert n.evidence["detector_evidence"] == {"psi": 0.31} and n.evidence["verdict_at"] == 0
    assert e.evaluate() == []
    e.observe_detector("drift", SERIES, False, {"psi": 0.05})
    assert states(e.evaluate()) == ["resolved"]
    with pytest.raises(KeyError):
        e.observe_detector("nope", SERIES, True)


def test_detector_rule_name_must_be_a_detector_rule():
    e, _ = engine(ACC)
    with pytest.raises(KeyError):
        e.observe_detector("acc_low", SERIES, True)


# ------------------------------------------------------------------ config
def test_shipped_rules_load_and_are_frozen():
    rules = load_rules(ROOT / "configs/alerts.yaml")
    assert len(rules) >= 4
    byname = {r.name: r for r in rules}
    acc = byname["DemoAccuracyLow"]
    assert (acc.metric, acc.window, acc.for_ms, acc.min_count) == ("accuracy", "10s", 30 * S, 50)
    assert dict(acc.match) == {"model": "kpistream-demo"}
    assert acc.condition.op == "<" and acc.condition.value == 0.9
    assert any(r.condition.kind == "relative_drop" and r.condition.baseline_ms == 600 * S
               for r in rules)
    with pytest.raises(dataclasses.FrozenInstanceError):
        acc.for_ms = 1  # type: ignore[misc]
    AlertEngine(ROOT / "configs/alerts.yaml", ManualClock())


@pytest.mark.parametrize("rules,path,words", [
    ([ACC, ACC, {**ACC, "fro": "1s"}], "rules[2].fro", "unknown key"),
    ([ACC, ACC, {**ACC, "for": "soon"}], "rules[2].for", "duration"),
    ([{**ACC, "metric": "accurracy"}], "rules[0].metric", "unknown KPI"),
    ([{k: v for k, v in ACC.items() if k != "metric"}], "rules[0].metric", "missing"),
    ([{k: v for k, v in ACC.items() if k != "window"}], "rules[0].window", "missing"),
    ([{**ACC, "condition": {"op": "=<", "value": 1}}], "rules[0].condition.op", "expected one of"),
    ([{**ACC, "condition": {"op": "<"}}], "rules[0].condition.value", "missing"),
    ([{**ACC, "condition": {"op": "<", "value": "x"}}], "rules[0].condition.value", "number"),
    ([{**ACC, "condition": {"relative_drop": 0.1}}], "rules[0].condition.baseline", "missing"),
    ([{**ACC, "condition": {"relative_drop": 1.5, "baseline": "1h"}}],
     "rules[0].condition.relative_drop", "must be in"),
    ([{**ACC, "condition": {"relative_drop": 0.1, "baseline": "1h", "x": 1}}],
     "rules[0].condition.x", "unknown key"),
    ([{**ACC, "clear": {"relative_drop": 0.1, "baseline": "1h"}}], "rules[0].clear", "same form"),
    ([{**ACC, "min_count": -1}], "rules[0].min_count", "must be in"),
    ([{**ACC, "min_count": 1.5}], "rules[0].min_count", "integer"),
    ([{**ACC, "metric": "error_rate", "min_label_coverage": 0.5}],
     "rules[0].min_label_coverage", "quality"),
    ([{**ACC, "min_label_coverage": 2}], "rules[0].min_label_coverage", "must be in"),
    ([{**ACC, "name": "acc low"}], "rules[0].name", "must match"),
    ([ACC, ACC], "rules[1].name", "duplicate"),
    ([{**ACC, "match": {"model": ["a"]}}], "rules[0].match.model", "string"),
    ([{**ACC, "labels": {"severity": "x"}}], "rules[0].labels.severity", "reserved"),
    ([{**ACC, "group_by": "model"}], "rules[0].group_by", "list"),
    ([{**ACC, "group_by": ["model", "model"]}], "rules[0].group_by", "distinct"),
    ([{**ACC, "condition": {"detector": "psi"}, "clear": {"op": "<", "value": 1}}],
     "rules[0].clear", "detector"),
    ([{**ACC, "annotations": {"summary": "{value"}}], "rules[0].annotations.summary", "template"),
])
def test_config_errors_name_the_key_path(rules, path, words):
    with pytest.raises(ConfigError) as ei:
        load_rules({"rules": [dict(r) for r in rules]})
    assert ei.value.path == path, str(ei.value)
    assert words in ei.value.reason


def test_top_level_errors(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_rules({"version": 2})
    assert ei.value.path == "version"
    with pytest.raises(ConfigError) as ei:
        load_rules({"rule": []})
    assert ei.value.path == "rule"
    with pytest.raises(ConfigError) as ei:
        load_rules(tmp_path / "missing.yaml")
    assert "file not found" in ei.value.reason
    (tmp_path / "bad.yaml").write_text("rules: [\n")
    with pytest.raises(ConfigError) as ei:
        load_rules(tmp_path / "bad.yaml")
    assert "YAML" in ei.value.reason


# ------------------------------------------------------------------ Prometheus
def test_prometheus_rules_text():
    rules = load_rules({"rules": [
        {**ACC, "match": {"model": "churn"}, "min_count": 30},
        {"name": "p99", "metric": "latency_p99", "window": "1m", "condition": {"op": ">", "value": 500}},
        {"name": "drop", "metric": "error_rate", "window": "1m",
         "condition": {"relative_rise": 0.5, "baseline": "1h"}},
        {"name": "drift", "condition": {"detector": "psi"}},
    ]})
    text = to_prometheus_rules(rules)
    assert ('kpistream_accuracy_ratio{window=\\"10s\\",model=\\"churn\\"} < 0.95' in text)
    assert "kpistream_window_requests{window=\\\"1m\\\"} >= 30" in text
    assert "kpistream_latency_p99_seconds{window=\\\"1m\\\"} > 0.5" in text
    assert "avg_over_time(kpistream_error_ratio{window=\\\"1m\\\"}[1h] offset 1m)" in text
    assert "# rule drift skipped" in text and "alert: drift" not in text
    assert "for: 30s" in text


def test_prom_mapping_matches_readme_and_exporter():
    readme = (ROOT / "README.md").read_text()
    for kpi in ("accuracy", "f1", "error_rate", "latency_p99", "requests", "label_coverage",
                "cost_per_1k"):
        assert PROM_METRICS[kpi][0] in readme
    # the exporter names its gauges from the same table
    from actors.publisher import PROM_KPIS

    assert {k: (v[0], v[2]) for k, v in PROM_KPIS.items()} == PROM_METRICS


@pytest.mark.prometheus
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_checks_the_exported_rules(tmp_path):
    for rules in (load_rules(ROOT / "configs/alerts.yaml"), load_rules({"rules": [
            {"name": "g", "metric": "f1", "window": "1m", "group_by": ["model"], "for": "5m",
             "min_label_coverage": 0.3, "annotations": {"s": "{value} {model} {series} {count}"},
             "condition": {"relative_drop": 0.2, "baseline": "30m"}}]})):
        f = tmp_path / "rules.yaml"
        f.write_text(to_prometheus_rules(rules))
        out = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr + f.read_text()


def test_a_series_that_goes_away_resolves_after_stale_after():
    e, clock = engine({**ACC, "for": 0, "stale_after": "2m"})
    e.observe([row(0.1, count=100)])
    assert states(e.evaluate()) == ["firing"]
    clock.set(119 * S)
    assert e.evaluate() == []                      # still within stale_after: keeps firing
    clock.set(121 * S)
    (n,) = e.evaluate()
    assert n.state == "resolved" and "no data for 121s" in n.evidence["stale"]
    assert e.active() == []
    clock.set(130 * S)
    assert e.evaluate() == []                      # once
    e.observe([row(0.1, start=130 * S, count=100)])
    assert states(e.evaluate()) == ["firing"]      # the series is back
