"""The trigger against a real MLflow store (SQLite in tmp_path): aliases, runs, tags, idempotency."""

from __future__ import annotations

import concurrent.futures
import threading

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402

from actors.trigger import Trigger  # noqa: E402
from kpistream.clock import ManualClock  # noqa: E402

pytestmark = pytest.mark.mlflow

T0 = 1_767_225_600_000


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite MLflow store holding two tiny logged sklearn models (sources for versions)."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("models", artifact_location=(root / "art").as_uri())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    y = (x[:, 0] > 0).astype(int)
    prev = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    sources = []
    try:
        for c in (1.0, 0.1):
            with mlflow.start_run(experiment_id=exp) as run:
                info = mlflow.sklearn.log_model(
                    LogisticRegression(C=c).fit(x, y), name="model",
                    pip_requirements=[f"scikit-learn=={sklearn.__version__}"])
            # the artifact folder itself: no logged-model lookup in the (global) tracking store
            src = mlflow.get_logged_model(info.model_id).artifact_location
            sources.append((src, run.info.run_id))
    finally:
        mlflow.set_tracking_uri(prev[0])
        mlflow.set_registry_uri(prev[1])
    return uri, client, sources


@pytest.fixture
def model(store, request):
    """A fresh registered model: versions 1, 2, 3; champion -> 1, challenger -> 2."""
    uri, client, sources = store
    name = "m-" + request.node.name.replace("[", "-").replace("]", "")[:60]
    client.create_registered_model(name)
    for src, run_id in (sources[0], sources[1], sources[0]):
        client.create_model_version(name, src, run_id=run_id)
    client.set_registered_model_alias(name, "champion", "1")
    client.set_registered_model_alias(name, "challenger", "2")
    return uri, client, name


@pytest.fixture
def alias_moves(monkeypatch):
    """Every set_registered_model_alias call of any client: [(name, alias, version)]."""
    calls = []
    real = MlflowClient.set_registered_model_alias

    def spy(self, name, alias, version):
        calls.append((name, alias, str(version)))
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", spy)
    return calls


def decision(name, id_, action="promote", primary="1", challenger="2", **kw):
    return {"id": id_, "action": action, "experiment": "canary-7", "model": name,
            "primary_version": primary, "challenger_version": challenger,
            "policy": {"alpha": 0.05, "margin": {"accuracy": 0.01}, "max_duration": "1h"},
            "metrics": [{"metric": "accuracy", "estimate": 0.012, "lower": 0.002, "upper": 0.02,
                         "margin": 0.01, "harm": None, "n": 1500, "verdict": "non_inferior"},
                        {"metric": "latency_p99", "estimate": -3.0, "lower": -5.0, "upper": 1.0,
                         "margin": None, "harm": 50.0, "n": 1500, "verdict": "ok"}],
            "srm": {"p_value": 0.41, "ok": True, "test": "chi2"},
            "reason": f"{action}: challenger non-inferior on accuracy", "at_ms": T0, **kw}


def alias(client, name, a):
    try:
        return str(client.get_model_version_by_alias(name, a).version)
    except mlflow.exceptions.MlflowException:
        return None


def vtags(client, name, v):
    return client.get_model_version(name, v).tags


def champion_moves(calls, name):
    return [c for c in calls if c[0] == name and c[1] == "champion"]


def test_promote_moves_champion_once(model, alias_moves):
    uri, client, name = model
    trig = Trigger(uri, name, clock=ManualClock(T0))
    d = decision(name, "dec-1")
    r = trig.apply(d)
    assert r["status"] == "applied" and r["alias_before"] == "1" and r["alias_after"] == "2"
    assert alias(client, name, "champion") == "2"
    # the old champion stays findable: alias and tags
    assert alias(client, name, "previous-champion") == "1"
    assert vtags(client, name, "1")["kpistream.replaced_by"] == "2"
    assert vtags(client, name, "1")["kpistream.demoted_by_run"] == r["run_id"]
    # challenger is the champion now: the challenger alias is gone
    assert alias(client, name, "challenger") is None
    t2 = vtags(client, name, "2")
    assert t2["kpistream.decision"] == "promote" and t2["kpistream.decision_run"] == r["run_id"]
    assert t2["kpistream.decision_id"] == "dec-1"
    # again, and again from a restarted trigger: nothing moves twice
    again = trig.apply(d)
    assert again["status"] == "duplicate" and again["first_status"] == "applied"
    assert again["run_id"] == r["run_id"]
    fresh = Trigger(uri, name, clock=ManualClock(T0 + 5))
    assert fresh.apply(d)["status"] == "duplicate"
    assert champion_moves(alias_moves, name) == [(name, "champion", "2")]
    assert [h["status"] for h in trig.history()] == ["applied"]


