"""The demo model (a real MLflow store in tmp_path) and the demo traffic driver (a fake sidecar).

No Ray cluster is started here: the MLflow part uses a real SQLite-backed
tracking and registry store, the traffic part a small ``http.server`` that
plays the sidecar's ``/demo``, ``/v1/feedback`` and ``/v1/series``.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from app.demo.traffic import (TrafficSummary, demo_dataset, demo_split, drift_rows,
                                    run_traffic)

pytestmark = pytest.mark.mlflow

# --------------------------------------------------------------------- the data set


def test_demo_dataset_is_deterministic_and_held_out():
    x1, y1, names = demo_dataset(0)
    x2, y2, _ = demo_dataset(0)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    x_tr, x_te, y_tr, y_te, names2 = demo_split(0)
    assert names == names2 and len(names) == 30 and x1.shape == (len(y1), 30)
    assert len(y_tr) + len(y_te) == 569 and set(np.unique(y1)) == {0, 1}
    assert not {tuple(r) for r in x_tr} & {tuple(r) for r in x_te}   # no leak
    d = drift_rows(x1, names)
    moved = [i for i, n in enumerate(names) if "texture" in n or "area" in n]
    assert np.all(d[:, moved] > x1[:, moved])
    same = [i for i in range(30) if i not in moved]
    assert np.array_equal(d[:, same], x1[:, same])


# --------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def demo_module():
    import app.demo.model

    return app.demo.model


@pytest.fixture(scope="module")
def store(tmp_path_factory, demo_module):
    """A fresh SQLite MLflow store where two 'replicas' called ensure_demo_model at once."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    results: list = []
    errors: list = []

    def call():
        try:
            results.append(demo_module.ensure_demo_model(uri))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t_start = time.perf_counter()
    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    assert not errors, errors
    return {"root": root, "uri": uri, "results": results, "elapsed": elapsed}


def test_ensure_demo_model_registers_once_with_champion_alias(store, demo_module):
    from mlflow import MlflowClient

    uri = store["uri"]
    assert store["results"] == [("models:/kpistream-demo@champion", "1")] * 2
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("kpistream-demo", "champion").version) == "1"
    versions = client.search_model_versions("name = 'kpistream-demo'")
    assert [str(v.version) for v in versions] == ["1"]   # the racing caller did not register

    exp = client.get_experiment_by_name("kpistream-demo")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.metrics["test_accuracy"] > 0.9
    assert run.data.params["dataset"] == "sklearn.datasets.load_breast_cancer"
    assert versions[0].run_id == run.info.run_id
    # artifacts live beside the database, not in ./mlruns
    assert exp.artifact_location.startswith((store["root"] / "mlartifacts").as_uri())

    # a second call (a replica restart) neither trains nor registers again
    assert demo_module.ensure_demo_model(uri) == ("models:/kpistream-demo@champion", "1")
    assert len(client.search_model_versions("name = 'kpistream-demo'")) == 1
    assert len(client.search_runs([exp.experiment_id])) == 1
    print(f"\nfirst ensure_demo_model (two racing callers, fresh store): {store['elapsed']:.1f} s")


def test_champion_loads_via_alias_and_predicts(store):
    import mlflow
    import mlflow.sklearn
    from sklearn.metrics import accuracy_score

    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_registry_uri(store["uri"])
    model = mlflow.sklearn.load_model("models:/kpistream-demo@champion")
    x, y, _ = demo_dataset(0)
    assert accuracy_score(y, model.predict(x)) > 0.9
    proba = model.predict_proba(x[:5])
    assert proba.shape == (5, 2) and np.allclose(proba.sum(axis=1), 1)
    # the drift the traffic driver injects does hurt it
    assert accuracy_score(y, model.predict(drift_rows(x, demo_dataset(0)[2]))) < 0.75
    info = mlflow.models.get_model_info("models:/kpistream-demo@champion")
    assert info.signature is not None and info.metadata["feature_names"][0] == "mean radius"


