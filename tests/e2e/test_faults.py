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
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kpistream.replay import iter_runs, replay_batches
from kpistream.spec.metrics import load_config
from kpistream.synthetic import generate_stream
from kpistream.wire.batch import FeedbackBatch, InferenceBatch
from kpistream.wire.schema import validate_rows
from kpistream.windows.aggregate import rows_frame

from conftest import deploy_sidecar, remove_sidecar, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[2]
KEY = ["window_start", "model", "model_version", "variant", "endpoint", "region", "metric"]


def _post(url: str, rows: list) -> dict:
    req = urllib.request.Request(url, data="\n".join(json.dumps(r) for r in rows).encode(),
                                 method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _series(base: str) -> pd.DataFrame:
    with urllib.request.urlopen(base + "/v1/series?resolution=10s&limit=100000",
                                timeout=30) as r:
        return pd.DataFrame(json.loads(r.read()))


def _final_series(base: str, timeout_s: float = 60.0) -> pd.DataFrame:
    """The stored 10 s rows once every window is final (the shards idle: the watermark
    moves to the clock)."""
    deadline = time.time() + timeout_s
    while True:
        got = _series(base)
        if len(got) and not got["provisional"].any():
            return got
        assert time.time() < deadline, "windows never became final"
        time.sleep(1)


def _assert_equals_replay(got: pd.DataFrame, recs: list, cfg) -> int:
    """Every stored 10 s window equals `kpistream replay` of ``recs``: same windows, same
    counts, same values.  Returns how many windows were compared."""
    res = validate_rows(recs, now_ms=int(time.time() * 1000), max_future_ms=cfg.max_future_ms)
    batches = [(k, (InferenceBatch if k == "inference" else FeedbackBatch).from_records(r))
               for k, r in iter_runs(res)]
    rows, _ = replay_batches(batches, cfg)
    want = rows_frame(rows, cfg.segments)
    want = want[want["window"] == "10s"]
    got = got.assign(window_start=pd.to_datetime(got["window_start"], utc=True))
    m = want.merge(got, on=KEY, suffixes=("_r", "_s"), how="outer", indicator=True)
    assert (m["_merge"] == "both").all(), m[m["_merge"] != "both"][KEY + ["_merge"]].head()
    assert (m["count_r"] == m["count_s"]).all(), \
        m[m["count_r"] != m["count_s"]][KEY + ["count_r", "count_s"]].head()
    both = m["value_r"].notna() | m["value_s"].notna()
    assert ((m["value_r"] - m["value_s"]).abs()[both] <= 1e-9 * m["value_r"].abs()[both]
            + 1e-12).all()
    return len(m)


def test_killed_shards_lose_and_double_nothing(serve_port, tmp_path):
    import ray

    from actors.remote import NAMESPACE, PUBLISHER, shard_name

    cfg = load_config(ROOT / "configs/metrics.yaml")
    deploy_sidecar("kpistream-faults", tmp_path / "store", alerts_config=None)
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
        finals: dict = {}          # window key -> (value, count) when first seen final
        rewritten: list = []

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

        def watch_finals():
            while not stop.is_set():
                try:
                    df = _series(base)
                except Exception:
                    continue
                if len(df):
                    for r in df[~df["provisional"]].itertuples(index=False):
                        k = tuple(getattr(r, c) for c in KEY)
                        v = (r.value, r.count)
                        if k not in finals:
                            finals[k] = v
                        elif finals[k] != v and not (v[0] != v[0] and finals[k][0] != finals[k][0]):
                            rewritten.append((k, finals[k], v))
                stop.wait(0.5)

        threads = [threading.Thread(target=chaos, daemon=True),
                   threading.Thread(target=watch_finals, daemon=True)]
        for t in threads:
            t.start()
        retries = 0
        t0 = time.time()
        for chunk in chunks:               # at least once: a chunk is sent until acknowledged
            for attempt in range(200):
                try:
                    rep = _post(base + "/v1/events", chunk)
                    break
                except (urllib.error.URLError, TimeoutError, ConnectionError):
                    retries += 1
                    time.sleep(0.2)
            else:
                pytest.fail("a chunk was never acknowledged")
            assert rep["received"] == len(chunk)
        sent_s = time.time() - t0
        stop.set()
        for t in threads:
            t.join(30)
        assert sum(k[0] == PUBLISHER for k in kills) >= 2 and len(kills) >= 8, kills
        got = _final_series(base)
        n_windows = _assert_equals_replay(got, recs, cfg)
        assert rewritten == [], rewritten[:5]
        with urllib.request.urlopen(base + "/v1/health", timeout=10) as r:
            health = json.loads(r.read())
        print(f"\nfaults: {len(recs):,} events in {len(chunks)} requests over {sent_s:.1f} s, "
              f"{sum(k[0] != PUBLISHER for k in kills)} shard and "
              f"{sum(k[0] == PUBLISHER for k in kills)} publisher kills (SIGKILL), "
              f"{retries} retried requests; "
              f"{n_windows:,} stored windows equal replay; {len(finals):,} final windows never "
              f"rewritten")
        assert health["shards_alive"] == 2
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
                       metrics_config=str(tmp_path / "metrics.yaml"))
        wait_healthy(base, timeout_s=60)
        for i in range(0, half, 500):
            assert _post(base + "/v1/events", recs[i:min(i + 500, half)])["received"]
        time.sleep(1.0)                              # a publisher round or two
        before = _series(base)
        open_before = int(before["provisional"].sum())
        finals = {tuple(r[c] for c in KEY): (r["value"], r["count"])
                  for r in before[~before["provisional"]].to_dict("records")}
        remove_sidecar("kpistream-restart")          # every process of the sidecar gone
        t0 = time.time()
        deploy_sidecar("kpistream-restart", store, alerts_config=None,
                       metrics_config=str(tmp_path / "metrics.yaml"))
        wait_healthy(base, timeout_s=60)
        ready_s = time.time() - t0
        for i in range(half, len(recs), 500):
            assert _post(base + "/v1/events", recs[i:i + 500])["received"]
        after = _final_series(base, timeout_s=90)
        _assert_equals_replay(after, recs, cfg)
        now_final = {tuple(r[c] for c in KEY): (r["value"], r["count"])
                     for r in after.to_dict("records")}
        changed = [k for k, v in finals.items() if now_final.get(k) != v
                   and not (v[0] != v[0] and now_final.get(k, (0,))[0] != now_final.get(k, (0,))[0])]
        assert open_before > 0 and changed == [], changed[:5]
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
