"""Retraining on Ray from the event archive, into a real MLflow store (SQLite in tmp_path)."""

from __future__ import annotations

import time

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")

from actors.archive import EventArchive  # noqa: E402
from actors.retrain import NotEnoughData, train_from_archive  # noqa: E402
from actors.trigger import Trigger  # noqa: E402
from kpistream.wire.batch import FeedbackBatch, InferenceBatch, shard_of  # noqa: E402
from app.demo.traffic import demo_split  # noqa: E402

pytestmark = pytest.mark.mlflow

T0 = 1_767_225_600_000
NAME = "kpistream-demo"


def _write(archive_dir, inferences: list[dict], feedback: list[dict], n_shards: int = 2):
    """Records -> batches -> each shard's EventArchive, as the live path would (by request)."""
    archives = [EventArchive(archive_dir, i, max_rows=250) for i in range(n_shards)]
    for kind, recs, cls in (("inference", inferences, InferenceBatch),
                            ("feedback", feedback, FeedbackBatch)):
        for lo in range(0, len(recs), 100):
            b = cls.from_records(recs[lo:lo + 100])
            owner = shard_of(b.request_id, n_shards)
            for s in range(n_shards):
                idx = np.flatnonzero(owner == s)
                if len(idx):
                    archives[s].append(kind, b.take(idx))
    for a in archives:
        a.flush()
        assert a.stats()["errors"] == 0, a.stats()["last_error"]
    return archives


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """The demo data (train + held-out rows, features + labels) as archived events.

    Also: a shadow scoring every 4th request (its features too: still one row per
    request), 60 requests without features (not trainable), a second, flipped
    label for every request arriving later (the first label counts), thumbs
    feedback (not a label).
    """
    x_tr, x_te, y_tr, y_te, names = demo_split(0)
    x = np.vstack([x_tr, x_te])
    y = np.concatenate([y_tr, y_te])
    inf, fb, late = [], [], []
    for i, (row, label) in enumerate(zip(x, y)):
        rid = f"req-{i}"
        feats = dict(zip(names, map(float, row)))
        base = {"request_id": rid, "ts": T0 + 10 * i, "model": NAME, "model_version": "1",
                "endpoint": "predict", "latency_ms": 2.0, "status": "ok", "pred_label": "1",
                "pred_score": 0.7, "segments": {"region": "eu"}}
        inf.append({**base, "event_id": f"inf-{i}", "variant": "primary", "features": feats})
        if i % 4 == 0:
            inf.append({**base, "event_id": f"sh-{i}", "variant": "shadow", "features": feats})
        fb.append({"event_id": f"lab-{i}", "request_id": rid, "ts": T0 + 10 * i + 5000,
                   "kind": "label", "label": str(int(label))})
        late.append({"event_id": f"lab2-{i}", "request_id": rid, "ts": T0 + 10 * i + 9000,
                     "kind": "label", "label": str(1 - int(label))})
        if i % 7 == 0:
            fb.append({"event_id": f"th-{i}", "request_id": rid, "ts": T0 + 10 * i + 6000,
                       "kind": "thumbs", "value": 1.0})
    for j in range(60):
        rid = f"nofeat-{j}"
        inf.append({"event_id": f"nf-{j}", "request_id": rid, "ts": T0 + j, "model": NAME,
                    "model_version": "1", "variant": "primary", "latency_ms": 1.0,
                    "status": "ok", "pred_label": "0"})
        fb.append({"event_id": f"nfl-{j}", "request_id": rid, "ts": T0 + j + 1,
                   "kind": "label", "label": "0"})
    root = tmp_path_factory.mktemp("archive")
    _write(root, inf, fb + late)
    return root, x, y, names


