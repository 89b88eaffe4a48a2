"""Shared fixtures: one Ray instance per test session, small (2 CPUs), started lazily."""

from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def deploy_sidecar(name: str, store_path, **args):
    """The sidecar app (2 shards) under ``name`` at ``/``, not waiting for readiness."""
    from pathlib import Path

    from ray import serve

    from app.sidecar import build_app

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
    import ray
    from ray import serve

    from actors.remote import CANARY, NAMESPACE, PUBLISHER, shard_name

    for name in app_names:
        serve.delete(name)
    for actor in [CANARY, PUBLISHER, *(shard_name(i) for i in range(n_shards))]:
        try:
            ray.kill(ray.get_actor(actor, namespace=NAMESPACE))
        except ValueError:
            pass
