"""The decision loop without Ray: shard -> publisher (paired summary) -> canary policy ->
trigger -> a real MLflow store (SQLite), on a manual clock."""

from __future__ import annotations

import numpy as np
import pytest

from actors.canary import Canary, load_canary_config
from actors.publisher import Publisher
from actors.shard import Shard
from actors.trigger import Trigger
from kpistream.clock import ManualClock
from kpistream.errors import ConfigError

pytestmark = pytest.mark.mlflow

T0 = 1_767_225_600_000
METRICS = {"version": 1, "time": {"lateness": "1s", "label_delay": "5s", "max_future": "1h"},
           "windows": [{"name": "10s", "type": "tumbling", "size": "10s"}],
           "series": {"segments": ["region"]},
           "metrics": {"families": ["traffic", "latency", "classification", "feedback", "paired"],
                       "classification": {"positive_label": "1"}}}
CANARY = {"alpha": 0.05, "min_samples": 300, "min_duration": "20s", "max_duration": "1h",
          "metrics": [{"name": "accuracy", "margin": 0.02},
                      {"name": "error_rate", "margin": 0.01}],
          "experiments": [{"name": "exp", "model": "m", "registered_model": "m",
                           "challenger_variant": "shadow", "interval": "1s"}],
          "actions": {"mode": "auto", "cooldown": "0s"}}


