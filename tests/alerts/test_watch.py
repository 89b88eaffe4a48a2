"""The watcher wired into the publisher: detectors, input drift, disparity, webhooks (no Ray).

The publisher runs here as the plain class, pulling from a plain Shard, on a
manual clock; the webhook receiver is a real HTTP server on a loopback port.
"""

from __future__ import annotations

import http.server
import json
import threading

import numpy as np
import pytest
from conftest import WebhookReceiver

from actors.notify import Notifier, WebhookSender
from actors.publisher import Publisher
from actors.shard import Shard
from kpistream.alerts.rules import AlertEngine, load_rules, to_prometheus_rules
from kpistream.clock import ManualClock
from kpistream.spec.metrics import EngineConfig, config_from_dict
from kpistream.errors import ConfigError
from kpistream.alerts.watcher import (DetectorBank, InputDriftBank, Watcher, alerts_from_dict,
                             check_windows, load_alerts)

T0 = 1_767_225_600_000
METRICS = {"version": 1, "time": {"lateness": "1s", "label_delay": "5s", "max_future": "1h"},
           "windows": [{"name": "10s", "type": "tumbling", "size": "10s"},
                       {"name": "1m", "type": "sliding", "size": "60s", "step": "10s"}],
           "series": {"segments": ["region"]},
           "metrics": {"families": ["traffic", "latency", "classification", "feedback"],
                       "classification": {"positive_label": "1"}}}


def acc_row(start, value, count, series=None, provisional=False, window="10s", metric="accuracy"):
    return {"window": window, "window_start": start, "window_end": start + 10_000,
            "metric": metric, "value": value, "count": count, "labelled": count,
            "provisional": provisional, "label_coverage": 1.0,
            **(series or {"model": "m", "model_version": "1", "variant": "primary",
                          "endpoint": "e", "region": "eu"})}


# ------------------------------------------------------------------ config
def test_repo_alerts_file_loads_and_matches_metrics_config():
    from kpistream.spec.metrics import load_config

    cfg = load_alerts("configs/alerts.yaml")
    check_windows(cfg, load_config("configs/metrics.yaml"))
    assert cfg.detectors and cfg.input_drift and any(r.is_detector for r in cfg.rules)
    assert any(r.condition.kind == "disparity" for r in cfg.rules)


@pytest.mark.parametrize("raw, field, reason", [
    ({"detectors": [{"name": "d", "type": "cusum", "metric": "accuracy", "window": "10s"}]},
     "detectors[0].shift", "missing"),
    ({"detectors": [{"name": "d", "type": "kalman", "metric": "accuracy", "window": "10s"}]},
     "detectors[0].type", "expected one of"),
    ({"detectors": [{"name": "d", "type": "adwin", "metric": "acc", "window": "10s"}]},
     "detectors[0].metric", "unknown KPI"),
    ({"detectors": [{"name": "d", "type": "adwin", "metric": "accuracy", "window": "10s",
                     "bogus": 1}]}, "detectors[0].bogus", "unknown key"),
    ({"rules": [{"name": "r", "condition": {"detector": "nope"}}]},
     "rules[0].condition.detector", "no detector"),
    ({"input_drift": [{"name": "x", "window": "10s", "alpha": 2}]}, "input_drift[0].alpha", "must be"),
    ({"notifications": {"webhooks": [{"url": "ftp://x"}]}}, "notifications.webhooks[0].url",
     "http"),
    ({"rules": [{"name": "r", "metric": "latency_p99", "window": "10s",
                 "condition": {"disparity": 5, "across": "region", "alpha": 0.01}}]},
     "rules[0].condition.alpha", "rate KPI"),
    ({"rules": [{"name": "r", "metric": "accuracy", "window": "10s",
                 "condition": {"disparity": 0.1, "across": "region"},
                 "clear": {"disparity": 0.2}}]}, "rules[0].clear.disparity", "hysteresis"),
])
def test_config_errors_name_the_field(raw, field, reason):
    with pytest.raises(ConfigError) as e:
        alerts_from_dict({"version": 1, **raw})
    assert e.value.path == field and reason in str(e.value)


def test_detectors_need_existing_tumbling_windows():
    eng = config_from_dict(METRICS)
    cfg = alerts_from_dict({"detectors": [{"name": "d", "type": "adwin", "metric": "accuracy",
                                           "window": "1m"}]})
    with pytest.raises(ConfigError, match="sliding"):
        check_windows(cfg, eng)
    cfg = alerts_from_dict({"detectors": [{"name": "d", "type": "adwin", "metric": "accuracy",
                                           "window": "5m"}]})
    with pytest.raises(ConfigError, match="no window"):
        check_windows(cfg, eng)


