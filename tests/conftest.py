"""Shared fixtures (one Ray instance per test session, small, started lazily) and markers.

Markers say what a test needs: ``ray`` (Ray or Serve), ``mlflow`` (a real MLflow store),
``prometheus`` (promtool or a Prometheus server), ``browser``, ``slow`` (seconds of CPU).
Tests that use the Ray fixtures are marked ``ray`` here; each of those markers also adds
``integration``. ``KPISTREAM_FAST=1`` (``make test-fast``) makes importing Ray or MLflow
fail inside the test process, so a test that needs them without its marker is caught.
"""

from __future__ import annotations

import http.server as _http_server
import importlib.abc
import json
import math
import os
import socket
import sys
import threading

import numpy as np
import pytest

NEEDS = ("ray", "mlflow", "prometheus", "browser")
_RAY_FIXTURES = {"ray_session", "serve_port"}


class _Blocked(importlib.abc.MetaPathFinder):
    """In fast mode: importing Ray or MLflow is an error naming the marker to add."""

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ("ray", "mlflow"):
            raise ImportError(f"{name} imported in `make test-fast`: mark the test "
                              f"@pytest.mark.{top} (it needs a real {top})")
        return None


if os.environ.get("KPISTREAM_FAST") == "1":
    sys.meta_path.insert(0, _Blocked())


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
        if any(item.get_closest_marker(m) for m in NEEDS):
            item.add_marker(pytest.mark.integration)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same_number(a: float, b: float) -> bool:
    """Equal to 12 significant digits, NaN equal to NaN: a recorded float may differ in
    its last bit between numpy builds (SIMD pow / log), everything else must not."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300)


def same(got, want) -> bool:
    """``got == want`` for nested lists / tuples / dicts, floats by :func:`same_number`."""
    if isinstance(got, float) or isinstance(want, float):
        return (isinstance(got, (int, float)) and isinstance(want, (int, float))
                and not isinstance(got, bool) and same_number(float(got), float(want)))
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(same(got[k], want[k]) for k in got)
    if isinstance(got, (list, tuple)) and isinstance(want, (list, tuple)):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    return got == want


@pytest.fixture(scope="session")
def ray_session():
    """Ray, started once for the whole test session (tests that need it ask for it)."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        started = True
    yield ray
    if started:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_session) -> int:
    """Ray Serve's HTTP proxy on a free loopback port, started once."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def kill_named_actors(*names: str, timeout_s: float = 30.0) -> None:
    """Kill the named (detached) actors of the ``kpistream`` namespace and wait until their
    names are free: ``ray.kill`` returns before the name is released, and a sidecar deployed
    meanwhile would find the dying actor (with another module's config) by name."""
    import time

    import ray

    from actors.remote import NAMESPACE

    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:
            pass
    deadline = time.time() + timeout_s
    for name in names:
        while True:
            try:
                ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                break
            assert time.time() < deadline, f"actor {name!r} still registered after kill"
            time.sleep(0.05)


def sidecar_actor_names(n_shards: int = 2) -> list[str]:
    from actors.remote import CANARY, PUBLISHER, shard_name

    return [CANARY, PUBLISHER, *(shard_name(i) for i in range(n_shards))]


def deploy_sidecar(name: str, store_path, **args):
    """The sidecar app (2 shards) under ``name`` at ``/``, not waiting for readiness.
    Leftover actors of another module are removed first (they would be found by name)."""
    from pathlib import Path

    from ray import serve

    from app.sidecar import build_app

    kill_named_actors(*sidecar_actor_names(int(args.get("shards", 2))))
    root = Path(__file__).resolve().parent.parent
    serve.run(build_app({"metrics_config": str(root / "configs/metrics.yaml"), "shards": 2,
                         "store_path": str(store_path), "publish_interval_s": 0.2, **args}),
              name=name, route_prefix="/", blocking=False)


def wait_healthy(base: str, n_shards: int = 2, timeout_s: float = 60.0) -> None:
    """Until ``GET /v1/health`` reports every shard alive (the sidecar is up)."""
    import json
    import time
    import urllib.request

    deadline = time.time() + timeout_s
    last: object = None
    while True:
        try:
            with urllib.request.urlopen(base + "/v1/health", timeout=10) as r:
                last = json.loads(r.read())
            if last["shards_alive"] == n_shards:
                return
        except Exception as e:
            last = e
        assert time.time() < deadline, f"the sidecar did not come up: {last!r}"
        time.sleep(0.5)


def remove_sidecar(*app_names: str, n_shards: int = 2) -> None:
    """Delete the apps and the (detached) shard and publisher actors."""
    from ray import serve

    for name in app_names:
        serve.delete(name)
    kill_named_actors(*sidecar_actor_names(n_shards))


class WebhookReceiver:
    """A real HTTP server that records posted JSON; fails the first ``fail_first`` posts."""

    def __init__(self, fail_first: int = 0) -> None:
        self.bodies: list[dict] = []
        self.attempts = 0
        rec = self

        class H(_http_server.BaseHTTPRequestHandler):
            def do_POST(self):
                data = self.rfile.read(int(self.headers["content-length"]))
                rec.attempts += 1
                if rec.attempts <= fail_first:
                    self.send_response(503)
                    self.end_headers()
                    return
                body = json.loads(data)
                assert self.headers["x-kpistream-notification-id"] == body["id"]
                rec.bodies.append(body)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = _http_server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


#: predictions, valid and hostile, that the fast normaliser must judge as the schema does
PREDICTION_CASES = [
    "a", "", "x" * 256, "x" * 257, 0, -12, 10**300, True, False, 1.0, -0.0, 3, 1e308,
    float("nan"), float("inf"), None, [1], {"label": "a"}, {"label": 2, "score": 1},
    {"label": "a", "score": True}, {"label": "a", "score": None, "scores": None},
    {"label": "b", "scores": {"a": 0.1, "b": 0.9}}, {"label": "c", "scores": {"a": 1}},
    {"label": "a", "scores": {"": 1.0}}, {"label": "a", "extra": 1}, {"score": 0.5},
    {"label": 1.5}, {"ranking": []}, {"ranking": ["a", 2]}, {"ranking": [1, "1"]},
    {"ranking": [True]}, {"ranking": "abc"}, {"ranking": ["a"], "label": "a"},
    {"ranking": list(range(1001))}, np.float64(0.5), {"label": "a", "score": float("nan")},
]


def inference_batch(ids):
    """One primary inference per request id, all at one time (routing tests)."""
    from kpistream.wire.batch import InferenceBatch

    now = 1_750_000_000_000
    return InferenceBatch.from_records([
        {"event_id": f"{r}:p", "request_id": r, "ts": now, "model": "m", "model_version": "1",
         "variant": "p", "endpoint": "", "latency_ms": 1.0, "status": "ok", "pred_label": "a",
         "pred_score": None, "pred_value": None, "ranking": None, "segments": {},
         "cost_usd": None, "tokens": None, "features": None} for r in ids])
