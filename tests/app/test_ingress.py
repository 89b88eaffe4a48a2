"""The experiment ingress (shadow mirror, weighted canary, controller) and models that follow an
MLflow alias: real Ray Serve over HTTP (the session's ``serve_port``), a real MLflow SQLite
store in tmp_path, real shard actors.

Toy models send their events to a recording actor (a sink that keeps each event's variant,
model_version and request-id hash), so the tests can see that primary and challenger scored
the same request ids; the demo classifier sends to real shard actors.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray")
from ray import cloudpickle, serve  # noqa: E402

from app.ingress import (CONTROLLER, CONTROLLER_NAMESPACE, ExperimentAppArgs,  # noqa: E402
                         ExperimentIngress, build_experiment_app, is_mirrored,
                         routes_to_challenger)
from app.monitor import ModelUnavailable, MonitoredModel  # noqa: E402
from kpistream.wire.batch import hash_ids  # noqa: E402
from conftest import kill_named_actors, sidecar_actor_names  # noqa: E402

# the classes below travel to Serve replicas and actors by value (tests/ is not importable there)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.ray, pytest.mark.mlflow]

TEST_NS = "kpistream-test-ingress"


# ---------------------------------------------------------------------------
# a recording sink, a toy model, a controller


class Recorder:
    """Every event a toy model flushed: (variant, model_version, request-id hash, error)."""

    def __init__(self) -> None:
        self.rows: list = []

    def record(self, rows: list) -> dict:
        self.rows.extend(rows)
        return {"accepted": len(rows), "late": 0, "duplicates": 0, "rejected": []}

    def get(self) -> list:
        return self.rows


class RecorderSink:
    """A MonitoredModel sink (``n_shards``, ``ready``, ``send``) writing to the Recorder actor."""

    n_shards = 1

    def __init__(self, name: str) -> None:
        self.name = name
        self.handle = None

    def ready(self) -> bool:
        if self.handle is None:
            try:
                self.handle = ray.get_actor(self.name, namespace=TEST_NS)
            except ValueError:
                return False
        return True

    def send(self, kind, batch):
        keys = batch.series_keys
        rows = [(keys[s][2], keys[s][1], int(r), bool(e))
                for s, r, e in zip(batch.series.tolist(), batch.request_id, batch.error.tolist())]
        return self.handle.record.remote(rows)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
class Toy(MonitoredModel):
    """Scores ``x``; as the challenger it sleeps or fails when the payload asks it to."""

    def __init__(self, variant: str, recorder: str, challenger: bool = False) -> None:
        super().__init__(model="toy", model_version="1", variant=variant, flush_ms=20,
                         sink=RecorderSink(recorder))
        self.challenger = challenger

    async def predict(self, payload: dict):
        if payload.get("fail_all"):
            raise RuntimeError("the model failed")
        if self.challenger:
            if payload.get("challenger_sleep"):
                await asyncio.sleep(float(payload["challenger_sleep"]))
            if payload.get("challenger_fail"):
                raise RuntimeError("the challenger failed")
        x = float(payload.get("x", 0.0))
        return {"label": int(x > 0.5), "score": x}


class Controller:
    """The canary controller's contract, minimal: traffic(experiment) -> mode/weight/step/state."""

    def __init__(self, weight: float, state: str = "running") -> None:
        self.weight, self.state, self.asked = weight, state, []

    def set(self, weight: float | None = None, state: str | None = None) -> None:
        if weight is not None:
            self.weight = weight
        if state is not None:
            self.state = state

    def asked_for(self) -> list:
        return self.asked

    def traffic(self, experiment: str) -> dict:
        self.asked.append(experiment)
        return {"mode": "canary", "weight": self.weight, "step": None, "state": self.state}


# ---------------------------------------------------------------------------
# helpers


