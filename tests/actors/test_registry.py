"""The MLflow adapter against a real MLflow store (SQLite in tmp_path): URIs, experiments, runs,
aliases, version tags, logging and loading a model, errors mapped to the exception tree."""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from actors.registry import (TAG_MAX, Registry, RunRecord, artifact_location,  # noqa: E402
                             mlflow_errors, normalize_tracking_uri, sqlite_path, store_lock)
from kpistream.errors import (KpistreamError, RegistryConflict, RegistryError,  # noqa: E402
                              RegistryNotFound)

pytestmark = pytest.mark.mlflow


# ------------------------------------------------------------------------- URIs

def test_normalize_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize_tracking_uri(tmp_path / "x.db") == f"sqlite:///{tmp_path}/x.db"
    assert normalize_tracking_uri(str(tmp_path / "x.sqlite")) == f"sqlite:///{tmp_path}/x.sqlite"
    assert normalize_tracking_uri(str(tmp_path / "store")) == \
        f"sqlite:///{tmp_path}/store/mlflow.db"                # a folder holds mlflow.db
    assert normalize_tracking_uri("rel.db") == f"sqlite:///{tmp_path}/rel.db"
    assert normalize_tracking_uri("sqlite:///rel/m.db") == f"sqlite:///{tmp_path}/rel/m.db"
    assert normalize_tracking_uri(f"sqlite:///{tmp_path}/a.db") == f"sqlite:///{tmp_path}/a.db"
    for uri in ("http://mlflow:5000", "https://x/y", "databricks", "databricks://profile",
                "file:///tmp/mlruns", "sqlite:///:memory:"):
        assert normalize_tracking_uri(uri) == uri


def test_sqlite_path_and_artifact_location(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sqlite_path(f"sqlite:///{tmp_path}/a.db") == tmp_path / "a.db"
    assert sqlite_path(f"sqlite:////{tmp_path}/a.db") == tmp_path / "a.db"
    assert sqlite_path("sqlite:///rel/a.db") == tmp_path / "rel" / "a.db"
    for uri in ("sqlite:///:memory:", "sqlite://", "http://h:5000", "databricks"):
        assert sqlite_path(uri) is None
    assert artifact_location(f"sqlite:///{tmp_path}/a.db") == (tmp_path / "mlartifacts").as_uri()
    assert artifact_location("http://h:5000") is None


def test_store_lock_is_exclusive_beside_the_database(tmp_path):
    uri = f"sqlite:///{tmp_path}/sub/m.db"
    lock_file = tmp_path / "sub" / "m.db.lock"
    with store_lock(uri):
        assert lock_file.exists()
        with open(lock_file, "a+") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock_file, "a+") as f:        # released
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    # another thread waits for it
    order = []

    def other():
        with store_lock(uri):
            order.append("t")

    with store_lock(uri):
        t = threading.Thread(target=other)
        t.start()
        t.join(0.3)
        order.append("main")
    t.join(5)
    assert order == ["main", "t"]
    with store_lock("http://h:5000"):        # no file for a remote store
        pass


# ------------------------------------------------------------------------ store

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return root, uri, Registry(uri), MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def logged(store):
    """One tiny scikit-learn model logged through the adapter, registered as version 1."""
    from sklearn.linear_model import LogisticRegression

    _, _, reg, _ = store
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 3))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    model = LogisticRegression().fit(x, y)
    exp = reg.ensure_experiment("models")
    run_id, model_uri = reg.log_sklearn_model(
        exp, model, run_name="train", tags={"kpistream.test": "yes"},
        params={"C": 1.0, "since_ms": None}, metrics={"acc": 0.9}, feature_names=["a", "b", "c"],
        example=x[:3].copy(), metadata={"feature_names": ["a", "b", "c"]})
    reg.ensure_registered_model("logged", description="a test model")
    version = reg.create_version("logged", model_uri, run_id=run_id, tags={"origin": "test"},
                                 description="v1")
    return {"x": x, "model": model, "run_id": run_id, "model_uri": model_uri,
            "version": version}


