"""The closed loop as users meet it: the sidecar with the canary controller, the shadow
experiment ingress in front of two MLflow-alias-following models, traffic and labels over
HTTP, a real MLflow store.  A better challenger is promoted (and the primary switches to it
without a failed request), a worse one is rolled back."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from ray import serve

from conftest import deploy_sidecar, remove_sidecar, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]
ROOT = Path(__file__).resolve().parents[2]
MODEL = "e2e-model"


def _log_model(uri: str, model, accuracy: float) -> str:
    """Log and register a scikit-learn model (a real MLflow run and version); artifacts go
    beside the SQLite file, not into ./mlruns."""
    import mlflow
    import sklearn
    from mlflow import MlflowClient

    from app.demo.model import demo_split

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    x_te = demo_split(0)[1]
    c = MlflowClient(uri, uri)
    exp = c.get_experiment_by_name("e2e")
    if exp is None:
        db = Path(uri.removeprefix("sqlite:///"))
        exp_id = c.create_experiment("e2e", artifact_location=(db.parent / "artifacts").as_uri())
    else:
        exp_id = exp.experiment_id
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_metric("accuracy", accuracy)
        info = mlflow.sklearn.log_model(model, name="model", input_example=x_te[:2],
                                        pip_requirements=[f"scikit-learn=={sklearn.__version__}"])
    try:
        c.create_registered_model(MODEL)
    except Exception:
        pass
    return str(c.create_model_version(MODEL, info.model_uri, run_id=run.info.run_id).version)


def _models():
    """(weak, strong, bad) pipelines and their accuracy on the traffic's rows: the weak one
    looks at one of the 30 features (0.71), the bad one learned flipped labels."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from app.demo.model import demo_dataset, demo_split

    x_tr, _, y_tr, _, _ = demo_split(0)
    x, y, _ = demo_dataset(0)

    def fit(ys, cols=None):
        steps = [("s", StandardScaler()), ("c", LogisticRegression(max_iter=500))]
        if cols is not None:
            steps.insert(0, ("pick", ColumnTransformer([("k", "passthrough", cols)])))
        return Pipeline(steps).fit(x_tr, ys)

    out = {"weak": fit(y_tr, [1]), "strong": fit(y_tr), "bad": fit(1 - y_tr)}
    return {k: (m, float((m.predict(x) == y).mean())) for k, m in out.items()}


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body, headers=None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def _drive(base: str, seconds: float, rng, x, y, names, stop_when=None) -> list[dict]:
    """Requests through the ingress, each label posted right after its reply (in batches)."""
    replies, labels = [], []
    end = time.time() + seconds
    while time.time() < end:
        i = int(rng.integers(0, len(y)))
        st, body, _ = _post(base + "/exp", {"features": dict(zip(names, x[i].tolist())),
                                            "region": "eu"})
        replies.append({"status": st, **body})
        if st == 200:
            labels.append({"type": "feedback", "event_id": f"fb-{body['request_id']}",
                           "request_id": body["request_id"], "ts": int(time.time() * 1000),
                           "kind": "label", "value": int(y[i])})
        if len(labels) >= 20:
            _post(base + "/v1/feedback", labels)
            labels = []
            if stop_when is not None and stop_when():
                break
        time.sleep(0.01)
    if labels:
        _post(base + "/v1/feedback", labels)
    return replies


