"""The demo as a user runs it: an MLflow-registered model (real SQLite store) served through the
monitoring wrapper on Ray Serve, requests and feedback over HTTP, KPIs read back from the sidecar."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import deploy_sidecar, remove_sidecar

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]
ROOT = Path(__file__).resolve().parents[2]


def _call(url: str, body=None, headers=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                 headers={"content-type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read()), r.headers


@pytest.fixture(scope="module")
def apps(serve_port, tmp_path_factory):
    from ray import serve

    from app.demo.model import build_demo_app

    tmp = tmp_path_factory.mktemp("demo")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    deploy_sidecar("kpistream-e2e", tmp / "store")
    serve.run(build_demo_app({"tracking_uri": uri, "n_shards": 2}), name="demo-e2e",
              route_prefix="/demo", blocking=False)
    base = f"http://127.0.0.1:{serve_port}"
    deadline = time.time() + 180
    while True:
        try:
            _call(base + "/demo", {"features": [0.0] * 30, "region": "warm-up"})
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)
    yield base, uri
    remove_sidecar("demo-e2e", "kpistream-e2e")


def test_model_is_the_mlflow_champion(apps):
    from mlflow import MlflowClient

    _, uri = apps
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias("kpistream-demo", "champion")
    assert str(mv.version) == "1"


def test_requests_and_feedback_over_http_give_the_kpis(apps):
    from app.demo.traffic import demo_dataset

    base, _ = apps
    X, y, names = demo_dataset(0)
    n = 120
    rids, correct = [], 0
    for i in range(n):
        body = {"features": dict(zip(names, map(float, X[i % len(X)]))), "region": "eu"}
        rid = f"e2e-{i}" if i % 2 else None  # half bring their own request id
        reply, headers = _call(base + "/demo", body, {"x-request-id": rid} if rid else None)
        assert reply["request_id"] == (rid or reply["request_id"])
        assert headers.get("x-request-id") == reply["request_id"]
        rids.append(reply["request_id"])
        correct += int(reply["prediction"]["label"] == int(y[i % len(y)]))
    now = int(time.time() * 1000)
    fb = [{"event_id": f"fb-{r}", "request_id": r, "ts": now, "kind": "label",
           "value": int(y[i % len(y)])} for i, r in enumerate(rids)]
    rep, _ = _call(base + "/v1/feedback", "\n".join(json.dumps(f) for f in fb).encode())
    assert rep["accepted"] == n and rep["rejected"] == []
    deadline = time.time() + 30
    while True:
        rows, _ = _call(base + "/v1/series?metric=requests,accuracy&resolution=10s&model=kpistream-demo&region=eu")
        req = sum(r["value"] for r in rows if r["metric"] == "requests")
        lab = sum(r["labelled"] for r in rows if r["metric"] == "accuracy")
        if (req == n and lab == n) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert req == n and lab == n
    got_correct = sum(r["value"] * r["labelled"] for r in rows if r["metric"] == "accuracy")
    assert got_correct == pytest.approx(correct)
    assert {r["model_version"] for r in rows} == {"1"} and {r["region"] for r in rows} == {"eu"}
    # the gauge shows the window once it is closed (the watermark passes its end: here,
    # once the shards have been idle for `lateness`)
    deadline = time.time() + 30
    while True:
        text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
        if 'kpistream_accuracy_ratio{endpoint="predict",model="kpistream-demo"' in text:
            break
        assert time.time() < deadline, "no accuracy gauge for the closed windows"
        time.sleep(0.5)
    # the replica's own counters reach /metrics too (reported about once a second)
    deadline = time.time() + 20
    while 'kpistream_emitter_events_total{model="kpistream-demo",variant="primary"}' not in text \
            and time.time() < deadline:
        time.sleep(1)
        text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    assert 'kpistream_emitter_dropped_total{model="kpistream-demo",variant="primary"} 0.0' in text


def test_bad_input_is_a_400_and_not_a_model_error(apps):
    """The demo model's own input checks answer 400 with the reason; nothing is recorded
    (a caller's mistake is not a model error: error_rate stays clean)."""
    import urllib.error

    base, _ = apps
    for body, words in (({"features": [0.0] * 29, "region": "bad-in"}, "30 values, got 29"),
                        ({"region": "bad-in"}, '"features"'),
                        ({"features": {"x": 1.0}, "region": "bad-in"}, "features missing"),
                        ({"features": [None] * 30, "region": "bad-in"}, "finite number")):
        with pytest.raises(urllib.error.HTTPError) as e:
            _call(base + "/demo", body)
        err = json.loads(e.value.read())["error"]
        assert e.value.code == 400 and words in err, err
    time.sleep(2)   # longer than the replica's flush and a publisher round
    rows, _ = _call(base + "/v1/series?model=kpistream-demo&region=bad-in")
    assert rows == []
