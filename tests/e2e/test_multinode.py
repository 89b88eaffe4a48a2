"""The sidecar on a multi-node Ray cluster (a head and three worker raylets on this machine):
a worker node removed mid-stream (its shard comes back on another node from its snapshot and
log), then the whole cluster stopped and started again on the same directory; every stored
window equals replay of the acknowledged events and no final window changes
(``multinode_driver.py``, run in its own process because it starts its own clusters)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]
HERE = Path(__file__).resolve().parent


def test_a_node_lost_and_a_whole_cluster_restart_lose_nothing():
    proc = subprocess.run([sys.executable, str(HERE / "multinode_driver.py"), "--events", "6000"],
                          capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, (proc.stdout[-2000:], proc.stderr[-4000:])
    r = json.loads(lines[-1])
    print(f"\nmultinode: {r['nodes']} nodes, {r['events']:,} events; node of shard 0 removed, "
          f"shard back on another node in {r['shard0_back_s']} s; whole cluster restarted "
          f"with {r['open_at_restart']} windows open, ready in {r['restart_ready_s']} s; "
          f"{r['compared']:,} windows equal replay, {r['final_watched']:,} final windows never "
          f"rewritten, {r['retried_requests']} retried requests")
    assert r["shards_on_workers"] and len(set(r["shards_before"].values())) == 2
    assert r["shards_after"]["0"] != r["removed_node"]
    assert (r["missing"], r["extra"], r["unequal"], r["lost"], r["doubled"]) == (0, 0, 0, 0, 0), r
    assert r["compared"] > 2000 and r["rewritten"] == 0
    assert r["open_at_restart"] > 0 and r["restart_ready_s"] < 60
    assert any(rec and rec.get("snapshot_seq") for rec in r["recovery_after_restart"].values()), \
        r["recovery_after_restart"]
