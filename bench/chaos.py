"""Exactly-once under faults at scale: the sidecar on Ray Serve, an interleaved stream over
HTTP, shard and publisher processes SIGKILLed at random; every stored window compared with
`kpistream replay` of the acknowledged events, and every final window checked never to change.

    python bench/chaos.py --requests 80000 --shard-kills 10 --publisher-kills 3

Last line: ``chaos: <events> events, <k> shard + <p> publisher kills, <windows> windows equal
replay, <n> final windows never rewritten, <lost> lost, <doubled> doubled``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402
from ray import serve  # noqa: E402

from actors.remote import NAMESPACE, PUBLISHER, shard_name  # noqa: E402
from app.sidecar import build_app  # noqa: E402
from kpistream.replay import iter_runs, replay_batches  # noqa: E402
from kpistream.spec.metrics import load_config  # noqa: E402
from kpistream.synthetic import generate_stream  # noqa: E402
from kpistream.wire.batch import FeedbackBatch, InferenceBatch  # noqa: E402
from kpistream.wire.schema import validate_rows  # noqa: E402
from kpistream.windows.aggregate import rows_frame  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = ["window_start", "model", "model_version", "variant", "endpoint", "region", "metric"]


def _post(url: str, rows: list) -> dict:
    req = urllib.request.Request(url, data="\n".join(json.dumps(r) for r in rows).encode(),
                                 method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _series(base: str) -> pd.DataFrame:
    out, offset = [], 0
    while True:
        with urllib.request.urlopen(f"{base}/v1/series?resolution=10s&limit=100000"
                                    f"&offset={offset}", timeout=60) as r:
            page = json.loads(r.read())
        out += page
        if len(page) < 100_000:
            return pd.DataFrame(out)
        offset += len(page)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=80_000)
    ap.add_argument("--shard-kills", type=int, default=10)
    ap.add_argument("--publisher-kills", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=1000)
    a = ap.parse_args()
    cfg = load_config(ROOT / "configs/metrics.yaml")
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    port = 8765
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    store = tempfile.mkdtemp(prefix="kpistream-chaos-")
    serve.run(build_app({"metrics_config": str(ROOT / "configs/metrics.yaml"), "shards": 2,
                         "store_path": store, "publish_interval_s": 0.25,
                         "alerts_config": None}), name="kpistream", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    now = int(time.time() * 1000)
    span_s = a.requests / 40.0
    stream = generate_stream(a.requests, seed=11, rate_per_s=40.0,
                             start_ms=now - int(span_s * 1000) - 3_600_000, late_rate=0.0)
    recs = list(stream.records())
    chunks = [recs[i:i + a.chunk] for i in range(0, len(recs), a.chunk)]
    plan = ["shard"] * a.shard_kills + ["publisher"] * a.publisher_kills
    random.Random(5).shuffle(plan)
    stop = threading.Event()
    kills: list[str] = []
    finals: dict = {}
    rewritten: list = []

    def chaos():
        rng = random.Random(3)
        pace = max(1.0, 0.8 * len(chunks) * 0.05 / max(len(plan), 1))
        for what in plan:
            if stop.wait(rng.uniform(0.5, 1.5) * pace):
                return
            name = PUBLISHER if what == "publisher" else shard_name(rng.randrange(2))
            for _ in range(60):      # an actor still restarting from the last kill: wait
                try:
                    pid = ray.get(ray.get_actor(name, namespace=NAMESPACE).pid.remote(),
                                  timeout=60)
                    os.kill(pid, signal.SIGKILL)
                    kills.append(what)
                    break
                except Exception:
                    if stop.wait(1.0):
                        return

    def watch():
        while not stop.is_set():
            try:
                df = _series(base)
            except Exception:
                stop.wait(1.0)
                continue
            for r in df[~df["provisional"]].itertuples(index=False) if len(df) else ():
                k = tuple(getattr(r, c) for c in KEY)
                v = (r.value, r.count)
                old = finals.setdefault(k, v)
                if old != v and not (old[0] != old[0] and v[0] != v[0]):
                    rewritten.append((k, old, v))
            stop.wait(2.0)

    threads = [threading.Thread(target=chaos, daemon=True),
               threading.Thread(target=watch, daemon=True)]
    for t in threads:
        t.start()
    t0 = time.time()
    retries = 0
    for chunk in chunks:
        while True:
            try:
                _post(base + "/v1/events", chunk)
                break
            except (urllib.error.URLError, TimeoutError, ConnectionError):
                retries += 1
                time.sleep(0.2)
    sent_s = time.time() - t0
    while len(kills) < len(plan) and time.time() - t0 < sent_s + 120:
        time.sleep(0.5)          # the rest of the plan, if the stream was quicker
    stop.set()
    for t in threads:
        t.join(60)
    deadline = time.time() + 180
    while True:
        got = _series(base)
        if len(got) and not got["provisional"].any():
            break
        if time.time() > deadline:
            with urllib.request.urlopen(base + "/v1/health", timeout=30) as r:
                health = r.read().decode()
            prov = got[got["provisional"]] if len(got) else got
            raise SystemExit(f"windows never became final: {len(prov)} provisional rows, "
                             f"{prov['window_start'].min() if len(prov) else '-'} to "
                             f"{prov['window_start'].max() if len(prov) else '-'}; "
                             f"health {health}")
        time.sleep(2)
    res = validate_rows(recs, now_ms=int(time.time() * 1000), max_future_ms=cfg.max_future_ms)
    batches = [(k, (InferenceBatch if k == "inference" else FeedbackBatch).from_records(r))
               for k, r in iter_runs(res)]
    rows, _ = replay_batches(batches, cfg)
    want = rows_frame(rows, cfg.segments)
    want = want[want["window"] == "10s"]
    got["window_start"] = pd.to_datetime(got["window_start"], utc=True)
    m = want.merge(got, on=KEY, suffixes=("_r", "_s"), how="outer", indicator=True)
    missing = int((m["_merge"] == "left_only").sum())
    extra = int((m["_merge"] == "right_only").sum())
    both = m[m["_merge"] == "both"]
    lost = int((both["count_r"] - both["count_s"]).clip(lower=0).sum())
    doubled = int((both["count_s"] - both["count_r"]).clip(lower=0).sum())
    vals = both["value_r"].notna() | both["value_s"].notna()
    unequal = int((~((both["value_r"] - both["value_s"]).abs()[vals]
                     <= 1e-9 * both["value_r"].abs()[vals] + 1e-12)).sum())
    print(f"sent {len(recs):,} events in {len(chunks)} requests over {sent_s:.0f} s "
          f"({len(recs) / sent_s:,.0f} events/s), {retries} retried requests; kills: "
          f"{kills.count('shard')} shard, {kills.count('publisher')} publisher (SIGKILL)")
    print(f"windows: {len(m):,} compared, {missing} missing, {extra} extra, {unequal} values "
          f"unequal; counts lost {lost}, doubled {doubled}; final windows watched "
          f"{len(finals):,}, rewritten {len(rewritten)}")
    print(f"chaos: {len(recs):,} events, {kills.count('shard')} shard + "
          f"{kills.count('publisher')} publisher kills, {len(both) - unequal:,} windows equal "
          f"replay, {len(finals):,} final windows never rewritten"
          f"{'' if not rewritten else f' ({len(rewritten)} REWRITTEN)'}, {lost} lost, "
          f"{doubled} doubled")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
