"""Exactly-once under faults at scale: the sidecar on Ray Serve, an interleaved stream over
HTTP, shard and publisher processes SIGKILLed at random; every stored window compared with
`kpistream replay` of the acknowledged events, and every final window checked never to change.

    python bench/chaos.py --requests 80000 --shard-kills 10 --publisher-kills 3

Last line: ``chaos: <events> events, <k> shard + <p> publisher kills, <windows> windows equal
replay, <n> final windows never rewritten, <lost> lost, <doubled> doubled``
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "e2e")]

import ray  # noqa: E402
from ray import serve  # noqa: E402

from actors.remote import NAMESPACE, PUBLISHER, shard_name  # noqa: E402
from app.sidecar import build_app  # noqa: E402
from exactness import FinalWatcher, compare_with_replay, final_series, post_until_acked  # noqa: E402
from kpistream.spec.metrics import load_config  # noqa: E402
from kpistream.synthetic import generate_stream  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=80_000)
    ap.add_argument("--shard-kills", type=int, default=10)
    ap.add_argument("--publisher-kills", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--snapshot-every", type=float, default=10.0,
                    help="seconds between shard snapshots (most restarts load one)")
    a = ap.parse_args()
    cfg = load_config(ROOT / "configs/metrics.yaml")
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    port = 8765
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    store = tempfile.mkdtemp(prefix="kpistream-chaos-")
    serve.run(build_app({"metrics_config": str(ROOT / "configs/metrics.yaml"), "shards": 2,
                         "store_path": store, "publish_interval_s": 0.25,
                         "alerts_config": None, "snapshot_every_s": a.snapshot_every}),
              name="kpistream", route_prefix="/")
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

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    watcher = FinalWatcher(base, every_s=2.0)
    t0 = time.time()
    retries = sum(post_until_acked(base + "/v1/events", chunk) for chunk in chunks)
    sent_s = time.time() - t0
    while len(kills) < len(plan) and time.time() - t0 < sent_s + 120:
        time.sleep(0.5)          # the rest of the plan, if the stream was quicker
    stop.set()
    thread.join(60)
    watcher.stop()
    finals, rewritten = watcher.finals, watcher.rewritten
    got = final_series(base, timeout_s=180)
    rep = compare_with_replay(got, recs, cfg)
    missing, extra, unequal = rep["missing"], rep["extra"], rep["unequal"]
    lost, doubled = rep["lost"], rep["doubled"]
    equal = rep["compared"] - missing - extra - unequal
    print(f"sent {len(recs):,} events in {len(chunks)} requests over {sent_s:.0f} s "
          f"({len(recs) / sent_s:,.0f} events/s), {retries} retried requests; kills: "
          f"{kills.count('shard')} shard, {kills.count('publisher')} publisher (SIGKILL)")
    print(f"windows: {rep['compared']:,} compared, {missing} missing, {extra} extra, {unequal} values "
          f"unequal; counts lost {lost}, doubled {doubled}; final windows watched "
          f"{len(finals):,}, rewritten {len(rewritten)}")
    print(f"chaos: {len(recs):,} events, {kills.count('shard')} shard + "
          f"{kills.count('publisher')} publisher kills, {equal:,} windows equal "
          f"replay, {len(finals):,} final windows never rewritten"
          f"{'' if not rewritten else f' ({len(rewritten)} REWRITTEN)'}, {lost} lost, "
          f"{doubled} doubled")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