# ------------------------------------------------------------------ detectors
def _bank(det: dict) -> DetectorBank:
    cfg = alerts_from_dict({"detectors": [det]})
    return DetectorBank(cfg.detectors, config_from_dict(METRICS))


def test_cusum_budget_from_time_learns_target_and_detects_a_step():
    bank = _bank({"name": "acc", "type": "cusum", "metric": "accuracy", "window": "10s",
                  "shift": 0.05, "false_alarm_every": "30d", "warmup": 6, "min_count": 50})
    rng = np.random.default_rng(1)
    n, change, signals = 400, 60, []
    for i in range(120):
        p = 0.95 if i < change else 0.88
        correct = rng.binomial(n, p)
        rows = [acc_row(T0 + i * 10_000, correct / n, n)]
        rows.append(acc_row(T0 + i * 10_000, 0.1, n, provisional=True))  # ignored
        for spec, st, sig in bank.observe(rows):
            if sig:
                signals.append(i)
    st = next(iter(bank.states["acc"].values()))
    assert st.arl0 == pytest.approx(30 * 86_400_000 / 10_000)   # windows per 30 days
    # learned from the warm-up, moved away from the watched side by 2 standard errors
    n = sum(c for _, c in st.warm)
    p = sum(v * c for v, c in st.warm) / n
    assert st.target == pytest.approx(p - 2 * np.sqrt(p * (1 - p) / n))
    assert abs(p - 0.95) < 0.01
    assert signals and signals[0] >= change and signals[0] - change <= 5
    ev = bank.evidence(bank.specs[0], st)
    assert ev["drift"] and ev["signals"] == len(signals) and ev["state"]["side"] == "down"


def test_thin_windows_are_skipped_and_windows_are_fed_once():
    bank = _bank({"name": "acc", "type": "cusum", "metric": "accuracy", "window": "10s",
                  "shift": 0.05, "warmup": 2, "min_count": 50})
    bank.observe([acc_row(T0, 0.9, 10)])                 # thin
    bank.observe([acc_row(T0 + 10_000, 0.9, 100)])
    bank.observe([acc_row(T0 + 10_000, 0.9, 100)])       # the same window again
    st = next(iter(bank.states["acc"].values()))
    assert st.skipped == 1 and len(st.warm) == 1 and st.det is None


def test_ewma_and_river_detectors_run_on_window_values():
    rng = np.random.default_rng(2)
    for det in ({"name": "e", "type": "ewma", "metric": "error_rate", "window": "10s",
                 "false_alarm_every": "7d"},
                {"name": "p", "type": "page_hinkley", "metric": "latency_p99", "window": "10s",
                 "threshold": 200, "delta": 5},
                {"name": "a", "type": "adwin", "metric": "latency_p99", "window": "10s"}):
        bank = _bank(det)
        hits = []
        for i in range(200):
            if det["metric"] == "error_rate":
                v = rng.binomial(500, 0.02 if i < 100 else 0.08) / 500
            else:
                v = rng.normal(100 if i < 100 else 300, 5)
            row = acc_row(T0 + i * 10_000, v, 500, metric=det["metric"])
            hits += [i for _, _, s in bank.observe([row]) if s]
        assert hits and all(h >= 100 for h in hits[:1]), (det["type"], hits[:5])


# ------------------------------------------------------------------ input drift
def test_input_drift_reference_window_then_shift_is_flagged_and_noise_is_not():
    cfg = alerts_from_dict({"input_drift": [{"name": "inp", "window": "10s", "reference": "60s",
                                             "alpha": 0.01, "min_effect": 0.1,
                                             "min_samples": 50}]})
    bank = InputDriftBank(cfg.input_drift)
    rng = np.random.default_rng(3)
    series = {"model": "m", "model_version": "1", "variant": "primary", "endpoint": "e"}
    verdicts = []
    for i in range(30):
        shift = 1.0 if i >= 20 else 0.0
        sample = {"x": rng.normal(shift, 1, 256),
                  "colour": rng.choice(["red", "blue"] if i < 20 else ["red", "green"], 256)}
        bank.observe("10s", T0 + i * 10_000, T0 + (i + 1) * 10_000, series, sample, True)
        for spec, st, fired in bank.run():
            verdicts.append((i, fired))
    assert verdicts[0][0] == 6            # 6 windows of reference, then tests
    assert not any(f for i, f in verdicts if i < 20)
    assert all(f for i, f in verdicts if i >= 20)
    st = next(iter(bank.states["inp"].values()))
    last = {f["feature"]: f for f in st.last["features"]}
    assert last["x"]["drift"] and last["x"]["psi"] > last["x"]["psi_threshold"]
    assert last["colour"]["test"] == "chi2" and last["colour"]["drift"]