def _post(url: str, payload=None, rid: str | None = None, headers: dict | None = None,
          raw: bytes | None = None):
    h = {"Content-Type": "application/json", **(headers or {})}
    if rid is not None:
        h["x-request-id"] = rid
    data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers=h)
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, body, hdrs = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        status, body, hdrs = e.code, e.read(), e.headers
    return status, json.loads(body), hdrs, time.perf_counter() - t0


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _wait(cond, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _ready(url: str) -> dict:
    def ok():
        try:
            return _get(url + "/v1/experiment")
        except (urllib.error.URLError, ConnectionError):
            return None
    return _wait(ok, 60, "the experiment app")


def _counters(url: str) -> dict:
    return _get(url + "/v1/experiment")["counters"]


@pytest.fixture
def recorder(ray_session, request):
    name = f"recorder-{request.node.name}"
    actor = ray.remote(num_cpus=0)(Recorder).options(name=name, namespace=TEST_NS).remote()
    ray.get(actor.get.remote())
    yield name, actor
    ray.kill(actor)


def _rows_by_variant(actor) -> dict[str, list]:
    out: dict[str, list] = {}
    for variant, version, rid_hash, error in ray.get(actor.get.remote()):
        out.setdefault(variant, []).append((version, rid_hash, error))
    return out


def _hashes(ids) -> set[int]:
    return {int(h) for h in hash_ids(list(ids))}


# ---------------------------------------------------------------------------
# shadow


def test_shadow_mirrors_a_reproducible_share_without_touching_the_primary(serve_port, recorder):
    rec_name, rec = recorder
    exp = "t-shadow"
    app = ExperimentIngress.bind(
        Toy.options(name="toy-primary").bind("primary", rec_name),
        Toy.options(name="toy-shadow").bind("shadow", rec_name, challenger=True),
        {"experiment": exp, "mode": "shadow", "mirror_fraction": 0.5,
         "max_mirror_in_flight": 4, "control_poll_s": 0.2,
         "controller": "no-such-controller"})     # whatever other tests leave running
    url = f"http://127.0.0.1:{serve_port}/exp-shadow"
    serve.run(app, name="exp-shadow", route_prefix="/exp-shadow")
    try:
        status = _ready(url)
        assert status["mode"] == "shadow" and status["controller"]["found"] is False

        # 1. N requests: N primary replies, the mirrored share decided by the request id
        ids = [f"shadow-{i}" for i in range(200)]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda rid: _post(url, {"x": 0.7}, rid), ids))
        for rid, (st, body, hdrs, _) in zip(ids, results):
            assert st == 200, body
            assert body == {"request_id": rid, "prediction": {"label": 1, "score": 0.7},
                            "variant": "primary", "model_version": "1"}
            assert hdrs.get_all("x-request-id") == [rid]
            assert hdrs["x-kpistream-variant"] == "primary"
        expected = [r for r in ids if is_mirrored(exp, r, 0.5)]
        n, k = len(ids), len(expected)
        assert abs(k - n * 0.5) <= 4 * math.sqrt(n * 0.25)     # binomial tolerance
        c = _wait(lambda: (lambda c: c if c["mirror_ok"] >= k else None)(_counters(url)),
                  what="the mirrors")
        assert c["mirrored"] == c["mirror_ok"] == k and c["mirror_dropped"] == 0
        assert c["mirror_sampled_out"] == n - k and c["routed"] == {"primary": n}

        # both variants' events carry the same request ids (read from the events themselves)
        rows = _wait(lambda: (lambda r: r if len(r.get("shadow", ())) >= k
                              and len(r.get("primary", ())) >= n else None)(
            _rows_by_variant(rec)), what="the events")
        assert {h for _, h, _ in rows["primary"]} == _hashes(ids)
        assert {h for _, h, _ in rows["shadow"]} == _hashes(expected)
        assert len(rows["shadow"]) == k and len(rows["primary"]) == n

        # 2. a challenger that sleeps 2 s neither slows nor fails the primary's replies
        plain = [r for r in (f"lat-{i}" for i in range(400)) if not is_mirrored(exp, r, 0.5)]
        mirrored = [r for r in (f"lat-{i}" for i in range(400)) if is_mirrored(exp, r, 0.5)]
        base_s, slow_s = [], []
        for a, b in zip(plain[:60], mirrored[:60]):
            st, _, _, dt = _post(url, {"x": 0.2, "challenger_sleep": 2.0}, a)
            assert st == 200
            base_s.append(dt)
            st, body, _, dt = _post(url, {"x": 0.2, "challenger_sleep": 2.0}, b)
            assert st == 200 and body["variant"] == "primary"
            slow_s.append(dt)
        c2 = _counters(url)
        assert c2["mirror_dropped"] > 0                    # bounded: at most 4 outstanding
        assert c2["mirror_in_flight"] <= 4
        p50_base, p50_slow = statistics.median(base_s), statistics.median(slow_s)

        # 3. a failing challenger: the replies are fine, the failures counted
        _wait(lambda: _counters(url)["mirror_in_flight"] == 0, what="the slow mirrors")
        before = _counters(url)
        fail_ids = mirrored[60:100]
        base2_s, fail_s = [], []
        for a, b in zip(plain[60:100], fail_ids):
            st, _, _, dt = _post(url, {"x": 0.9, "challenger_fail": True}, a)
            assert st == 200
            base2_s.append(dt)
            st, body, _, dt = _post(url, {"x": 0.9, "challenger_fail": True}, b)
            assert st == 200 and body["prediction"]["label"] == 1
            fail_s.append(dt)
        after = _wait(lambda: (lambda c: c if c["mirror_in_flight"] == 0 else None)(
            _counters(url)), what="the failing mirrors")
        sent = after["mirrored"] - before["mirrored"]
        assert sent >= 1 and after["mirror_dropped"] == before["mirror_dropped"]
        assert after["mirror_errors"] - before["mirror_errors"] == sent
        p50_base2, p50_fail = statistics.median(base2_s), statistics.median(fail_s)
        print(f"\nprimary p50: {p50_base * 1e3:.1f} ms not mirrored vs {p50_slow * 1e3:.1f} ms "
              f"mirrored to a shadow that sleeps 2 s ({c2['mirror_dropped']} mirrors dropped); "
              f"{p50_base2 * 1e3:.1f} ms not mirrored vs {p50_fail * 1e3:.1f} ms mirrored to a "
              f"failing shadow")
        # a generous ratio: waiting for the 2 s shadow would make it ~100x; what remains is
        # the mirror's CPU on a small machine
        assert p50_slow < 4 * p50_base and p50_fail < 4 * p50_base2

        # the failing challenger's error events carry the request ids too
        rows = _wait(lambda: (lambda r: r if sum(e for _, _, e in r.get("shadow", ())) >= sent
                              else None)(_rows_by_variant(rec)), what="the error events")
        assert {h for _, h, e in rows["shadow"] if e} <= _hashes(fail_ids)

        # the primary failing is the caller's 500; a body that is not JSON a 400
        st, body, hdrs, _ = _post(url, {"fail_all": True}, "boom-1")
        assert st == 500 and body["request_id"] == "boom-1" and "the model failed" in body["error"]
        assert hdrs.get_all("x-request-id") == ["boom-1"]
        assert hdrs["x-kpistream-variant"] == "primary"
        st, body, hdrs, _ = _post(url, raw=b"{not json", rid="bad-1")
        assert st == 400 and body["request_id"] == "bad-1"
        assert hdrs.get_all("x-request-id") == ["bad-1"]
        c = _counters(url)
        assert c["errors_primary"] == 1 and c["bad_requests"] == 1
    finally:
        serve.delete("exp-shadow")


