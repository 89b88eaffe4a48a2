"""A publisher killed and started again on the same store goes on exactly: alert states,
detectors (CUSUM, EWMA, River's Page-Hinkley and ADWIN), input-drift references and the
notification log come back from the store's checkpoint, and the windows final since it are
watched again, so no transition is repeated or lost and every detector ends as in a run
that never stopped.

The publisher is the plain class pulling from plain shards on a manual clock; the webhook
receiver is a real HTTP server on a loopback port.  A "kill" drops the publisher without
``stop()`` (as SIGKILL would) and drops its webhook queue.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import WebhookReceiver

from actors.publisher import Publisher
from actors.shard import Shard
from kpistream.alerts.detectors import Adwin, Cusum, Ewma, PageHinkley, TwoSidedCusum
from kpistream.alerts.detectors import detector_from_dict, detector_to_dict
from kpistream.clock import ManualClock
from kpistream.wire.batch import hash_ids, shard_of

T0 = 1_767_225_600_000
WINDOWS = 48
METRICS = {"version": 1, "time": {"lateness": "1s", "label_delay": "5s", "max_future": "1h"},
           "windows": [{"name": "10s", "type": "tumbling", "size": "10s"},
                       {"name": "1m", "type": "sliding", "size": "60s", "step": "10s"}],
           "series": {"segments": ["region"]},
           "metrics": {"families": ["traffic", "latency", "classification", "feedback",
                                    "features"],
                       "classification": {"positive_label": "1"}}}


def _alerts(url: str) -> dict:
    det = {"metric": "accuracy", "window": "10s", "min_count": 50, "hold": "30s"}
    return {"version": 1,
            "rules": [{"name": "AccLow", "metric": "accuracy", "window": "10s",
                       "condition": {"op": "<", "value": 0.8},
                       "clear": {"op": ">=", "value": 0.85}, "for": "15s", "min_count": 50},
                      {"name": "AccLow1m", "metric": "accuracy", "window": "1m",
                       "condition": {"op": "<", "value": 0.85}, "min_count": 100},
                      {"name": "LatencyHigh", "metric": "latency_p99", "window": "10s",
                       "condition": {"op": ">", "value": 40}, "min_count": 50},
                      {"name": "AccCusum", "condition": {"detector": "cusum"}},
                      {"name": "AccEwma", "condition": {"detector": "ewma"}},
                      {"name": "AccPH", "condition": {"detector": "ph"}},
                      {"name": "AccAdwin", "condition": {"detector": "adwin"}},
                      {"name": "Inputs", "condition": {"detector": "inputs"}}],
            "detectors": [
                {"name": "cusum", "type": "cusum", "shift": 0.1, "warmup": 4, **det},
                {"name": "ewma", "type": "ewma", "direction": "down", "warmup": 4, **det},
                {"name": "ph", "type": "page_hinkley", "direction": "down", "threshold": 0.2,
                 "delta": 0.01, **det},
                {"name": "adwin", "type": "adwin", "delta": 0.05, "warmup": 2, **det}],
            "input_drift": [{"name": "inputs", "window": "10s", "reference": "40s",
                             "min_samples": 50}],
            "notifications": {"log": False, "webhooks": [{"url": url, "backoff": "20ms"}]}}


def _window(i: int, rng) -> list[dict]:
    """One 10 s window of traffic: accuracy drops in windows 8-13 and 36-41, latency rises in 15-17,
    an input shifts from window 20; each label arrives 0.1-3 s after its prediction (some
    in the next window)."""
    correct = 0.6 if 8 <= i < 14 or 36 <= i < 42 else 0.93
    slow = 15 <= i < 18
    shift = 1.0 if i >= 20 else 0.0
    out = []
    for j in range(240):
        rid = f"r{i}-{j}"
        ts = T0 + i * 10_000 + int(j * 10_000 / 240)
        y = int(rng.integers(0, 2))
        pred = y if rng.random() < correct else 1 - y
        out.append({"type": "inference", "event_id": f"i{rid}", "request_id": rid, "ts": ts,
                    "model": "m", "model_version": "1", "variant": "primary",
                    "latency_ms": float(rng.uniform(50, 60) if slow else rng.uniform(5, 30)),
                    "status": "ok", "prediction": str(pred),
                    "segments": {"region": "eu" if j % 3 else "us"},
                    "features": {"x": float(rng.normal(shift)), "y": float(rng.normal())}})
        out.append({"type": "feedback", "event_id": f"f{rid}", "request_id": rid,
                    "ts": ts + int(rng.integers(100, 3_000)), "kind": "label", "value": str(y)})
    return out


def _stream(windows: int) -> list[dict]:
    rng = np.random.default_rng(11)
    rows = [r for i in range(windows) for r in _window(i, rng)]
    return sorted(rows, key=lambda r: r["ts"])   # in arrival order: a label after its answer


def _run(store, url: str, kills: dict[int, str]) -> tuple[Publisher, list[dict]]:
    """``WINDOWS`` windows of traffic through 2 shards, 4 publisher ticks per window.  ``kills``: tick index ->
    "after" (killed after that tick) or "pulled" (killed after pulling that tick's round,
    before publishing it).  Returns the last publisher and the status after every tick."""
    clock = ManualClock(T0)
    shards = [Shard(i, METRICS, clock=clock, processing_time_watermark=False) for i in range(2)]
    alerts = _alerts(url)

    def start() -> Publisher:
        return Publisher(METRICS, store, clock=clock, n_sources=2, alerts=alerts)

    pub, resync = start(), True
    stream = _stream(WINDOWS)
    times = np.array([r["ts"] for r in stream])
    tick = 0
    for i in range(WINDOWS):
        lo, hi = np.searchsorted(times, [T0 + i * 10_000, T0 + (i + 1) * 10_000])
        rows = stream[lo:hi]
        parts = shard_of(hash_ids([r["request_id"] for r in rows]), 2)
        for s, sh in enumerate(shards):
            sh.ingest_rows([r for r, p in zip(rows, parts) if p == s])
        for _ in range(4):
            clock.advance(2_500)
            results = [sh.collect(pub.acked_watermark, resync) for sh in shards]
            resync = False
            if kills.get(tick) == "pulled":
                pub.notifier.close()       # the round and the webhook queue die with it
                pub, resync = start(), True
            else:
                pub.tick(results)
                if kills.get(tick) == "after":
                    pub.notifier.close()
                    pub, resync = start(), True
            tick += 1
    clock.advance(30_000)
    pub.tick([sh.flush() for sh in shards])
    return pub, shards


def _watched(pub: Publisher) -> dict:
    st = pub.watcher.status()
    for a in st["alerts"]:
        a["evidence"].pop("evaluated_at", None)
    return json.loads(json.dumps({**st, "detections": pub.watcher.detections},
                                 default=str))


def test_a_killed_publisher_goes_on_from_its_checkpoint_without_repeating_or_losing(tmp_path):
    rec_a, rec_b = WebhookReceiver(), WebhookReceiver()
    want, _ = _run(tmp_path / "a", rec_a.url, {})
    kills = {5: "after", 23: "pulled", 40: "after", 41: "after", 62: "pulled", 77: "after",
             90: "pulled", 101: "after"}
    got, _ = _run(tmp_path / "b", rec_b.url, kills)
    for p in (want, got):
        assert p.notifier.flush(10)
    # the scenario exercises every part: alerts fired and resolved, detectors signalled
    fired = {(b["rule"], b["state"]) for b in rec_a.bodies}
    assert {("AccLow", "firing"), ("AccLow", "resolved"), ("AccLow1m", "firing"),
            ("LatencyHigh", "firing"),
            ("LatencyHigh", "resolved"), ("AccCusum", "firing"), ("Inputs", "firing")} <= fired
    assert want.watcher.detections["ph"] >= 1
    adwin = next(iter(want.watcher.detectors.states["adwin"].values()))
    assert adwin.det.n >= 40        # fed, with a history to replay (too few windows to signal)
    assert got.restored["watermark"] > 0 and got.restored["detectors"] == 8   # 4 detectors x 2 regions

    # the transition log: every transition once, in the same order, at the same times,
    # numbered on without a gap (readers of the log carry on: the epoch is kept)
    log = got.notifications(0)
    assert [b["seq"] for b in log] == list(range(1, len(log) + 1))
    assert [(b["id"], b["seq"]) for b in log] == [(b["id"], b["seq"])
                                                  for b in want.notifications(0)]
    assert got.notifier.epoch == Publisher(METRICS, tmp_path / "b").notifier.epoch
    # webhooks: every transition delivered, in order; one a kill caught in flight is posted
    # again with the same notification id (at least once: receivers drop repeats by id)
    seen, deduped = set(), []
    for b in rec_b.bodies:
        if b["id"] not in seen:
            seen.add(b["id"])
            deduped.append(b["id"])
    assert deduped == [b["id"] for b in rec_a.bodies]
    assert len(rec_b.bodies) - len(deduped) <= 2 * len(kills)
    # detectors, input drift and alert states end exactly as without the kills
    assert _watched(got) == _watched(want)
    # and the stored windows are those of the run without kills
    cols = ["window_start", "region", "metric", "value", "count", "provisional"]
    a = want.store.query(resolution="10s")[cols].sort_values(cols[:3]).reset_index(drop=True)
    b = got.store.query(resolution="10s")[cols].sort_values(cols[:3]).reset_index(drop=True)
    assert len(a) > 500 and a.equals(b)
    for p in (want, got):
        p.notifier.close()
    rec_a.close()
    rec_b.close()


def test_a_checkpoint_of_another_version_is_left_and_the_publisher_starts_afresh(tmp_path):
    clock = ManualClock(T0)
    pub = Publisher(METRICS, tmp_path, clock=clock, alerts=_alerts("http://127.0.0.1:9/x"))
    pub.store.save_checkpoint(Publisher.CHECKPOINT, {"watcher": {"version": 99},
                                                     "notifier": {}}, 0, T0)
    pub.notifier.close()
    again = Publisher(METRICS, tmp_path, clock=clock, alerts=_alerts("http://127.0.0.1:9/x"))
    assert "version 99" in again.restored["error"]
    assert again.health()["checkpoint"]["restored"]["error"]
    again.notifier.close()


@pytest.mark.parametrize("make", [
    lambda: Cusum(0.1, 0.05, 100.0), lambda: Cusum(0.5, 0.2, 50.0, 1.0, side="down"),
    lambda: TwoSidedCusum(0.5, 0.1, 200.0, 1.0), lambda: Ewma(0.1, None, 0.2, 100.0),
    lambda: Ewma(0.0, 1.0, 0.1, 100.0, side="up"),
    lambda: PageHinkley(threshold=3.0, min_instances=5), lambda: Adwin(delta=0.05)])
def test_a_detector_saved_and_restored_anywhere_goes_on_as_the_original(make):
    rng = np.random.default_rng(3)
    xs = np.concatenate([rng.normal(0.1, 0.05, 200), rng.normal(0.5, 0.05, 200),
                         rng.normal(0.1, 0.05, 200), rng.normal(0.6, 0.05, 200)])
    ref = make()
    signals = [ref.update(x) for x in xs]
    assert sum(signals) >= 1
    for cut in (0, 1, 150, 201, 400, 650):
        a = make()
        for x in xs[:cut]:
            a.update(x)
        b = detector_from_dict(json.loads(json.dumps(detector_to_dict(a))))
        assert [b.update(x) for x in xs[cut:]] == signals[cut:]
        assert b.detections == ref.detections and b.n == ref.n
        assert json.dumps(b.state, default=str) == json.dumps(ref.state, default=str)