def test_input_drift_given_reference_and_small_samples_stay_quiet():
    cfg = alerts_from_dict({"input_drift": [{"name": "inp", "window": "10s",
                                             "min_samples": 50}]})
    bank = InputDriftBank(cfg.input_drift)
    series = {"model": "m", "model_version": "1", "variant": "primary"}
    bank.set_reference("inp", series, {"x": np.random.default_rng(0).normal(0, 1, 2000)}, "mlflow")
    bank.observe("10s", T0, T0 + 10_000, series, {"x": np.full(20, 5.0)}, True)   # thin
    (spec, st, fired), = bank.run()
    assert not fired and st.source == "mlflow" and st.last["features"][0]["n_cur"] == 20


# ------------------------------------------------------------------ disparity
def test_segment_disparity_rule_fires_resolves_and_needs_data_in_each_segment():
    clock = ManualClock(T0)
    rules = load_rules({"rules": [{
        "name": "RegionGap", "metric": "accuracy", "window": "10s",
        "condition": {"disparity": 0.1, "across": "region", "alpha": 0.01},
        "clear": {"disparity": 0.05}, "min_count": 100, "for": "0s"}]})
    eng = AlertEngine(rules, clock)
    base = {"model": "m", "model_version": "1", "variant": "primary", "endpoint": "e"}

    def window(i, values, counts):
        return [acc_row(T0 + i * 10_000, v, c, {**base, "region": r})
                for r, v, c in zip(("eu", "us", "ap"), values, counts)]

    eng.observe(window(0, [0.95, 0.80, 0.94], [500, 50, 500]))     # us too thin: gap 0.01
    assert eng.evaluate() == []
    eng.observe(window(1, [0.95, 0.80, 0.94], [2000, 2000, 2000]))
    (n,) = eng.evaluate()
    assert n.state == "firing" and n.series == base
    ev = n.evidence
    assert ev["value"] == pytest.approx(0.15) and ev["highest"] == "eu" and ev["lowest"] == "us"
    assert {s["segment"] for s in ev["segments"]} == {"eu", "us", "ap"}
    assert ev["test"]["pairs"] == 3 and ev["test"]["p_adjusted"] < 0.01
    assert ev["test"]["z"] == pytest.approx(0.05 / np.sqrt(0.875 * 0.125 * 2 / 2000))
    eng.observe(window(2, [0.95, 0.88, 0.94], [500, 500, 500]))    # gap 0.07: hysteresis band
    assert eng.evaluate() == []
    eng.observe(window(3, [0.95, 0.92, 0.94], [500, 500, 500]))    # gap 0.03 <= 0.05: resolve
    assert [x.state for x in eng.evaluate()] == ["resolved"]
    # the same gap on 500 requests each is not significantly beyond the bound
    eng.observe(window(4, [0.95, 0.80, 0.94], [500, 500, 500]))
    assert eng.evaluate() == []
    assert next(iter(eng._inst["RegionGap"].values())).evidence["test"]["p_adjusted"] > 0.01
    text = to_prometheus_rules(rules)
    assert "without (region)" in text and "count without (region)" in text


# ------------------------------------------------------------------ publisher + webhook
_Receiver = WebhookReceiver


def _events(i0: int, n: int, correct: float, t_ms: int, rng) -> list[dict]:
    out = []
    for j in range(n):
        rid = f"r{i0 + j}"
        y = int(rng.integers(0, 2))
        pred = y if rng.random() < correct else 1 - y
        ts = t_ms + int(j * 10_000 / n)
        out.append({"type": "inference", "event_id": f"i{i0 + j}", "request_id": rid, "ts": ts,
                    "model": "m", "model_version": "1", "variant": "primary",
                    "latency_ms": 5.0, "status": "ok", "prediction": str(pred),
                    "segments": {"region": "eu"}})
        out.append({"type": "feedback", "event_id": f"f{i0 + j}", "request_id": rid,
                    "ts": ts + 100, "kind": "label", "value": str(y)})
    return out