# ---------------------------------------------------------------------------
# canary


def test_canary_split_is_weighted_sticky_and_follows_the_controller(serve_port, recorder):
    rec_name, rec = recorder
    exp = "t-canary"
    try:   # a leftover of another test would answer instead of ours
        ray.kill(ray.get_actor(CONTROLLER, namespace=CONTROLLER_NAMESPACE))
    except ValueError:
        pass
    app = ExperimentIngress.bind(
        Toy.options(name="toy-primary").bind("primary", rec_name),
        Toy.options(name="toy-canary").bind("canary", rec_name, challenger=True),
        {"experiment": exp, "mode": "canary", "weights": [0.1, 0.5, 1.0], "initial_step": 0,
         "sticky_key": "user_id", "control_poll_s": 0.2})
    url = f"http://127.0.0.1:{serve_port}/exp-canary"
    serve.run(app, name="exp-canary", route_prefix="/exp-canary")
    ctl = None
    try:
        assert _ready(url)["weight"] == 0.1

        def one(u, tag, via):
            if via == "payload":
                return _post(url, {"x": 0.3, "user_id": u}, f"{tag}-{u}")
            return _post(url, {"x": 0.3}, f"{tag}-{u}", headers={"user_id": u})

        def send(users, weight, tag, via="payload"):
            got = {}
            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda u: one(u, tag, via), users))
            for u, (st, body, hdrs, _) in zip(users, results):
                assert st == 200, body
                assert hdrs["x-kpistream-variant"] == body["variant"]
                got[u] = body["variant"]
            want = {u: "canary" if routes_to_challenger(exp, u, weight) else "primary"
                    for u in users}
            assert got == want
            return got

        # the initial step: ~10 % of users, exactly the ones the hash says
        n = 300
        users = [f"u{i}" for i in range(n)]
        first = send(users, 0.1, "a")
        k = sum(v == "canary" for v in first.values())
        assert abs(k - n * 0.1) <= 4 * math.sqrt(n * 0.1 * 0.9)     # binomial tolerance
        # sticky: the same users again (new request ids), and the key from a header
        assert send(users[:60], 0.1, "b") == {u: first[u] for u in users[:60]}
        assert send(users[60:100], 0.1, "c", via="header") == \
            {u: first[u] for u in users[60:100]}
        # no key: the request id decides
        for i in range(20):
            rid = f"nokey-{i}"
            st, body, _, _ = _post(url, {"x": 0.3}, rid)
            assert body["variant"] == ("canary" if routes_to_challenger(exp, rid, 0.1)
                                       else "primary")

        # the controller says 0.5: the ingress follows within a few polls
        ctl = ray.remote(num_cpus=0)(Controller).options(
            name=CONTROLLER, namespace=CONTROLLER_NAMESPACE).remote(0.5)
        _wait(lambda: _get(url + "/v1/experiment")["weight"] == 0.5, 20, "weight 0.5")
        second = send(users, 0.5, "d")
        k2 = sum(v == "canary" for v in second.values())
        assert abs(k2 - n * 0.5) <= 4 * math.sqrt(n * 0.25)
        assert all(second[u] == "canary" for u in users if first[u] == "canary")  # monotone
        assert set(ray.get(ctl.asked_for.remote())) == {exp}
        status = _get(url + "/v1/experiment")
        assert status["source"] == "controller" and status["controller"]["found"]
        assert status["controller"]["last"]["weight"] == 0.5

        # rollback: everything to the primary
        ray.get(ctl.set.remote(state="rollback"))
        _wait(lambda: _get(url + "/v1/experiment")["halted"], 20, "the rollback")
        assert set(send(users[:60], 0.0, "e").values()) == {"primary"}

        # the events: each reply's variant scored its request
        c = _counters(url)
        routed = c["routed"]
        assert routed["canary"] == k + sum(first[u] == "canary" for u in users[:100]) + \
            sum(routes_to_challenger(exp, f"nokey-{i}", 0.1) for i in range(20)) + k2
        rows = _wait(lambda: (lambda r: r if len(r.get("canary", ())) >= routed["canary"]
                              and len(r.get("primary", ())) >= routed["primary"] else None)(
            _rows_by_variant(rec)), what="the events")
        assert {h for _, h, _ in rows["canary"]} >= _hashes(
            f"d-{u}" for u in users if second[u] == "canary")
        assert not {h for _, h, _ in rows["canary"]} & _hashes(f"e-{u}" for u in users[:60])
    finally:
        serve.delete("exp-canary")
        if ctl is not None:
            ray.kill(ctl)


