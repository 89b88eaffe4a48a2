"""The sidecar on a real multi-node Ray cluster on this machine, and a node lost mid-stream.

A head node (Serve, the publisher) and three worker nodes, each a raylet with its own
processes and resources (``ray.cluster_utils.Cluster``: what ``ray start --head`` and
``ray start --address`` give).  The shards need the ``kpistream-shard`` resource, which only
workers have, and spread over them.  An interleaved stream goes in over HTTP; a third of the
way in, the worker holding shard 0 is removed without warning (its raylet and every process
on it killed).  Ray restarts the shard on another worker, where it loads its snapshot and
replays its log (the log directory is on storage every node reaches: here the machine's
disk, on a real cluster a shared filesystem).  Two thirds in, the whole cluster is stopped
(every raylet and process, as ``serve shutdown`` + ``ray stop``) and a new one started on
the same directory; the rest of the stream follows.  At the end every stored window is
compared with `kpistream replay` of the acknowledged events, and every window seen final
is checked never to have changed.

Run by ``tests/e2e/test_multinode.py`` in its own process (it starts its own cluster);
prints one JSON line.  By hand::

    python tests/e2e/multinode_driver.py --events 20000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

import pandas as pd  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from actors.remote import NAMESPACE, shard_name  # noqa: E402
from app.sidecar import build_app  # noqa: E402
from conftest import free_port  # noqa: E402
from exactness import (FinalWatcher, changed, compare_with_replay, final_series,  # noqa: E402
                       final_values, post_until_acked, series)
from kpistream.spec.metrics import load_config  # noqa: E402
from kpistream.synthetic import generate_stream  # noqa: E402


def _node_of(name: str) -> str:
    h = ray.get_actor(name, namespace=NAMESPACE)
    return ray.get(h.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()),
                   timeout=60)


def _health(base: str) -> dict:
    with urllib.request.urlopen(base + "/v1/health", timeout=30) as r:
        return json.loads(r.read())


def _start(store: str, port: int) -> tuple[Cluster, list]:
    """A head node (Serve, the publisher) and three workers (the shards), the sidecar on it."""
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"kpistream-head": 1}, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, resources={"kpistream-shard": 4})
               for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
    serve.run(build_app({"metrics_config": str(ROOT / "configs/metrics.yaml"), "shards": 2,
                         "store_path": store, "publish_interval_s": 0.25, "alerts_config": None,
                         "shard_resources": {"kpistream-shard": 0.01}, "snapshot_every_s": 2.0,
                         "publisher_resources": {"kpistream-head": 0.01}}),
              name="kpistream", route_prefix="/")
    return cluster, workers


def _stop(cluster: Cluster) -> None:
    """Everything gone, as after `serve shutdown` and `ray stop`: every raylet and process."""
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=12_000, help="requests in the stream")
    ap.add_argument("--chunk", type=int, default=400)
    a = ap.parse_args()
    cfg = load_config(ROOT / "configs/metrics.yaml")
    port = free_port()
    store = tempfile.mkdtemp(prefix="kpistream-multinode-")
    cluster, workers = _start(store, port)
    base = f"http://127.0.0.1:{port}"
    worker_ids = {w.node_id: w for w in workers}
    before = {i: _node_of(shard_name(i)) for i in range(2)}
    now = int(time.time() * 1000)
    recs = list(generate_stream(a.events, seed=17, rate_per_s=20.0,
                                start_ms=now - a.events * 50 - 3_600_000,
                                late_rate=0.0).records())
    chunks = [recs[i:i + a.chunk] for i in range(0, len(recs), a.chunk)]
    watcher = FinalWatcher(base, every_s=1.0)
    removed: dict = {}

    def lose_a_node() -> None:
        victim = worker_ids[before[0]]
        t0 = time.time()
        cluster.remove_node(victim, allow_graceful=False)
        removed["at"] = t0
        while True:          # until the shard answers again, from another node
            try:
                removed["shard0_node"] = _node_of(shard_name(0))
                if _health(base)["shards_alive"] == 2:
                    break
            except Exception:
                pass
            time.sleep(0.2)
        removed["back_s"] = time.time() - t0

    # phase 1: two thirds of the stream; a third in, the node holding shard 0 goes
    retries, thread = 0, None
    t0 = time.time()
    cut = 2 * len(chunks) // 3
    for k, chunk in enumerate(chunks[:cut]):
        if k == len(chunks) // 3:
            thread = threading.Thread(target=lose_a_node, daemon=True)
            thread.start()
        retries += post_until_acked(base + "/v1/events", chunk)
    thread.join(180)
    # stopped while traffic flows (a pause longer than the lateness before the stop would
    # let the idle shards close every window: this stream is an hour old)
    after = {i: _node_of(shard_name(i)) for i in range(2)}
    watcher.stop()
    open_at_stop = int(series(base)["provisional"].sum())

    # phase 2: the whole cluster stopped and started again on the same directory
    _stop(cluster)
    t1 = time.time()
    cluster, workers = _start(store, port)
    ready_s = time.time() - t1
    restart = _health(base)
    watcher2 = FinalWatcher(base, every_s=1.0)
    for chunk in chunks[cut:]:
        retries += post_until_acked(base + "/v1/events", chunk)
    sent_s = time.time() - t0
    got = final_series(base, timeout_s=120)
    watcher2.stop()
    rep = compare_with_replay(got, recs, cfg)
    changed_finals = changed(watcher.finals, final_values(got))
    logs = {i: lg for i, lg in restart.get("shard_logs", {}).items()}
    print(json.dumps({
        "events": len(recs), "requests": len(chunks), "sent_s": round(sent_s, 1),
        "retried_requests": retries, "nodes": 1 + len(workers),
        "shards_before": before, "shards_after": after,
        "shards_on_workers": all(n in worker_ids for n in before.values()),
        "removed_node": before[0], "shard0_back_s": round(removed.get("back_s", -1), 1),
        "open_at_restart": open_at_stop, "restart_ready_s": round(ready_s, 1),
        "recovery_after_restart": {i: lg.get("recovery") for i, lg in logs.items()},
        "final_watched": len(watcher.finals) + len(watcher2.finals),
        "rewritten": len(watcher.rewritten) + len(watcher2.rewritten) + len(changed_finals),
        "removed_at": time.strftime("%H:%M:%S", time.gmtime(removed.get("at", 0))),
        "stream_span": [str(pd.to_datetime(recs[0]["ts"], unit="ms")),
                        str(pd.to_datetime(recs[-1]["ts"], unit="ms"))], **rep},
        default=str))
    _stop(cluster)


if __name__ == "__main__":
    main()