@pytest.mark.slow
def test_publisher_fires_alert_and_detector_and_posts_each_transition_once(tmp_path):
    rec = _Receiver(fail_first=1)       # the first post fails: retried with backoff
    clock = ManualClock(T0)
    alerts = {"version": 1,
              "rules": [{"name": "AccLow", "metric": "accuracy", "window": "10s",
                         "condition": {"op": "<", "value": 0.8}, "clear": {"op": ">=", "value": 0.85},
                         "for": "20s", "min_count": 50, "severity": "critical",
                         "annotations": {"summary": "accuracy {value:.2f}"}},
                        {"name": "AccDrift", "condition": {"detector": "acc_cusum"}}],
              "detectors": [{"name": "acc_cusum", "type": "cusum", "metric": "accuracy",
                             "window": "10s", "shift": 0.1, "warmup": 3, "min_count": 50,
                             "false_alarm_every": "30d", "hold": "30s"}],
              "notifications": {"log": False, "webhooks": [
                  {"url": rec.url, "backoff": "50ms", "retries": 5}]}}
    shard = Shard(0, METRICS, clock=clock, processing_time_watermark=False)
    pub = Publisher(METRICS, tmp_path / "store", pull=lambda: [shard.collect()], clock=clock,
                    n_sources=1, alerts=alerts)
    rng = np.random.default_rng(4)
    states = []
    for i in range(16):
        correct = 0.95 if i < 6 or i >= 11 else 0.6
        shard.ingest_rows(_events(i * 200, 200, correct, T0 + i * 10_000, rng))
        clock.set(T0 + (i + 1) * 10_000 + 6_500)
        pub.tick()
        states.append({a["rule"]: a["state"] for a in pub.alerts()["alerts"]})
    assert pub.notifier.flush(10)
    got = [(b["rule"], b["state"]) for b in rec.bodies]
    # AccLow: pending then firing (after 20 s) then resolved; AccDrift fires and resolves
    assert [s for r, s in got if r == "AccLow"] == ["firing", "resolved"]
    assert [s for r, s in got if r == "AccDrift"] == ["firing", "resolved"]
    assert len({b["id"] for b in rec.bodies}) == len(rec.bodies)        # exactly once each
    assert rec.attempts == len(rec.bodies) + 1
    firing = next(b for b in rec.bodies if b["rule"] == "AccLow" and b["state"] == "firing")
    assert firing["evidence"]["value"] < 0.8 and firing["evidence"]["count"] >= 50
    assert firing["annotations"]["summary"].startswith("accuracy 0.")
    assert any(s.get("AccLow") == "pending" for s in states)
    drift = next(b for b in rec.bodies if b["rule"] == "AccDrift" and b["state"] == "firing")
    assert drift["evidence"]["detector_evidence"]["signals"] >= 1
    # the pollable log (the hook later actions use) has every transition, numbered
    log = pub.notifications(0)
    assert [b["seq"] for b in log] == list(range(1, len(log) + 1))
    assert {(b["rule"], b["state"]) for b in log} >= set(got)
    assert pub.notifications(log[-1]["seq"]) == []
    text = pub.metrics_text()
    assert 'kpistream_alert_transitions_total{alertname="AccLow",state="firing"} 1.0' in text
    assert 'kpistream_drift_detections_total{detector="acc_cusum"}' in text
    assert 'kpistream_webhook_notifications_total{outcome="delivered",receiver="0"}' in text
    pub.notifier.close()
    rec.close()


def test_firing_alert_is_on_metrics_and_in_alerts(tmp_path):
    clock = ManualClock(T0)
    alerts = {"rules": [{"name": "AccLow", "metric": "accuracy", "window": "10s",
                         "condition": {"op": "<", "value": 0.8}, "min_count": 50}],
              "notifications": {"log": False}}
    shard = Shard(0, METRICS, clock=clock, processing_time_watermark=False)
    pub = Publisher(METRICS, tmp_path / "store", pull=lambda: [shard.collect()], clock=clock,
                    n_sources=1, alerts=alerts)
    rng = np.random.default_rng(5)
    shard.ingest_rows(_events(0, 200, 0.5, T0, rng))
    clock.set(T0 + 5_000)
    pub.tick()
    assert pub.alerts()["alerts"] == []       # the window in progress is not judged
    # an event of the next window moves the watermark past the end (lateness 1 s): the
    # window is closed, its accuracy provisional until the label deadline (5 s later)
    shard.ingest_rows(_events(200, 1, 0.5, T0 + 11_000, rng))
    clock.set(T0 + 12_000)
    pub.tick()
    (a,) = pub.alerts()["alerts"]
    assert a["state"] == "firing" and a["evidence"]["provisional"]
    text = pub.metrics_text()
    line = next(x for x in text.splitlines() if x.startswith("kpistream_alerts_firing{"))
    assert 'alertname="AccLow"' in line and 'model="m"' in line and line.endswith(" 1.0")
    assert 'kpistream_alert_rule_firing{alertname="AccLow"} 1.0' in text
    assert 'kpistream_alert_rule_pending{alertname="AccLow"} 0.0' in text   # 0, not absent