def _registry(tmp_path):
    """A real MLflow store with the weak model as v1 @champion and the strong one as v2:
    ``(uri, client, models, v1, v2)``."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    models = _models()
    v1 = _log_model(uri, *models["weak"])
    v2 = _log_model(uri, *models["strong"])
    c = MlflowClient(uri, uri)
    c.set_registered_model_alias(MODEL, "champion", v1)
    return uri, c, models, v1, v2


def _deploy(tmp_path, serve_port: int, name: str, canary: dict, uri: str) -> str:
    """The sidecar with the canary controller on ``canary`` (no alert rules); its base URL."""
    cfile = tmp_path / "canary.yaml"
    cfile.write_text(yaml.safe_dump(canary))
    deploy_sidecar(name, tmp_path / "store", canary_config=str(cfile), mlflow_tracking_uri=uri,
                   alerts_config=None)
    return f"http://127.0.0.1:{serve_port}"


def test_better_challenger_promoted_worse_rolled_back(serve_port, tmp_path):
    from app.demo.model import demo_dataset
    from app.ingress import ExperimentAppArgs, build_experiment_app

    uri, c, models, v1, v2 = _registry(tmp_path)
    assert models["strong"][1] > models["weak"][1] + 0.1 > models["bad"][1]
    canary = {"alpha": 0.05, "min_samples": 150, "min_duration": "5s", "max_duration": "10m",
              "metrics": [{"name": "accuracy", "margin": 0.02},
                          {"name": "error_rate", "margin": 0.01}],
              "experiments": [{"name": "e2e", "model": MODEL, "challenger_variant": "shadow",
                               "interval": "1s"}],
              "actions": {"mode": "auto", "cooldown": "0s"}}
    base = _deploy(tmp_path, serve_port, "kpistream-e2e", canary, uri)
    args = ExperimentAppArgs(experiment="e2e", mode="shadow", control_poll_s=0.5,
                             shared_init_args={"tracking_uri": uri, "model_name": MODEL,
                                               "n_shards": 2, "alias_poll_s": 0.5})
    try:
        wait_healthy(base, timeout_s=90)
        serve.run(build_experiment_app(args), name="e2e-exp", route_prefix="/exp")
        x, y, names = demo_dataset(0)
        rng = np.random.default_rng(3)
        # no challenger yet: the primary (v1) answers, mirrors are skipped
        r = _drive(base, 2, rng, x, y, names)
        assert all(t["status"] == 200 and t["model_version"] == v1 for t in r)
        st = _get(base + "/v1/canary")["experiments"][0]
        assert st["current"] is None and st["traffic"]["state"] == "idle"
        # approving what does not exist: a 404 with a plain message; a wrong type is a 400
        for body, code, words in (({"decision_id": "nope", "by": "me"}, 404, "nope"),
                                  ({"decision_id": 123, "by": "me"}, 400, "expected a string")):
            req = urllib.request.Request(base + "/v1/canary/approve", method="POST",
                                         data=json.dumps(body).encode())
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            detail = json.loads(e.value.read())["detail"]
            assert e.value.code == code and words in detail and not detail.startswith(("'", '"'))

        # a better challenger: shadowed, judged on paired labels, promoted
        c.set_registered_model_alias(MODEL, "challenger", v2)

        def decided():
            cur = _get(base + "/v1/canary")["experiments"][0]["current"]
            return cur is not None and cur["status"] not in ("running",)

        replies = _drive(base, 90, rng, x, y, names, stop_when=decided)
        cur = _get(base + "/v1/canary")["experiments"][0]["current"]
        assert cur["status"] == "promoted", json.dumps(cur, indent=1)[:3000]
        d = cur["decision"]
        acc = next(m for m in d["metrics"] if m["metric"] == "accuracy")
        assert acc["lower"] > -0.02 and acc["estimate"] > 0.05
        assert d["counts"]["paired_labelled"] >= 150
        assert str(c.get_model_version_by_alias(MODEL, "champion").version) == v2
        assert str(c.get_model_version_by_alias(MODEL, "previous-champion").version) == v1
        run = c.get_run(cur["outcome"]["run_id"])
        assert run.data.tags["kpistream.decision"] == "promote"
        assert run.data.tags["kpistream.challenger_version"] == v2
        assert run.data.tags["kpistream.primary_version"] == v1
        assert run.data.metrics["accuracy.lower"] == pytest.approx(acc["raw"]["lower"])
        assert c.get_model_version(MODEL, v2).tags["kpistream.decision"] == "promote"
        # the primary follows the alias: no failed request while it switches, then v2 answers
        after = _drive(base, 4, rng, x, y, names)
        assert all(t["status"] == 200 for t in replies + after)
        assert after[-1]["model_version"] == v2 and after[-1]["variant"] == "primary"

        # a worse challenger: rolled back, the champion stays
        v3 = _log_model(uri, *models["bad"])
        c.set_registered_model_alias(MODEL, "challenger", v3)

        def rolled():
            cur = _get(base + "/v1/canary")["experiments"][0]["current"]
            return cur is not None and cur["challenger_version"] == v3 and cur["status"] != "running"

        _drive(base, 60, rng, x, y, names, stop_when=rolled)
        body = _get(base + "/v1/canary")
        cur = body["experiments"][0]["current"]
        assert cur["challenger_version"] == v3 and cur["status"] == "rolled_back", cur
        assert body["experiments"][0]["past"][0]["status"] == "promoted"
        assert str(c.get_model_version_by_alias(MODEL, "champion").version) == v2
        tags = c.get_model_version(MODEL, v3).tags
        assert tags["kpistream.rolled_back"] == "true" and tags["kpistream.decision"] == "rollback"
        run = c.get_run(cur["outcome"]["run_id"])
        assert run.data.tags["kpistream.decision"] == "rollback"
        assert body["experiments"][0]["traffic"]["state"] == "rollback"
    finally:
        try:
            serve.delete("e2e-exp")
        finally:
            remove_sidecar("kpistream-e2e")


def test_canary_steps_through_weights_then_promotes(serve_port, tmp_path):
    """Canary mode on the real stack: the ingress splits by the controller's weight (polled),
    each step is analysed on its own data, passing the step before 100 % promotes."""
    from app.demo.model import demo_dataset
    from app.ingress import ExperimentAppArgs, build_experiment_app

    uri, c, _, v1, v2 = _registry(tmp_path)
    canary = {"alpha": 0.05, "min_samples": 60, "min_duration": "3s", "max_duration": "10m",
              "metrics": [{"name": "accuracy", "margin": 0.05}],
              "experiments": [{"name": "e2e-canary", "model": MODEL, "mode": "canary",
                               "challenger_variant": "canary", "steps": [0.2, 0.5, 1.0],
                               "settle": "2s", "interval": "1s"}],
              "actions": {"mode": "auto", "cooldown": "0s"}}
    base = _deploy(tmp_path, serve_port, "kpistream-e2e-canary", canary, uri)
    args = ExperimentAppArgs(experiment="e2e-canary", mode="canary", sticky_key=None,
                             weights=[0.2, 0.5, 1.0], control_poll_s=0.5,
                             challenger={"variant": "canary", "init_args": {"alias": "challenger"}},
                             shared_init_args={"tracking_uri": uri, "model_name": MODEL,
                                               "n_shards": 2, "alias_poll_s": 0.5})
    try:
        wait_healthy(base, timeout_s=90)
        serve.run(build_experiment_app(args), name="e2e-canary", route_prefix="/exp")
        x, y, names = demo_dataset(0)
        rng = np.random.default_rng(4)
        # idle controller: weight 0, everything to the primary
        r = _drive(base, 3, rng, x, y, names)
        assert all(t["status"] == 200 and t["variant"] == "primary" for t in r)
        c.set_registered_model_alias(MODEL, "challenger", v2)

        def decided():
            cur = _get(base + "/v1/canary")["experiments"][0]["current"]
            return cur is not None and cur["status"] != "running"

        replies = _drive(base, 120, rng, x, y, names, stop_when=decided)
        cur = _get(base + "/v1/canary")["experiments"][0]["current"]
        assert cur["status"] == "promoted", json.dumps(cur, indent=1)[:3000]
        steps = [e for e in cur["events"] if e["event"] == "step passed"]
        assert [e["next_weight"] for e in steps] == [0.5]
        assert cur["decision"]["srm"]["checked"] and cur["decision"]["srm"]["expected_share"] == 0.5
        # the split followed the controller: some requests went to the canary, none failed
        canary_share = np.mean([t.get("variant") == "canary" for t in replies])
        assert 0.1 < canary_share < 0.6 and all(t["status"] == 200 for t in replies)
        assert str(c.get_model_version_by_alias(MODEL, "champion").version) == v2
        run = c.get_run(cur["outcome"]["run_id"])
        assert run.data.tags["kpistream.decision"] == "promote"
        assert run.data.params["policy.mode"] == "canary"
    finally:
        try:
            serve.delete("e2e-canary")
        finally:
            remove_sidecar("kpistream-e2e-canary")
