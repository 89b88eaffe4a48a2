"""Alerts as users meet them: the sidecar on Ray Serve fires a rule while a real Prometheus
server, loaded with the same rules exported by kpistream, fires it too; a real HTTP
receiver gets each transition once."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from kpistream.alerts.rules import load_rules, to_prometheus_rules

from conftest import WebhookReceiver as _Receiver
from conftest import deploy_sidecar, free_port, remove_sidecar, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.prometheus]
ROOT = Path(__file__).resolve().parents[2]
RULE = "LiveAccuracyLow"


def _get(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str, rows: list) -> dict:
    req = urllib.request.Request(url, data="\n".join(json.dumps(r) for r in rows).encode(),
                                 method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _events(rng, start: int, n: int, accuracy: float, window_start: int) -> list[dict]:
    """``n`` labelled requests, all timed inside the 10 s window from ``window_start``."""
    out = []
    for j in range(start, start + n):
        y = int(rng.integers(0, 2))
        pred = y if rng.random() < accuracy else 1 - y
        ts = window_start + 1000 + (j % 7000)
        out.append({"type": "inference", "event_id": f"li{j}", "request_id": f"lr{j}", "ts": ts,
                    "model": "live", "model_version": "1", "variant": "primary",
                    "latency_ms": 3.0, "status": "ok", "prediction": str(pred),
                    "segments": {"region": "eu"}})
        out.append({"type": "feedback", "event_id": f"lf{j}", "request_id": f"lr{j}",
                    "ts": ts + 50, "kind": "label", "value": str(y)})
    return out


def _close(window_start: int, i: int) -> list[dict]:
    """Unlabelled requests 6 s after the window's end, on every shard: with 5 s of
    lateness the watermark passes the end, so the window is closed (what gauges and rules
    show)."""
    return [{"type": "inference", "event_id": f"lc{i}-{k}", "request_id": f"lcr{i}-{k}",
             "ts": window_start + 16_000, "model": "live", "model_version": "1",
             "variant": "primary", "latency_ms": 3.0, "status": "ok", "prediction": "1",
             "segments": {"region": "eu"}} for k in range(16)]


def test_prometheus_and_kpistream_fire_the_same_rule(serve_port, tmp_path):
    prom = shutil.which("prometheus")
    if prom is None:
        pytest.skip("prometheus not installed (.ci/run installs it)")
    receiver = _Receiver()
    alerts = {"version": 1, "rules": [{
        "name": RULE, "metric": "accuracy", "window": "10s", "match": {"model": "live"},
        "condition": {"op": "<", "value": 0.8}, "for": "3s", "min_count": 50,
        "min_label_coverage": 0.5, "severity": "critical",
        "annotations": {"summary": "accuracy of {model} is {value:.3f}",
                        "evidence": "{count} labelled requests"}}],
        "notifications": {"log": False, "webhooks": [{"url": receiver.url, "backoff": "100ms"}]}}
    alerts_file = tmp_path / "alerts.yaml"
    alerts_file.write_text(yaml.safe_dump(alerts))
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(to_prometheus_rules(load_rules(alerts_file)))
    promtool = shutil.which("promtool")
    if promtool:
        p = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True,
                           text=True)
        assert p.returncode == 0, p.stdout + p.stderr

    deploy_sidecar("kpistream-alerts", tmp_path / "store", alerts_config=str(alerts_file))
    base = f"http://127.0.0.1:{serve_port}"
    wait_healthy(base, timeout_s=60)
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{rules_file}']\n"
        "scrape_configs:\n"
        f"  - job_name: kpistream\n    static_configs: [{{targets: ['127.0.0.1:{serve_port}']}}]\n")
    proc = subprocess.Popen([prom, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prom_alerts = f"http://127.0.0.1:{port}/api/v1/alerts"

    def both():
        ours = [a for a in _get(base + "/v1/alerts")["alerts"] if a["rule"] == RULE]
        try:
            theirs = [a for a in _get(prom_alerts)["data"]["alerts"]
                      if a["labels"]["alertname"] == RULE]
        except Exception:
            theirs = None
        return ours, theirs

    try:
        rng = np.random.default_rng(7)
        # event time a minute ahead of the clock (max_future is 5 minutes): the watermark
        # moves with the events alone, not with the processing time the test takes
        now = int(time.time() * 1000)
        w1 = now - now % 10_000 + 60_000
        w2 = w1 + 20_000
        # healthy traffic in one window, then closed: nothing pending or firing on either side
        for i in range(4):
            r = _post(base + "/v1/events", _events(rng, 100 * i, 100, 0.97, w1))
            assert r["accepted"] == 200 and not r["rejected"]
        assert _post(base + "/v1/events", _close(w1, 1))["accepted"] == 16
        deadline = time.time() + 30
        while True:  # wait until Prometheus has scraped the healthy window
            q = (f"http://127.0.0.1:{port}/api/v1/query?query=kpistream_accuracy_ratio"
                 "%7Bmodel%3D%22live%22%2Cwindow%3D%2210s%22%7D")
            try:
                res = _get(q)["data"]["result"]
                if res and float(res[0]["value"][1]) > 0.9:
                    break
            except Exception:
                pass
            assert time.time() < deadline, "Prometheus never scraped the healthy window"
            time.sleep(0.5)
        time.sleep(4)   # longer than the rule's `for`
        ours, theirs = both()
        assert ours == [] and theirs == [], (ours, theirs)
        # the drift: accuracy ~0.4 in a later window; once it closes, both sides must fire
        for i in range(3):
            _post(base + "/v1/events", _events(rng, 1000 + 100 * i, 100, 0.4, w2))
        assert _post(base + "/v1/events", _close(w2, 2))["accepted"] == 16
        fired_ours = fired_theirs = None
        deadline = time.time() + 45
        while time.time() < deadline and not (fired_ours and fired_theirs):
            ours, theirs = both()
            fired_ours = fired_ours or next((a for a in ours if a["state"] == "firing"), None)
            fired_theirs = fired_theirs or next((a for a in theirs or []
                                                 if a["state"] == "firing"), None)
            time.sleep(0.5)
        assert fired_ours, f"kpistream did not fire {RULE}: {ours}"
        assert fired_theirs, f"Prometheus did not fire {RULE}: {theirs}"
        for k in ("model", "model_version", "variant", "region"):
            assert fired_theirs["labels"][k] == fired_ours["series"][k]
        assert fired_theirs["labels"]["severity"] == "critical"
        assert fired_theirs["annotations"]["kpistream_rule"] == RULE
        ev = fired_ours["evidence"]
        assert ev["value"] < 0.8 and ev["count"] >= 50 and ev["label_coverage"] >= 0.5
        # {count} in the exported rule is a query of the alert's own series: the same number
        assert fired_theirs["annotations"]["evidence"] == f"{ev['count']} labelled requests"
        assert fired_ours["annotations"]["evidence"] == f"{ev['count']} labelled requests"
        # Prometheus's value and ours are the same window's (its value is the gauge's)
        assert float(fired_theirs["value"]) == pytest.approx(ev["value"], rel=1e-9)
        assert ev["window_start"] == w2
        # the real receiver got pending? no: webhooks default to firing and resolved
        deadline = time.time() + 15
        while time.time() < deadline and not receiver.bodies:
            time.sleep(0.2)
        got = [(b["rule"], b["state"]) for b in receiver.bodies]
        assert got == [(RULE, "firing")]
        body = _get(base + "/v1/alerts?since=0")
        assert [t["state"] for t in body["transitions"]] == ["pending", "firing"]
        text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        assert f'kpistream_alert_rule_firing{{alertname="{RULE}"}} 1.0' in text
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        receiver.close()
        remove_sidecar("kpistream-alerts")