def test_decision_run_holds_the_evidence(model):
    uri, client, name = model
    trig = Trigger(uri, name, clock=ManualClock(T0))
    d = decision(name, "dec-evidence")
    r = trig.apply(d)
    run = client.get_run(r["run_id"])
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "kpistream-decisions" and run.info.status == "FINISHED"
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert p == {"policy.alpha": "0.05", "policy.margin.accuracy": "0.01",
                 "policy.max_duration": "1h"}
    assert m == {"accuracy.estimate": 0.012, "accuracy.lower": 0.002, "accuracy.upper": 0.02,
                 "accuracy.margin": 0.01, "accuracy.n": 1500.0, "latency_p99.estimate": -3.0,
                 "latency_p99.lower": -5.0, "latency_p99.upper": 1.0, "latency_p99.harm": 50.0,
                 "latency_p99.n": 1500.0, "srm.p_value": 0.41, "srm.ok": 1.0}
    want = {"kpistream.decision": "promote", "kpistream.decision_id": "dec-evidence",
            "kpistream.model": name, "kpistream.experiment": "canary-7",
            "kpistream.primary_version": "1", "kpistream.challenger_version": "2",
            "kpistream.verdict.accuracy": "non_inferior", "kpistream.verdict.latency_p99": "ok",
            "kpistream.srm.test": "chi2", "kpistream.status": "applied",
            "kpistream.dry_run": "false", "kpistream.mode": "auto",
            "kpistream.alias_before": "1", "kpistream.alias_after": "2"}
    assert {k: t.get(k) for k in want} == want
    assert d["reason"] in t["mlflow.note.content"]
    from mlflow.artifacts import load_dict

    assert load_dict(f"{run.info.artifact_uri}/decision.json") == d
    outcome = load_dict(f"{run.info.artifact_uri}/outcome.json")
    assert outcome["status"] == "applied" and outcome["decision_id"] == "dec-evidence"


def test_crash_between_steps_finishes_without_moving_twice(model, alias_moves, monkeypatch):
    uri, client, name = model
    trig = Trigger(uri, name, clock=ManualClock(T0))
    real = Trigger._tag_challenger

    def crash(self, *a, **kw):   # dies after the champion moved, before the version tags
        raise RuntimeError("killed")

    monkeypatch.setattr(Trigger, "_tag_challenger", crash)
    with pytest.raises(RuntimeError):
        trig.apply(decision(name, "dec-crash"))
    assert alias(client, name, "champion") == "2"
    monkeypatch.setattr(Trigger, "_tag_challenger", real)
    restarted = Trigger(uri, name, clock=ManualClock(T0 + 1000))
    r = restarted.apply(decision(name, "dec-crash"))
    assert r["status"] == "applied" and r["alias_before"] == "1" and r["alias_after"] == "2"
    assert alias(client, name, "previous-champion") == "1"     # not the new champion
    assert vtags(client, name, "2")["kpistream.decision_run"] == r["run_id"]
    assert alias(client, name, "challenger") is None
    assert champion_moves(alias_moves, name) == [(name, "champion", "2")]
    runs = client.search_runs([client.get_experiment_by_name("kpistream-decisions")
                               .experiment_id], "tags.`kpistream.decision_id` = 'dec-crash'")
    assert len(runs) == 1


@pytest.mark.parametrize("action", ["rollback", "halt"])
def test_rollback_tags_and_keeps_champion(model, alias_moves, action):
    uri, client, name = model
    trig = Trigger(uri, name, clock=ManualClock(T0))
    r = trig.apply(decision(name, f"dec-{action}", action, reason="latency_p99 harm exceeded"))
    assert r["status"] == "applied" and r["alias_before"] == r["alias_after"] == "1"
    assert alias(client, name, "champion") == "1"
    assert alias(client, name, "challenger") is None
    t = vtags(client, name, "2")
    assert t["kpistream.rolled_back"] == "true"
    assert t["kpistream.rollback_reason"] == "latency_p99 harm exceeded"
    assert t["kpistream.decision"] == action and t["kpistream.decision_run"] == r["run_id"]
    assert champion_moves(alias_moves, name) == []
    assert trig.apply(decision(name, f"dec-{action}", action))["status"] == "duplicate"