# ---------------------------------------------------------------------------
# models that follow an MLflow alias


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A real MLflow store (SQLite) with the demo model's version 1 as ``champion``."""
    from app.demo.model import ensure_demo_model

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    ensure_demo_model(uri)
    return uri


def test_a_missing_alias_is_a_clear_503_and_a_clear_error(mlflow_store):
    """No Serve: the wrapper's HTTP path and infer() on a replica whose alias does not exist."""
    from starlette.requests import Request

    from app.demo.model import DemoClassifier

    obj = DemoClassifier.func_or_class(tracking_uri=mlflow_store, alias="candidate",
                                       variant="shadow")
    assert obj.clf is None and obj.alias_stats()["available"] is False

    async def go():
        body = json.dumps({"features": [1.0] * 30}).encode()
        scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
                 "headers": [(b"x-request-id", b"r-1")]}

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        resp = await obj(Request(scope, receive))
        assert resp.status_code == 503
        msg = json.loads(resp.body)["error"]
        assert "ModelUnavailable" in msg and "no alias 'candidate'" in msg
        with pytest.raises(ModelUnavailable, match="no alias 'candidate'"):
            await obj.infer({"features": [1.0] * 30}, "r-2")
        st = obj.monitor_stats()
        assert st["unavailable"] == 2 and st["buffered"] == 0   # no events recorded
        await obj.aclose(timeout=0.1)

    asyncio.run(go())


