"""The sidecar on a multi-node Ray cluster (a head and three worker raylets on this machine),
a worker node removed mid-stream: its shard comes back on another node from its log and
every stored window equals replay of the acknowledged events (``multinode_driver.py``, run
in its own process because it starts its own cluster)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]
HERE = Path(__file__).resolve().parent


def test_a_node_lost_mid_stream_moves_its_shard_and_loses_nothing():
    proc = subprocess.run([sys.executable, str(HERE / "multinode_driver.py"), "--events", "6000"],
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, (proc.stdout[-2000:], proc.stderr[-4000:])
    r = json.loads(lines[-1])
    print(f"\nmultinode: {r['nodes']} nodes, {r['events']:,} events; node of shard 0 removed, "
          f"shard back on another node in {r['shard0_back_s']} s; {r['compared']:,} windows "
          f"equal replay, {r['final_watched']:,} final windows never rewritten, "
          f"{r['retried_requests']} retried requests")
    assert r["shards_on_workers"] and len(set(r["shards_before"].values())) == 2
    assert r["shards_after"]["0"] != r["removed_node"]
    assert (r["missing"], r["extra"], r["unequal"], r["lost"], r["doubled"]) == (0, 0, 0, 0, 0), r
    assert r["compared"] > 2000 and r["rewritten"] == 0
