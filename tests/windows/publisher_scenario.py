"""A fixed publisher state for the /metrics, store and paired-summary regression tests.

Two plain shards on a manual clock, every KPI family (binary and multiclass
classification, regression, ranking, every feedback kind, cost, paired, sampled
features), rejected / late / duplicate rows, an emitter report, an archive
counter, a firing alert rule and a drift detector.  Deterministic: the same
calls give the same state, so its outputs can be compared with recorded ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from actors.publisher import Publisher
from actors.shard import Shard
from kpistream.clock import ManualClock

T0 = 1_767_225_600_000
DATA = Path(__file__).resolve().parent / "data"

METRICS = {"version": 1, "time": {"lateness": "1s", "label_delay": "5s", "max_future": "1h"},
           "windows": [{"name": "10s", "type": "tumbling", "size": "10s"},
                       {"name": "1m", "type": "sliding", "size": "60s", "step": "10s"}],
           "series": {"segments": ["region"]},
           "metrics": {"families": ["traffic", "latency", "classification", "regression",
                                    "ranking", "feedback", "cost", "paired", "features"],
                       "classification": {"positive_label": "1"}, "ranking": {"k": 3}}}

ALERTS = {"version": 1,
          "rules": [{"name": "AccLow", "metric": "accuracy", "window": "10s",
                     "match": {"model": "clf"},
                     "condition": {"op": "<", "value": 0.9}, "min_count": 20,
                     "severity": "critical"},
                    {"name": "SlowP99", "metric": "latency_p99", "window": "10s",
                     "condition": {"op": ">", "value": 1000}, "for": "30s"},
                    {"name": "AccDrift", "condition": {"detector": "acc_cusum"}}],
          "detectors": [{"name": "acc_cusum", "type": "cusum", "metric": "accuracy",
                         "window": "10s", "shift": 0.1, "warmup": 2, "min_count": 20,
                         "false_alarm_every": "30d", "hold": "30s"}],
          "notifications": {"log": False}}


def _events(i: int, t: int, rng) -> list[dict]:
    """Request ``i`` at ``t``: its inferences (and a shadow's) and its feedback."""
    out = []
    region = "eu" if i % 3 else "us"
    rid = f"r{i}"
    kind = i % 4
    base = {"type": "inference", "request_id": rid, "ts": t, "model_version": "1",
            "variant": "primary", "segments": {"region": region}}
    lat = float(round(rng.lognormal(3, 0.5), 3))
    ok = "error" if i % 17 == 0 else "ok"
    if kind == 0:      # binary classification, with a shadow, feedback of every kind
        y = str(int(rng.integers(0, 2)))
        pred = y if rng.random() < 0.7 else str(1 - int(y))
        out.append({**base, "event_id": f"i{i}", "model": "clf", "latency_ms": lat,
                    "status": ok, "prediction": {"label": pred, "score": 0.5},
                    "cost": {"usd": 0.002, "tokens": int(100 + i % 50)},
                    "features": {"x": float(round(rng.normal(), 4)), "c": "ab"[i % 2]}})
        out.append({**base, "event_id": f"s{i}", "model": "clf", "variant": "shadow",
                    "latency_ms": lat * 1.2, "status": "ok",
                    "prediction": y if rng.random() < 0.8 else str(1 - int(y))})
        fb = {"type": "feedback", "request_id": rid, "ts": t + 200}
        out.append({**fb, "event_id": f"l{i}", "kind": "label", "value": y})
        out.append({**fb, "event_id": f"t{i}", "kind": "thumbs", "value": bool(i % 8)})
        if i % 3 == 0:
            out.append({**fb, "event_id": f"c{i}", "kind": "click"})
        if i % 12 == 0:
            out.append({**fb, "event_id": f"v{i}", "kind": "conversion", "value": True})
        out.append({**fb, "event_id": f"d{i}", "kind": "dwell",
                    "value": float(round(rng.exponential(20), 2))})
        out.append({**fb, "event_id": f"w{i}", "kind": "reward", "value": float(i % 5) / 4})
    elif kind == 1:    # multiclass
        y = "abc"[int(rng.integers(0, 3))]
        pred = y if rng.random() < 0.6 else "abc"[int(rng.integers(0, 3))]
        out.append({**base, "event_id": f"i{i}", "model": "multi", "latency_ms": lat,
                    "status": ok, "prediction": pred})
        out.append({"type": "feedback", "event_id": f"l{i}", "request_id": rid,
                    "ts": t + 300, "kind": "label", "value": y})
    elif kind == 2:    # regression
        y = float(round(rng.normal(10, 2), 3))
        out.append({**base, "event_id": f"i{i}", "model": "reg", "latency_ms": lat,
                    "status": ok, "prediction": float(round(y + rng.normal(0, 1), 3)),
                    "cost": {"usd": 0.01}})
        out.append({"type": "feedback", "event_id": f"l{i}", "request_id": rid,
                    "ts": t + 100, "kind": "label", "value": y})
    else:              # ranking
        items = [f"it{j}" for j in rng.permutation(6)[:4]]
        out.append({**base, "event_id": f"i{i}", "model": "rank", "latency_ms": lat,
                    "status": ok, "prediction": {"ranking": items}})
        rel = [f"it{j}" for j in range(6) if rng.random() < 0.4] or ["it0"]
        out.append({"type": "feedback", "event_id": f"l{i}", "request_id": rid,
                    "ts": t + 250, "kind": "relevance", "value": rel})
    return out


def build(store_path: str | Path, rounds: int = 4, per_round: int = 120) -> Publisher:
    """The publisher after ``rounds`` ticks over two shards (no threads left running)."""
    clock = ManualClock(T0)
    shards = [Shard(i, METRICS, clock=clock, processing_time_watermark=False) for i in range(2)]

    def pull():
        out = []
        for s in shards:
            parts, wm, st = s.collect()
            st["archive"] = {"rows": 10 * s.index + 3, "files": 1, "errors": 0,
                             "dropped": s.index}
            out.append((parts, wm, st))
        return out

    pub = Publisher(METRICS, store_path, pull=pull, clock=clock, n_sources=2, alerts=ALERTS)
    rng = np.random.default_rng(11)
    for r in range(rounds):
        rows: list[list[dict]] = [[], []]
        for j in range(per_round):
            i = r * per_round + j
            for ev in _events(i, T0 + r * 10_000 + j * 40, rng):
                rows[i % 2].append(ev)
        if r == 1:   # a bad row, a duplicate, a late row
            rows[0].append({"type": "inference", "event_id": "bad", "request_id": "x",
                            "ts": T0, "model": "clf", "latency_ms": -1.0})
            rows[0].append(dict(rows[0][0]))
        if r == 3:
            late = dict(rows[1][0], event_id="late", ts=T0)
            rows[1].append(late)
        for s, rs in zip(shards, rows):
            s.ingest_rows(rs)
        shards[r % 2].report_emitter(f"replica-{r % 2}", {
            "model": "clf", "variant": "primary", "dropped": r, "flushed_rows": 100 * r,
            "send_errors": 0, "lost_rows": 0, "buffered": 7})
        clock.set(T0 + (r + 1) * 10_000 + 6_500)
        pub.tick()
    return pub


def outputs(pub: Publisher) -> dict:
    """What the regression tests compare: /metrics, the paired summary, stored series."""
    import json

    paired = pub.paired_summary("clf", "shadow", "1", 0)
    series = pub.series(resolution="10s")
    return {"metrics": pub.metrics_text(),
            "paired": json.dumps(paired, sort_keys=True, default=str),
            "series": json.dumps(series, sort_keys=True, default=str)}