def test_ensure_experiment_once_with_artifacts_beside_the_database(store):
    root, _, reg, client = store
    a = reg.ensure_experiment("exp-a", {"kpistream.kind": "test"})
    assert reg.ensure_experiment("exp-a", {"other": "ignored"}) == a
    exp = client.get_experiment(a)
    assert exp.name == "exp-a" and exp.tags["kpistream.kind"] == "test"
    assert exp.artifact_location.startswith((root / "mlartifacts").as_uri())


def test_ensure_experiment_taken_meanwhile_is_a_conflict(store):
    """What ensure_experiment relies on when another process creates it first."""
    _, _, reg, client = store
    reg.ensure_experiment("taken")
    with pytest.raises(RegistryConflict) as e:
        with mlflow_errors():
            client.create_experiment("taken")
    assert e.value.code == "RESOURCE_ALREADY_EXISTS"


def test_runs_tags_params_metrics_artifacts(store):
    _, _, reg, client = store
    exp = reg.ensure_experiment("runs")
    run_id = reg.create_run(exp, "r1", {"kpistream.kind": "test", "n": 3})
    long = "x" * (TAG_MAX + 100)
    reg.set_run_tags(run_id, {"kpistream.status": "in_progress", "kpistream.long": long})
    params = {f"p{i:03d}": str(i) for i in range(230)}          # three batches
    metrics = [(f"m{i}", float(i), 1_000 + i) for i in range(3)]
    reg.log_run_data(run_id, params, metrics)
    reg.log_dict(run_id, {"id": "dec-1", "nested": {"a": [1, 2]}}, "decision.json")
    reg.end_run(run_id, "FAILED")

    run = client.get_run(run_id)
    assert run.info.run_name == "r1" and run.info.status == "FAILED"
    assert run.data.tags["n"] == "3" and run.data.tags["kpistream.status"] == "in_progress"
    assert run.data.tags["kpistream.long"] == long[:TAG_MAX]
    assert run.data.params == params
    assert run.data.metrics == {"m0": 0.0, "m1": 1.0, "m2": 2.0}
    hist = client.get_metric_history(run_id, "m2")
    assert [(h.timestamp, h.step) for h in hist] == [(1_002, 0)]

    other = reg.create_run(exp, "r2", {"kpistream.kind": "other"})
    found = reg.find_runs(exp, "tags.`kpistream.kind` = 'test'", max_results=10,
                          order_by=["attributes.start_time ASC"])
    assert [r.run_id for r in found] == [run_id]
    rec = found[0]
    assert isinstance(rec, RunRecord) and rec.tags["kpistream.status"] == "in_progress"
    assert rec.artifact_uri == run.info.artifact_uri
    assert reg.load_dict(rec, "decision.json") == {"id": "dec-1", "nested": {"a": [1, 2]}}
    reg.log_dict(run_id, {"nan": float("nan"), "inf": [float("-inf"), 1.5], "t": (1, 2),
                          "path": Path("/x"), 3: "k"}, "clean.json")      # plain JSON
    assert reg.load_dict(rec, "clean.json") == {"nan": None, "inf": [None, 1.5], "t": [1, 2],
                                                "path": "/x", "3": "k"}
    assert {r.run_id for r in reg.find_runs(exp, "", max_results=10)} == {run_id, other}