def _registry(uri: str, versions: int = 2):
    """A registered model ``m`` with versions 1..n, champion=1, challenger=n (real MLflow)."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    c.create_registered_model("m")
    for _ in range(versions):
        c.create_model_version("m", source="file:///nonexistent/model", run_id=None)
    c.set_registered_model_alias("m", "champion", "1")
    c.set_registered_model_alias("m", "challenger", str(versions))
    return c


def _shadow_events(rng, i0: int, n: int, acc_p: float, acc_c: float, t0: int,
                   version_c: str = "2") -> list[dict]:
    """Requests scored by the primary (v1) and the shadow, then labelled."""
    out = []
    for j in range(i0, i0 + n):
        y = int(rng.integers(0, 2))
        u = rng.random()
        ts = t0 + (j - i0) * 10_000 // n
        for variant, version, acc in (("primary", "1", acc_p), ("shadow", version_c, acc_c)):
            pred = y if u < acc else 1 - y           # common u: the models agree mostly
            out.append({"type": "inference", "event_id": f"{variant}{j}", "request_id": f"r{j}",
                        "ts": ts, "model": "m", "model_version": version, "variant": variant,
                        "latency_ms": 5.0, "status": "ok", "prediction": str(pred),
                        "segments": {"region": "eu" if j % 2 else "us"}})
        out.append({"type": "feedback", "event_id": f"f{j}", "request_id": f"r{j}",
                    "ts": ts + 20, "kind": "label", "value": str(y)})
    return out


def _loop(tmp_path, acc_p, acc_c, config=CANARY, windows=12):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = _registry(uri)
    clock = ManualClock(T0)
    cfg = load_canary_config(config)
    shard = Shard(0, METRICS, clock=clock, processing_time_watermark=False)
    pub = Publisher(METRICS, tmp_path / "store", pull=lambda: [shard.collect()], clock=clock,
                    n_sources=1)
    trig = Trigger(uri, "m", mode=cfg.actions.mode, cooldown_s=cfg.actions.cooldown_ms / 1000,
                   clock=clock)
    canary = Canary(cfg, summary=lambda spec, v, since, pv: pub.paired_summary(
        spec.model, spec.challenger_variant, v, since, spec.primary_variant, pv),
        triggers={"m": trig}, clock=clock)
    rng = np.random.default_rng(11)
    records = []
    for i in range(windows):
        shard.ingest_rows(_shadow_events(rng, i * 200, 200, acc_p, acc_c, T0 + i * 10_000))
        clock.set(T0 + (i + 1) * 10_000 + 500)
        pub.tick()
        records += canary.tick()
    return client, canary, pub, trig, records


def test_paired_summary_counts_every_pair(tmp_path):
    _, canary, pub, _, _ = _loop(tmp_path, 0.9, 0.9, {**CANARY, "min_samples": 10**6}, windows=3)
    s = pub.paired_summary("m", "shadow", "2", 0)
    assert s["paired"]["requests"] == 600 and s["paired"]["labelled"] >= 400
    c = s["paired"]["correct"]
    assert sum(c.values()) == s["paired"]["labelled"]
    assert s["arms"]["primary"]["requests"] == 600 and s["arms"]["challenger"]["requests"] == 600
    # the cache of final panes gives the same answer as a fresh read
    again = pub.paired_summary("m", "shadow", "2", 0)
    assert again["paired"] == s["paired"]
    # a version nobody served has no pairs
    assert pub.paired_summary("m", "shadow", "7", 0)["paired"]["requests"] == 0
    st = canary.status()["experiments"][0]
    assert st["current"]["status"] == "running" and st["current"]["decision"]["action"] == "wait"


def test_better_challenger_is_promoted_in_mlflow(tmp_path):
    client, canary, _, _, records = _loop(tmp_path, 0.80, 0.95)
    (rec,) = records
    assert rec["action"] == "promote" and rec["status"] == "applied"
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("m", "previous-champion").version) == "1"
    run = client.get_run(rec["run_id"])
    assert run.data.tags["kpistream.decision"] == "promote"
    assert run.data.tags["kpistream.challenger_version"] == "2"
    assert run.data.metrics["accuracy.lower"] > -0.02
    tags = client.get_model_version("m", "2").tags
    assert tags["kpistream.decision"] == "promote"
    cur = canary.status()["experiments"][0]["current"]
    assert cur["status"] == "promoted" and canary.traffic("exp")["state"] == "promoted"
    # later ticks do not act again
    assert canary.tick() == []


def test_worse_challenger_is_rolled_back_early(tmp_path):
    client, canary, _, _, records = _loop(tmp_path, 0.95, 0.75)
    (rec,) = records
    assert rec["action"] == "rollback" and rec["status"] == "applied"
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    assert client.get_model_version("m", "2").tags["kpistream.rolled_back"] == "true"
    cur = canary.status()["experiments"][0]["current"]
    assert cur["status"] == "rolled_back"
    acc = next(m for m in cur["decision"]["metrics"] if m["metric"] == "accuracy")
    assert acc["upper"] < 0 and acc["verdict"] == "harmful"
    # rolled back before min_samples: the evidence was enough on its own
    assert cur["decision"]["counts"]["paired_labelled"] < 300 * 4
    assert canary.traffic("exp") == {"mode": "shadow", "weight": 0.0, "step": 0,
                                     "state": "rollback", "challenger_version": "2"}


def test_approval_mode_waits_for_a_person(tmp_path):
    cfg = {**CANARY, "actions": {"mode": "approval", "cooldown": "0s"}}
    client, canary, _, trig, records = _loop(tmp_path, 0.80, 0.95, cfg)
    (rec,) = records
    assert rec["status"] == "awaiting_approval"
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    (pending,) = canary.status()["pending_approval"]
    canary.approve(pending["id"], "alice")
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
    assert canary.status()["experiments"][0]["current"]["status"] == "promoted"


def test_canary_config_errors_name_the_field():
    for raw, field in (({"experiments": [{"name": "e"}]}, "experiments[0].model"),
                       ({"experiments": [{"name": "e", "model": "m", "mode": "blue"}]},
                        "experiments[0].mode"),
                       ({"experiments": [{"name": "e", "model": "m", "mode": "canary",
                                          "steps": [0.5, 0.25]}]}, "experiments[0].steps[1]"),
                       ({"actions": {"mode": "yolo"}}, "actions.mode"),
                       ({"metrics": [{"name": "accuracy", "margn": 1}]}, "metrics[0].margn")):
        with pytest.raises(ConfigError) as e:
            load_canary_config(raw)
        assert e.value.path == field
    load_canary_config("configs/canary.yaml")


def _controller(uri, cfg, pub, clock):
    cfg = load_canary_config(cfg)
    trig = Trigger(uri, "m", mode=cfg.actions.mode, cooldown_s=cfg.actions.cooldown_ms / 1000,
                   clock=clock)
    return Canary(cfg, summary=lambda spec, v, since, pv: pub.paired_summary(
        spec.model, spec.challenger_variant, v, since, spec.primary_variant, pv),
        triggers={"m": trig}, clock=clock)


def test_a_restarted_controller_neither_reruns_a_decided_version_nor_loses_an_approval(tmp_path):
    # rolled back before the restart: not run again (MLflow remembers)
    client, canary, pub, _, (rec,) = _loop(tmp_path / "a", 0.95, 0.75)
    assert rec["action"] == "rollback"
    client.set_registered_model_alias("m", "challenger", "2")      # a person puts it back
    again = _controller(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}", CANARY, pub, canary.clock)
    assert again.tick() == []
    st = again.status()["experiments"][0]
    assert st["current"] is None and st["past"][-1]["status"] == "decided before: rollback"
    # and GET /v1/canary still lists the decision itself: read back from MLflow
    (old,) = [p for p in st["past"] if p.get("source") == "mlflow"]
    assert old["decision_id"] == rec["decision_id"] and old["action"] == "rollback"
    assert old["status"] == rec["status"] and old["run_id"] == rec["run_id"]
    assert old["challenger_version"] == "2" and old["primary_version"] == "1"
    assert [p.get("source") for p in again.status()["experiments"][0]["past"]].count(
        "mlflow") == 1                                            # read back once
    # awaiting approval before the restart: the new controller picks it up, same decision id
    cfg = {**CANARY, "actions": {"mode": "approval", "cooldown": "0s"}}
    client, canary, pub, _, (rec,) = _loop(tmp_path / "b", 0.80, 0.95, cfg)
    assert rec["status"] == "awaiting_approval"
    again = _controller(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}", cfg, pub, canary.clock)
    again.tick()
    cur = again.status()["experiments"][0]["current"]
    assert cur["status"] == "awaiting_approval"
    assert cur["outcome"]["decision_id"] == rec["decision_id"]
    (pending,) = again.status()["pending_approval"]
    again.approve(pending["id"], "bob")
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
    assert again.status()["experiments"][0]["current"]["status"] == "promoted"


def test_champion_moved_by_hand_restarts_the_run_against_the_new_champion(tmp_path):
    client, canary, pub, _, _ = _loop(tmp_path, 0.9, 0.9, {**CANARY, "min_samples": 10**6},
                                      windows=2)
    assert canary.status()["experiments"][0]["current"]["primary_version"] == "1"
    client.create_model_version("m", source="file:///nonexistent/model", run_id=None)  # v3
    client.set_registered_model_alias("m", "champion", "3")
    canary.clock.advance(5_000)
    canary.tick()
    st = canary.status()["experiments"][0]
    assert st["past"][-1]["status"] == "ended"
    assert "champion moved to 3" in st["past"][-1]["events"][-1]["event"]
    cur = st["current"]
    assert cur["status"] == "running" and cur["primary_version"] == "3"
    # the primary arm of the new run counts only the new champion's requests (none yet)
    s = pub.paired_summary("m", "shadow", "2", cur["started_ms"], "primary", "3")
    assert s["arms"]["primary"]["requests"] == 0


def test_canary_steps_then_promote_before_the_full_rollout(tmp_path):
    """Canary mode: each request goes to one arm with the step's weight; passing the step
    before the last (100 %) promotes."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = _registry(uri)
    clock = ManualClock(T0)
    cfg = {**CANARY, "min_samples": 150, "min_duration": "10s",
           "metrics": [{"name": "accuracy", "margin": 0.05}],
           "experiments": [{"name": "exp", "model": "m", "mode": "canary",
                            "challenger_variant": "canary", "steps": [0.2, 0.5, 1.0],
                            "settle": "0s", "interval": "1s"}]}
    shard = Shard(0, METRICS, clock=clock, processing_time_watermark=False)
    pub = Publisher(METRICS, tmp_path / "store", pull=lambda: [shard.collect()], clock=clock,
                    n_sources=1)
    canary = _controller(uri, cfg, pub, clock)
    rng = np.random.default_rng(5)
    weights, recs = [], []
    for i in range(40):
        canary.tick()
        t = canary.traffic("exp")
        weights.append(t["weight"])
        rows = []
        for j in range(300):
            k = i * 300 + j
            y = int(rng.integers(0, 2))
            to_c = rng.random() < t["weight"]
            acc = 0.97 if to_c else 0.85
            pred = y if rng.random() < acc else 1 - y
            ts = T0 + i * 10_000 + j * 30
            rows.append({"type": "inference", "event_id": f"i{k}", "request_id": f"r{k}",
                         "ts": ts, "model": "m", "model_version": "2" if to_c else "1",
                         "variant": "canary" if to_c else "primary", "latency_ms": 5.0,
                         "status": "ok", "prediction": str(pred)})
            rows.append({"type": "feedback", "event_id": f"f{k}", "request_id": f"r{k}",
                         "ts": ts + 20, "kind": "label", "value": str(y)})
        shard.ingest_rows(rows)
        clock.set(T0 + (i + 1) * 10_000 + 500)
        pub.tick()
        recs += canary.tick()
        if recs:
            break
    (rec,) = recs
    assert rec["action"] == "promote" and rec["status"] == "applied"
    st = canary.status()["experiments"][0]["current"]
    steps = [e for e in st["events"] if e["event"] == "step passed"]
    assert [e["next_weight"] for e in steps] == [0.5]      # 0.2 -> 0.5, then promote
    assert 0.2 in weights and 0.5 in weights and 1.0 not in weights
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
    assert canary.traffic("exp")["weight"] == 0.0