def test_inconclusive_is_recorded_only(model):
    uri, client, name = model
    r = Trigger(uri, name, clock=ManualClock(T0)).apply(decision(name, "dec-inc", "inconclusive"))
    assert r["status"] == "applied" and r["alias_after"] == "1"
    assert alias(client, name, "champion") == "1" and alias(client, name, "challenger") == "2"
    assert vtags(client, name, "2")["kpistream.decision"] == "inconclusive"
    assert client.get_run(r["run_id"]).data.tags["kpistream.decision"] == "inconclusive"


def test_wait_is_ignored(model):
    uri, client, name = model
    trig = Trigger(uri, name, clock=ManualClock(T0))
    assert trig.apply(decision(name, "dec-wait", "wait"))["status"] == "ignored"
    exp = client.get_experiment_by_name("kpistream-decisions")
    if exp is not None:
        assert not client.search_runs([exp.experiment_id],
                                      "tags.`kpistream.decision_id` = 'dec-wait'")


def test_dry_run_moves_nothing(model, alias_moves):
    uri, client, name = model
    trig = Trigger(uri, name, mode="dry_run", clock=ManualClock(T0))
    r = trig.apply(decision(name, "dec-dry"))
    assert r["status"] == "dry_run" and r["alias_before"] == "1" and r["alias_after"] == "2"
    assert alias(client, name, "champion") == "1" and alias(client, name, "challenger") == "2"
    assert "kpistream.decision" not in vtags(client, name, "2")
    tags = client.get_run(r["run_id"]).data.tags
    assert tags["kpistream.dry_run"] == "true" and tags["kpistream.status"] == "dry_run"
    assert trig.apply(decision(name, "dec-dry"))["status"] == "duplicate"
    assert trig.apply(decision(name, "dec-dry-rb", "rollback"))["status"] == "dry_run"
    assert alias(client, name, "challenger") == "2"
    assert trig.maybe_retrain("drift", {}, launch=lambda **kw: 1 / 0)["status"] == "dry_run"
    assert alias_moves == []


def test_approval_waits_then_applies(model):
    uri, client, name = model
    trig = Trigger(uri, name, mode="approval", clock=ManualClock(T0))
    r = trig.apply(decision(name, "dec-ask"))
    assert r["status"] == "awaiting_approval"
    assert alias(client, name, "champion") == "1"
    assert [d["id"] for d in trig.pending()] == ["dec-ask"]
    assert trig.apply(decision(name, "dec-ask"))["status"] == "duplicate"
    # inconclusive needs no approval
    assert trig.apply(decision(name, "dec-inc", "inconclusive"))["status"] == "applied"
    # a restarted trigger still knows what waits
    restarted = Trigger(uri, name, mode="approval", clock=ManualClock(T0 + 10))
    assert [d["id"] for d in restarted.pending()] == ["dec-ask"]
    done = restarted.approve("dec-ask", by="alice")
    assert done["status"] == "applied" and done["approved_by"] == "alice"
    assert alias(client, name, "champion") == "2" and restarted.pending() == []
    tags = client.get_run(done["run_id"]).data.tags
    assert tags["kpistream.approved_by"] == "alice" and tags["kpistream.status"] == "applied"
    assert done["run_id"] == r["run_id"]
    assert restarted.apply(decision(name, "dec-ask"))["status"] == "duplicate"
    with pytest.raises(KeyError):
        restarted.approve("dec-ask", by="alice")
    # a rejected decision: recorded, nothing moves
    no = restarted.apply(decision(name, "dec-no", "rollback", primary="2", challenger="3"))
    assert no["status"] == "awaiting_approval"
    rej = restarted.reject("dec-no", by="bob")
    assert rej["status"] == "rejected"
    assert client.get_run(rej["run_id"]).data.tags["kpistream.rejected_by"] == "bob"
    assert "kpistream.rolled_back" not in vtags(client, name, "3")
    assert restarted.apply(decision(name, "dec-no", "rollback"))["status"] == "duplicate"