def test_aliases_and_version_tags(store, logged):
    _, _, reg, client = store
    name = "logged"
    v2 = reg.create_version(name, logged["model_uri"], run_id=logged["run_id"])
    assert (logged["version"], v2) == ("1", "2")
    assert reg.alias_version(name, "champion") is None           # no alias yet
    assert reg.alias_version("no-such-model", "champion") is None
    reg.set_alias(name, "champion", "1")
    reg.set_alias(name, "challenger", v2)
    assert reg.alias_version(name, "champion") == "1"
    assert reg.alias_version(name, "challenger") == "2"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    reg.set_alias(name, "champion", "2")                          # moved
    assert reg.alias_version(name, "champion") == "2"
    reg.delete_alias(name, "challenger")
    assert reg.alias_version(name, "challenger") is None

    assert reg.version_tags(name, "1") == {"origin": "test"}
    reg.set_version_tags(name, "1", {"kpistream.decision": "promote", "n": 7,
                                     "kpistream.long": "y" * (TAG_MAX + 5)})
    tags = reg.version_tags(name, "1")
    assert tags["kpistream.decision"] == "promote" and tags["n"] == "7"
    assert tags["kpistream.long"] == "y" * TAG_MAX
    assert client.get_model_version(name, "1").tags == tags
    assert client.get_model_version(name, "1").description == "v1"
    assert client.get_registered_model(name).description == "a test model"
    reg.ensure_registered_model(name)                             # exists: no error


def test_errors_are_mapped_to_the_exception_tree(store):
    _, _, reg, client = store
    with pytest.raises(RegistryNotFound) as e:
        reg.version_tags("no-such-model", "1")
    assert e.value.code == "RESOURCE_DOES_NOT_EXIST"
    assert isinstance(e.value, RegistryError) and isinstance(e.value, KpistreamError)
    assert isinstance(e.value.__cause__, MlflowException)
    with pytest.raises(RegistryNotFound):
        reg.set_alias("no-such-model", "champion", "1")
    with pytest.raises(RegistryNotFound):
        reg.end_run("0" * 32)
    client.create_registered_model("dup")
    with pytest.raises(RegistryConflict) as e:
        with mlflow_errors():
            client.create_registered_model("dup")
    assert e.value.code == "RESOURCE_ALREADY_EXISTS"
    with pytest.raises(RegistryError) as e:                       # neither missing nor taken
        with mlflow_errors():
            raise MlflowException("boom")
    assert type(e.value) is RegistryError and e.value.code == "INTERNAL_ERROR"
    assert str(e.value) == "boom"
    with pytest.raises(ValueError):                               # other errors pass through
        with mlflow_errors():
            raise ValueError("not MLflow")


def test_log_sklearn_model_and_load_it_back(store, logged):
    _, uri, reg, client = store
    run = client.get_run(logged["run_id"])
    assert run.info.run_name == "train" and run.data.tags["kpistream.test"] == "yes"
    assert run.data.params == {"C": "1.0", "since_ms": "None"}
    assert run.data.metrics == {"acc": 0.9}
    info = mlflow.models.get_model_info(logged["model_uri"])
    assert info.signature is not None and info.metadata["feature_names"] == ["a", "b", "c"]
    path = mlflow.artifacts.download_artifacts(run_id=logged["run_id"],
                                               artifact_path="feature_names.json",
                                               tracking_uri=uri)
    assert Path(path).read_text().count('"a"') == 1

    x = logged["x"][:10]
    clf = reg.load_model("logged", "1", "sklearn")
    assert mlflow.get_tracking_uri() == uri == mlflow.get_registry_uri()   # made global
    assert np.allclose(clf.predict_proba(x), logged["model"].predict_proba(x))
    pyf = Registry(uri).load_model("logged", "1")                 # pyfunc by default
    assert np.array_equal(np.asarray(pyf.predict(x)).ravel(), logged["model"].predict(x))
    with pytest.raises(RegistryError):
        reg.load_model("logged", "99")


@pytest.mark.slow
def test_processes_preparing_a_fresh_store_together_all_succeed(tmp_path):
    """The app builders of `serve run` (one per application) prepare the store at once:
    one creates the tables under the lock, the others find them."""
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    start = time.time() + 2.0    # everyone starts at the same moment, imports done
    code = ("import time, sys; from actors.registry import prepare_store; "
            f"time.sleep(max(0, {start} - time.time())); print(prepare_store({uri!r}))")
    root = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-2000:] for _, e in outs]
    assert {o.strip() for o, _ in outs} == {uri}
    assert all("Traceback" not in e for _, e in outs)
    assert Registry(uri).ensure_experiment("after")