def test_alias_follow_through_the_experiment_app(serve_port, mlflow_store):
    """build_experiment_app with the demo classifier: champion (primary) vs challenger
    (shadow, missing at first); registering version 2 and moving the aliases switches the
    replicas without a failed request, and later events carry model_version 2."""
    from mlflow import MlflowClient

    from actors.remote import NAMESPACE, ShardActor, shard_name
    from app.demo.model import MODEL_NAME, demo_dataset

    kill_named_actors(*sidecar_actor_names())   # another module's leftovers mislead counts
    shards = [ShardActor.options(name=shard_name(i), namespace=NAMESPACE).remote(
        i, {"series": {"segments": ["region"]}}) for i in range(2)]
    ray.get([s.ping.remote() for s in shards])
    args = ExperimentAppArgs(experiment="t-alias", mode="shadow", control_poll_s=0.2,
                             controller="no-such-controller",
                             shared_init_args={"tracking_uri": mlflow_store, "n_shards": 2,
                                               "alias_poll_s": 0.5})
    url = f"http://127.0.0.1:{serve_port}/exp-alias"
    serve.run(build_experiment_app(args), name="exp-alias", route_prefix="/exp-alias")
    x, _, names = demo_dataset(0)
    stop = threading.Event()
    try:
        _ready(url)
        for i in range(20):
            st, body, _, _ = _post(url, {"features": x[i].tolist(), "region": "eu"}, f"al-{i}")
            assert st == 200 and body["model_version"] == "1" and body["variant"] == "primary"
        c = _wait(lambda: (lambda c: c if c["mirror_unavailable"] == 20 else None)(
            _counters(url)), what="the skipped mirrors")
        assert c["mirror_errors"] == 0 and c["mirror_ok"] == 0    # skipped, not failed
        assert c["mirrored"] < 5 and c["challenger_unavailable"]  # not sent while absent

        # version 2: v1's logged model registered again (training anew would take seconds)
        client = MlflowClient(tracking_uri=mlflow_store, registry_uri=mlflow_store)
        v1 = client.get_model_version(MODEL_NAME, "1")
        v2 = client.create_model_version(MODEL_NAME, v1.source, run_id=v1.run_id)
        assert str(v2.version) == "2"

        # traffic all along; the aliases move under it
        replies: list = []

        def traffic():
            i = 0
            while not stop.is_set():
                st, body, _, _ = _post(url, {"features": x[i % 100].tolist(), "region": "us"},
                                       f"sw-{i}")
                replies.append((time.monotonic(), st, body.get("model_version")))
                i += 1

        t = threading.Thread(target=traffic, daemon=True)
        t.start()
        client.set_registered_model_alias(MODEL_NAME, "challenger", "2")
        _wait(lambda: _counters(url)["mirror_ok"] > 0, 30, "the challenger to appear")
        t_move = time.monotonic()
        client.set_registered_model_alias(MODEL_NAME, "champion", "2")
        _wait(lambda: any(v == "2" for _, _, v in replies[-5:]), 30, "the champion to move")
        switched_s = next(t for t, _, v in replies if t > t_move and v == "2") - t_move
        time.sleep(0.5)
        stop.set()
        t.join(30)
        statuses = [st for _, st, _ in replies]
        versions = [v for _, _, v in replies]
        assert statuses == [200] * len(replies)          # no failed request during the switch
        first2 = versions.index("2")
        assert set(versions[:first2]) == {"1"} and set(versions[first2:]) == {"2"}
        print(f"\nalias follow (poll 0.5 s): champion moved -> replies from version 2 after "
              f"{switched_s:.2f} s; {len(replies)} requests during the switch, none failed")

        c = _counters(url)
        assert c["mirror_errors"] == 0 and c["mirror_ok"] > 0
        # the events in the shards: version 1 and 2 for the primary, version 2 for the shadow
        n_events = 20 + len(replies) + c["mirror_ok"]

        def arrived():
            stats = ray.get([s.stats.remote() for s in shards])
            return sum(st["counters"].get("inference_in", 0) for st in stats) >= n_events
        _wait(arrived, 30, "the events in the shards")
        parts = ray.get([s.flush.remote() for s in shards])
        series = {p.series[:3] for partials, _, _ in parts for p in partials}
        assert {(MODEL_NAME, "1", "primary"), (MODEL_NAME, "2", "primary"),
                (MODEL_NAME, "2", "shadow")} <= series
        assert (MODEL_NAME, "1", "shadow") not in series
    finally:
        stop.set()
        serve.delete("exp-alias")
        kill_named_actors(*sidecar_actor_names())


