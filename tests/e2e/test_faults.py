"""Exactly-once under faults, as users meet it: the sidecar on Ray Serve takes an interleaved
stream over HTTP while its shard processes are killed with SIGKILL; every stored window
equals `kpistream replay` of the events the sender saw acknowledged, and no window once
final ever changes."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from kpistream.spec.metrics import load_config
from kpistream.synthetic import generate_stream

from conftest import deploy_sidecar, remove_sidecar, wait_healthy
from exactness import (FinalWatcher, assert_equals_replay, changed, final_series,
                       final_values, post, post_until_acked, series)

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[2]


def test_killed_shards_lose_and_double_nothing(serve_port, tmp_path):
    import ray

    from actors.remote import NAMESPACE, PUBLISHER, shard_name

    cfg = load_config(ROOT / "configs/metrics.yaml")
    # snapshots every second: most kills restart a shard from a snapshot and a log tail
    deploy_sidecar("kpistream-faults", tmp_path / "store", alerts_config=None,
                   snapshot_every_s=1.0)
    base = f"http://127.0.0.1:{serve_port}"
    try:
        wait_healthy(base, timeout_s=60)
        now = int(time.time() * 1000)
        # 10 minutes of traffic that ended an hour ago: labels late, duplicates, early feedback
        stream = generate_stream(12000, seed=9, rate_per_s=20.0, start_ms=now - 4_200_000,
                                 late_rate=0.0)
        recs = list(stream.records())
        chunks = [recs[i:i + 400] for i in range(0, len(recs), 400)]
        stop = threading.Event()
        kills: list[tuple[int, float]] = []

        def chaos():
            """SIGKILL a shard (8 times) or the publisher (every third kill) at random."""
            rng = random.Random(4)
            time.sleep(1.0)
            while not stop.is_set() and len(kills) < 12:
                name = PUBLISHER if len(kills) % 3 == 2 else shard_name(rng.randrange(2))
                try:
                    pid = ray.get(ray.get_actor(name, namespace=NAMESPACE).pid.remote(),
                                  timeout=30)
                    os.kill(pid, signal.SIGKILL)
                    kills.append((name, time.time()))
                except Exception:
                    pass
                stop.wait(rng.uniform(0.8, 2.0))

        thread = threading.Thread(target=chaos, daemon=True)
        thread.start()
        watcher = FinalWatcher(base, every_s=0.5)
        t0 = time.time()
        # at least once: a chunk is sent until acknowledged
        acked_at = []
        retries = 0
        for chunk in chunks:
            retries += post_until_acked(base + "/v1/events", chunk)
            acked_at.append(round(time.time() - t0, 1))
        sent_s = time.time() - t0
        stop.set()
        thread.join(30)
        watcher.stop()
        finals, rewritten = watcher.finals, watcher.rewritten
        assert sum(k[0] == PUBLISHER for k in kills) >= 2 and len(kills) >= 8, kills
        got = final_series(base)
        with urllib.request.urlopen(base + "/v1/health", timeout=10) as r:
            health = json.loads(r.read())
        try:
            n_windows = assert_equals_replay(got, recs, cfg)
        except AssertionError as e:    # what happened when, for the one who reads the failure
            raise AssertionError(f"{e}\nkills (s after the first post): "
                                 f"{[(k, round(t - t0, 1)) for k, t in kills]}\nchunks "
                                 f"acknowledged at {acked_at}\nchunk of each request: "
                                 f"{[(c[0]['ts'], c[-1]['ts']) for c in chunks]}\n"
                                 f"health {json.dumps(health)[:3000]}") from None
        assert rewritten == [], rewritten[:5]
        print(f"\nfaults: {len(recs):,} events in {len(chunks)} requests over {sent_s:.1f} s, "
              f"{sum(k[0] != PUBLISHER for k in kills)} shard and "
              f"{sum(k[0] == PUBLISHER for k in kills)} publisher kills (SIGKILL), "
              f"{retries} retried requests; "
              f"{n_windows:,} stored windows equal replay; {len(finals):,} final windows never "
              f"rewritten")
        assert health["shards_alive"] == 2
        # the shards killed last came back from a snapshot and the log after it
        recov = [lg["recovery"] for lg in health["shard_logs"].values()]
        assert any(r.get("snapshot_seq") for r in recov), recov
    finally:
        remove_sidecar("kpistream-faults")


def test_a_whole_restart_completes_the_open_windows_from_the_logs(serve_port, tmp_path):
    """Every actor gone at once (as after `serve shutdown` and `ray stop`), then the sidecar
    deployed again on the same directory: the shards replay their logs, the publisher
    resumes from the store; windows open at the restart end exactly as without it."""
    # a lateness well above the restart time: a shard idle that long moves its watermark
    # to the clock, and this stream is an hour old (live events would not mind)
    metrics = yaml.safe_load((ROOT / "configs/metrics.yaml").read_text())
    metrics["time"]["lateness"] = "20s"
    (tmp_path / "metrics.yaml").write_text(yaml.safe_dump(metrics))
    cfg = load_config(tmp_path / "metrics.yaml")
    base = f"http://127.0.0.1:{serve_port}"
    store = tmp_path / "store"
    now = int(time.time() * 1000)
    recs = list(generate_stream(4000, seed=13, rate_per_s=20.0, start_ms=now - 4_000_000,
                                late_rate=0.0).records())
    half = len(recs) // 2
    try:
        deploy_sidecar("kpistream-restart", store, alerts_config=None,
                       metrics_config=str(tmp_path / "metrics.yaml"), snapshot_every_s=1.0)
        wait_healthy(base, timeout_s=60)
        for i in range(0, half, 500):
            assert post(base + "/v1/events", recs[i:min(i + 500, half)])["received"]
        time.sleep(1.0)                              # a publisher round or two
        before = series(base)
        open_before = int(before["provisional"].sum())
        finals = final_values(before)
        remove_sidecar("kpistream-restart")          # every process of the sidecar gone
        t0 = time.time()
        deploy_sidecar("kpistream-restart", store, alerts_config=None,
                       metrics_config=str(tmp_path / "metrics.yaml"), snapshot_every_s=1.0)
        wait_healthy(base, timeout_s=60)
        ready_s = time.time() - t0
        for i in range(half, len(recs), 500):
            assert post(base + "/v1/events", recs[i:i + 500])["received"]
        after = final_series(base, timeout_s=90)
        assert_equals_replay(after, recs, cfg)
        diff = changed(finals, final_values(after))
        assert open_before > 0 and diff == [], diff[:5]
        print(f"\nrestart: {open_before} windows open at the restart, completed from the logs; "
              f"ready again in {ready_s:.1f} s; {len(finals)} final windows unchanged")
        assert ready_s < 60
    finally:
        remove_sidecar("kpistream-restart")


def test_a_monitored_model_delivers_every_event_once_through_shard_kills(serve_port, tmp_path):
    """The monitoring wrapper's path: requests to a Serve deployment, events to the shards
    by the emitter, shards SIGKILLed meanwhile; failed sends go again (at least once) and
    the shards drop re-deliveries (exactly once): the stored request count is exact."""
    import ray
    from ray import serve

    from actors.remote import NAMESPACE, shard_name
    from app.monitor import MonitoredModel

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Echo(MonitoredModel):
        def __init__(self) -> None:
            super().__init__(model="echo", model_version="1", n_shards=2, flush_rows=64,
                             flush_ms=20, send_timeout_s=5.0)

        async def predict(self, payload: dict):
            return {"label": int(payload.get("x", 0) > 0.5)}

    base = f"http://127.0.0.1:{serve_port}"
    deploy_sidecar("kpistream-faults-mon", tmp_path / "store", alerts_config=None)
    try:
        wait_healthy(base, timeout_s=60)
        serve.run(Echo.bind(), name="faults-echo", route_prefix="/echo")
        stop = threading.Event()
        kills: list = []

        def chaos():
            rng = random.Random(7)
            time.sleep(1.0)
            while not stop.is_set() and len(kills) < 5:
                try:
                    h = ray.get_actor(shard_name(rng.randrange(2)), namespace=NAMESPACE)
                    os.kill(ray.get(h.pid.remote(), timeout=30), signal.SIGKILL)
                    kills.append(time.time())
                except Exception:
                    pass
                stop.wait(rng.uniform(1.0, 2.0))

        t = threading.Thread(target=chaos, daemon=True)
        t.start()
        n = 0
        t_end = time.time() + 12
        while time.time() < t_end or len(kills) < 5:
            req = urllib.request.Request(base + "/echo", data=json.dumps({"x": 0.7}).encode(),
                                         method="POST")
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.status == 200
            n += 1
            assert time.time() < t_end + 60, "the chaos thread stalled"
        stop.set()
        t.join(30)

        def stored():
            rows = json.loads(urllib.request.urlopen(
                base + "/v1/series?metric=requests&resolution=10s&model=echo&limit=100000",
                timeout=30).read())
            return sum(r["value"] for r in rows), all(not r["provisional"] for r in rows)

        deadline = time.time() + 90
        while True:          # the emitters' retries, then every window final
            total, final = stored()
            if total >= n and final:
                break
            assert time.time() < deadline, f"stored {total} of {n} requests"
            time.sleep(1)
        time.sleep(2)
        total, _ = stored()
        text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
        lost = [line for line in text.splitlines()
                if line.startswith('kpistream_emitter_lost_total{model="echo"')]
        assert total == n, (total, n)
        assert lost and lost[0].endswith(" 0.0"), lost
        print(f"\nmonitored: {n:,} requests through the wrapper, {len(kills)} shard kills; "
              f"{int(total):,} stored, none lost or doubled")
    finally:
        stop.set()
        serve.delete("faults-echo")
        remove_sidecar("kpistream-faults-mon")