def test_cooldown_holds_a_second_move(model, alias_moves):
    uri, client, name = model
    clock = ManualClock(T0)
    trig = Trigger(uri, name, cooldown_s=600, clock=clock)
    assert trig.apply(decision(name, "dec-a"))["status"] == "applied"
    clock.advance(60_000)
    client.set_registered_model_alias(name, "challenger", "3")
    d2 = decision(name, "dec-b", primary="2", challenger="3")
    held = trig.apply(d2)
    assert held["status"] == "cooldown" and alias(client, name, "champion") == "2"
    # the last move time survives a restart (it is on the decision run)
    assert Trigger(uri, name, cooldown_s=600, clock=clock).apply(d2)["status"] == "cooldown"
    # rollbacks are not held back by the cooldown
    assert trig.apply(decision(name, "dec-rb", "rollback", primary="2",
                               challenger="3"))["status"] == "applied"
    client.set_registered_model_alias(name, "challenger", "3")
    clock.advance(540_000)
    later = trig.apply(d2)        # the same decision once the cooldown is over
    assert later["status"] == "applied" and later["run_id"] == held["run_id"]
    assert alias(client, name, "champion") == "3"
    assert alias(client, name, "previous-champion") == "2"
    assert [v for _, _, v in champion_moves(alias_moves, name)] == ["2", "3"]


def test_stale_decision(model, alias_moves):
    uri, client, name = model
    client.set_registered_model_alias(name, "champion", "3")     # moved by someone else
    trig = Trigger(uri, name, clock=ManualClock(T0))
    r = trig.apply(decision(name, "dec-old"))
    assert r["status"] == "stale" and r["alias_before"] == r["alias_after"] == "3"
    assert alias(client, name, "champion") == "3" and alias(client, name, "challenger") == "2"
    assert trig.apply(decision(name, "dec-old-rb", "rollback"))["status"] == "stale"
    assert "kpistream.rolled_back" not in vtags(client, name, "2")
    assert trig.apply(decision(name, "dec-old"))["status"] == "duplicate"
    assert champion_moves(alias_moves, name) == [(name, "champion", "3")]


def test_bad_decisions_are_refused(model):
    uri, _, name = model
    trig = Trigger(uri, name, clock=ManualClock(T0))
    with pytest.raises(ValueError, match="action"):
        trig.apply(decision(name, "x", "explode"))
    with pytest.raises(ValueError, match="id"):
        trig.apply({**decision(name, "x"), "id": ""})
    with pytest.raises(ValueError, match="mode"):
        Trigger(uri, name, mode="yolo")


def test_maybe_retrain_cooldown_and_running(model):
    uri, client, name = model
    clock = ManualClock(T0)
    trig = Trigger(uri, name, clock=clock, retrain_cooldown_s=3600)
    assert trig.retrain_status() == {"status": "idle"}
    assert trig.maybe_retrain("no way to train")["status"] == "unavailable"
    gate = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    seen = []

    def launch(**kw):
        seen.append(kw)
        return pool.submit(lambda: (gate.wait(10), {"version": "4", "run_id": "r"})[1])

    r = trig.maybe_retrain("accuracy alert", {"accuracy": 0.61, "window": "1m"}, launch=launch)
    assert r["status"] == "launched" and seen[0]["reason"] == "accuracy alert"
    assert seen[0]["parent_run_id"] == r["run_id"]
    assert trig.retrain_status()["status"] == "running"
    assert trig.maybe_retrain("again", {}, launch=launch)["status"] == "running"
    gate.set()
    pool.shutdown(wait=True)
    st = trig.retrain_status()
    assert st["status"] == "done" and st["result"]["version"] == "4"
    assert trig.maybe_retrain("again", {}, launch=launch)["status"] == "cooldown"
    assert len(seen) == 1
    run = client.get_run(r["run_id"])
    assert run.data.tags["kpistream.decision"] == "retrain"
    assert run.data.tags["kpistream.retrain_version"] == "4" and run.info.status == "FINISHED"
    from mlflow.artifacts import load_dict

    ev = load_dict(f"{run.info.artifact_uri}/evidence.json")
    assert ev["reason"] == "accuracy alert" and ev["evidence"]["accuracy"] == 0.61
    clock.advance(3_600_000)
    failing = trig.maybe_retrain("after cooldown", {}, launch=lambda **kw: 1 / 0)
    assert failing["status"] == "failed" and "ZeroDivisionError" in failing["detail"]