def test_app_args_are_typed(tmp_path):
    with pytest.raises(Exception):
        ExperimentAppArgs.model_validate({"mode": "both"})
    with pytest.raises(Exception):
        ExperimentAppArgs.model_validate({"weights": [0.1, 1.5]})
    with pytest.raises(Exception):
        ExperimentAppArgs.model_validate({"weights": [0.1], "initial_step": 1})
    with pytest.raises(Exception):
        ExperimentAppArgs.model_validate({"mirror_fractoin": 0.5})        # typo: rejected
    with pytest.raises(ValueError, match="different variants"):
        build_experiment_app({"challenger": {"variant": "primary"}})
    app = build_experiment_app({"mode": "canary", "shared_init_args": {
        "tracking_uri": str(tmp_path / "x.db")}})
    assert type(app).__name__ == "Application"
    # the split is a pure function of (experiment, key): reproducible, and independent
    # between experiments
    a = [routes_to_challenger("e1", f"u{i}", 0.3) for i in range(2000)]
    assert a == [routes_to_challenger("e1", f"u{i}", 0.3) for i in range(2000)]
    assert a != [routes_to_challenger("e2", f"u{i}", 0.3) for i in range(2000)]
    assert abs(sum(a) - 600) <= 4 * math.sqrt(2000 * 0.21)
    assert all(routes_to_challenger("e1", f"u{i}", 1.0) for i in range(100))
    assert not any(routes_to_challenger("e1", f"u{i}", 0.0) for i in range(100))