def test_webhook_sender_gives_up_on_4xx_and_counts_unreachable(tmp_path):
    from kpistream.alerts.watcher import WebhookSpec

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(400)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    s = WebhookSender(WebhookSpec(f"http://127.0.0.1:{srv.server_address[1]}/", retries=3,
                                  backoff_s=0.01))
    s.submit({"id": "a"})
    assert s.flush(5) and s.counters["rejected"] == 1 and s.counters["retries"] == 0
    srv.shutdown()
    s.close()
    dead = WebhookSender(WebhookSpec("http://127.0.0.1:9/", retries=2, backoff_s=0.01,
                                     timeout_s=0.5))
    dead.submit({"id": "b"})
    assert dead.flush(10) and dead.counters["failed"] == 1 and dead.counters["retries"] == 2
    dead.close()


def test_publisher_runs_input_drift_on_sampled_features(tmp_path):
    metrics = {**METRICS, "metrics": {**METRICS["metrics"],
                                      "families": ["traffic", "features"]}}
    clock = ManualClock(T0)
    alerts = {"rules": [{"name": "Inputs", "condition": {"detector": "inp"}}],
              "input_drift": [{"name": "inp", "window": "10s", "reference": "30s",
                               "alpha": 0.01, "min_effect": 0.1, "min_samples": 50}],
              "notifications": {"log": False}}
    shard = Shard(0, metrics, clock=clock, processing_time_watermark=False)
    pub = Publisher(metrics, tmp_path / "store", pull=lambda: [shard.collect()], clock=clock,
                    n_sources=1, alerts=alerts)
    rng = np.random.default_rng(8)
    fired_at = None
    for i in range(10):
        shift = 1.5 if i >= 6 else 0.0
        rows = [{"type": "inference", "event_id": f"e{i}-{j}", "request_id": f"r{i}-{j}",
                 "ts": T0 + i * 10_000 + j * 30, "model": "m", "model_version": "1",
                 "variant": "primary", "latency_ms": 2.0, "status": "ok", "prediction": "1",
                 "segments": {"region": "eu" if j % 2 else "us"},
                 "features": {"x": float(rng.normal(shift)), "y": float(rng.normal()),
                              "kind": str(rng.choice(["a", "b"]))}}
                for j in range(300)]
        shard.ingest_rows(rows)
        clock.set(T0 + (i + 1) * 10_000 + 1_500)
        pub.tick()
        if fired_at is None and any(a["rule"] == "Inputs" and a["state"] == "firing"
                                    for a in pub.alerts()["alerts"]):
            fired_at = i
    (st,) = pub.alerts()["input_drift"]
    assert st["reference_ready"] and st["group"] == {"model": "m", "model_version": "1",
                                                     "variant": "primary"}
    # the first shifted window (6) is final once window 7's events move the watermark past it
    assert fired_at == 7
    feats = {f["feature"]: f for f in st["last"]["features"]}
    assert feats["x"]["drift"] and not feats["y"]["drift"] and not feats["kind"]["drift"]
    assert feats["x"]["n_cur"] >= 256          # both regions' samples of the window


def test_a_series_that_stops_reporting_is_not_in_drift_and_is_pruned():
    bank = _bank({"name": "acc", "type": "cusum", "metric": "accuracy", "window": "10s",
                  "shift": 0.05, "warmup": 2, "min_count": 50, "hold": "1m"})
    for i in range(6):
        bank.observe([acc_row(T0 + i * 10_000, 0.95 if i < 2 else 0.5, 200)], now_ms=i * 1000)
    st = next(iter(bank.states["acc"].values()))
    assert bank.evidence(bank.specs[0], st, now_ms=6_000)["drift"]
    ev = bank.evidence(bank.specs[0], st, now_ms=5_000 + 61_000)     # silent for over `hold`
    assert not ev["drift"] and ev["idle"]
    assert bank.prune(now_ms=5_000 + 3_600_001) == 1 and not bank.states["acc"]