def test_retrain_on_ray_registers_a_challenger(archive, ray_session, tmp_path):
    root, x, y, names = archive
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trig = Trigger(uri, NAME, archive_dir=str(root), retrain_cooldown_s=3600)
    r = trig.maybe_retrain("accuracy below 0.8 for 5m", {"accuracy": 0.61})
    assert r["status"] == "launched"
    deadline = time.monotonic() + 300
    while trig.retrain_status()["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    st = trig.retrain_status()
    assert st["status"] == "done", st.get("error")
    res = st["result"]
    # one row per request with features and a label: the shadow adds none, the
    # featureless requests none
    assert res["rows"] == len(y) and res["feature_names"] == names
    assert res["metrics"]["test_accuracy"] > 0.9
    assert res["data_from_ms"] == T0 and res["data_to_ms"] == T0 + 10 * (len(y) - 1)

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias(NAME, "challenger")
    assert str(mv.version) == res["version"] == "1" and mv.run_id == res["run_id"]
    assert mv.tags["kpistream.trained_on_rows"] == str(len(y))
    assert mv.tags["kpistream.retrain_reason"] == "accuracy below 0.8 for 5m"
    assert mv.tags["kpistream.parent_run"] == r["run_id"]
    run = client.get_run(res["run_id"])
    assert run.data.params["estimator"] == "StandardScaler+LogisticRegression"
    assert run.data.params["data_from_ms"] == str(T0)
    assert run.data.metrics["rows"] == len(y) and "test_roc_auc" in run.data.metrics
    assert client.get_experiment(run.info.experiment_id).name == "kpistream-retrain"
    # the trigger's own record of why
    why = client.get_run(r["run_id"]).data.tags
    assert why["kpistream.retrain_version"] == "1" and why["kpistream.status"] == "done"
    assert trig.maybe_retrain("again", {})["status"] == "cooldown"

    # the model predicts sensibly on the data, fed as the serving wrapper feeds it
    prev = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        model = mlflow.sklearn.load_model(f"models:/{NAME}@challenger")
        info = mlflow.models.get_model_info(f"models:/{NAME}@challenger")
    finally:
        mlflow.set_tracking_uri(prev[0])
        mlflow.set_registry_uri(prev[1])
    acc = float((model.predict(x) == y).mean())
    assert acc > 0.8, acc                    # the flipped later labels would give < 0.2
    assert info.signature is not None and len(info.signature.inputs.to_dict()) == 1


def test_custom_trainer_window_and_too_little_data(archive, ray_session, tmp_path):
    from sklearn.tree import DecisionTreeClassifier

    root, x, y, _ = archive
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def tree(xt, yt):
        return DecisionTreeClassifier(max_depth=4, random_state=0).fit(xt, yt)

    res = train_from_archive(str(root), uri, NAME, trainer=tree, since_ms=T0 + 10 * 100,
                             reason="nightly",
                             log_model_kwargs={"skops_trusted_types": ["sklearn.tree._tree.Tree"]})
    assert res["rows"] == len(y) - 100 and res["metrics"]["test_accuracy"] > 0.8
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.get_model_version_by_alias(NAME, "challenger").version in (1, "1")
    assert client.get_run(res["run_id"]).data.params["estimator"] == "tree"
    with pytest.raises(NotEnoughData, match="min_rows"):
        train_from_archive(str(root), uri, NAME, min_rows=10_000)
    with pytest.raises(NotEnoughData, match="no archived"):
        train_from_archive(str(tmp_path / "empty"), uri, NAME)


def test_retrain_jobs_record_each_launch(tmp_path):
    """The job launcher alone (no Ray): one job at a time, cooldown, outcome on the run."""
    import concurrent.futures
    import threading
    from collections import deque

    from mlflow import MlflowClient

    from actors.registry import Registry
    from actors.retrain import RetrainJobs
    from kpistream.clock import ManualClock

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reg = Registry(uri)
    clock = ManualClock(T0)
    history: deque = deque(maxlen=10)
    fut: concurrent.futures.Future = concurrent.futures.Future()
    jobs = RetrainJobs(reg, lambda: reg.ensure_experiment("decisions"), NAME, dry_run=False,
                       cooldown_s=60, clock=clock, launch=lambda **kw: fut, history=history,
                       lock=threading.RLock())
    assert jobs.status() == {"status": "idle"}
    r = jobs.maybe_retrain("drift", {"psi": float("nan")})
    assert r["status"] == "launched" and r["action"] == "retrain"
    assert jobs.maybe_retrain("again")["status"] == "running"
    fut.set_result({"version": "4", "run_id": "abc"})
    st = jobs.status()
    assert st["status"] == "done" and st["result"]["version"] == "4"
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(r["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["kpistream.retrain_version"] == "4"
    assert reg.load_dict(reg.find_runs(run.info.experiment_id, "", max_results=5)[0],
                         "evidence.json")["evidence"] == {"psi": None}
    assert jobs.maybe_retrain("soon")["status"] == "cooldown"
    clock.advance(61_000)
    failed = jobs.maybe_retrain("later", launch=lambda **kw: 1 / 0)
    assert failed["status"] == "failed" and "ZeroDivisionError" in failed["detail"]
    assert client.get_run(failed["run_id"]).info.status == "FAILED"
    assert [h["status"] for h in history] == ["launched", "running", "cooldown", "failed"]
    none = RetrainJobs(reg, lambda: "0", NAME, dry_run=False, cooldown_s=0, clock=clock,
                       launch=None, history=history, lock=threading.RLock())
    assert none.maybe_retrain("x")["status"] == "unavailable"
    dry = RetrainJobs(reg, lambda: "0", NAME, dry_run=True, cooldown_s=0, clock=clock,
                      launch=lambda **kw: 1 / 0, history=history, lock=threading.RLock())
    assert dry.maybe_retrain("x")["status"] == "dry_run"