def test_demo_classifier_predict_and_segments(store, demo_module):
    """The deployment's predict/segments on the model loaded from the store (no Serve)."""
    import asyncio

    cls = demo_module.DemoClassifier.func_or_class    # the class under @serve.deployment
    obj = cls(tracking_uri=store["uri"], feature_sample=0.5)
    assert obj.model_version == "1"
    stats = obj.monitor_stats()
    assert (stats["model"], stats["variant"], stats["endpoint"]) == \
        ("kpistream-demo", "primary", "predict")
    x, y, names = demo_dataset(0)
    right = 0
    for i in range(40):
        body = {"features": dict(zip(names, x[i].tolist())), "region": "eu"}
        if i % 2:
            body["features"] = x[i].tolist()
        p = asyncio.run(obj.predict(body))
        assert set(p) == {"label", "score"} and p["label"] in (0, 1)
        assert 0 <= p["score"] <= 1 and (p["score"] >= 0.5) == (p["label"] == 1)
        right += p["label"] == y[i]
    assert right >= 36
    assert obj.segments({"features": [], "region": "apac"}) == {"region": "apac"}
    assert obj.segments({"features": []}) == {"region": "unknown"}
    feats = obj.features({"features": x[0].tolist(), "region": "eu"})
    assert list(feats) == names and feats["mean radius"] == x[0][0]
    assert obj.features({"features": "nonsense"}) is None
    with pytest.raises(ValueError, match="features missing"):
        asyncio.run(obj.predict({"features": {"mean radius": 1.0}}))
    with pytest.raises(ValueError, match="30 values"):
        asyncio.run(obj.predict({"features": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="finite"):
        asyncio.run(obj.predict({"features": [float("nan")] * 30}))


def test_build_demo_app_typed_args(demo_module, tmp_path):
    app = demo_module.build_demo_app(demo_module.DemoAppArgs(
        tracking_uri=str(tmp_path / "x.db"), n_shards=2))
    assert type(app).__name__ == "Application"
    app2 = demo_module.build_demo_app({"model_name": "m"})
    assert type(app2).__name__ == "Application"
    with pytest.raises(Exception):
        demo_module.DemoAppArgs.model_validate({"n_shard": 2})   # typo: rejected
    assert demo_module._normalize_uri(str(tmp_path / "x.db")) == f"sqlite:///{tmp_path}/x.db"
    assert demo_module._normalize_uri("sqlite:///rel/m.db").startswith("sqlite:////")


# --------------------------------------------------------------------- the fake sidecar


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeSidecar:
    """/demo, /v1/feedback and /v1/series, recording what arrives (monotonic times)."""

    def __init__(self, port: int | None = None, fail_every: int = 0):
        self.lock = threading.Lock()
        self.requests: list[tuple[float, str, dict]] = []      # (replied at, request id, body)
        self.feedback: list[tuple[float, dict]] = []           # (arrived at, event)
        self.series_queries: list[dict] = []
        self.fail_every = fail_every
        self.n = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _reply(self, code, obj, headers=()):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/demo":
                    with fake.lock:
                        fake.n += 1
                        n = fake.n
                    if fake.fail_every and n % fake.fail_every == 0:
                        return self._reply(500, {"detail": "boom"})
                    rid = f"req-{n}"
                    payload = json.loads(body)
                    with fake.lock:
                        fake.requests.append((time.monotonic(), rid, payload))
                    return self._reply(200, {"request_id": rid,
                                             "prediction": {"label": 1, "score": 0.9}},
                                       [("x-request-id", rid)])
                if self.path == "/v1/feedback":
                    assert self.headers.get("Content-Type") == "application/x-ndjson"
                    events = [json.loads(line) for line in body.decode().splitlines() if line]
                    now = time.monotonic()
                    with fake.lock:
                        fake.feedback.extend((now, e) for e in events)
                    return self._reply(200, {"accepted": len(events), "rejected": []})
                self._reply(404, {"detail": "not found"})

            def do_GET(self):
                u = urlparse(self.path)
                if u.path == "/v1/alerts":
                    return self._reply(200, {
                        "alerts": [{"rule": "DemoAccuracyLow", "state": "firing",
                                    "series": {"model": "kpistream-demo", "model_version": "1",
                                               "variant": "primary", "region": "eu"},
                                    "annotations": {"summary": "accuracy is 0.620 < 0.9"}}],
                        "detectors": [{"detector": "demo_accuracy_cusum", "drift": True,
                                       "series": {"region": "eu"}},
                                      {"detector": "demo_error_rate_ewma", "drift": False,
                                       "series": {"region": "us"}}],
                        "input_drift": [{"detector": "demo_inputs", "drift": True,
                                         "group": {"model_version": "1"}}]})
                if u.path != "/v1/series":
                    return self._reply(404, {"detail": "not found"})
                q = {k: v[0] for k, v in parse_qs(u.query).items()}
                with fake.lock:
                    fake.series_queries.append(q)
                res = q.get("resolution", "10s")
                step = 10 if res == "10s" else 60
                now = datetime.now(timezone.utc).timestamp()
                start = datetime.fromtimestamp((now // step - 1) * step, timezone.utc)
                rows = []
                values = {"requests": (40, 120), "error_rate": (0.0, 0.1),
                          "latency_p99": (3.0, 7.5), "accuracy": (0.9, 1.0),
                          "f1": (0.8, 1.0), "label_coverage": (0.5, 1.0)}
                for metric in q.get("metric", "").split(","):
                    for region, v, n in (("eu", values.get(metric, (0, 0))[0], 10),
                                         ("us", values.get(metric, (0, 0))[1], 30)):
                        rows.append({
                            "window": res, "window_start": start.isoformat(),
                            "window_end": (start + timedelta(seconds=step)).isoformat(),
                            "metric": metric, "value": v, "count": n,
                            "labelled": n if metric in ("accuracy", "f1") else None,
                            "provisional": True, "model": q.get("model"),
                            "model_version": "1", "variant": "primary",
                            "endpoint": "predict", "region": region})
                self._reply(200, rows)

        self.server = ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sidecar():
    fake = FakeSidecar().start()
    yield fake
    fake.close()


def _labels_by_features():
    """Row values (as the driver rounds them) -> true label, for clean and drifted rows."""
    x, y, names = demo_dataset(0)
    clean = {tuple(round(float(v), 6) for v in row): int(t) for row, t in zip(x, y)}
    drifted = {tuple(round(float(v), 6) for v in row): int(t)
               for row, t in zip(drift_rows(x, names), y)}
    return names, clean, drifted


def test_run_traffic_rate_feedback_drift_and_display(sidecar):
    out = io.StringIO()
    s = run_traffic(sidecar.url, "/demo", rate_per_s=40, duration_s=4, drift_at_s=2,
                    label_delay_s=(0.3, 0.8), seed=1, display_every_s=1, out=out,
                    tracking_uri="sqlite:////tmp/x/mlflow.db")
    text = out.getvalue()
    assert isinstance(s, TrafficSummary) and not s.interrupted

    # the rate: 4 s at 40/s
    reqs = sidecar.requests
    assert 150 <= len(reqs) <= 165 and s.sent == len(reqs) and s.errors == 0
    span = reqs[-1][0] - reqs[0][0]
    assert 3.5 <= span <= 4.5

    # every request got its true label as feedback, after its delay
    names, clean, drifted = _labels_by_features()
    by_rid = {rid: (t, body) for t, rid, body in reqs}
    fb = sidecar.feedback
    assert {e["request_id"] for _, e in fb} == set(by_rid)      # drained at the natural end
    assert len(fb) == len(by_rid) == s.feedback_posted
    for arrived, e in fb:
        assert e["type"] == "feedback" and e["kind"] == "label"
        assert e["event_id"] == f"fb-{e['request_id']}" and isinstance(e["ts"], int)
        replied, body = by_rid[e["request_id"]]
        assert arrived - replied >= 0.3 - 0.02           # never before the delay
        assert arrived - replied <= 0.8 + 0.5 + 1.5      # flush every 0.5 s; slack for load
        row = tuple(body["features"][n] for n in names)
        assert e["value"] == clean.get(row, drifted.get(row))

    # the drift: clean rows before 2 s, drifted rows after
    first = reqs[0][0]
    before = [body for t, _, body in reqs if t - first < 1.8]
    after = [body for t, _, body in reqs if t - first > 2.3]
    assert before and after
    assert all(tuple(b["features"][n] for n in names) in clean for b in before)
    assert all(tuple(b["features"][n] for n in names) in drifted for b in after)
    assert s.drifted == len([1 for b in (body for _, _, body in reqs)
                             if tuple(b["features"][n] for n in names) in drifted])
    assert {b["region"] for _, _, b in reqs} == {"eu", "us", "apac"}

    # the live view and the banner
    assert "http://127.0.0.1:8265" in text and f"{sidecar.url}/metrics" in text
    assert "mlflow ui --backend-store-uri sqlite:////tmp/x/mlflow.db" in text
    assert "drift injected" in text
    assert text.count("accuracy") >= 3
    assert "0.975" in text          # accuracy over the two regions, weighted by count
    assert "accuracy by region" in text
    # alerts and detectors from GET /v1/alerts, and when each was first seen
    assert "ALERT firing  DemoAccuracyLow [1/primary/eu] accuracy is 0.620 < 0.9" in text
    assert "DRIFT demo_accuracy_cusum (eu)" in text and "DRIFT demo_inputs (1)" in text
    assert "demo_error_rate_ewma" not in text
    assert set(s.alerts_fired) == {"DemoAccuracyLow", "demo_accuracy_cusum", "demo_inputs"}
    assert "alerts and detectors that fired" in text
    assert "finished after" in text and "feedback: posted" in text
    res = {q["resolution"] for q in sidecar.series_queries}
    assert res == {"10s", "1m"}
    q = sidecar.series_queries[0]
    assert "accuracy" in q["metric"].split(",") and q["model"] == "kpistream-demo"


def test_stop_event_stops_and_flushes_only_due_feedback(sidecar):
    stop = threading.Event()
    out = io.StringIO()
    threading.Timer(1.0, stop.set).start()
    t0 = time.monotonic()
    s = run_traffic(sidecar.url, rate_per_s=40, duration_s=None, drift_at_s=None,
                    label_delay_s=(0.3, 0.8), display_every_s=None, stop_event=stop, out=out)
    assert time.monotonic() - t0 < 6                       # stops promptly (not a benchmark)
    assert s.interrupted and "stopped after" in out.getvalue()
    assert 25 <= len(sidecar.requests) <= 50
    n = len(sidecar.requests)
    time.sleep(0.3)
    assert len(sidecar.requests) == n                       # nothing sent after the stop
    replied = {rid: t for t, rid, _ in sidecar.requests}
    assert all(a - replied[e["request_id"]] >= 0.28 for a, e in sidecar.feedback)
    assert s.feedback_posted + s.feedback_dropped == s.ok
    assert s.feedback_dropped > 0          # the last ones were not yet due
    assert s.drifted == 0


def test_waits_for_the_sidecar_and_counts_http_errors():
    port = _free_port()
    started: list[FakeSidecar] = []
    # the server binds its port only when it starts (1.2 s in): refused until then
    timer = threading.Timer(1.2, lambda: started.append(FakeSidecar(port, fail_every=5).start()))
    timer.start()
    out = io.StringIO()
    try:
        s = run_traffic(f"http://127.0.0.1:{port}", rate_per_s=40, duration_s=1.5,
                        drift_at_s=None, label_delay_s=(0.1, 0.2), display_every_s=None,
                        out=out)
    finally:
        timer.join()
        for f in started:
            f.close()
    fake = started[0]
    text = out.getvalue()
    assert "waiting for the model" in text and "starting traffic" in text
    assert s.errors > 5 and s.ok > 30 and s.errors + s.ok == s.sent
    assert "HTTP 500" in text
    assert s.feedback_posted == len(fake.feedback) == s.ok


def test_gives_up_when_the_sidecar_never_comes():
    out = io.StringIO()
    with pytest.raises(ConnectionError, match="not answering"):
        run_traffic(f"http://127.0.0.1:{_free_port()}", duration_s=1, display_every_s=None,
                    wait_ready_s=1.0, out=out)
    assert "waiting for the model" in out.getvalue()
    assert "gave up" in out.getvalue()
