"""The live pipeline on Ray: producers -> shard actors -> publisher -> store.

In one run:

1. **Throughput** for ``--seconds`` (30 s): the driver produces the demo
   stream (inference and feedback, every metric family) as columnar batches,
   split by ``hash(request_id) % N``, to the shard actors with a bound on
   calls in flight per shard (so queues cannot grow without bound: the
   maximum seen is printed).  The publisher ticks every 100 ms, merging and
   writing to the SQLite store.  Events/s counts events the shards accepted.
2. **Baseline**: the same shard actors fed one event per actor call.
   **Durability**: shards with and without their log (every input written
   through before the shard answers), ``--ab-rounds`` alternating rounds of
   ``--ab-seconds``, collected and acknowledged every 0.5 s as the publisher
   does; the cost is 1 - median(with) / median(without).
3. **Freshness** at ``--fresh-rate`` (100,000 events/s) of background load:
   probe events are emitted one at a time, and the time until the query API
   (the publisher's ``series``, what ``GET /v1/series`` serves) shows the
   probe in its open window's running value is measured.

Last line:
``pipeline: <events/s> events/s, <ratio>x per-event calls, freshness p50 <ms> ms p99 <ms> ms,
durability cost <percent> %``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from actors.remote import ensure_actors  # noqa: E402
from kpistream.wire.batch import InferenceBatch, split_by_shard  # noqa: E402
from kpistream.synthetic import generate_stream  # noqa: E402

CONFIG = {"time": {"lateness": "5s", "label_delay": "60s", "max_future": "5m"},
          "windows": [{"name": "10s", "type": "tumbling", "size": "10s"},
                      {"name": "1m", "type": "sliding", "size": "60s", "step": "10s"}],
          "series": {"segments": ["region"]}}


def shifted(batch, dt_ms: int, salt: int):
    """A copy of ``batch`` moved ``dt_ms`` in time with fresh ids (no dedup across loops)."""
    import dataclasses

    s = np.uint64(salt)
    return dataclasses.replace(batch, ts=batch.ts + dt_ms, request_id=batch.request_id ^ s,
                               event_id=batch.event_id ^ s)


class Producer:
    """Sends pre-split batches round-robin to the shards, at most ``depth`` calls in flight each."""

    def __init__(self, shards, parts, span_ms: int, depth: int = 4, salt: int = 0) -> None:
        self.shards, self.parts, self.span, self.depth = shards, parts, span_ms, depth
        self.inflight: list[list] = [[] for _ in shards]
        self.max_inflight = 0
        self.loop = 0
        self.sent = 0
        self.accepted = 0
        self.salt = salt
        # event time runs on from loop to loop, and never behind the wall clock (live
        # events are stamped when they happen; the shards' idle watermark follows the clock)
        self.base = int(time.time() * 1000) - parts[0][2] - span_ms
        self.current_ts = 0

    def _wait(self, s: int, keep: int) -> None:
        q = self.inflight[s]
        while len(q) > keep:
            rep = ray.get(q.pop(0))
            self.accepted += rep["accepted"]

    def run(self, seconds: float, rate: float | None = None) -> float:
        """Produce for ``seconds`` (optionally paced to ``rate`` events/s); returns elapsed s."""
        t0 = time.perf_counter()
        sent0 = self.sent
        while time.perf_counter() - t0 < seconds:
            self.loop += 1
            self.base = max(self.base + self.span, int(time.time() * 1000) - self.parts[0][2])
            base = self.base
            for kind, per_shard, _ in self.parts:
                for s, b in enumerate(per_shard):
                    if not len(b):
                        continue
                    bb = shifted(b, base, (self.salt + self.loop) * 0x9E3779B97F4A7C15 & (2**63 - 1))
                    self.current_ts = max(self.current_ts, int(bb.ts.max()))
                    self._wait(s, self.depth - 1)
                    m = self.shards[s].ingest_inference if kind == "inference" \
                        else self.shards[s].ingest_feedback
                    self.inflight[s].append(m.remote(bb))
                    self.max_inflight = max(self.max_inflight, len(self.inflight[s]))
                    self.sent += len(b)
                    if rate:
                        ahead = (self.sent - sent0) / rate - (time.perf_counter() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
                if time.perf_counter() - t0 >= seconds:
                    break
        for s in range(len(self.shards)):
            self._wait(s, 0)
        return time.perf_counter() - t0


@ray.remote(num_cpus=0, max_concurrency=2)
class BackgroundLoad:
    """A paced producer in its own process: ``run`` in one thread, ``current_ts`` from another."""

    def __init__(self, n_shards: int, parts, span: int, base: int) -> None:
        from actors.remote import NAMESPACE, shard_name

        shards = [ray.get_actor(shard_name(i), namespace=NAMESPACE) for i in range(n_shards)]
        self.p = Producer(shards, parts, span, depth=2, salt=10_000)
        self.p.base = max(self.p.base, base)

    def run(self, seconds: float, rate: float) -> tuple[int, float]:
        t = time.perf_counter()
        while time.perf_counter() - t < seconds:
            self.p.run(min(1.0, seconds - (time.perf_counter() - t)), rate=rate)
        return self.p.sent, time.perf_counter() - t

    def current_ts(self) -> int:
        return self.p.current_ts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16384)
    ap.add_argument("--fresh-rate", type=float, default=100_000)
    ap.add_argument("--fresh-seconds", type=float, default=10.0)
    ap.add_argument("--ab-rounds", type=int, default=4)
    ap.add_argument("--ab-seconds", type=float, default=6.0)
    a = ap.parse_args()
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    store = tempfile.mkdtemp(prefix="kpistream-bench-store-")
    shards, pub = ensure_actors(CONFIG, a.shards, store, publish_interval_s=0.1)

    # the demo stream (about one second of event time), pre-split by shard: replayed in a
    # loop, its event time runs at about the rate the pipeline consumes it
    stream = generate_stream(400_000, seed=3, rate_per_s=400_000, late_rate=0.0, future_rate=0.0,
                             feedback_delay_ms=(50, 500), duplicate_within_ms=200, start_ms=0)
    parts = []
    t_first = None
    for kind, b in stream.batches(a.batch, exact_order=False):
        t_first = int(b.ts.min()) if t_first is None else t_first
        parts.append((kind, split_by_shard(b, a.shards), t_first))
    span = int(max(stream.inf_ts.max(), stream.fb_ts.max()) - stream.inf_ts.min()) + 1
    print(f"machine: {os.cpu_count()} cores; {a.shards} shards; stream of {len(stream):,} events "
          f"({span / 1000:.0f} s of event time) replayed in a loop with fresh ids")

    # 1. throughput
    prod = Producer(shards, parts, span)
    prod.run(3.0)  # warm-up (JIT compile, table growth)
    prod.sent = prod.accepted = 0
    secs = prod.run(a.seconds)
    rate = prod.accepted / secs
    st = ray.get(pub.health.remote())
    busy = [s["busy_s"] for s in ray.get([sh.stats.remote() for sh in shards])]
    print(f"throughput: {prod.accepted:,} events accepted in {secs:.1f} s = {rate:,.0f} events/s; "
          f"max calls in flight per shard {prod.max_inflight} (bounded by --depth); "
          f"publisher ticks {st['ticks']}, errors {st['errors']}; shard busy {busy}")

    # 1b. the cost of durability: shards with and without their log, A/B interleaved
    from actors.remote import ShardActor

    dur = {}
    for label, log_root in (("log", tempfile.mkdtemp(prefix="kpistream-bench-log-")),
                            ("no log", None)):
        # snapshots every 5 s (12x the default rate), so the rounds pay for several
        sh = [ShardActor.remote(200 + i + (10 if log_root is None else 0), CONFIG,
                                log_dir=None if log_root is None else f"{log_root}/shard-{i}",
                                log_options={"snapshot_every_s": 5.0})
              for i in range(a.shards)]
        ray.get([x.ping.remote() for x in sh])
        dur[label] = (sh, Producer(sh, parts, span, salt=77 if log_root else 88), [])
    for rnd in range(a.ab_rounds):
        for label in (("log", "no log") if rnd % 2 == 0 else ("no log", "log")):
            sh, p, rates = dur[label]
            acked = [None] * len(sh)
            p.sent = p.accepted = 0
            t_end = time.perf_counter() + a.ab_seconds
            secs = 0.0
            while time.perf_counter() < t_end:   # a publisher's pulls, acknowledging
                secs += p.run(0.5)
                res = ray.get([x.collect.remote(acked[i]) for i, x in enumerate(sh)])
                acked = [wm for _, wm, _ in res]
            rates.append(p.accepted / secs)
    on, off = dur["log"][2], dur["no log"][2]
    cost = 1 - float(np.median(on)) / float(np.median(off))
    log_stats = ray.get(dur["log"][0][0].stats.remote())["log"]
    print(f"durability: shards with their log {', '.join(f'{r:,.0f}' for r in on)} events/s, "
          f"without {', '.join(f'{r:,.0f}' for r in off)} events/s ({a.ab_rounds} alternating "
          f"rounds of {a.ab_seconds:g} s); cost {100 * cost:.1f} % (medians); shard 0's log "
          f"{log_stats['bytes'] / 2**20:,.0f} MiB in {log_stats['segments']} segments after "
          f"truncation, {log_stats['records']:,} records; {log_stats['snapshots']} snapshots "
          f"(every 5 s), the last {log_stats['snapshot_bytes'] / 2**20:,.1f} MiB written in "
          f"{log_stats['snapshot_s']:.2f} s")
    for sh, _, _ in dur.values():
        for x in sh:
            ray.kill(x)

    # 2. baseline: one event per actor call, into fresh shard actors of the same class

    base_shards = [ShardActor.remote(100 + i, CONFIG) for i in range(a.shards)]
    ray.get([b.ping.remote() for b in base_shards])
    one = [InferenceBatch.from_records([{
        "event_id": f"b{i}", "request_id": f"rb{i}", "ts": prod.current_ts,
        "model": "baseline", "model_version": "1", "variant": "primary", "endpoint": "",
        "latency_ms": 1.0, "status": "ok", "pred_label": "1", "segments": {}}]) for i in range(20_000)]
    t0 = time.perf_counter()
    n = 0
    refs: list = []
    while time.perf_counter() - t0 < 5.0 and n < len(one):
        refs.append(base_shards[n % a.shards].ingest_inference.remote(one[n]))
        n += 1
        if len(refs) >= 64:
            ray.get(refs)
            refs = []
    ray.get(refs)
    base_rate = n / (time.perf_counter() - t0)
    print(f"baseline: one actor call per event: {base_rate:,.0f} events/s")

    # 3. freshness under background load
    lat = []
    # the background load comes from its own process (a Ray actor), paced
    bg = BackgroundLoad.remote(a.shards, parts, span, prod.base + span)
    bg_run = bg.run.remote(a.fresh_seconds + 2.0, a.fresh_rate)
    time.sleep(1.0)
    seen = 0
    t_end = time.perf_counter() + a.fresh_seconds
    k = 0
    while time.perf_counter() < t_end:
        k += 1
        now = ray.get(bg.current_ts.remote())  # inside the windows the load keeps open
        b = InferenceBatch.from_records([{
            "event_id": f"p{k}", "request_id": f"probe{k}", "ts": now, "model": "probe",
            "model_version": "1", "variant": "primary", "endpoint": "", "latency_ms": 1.0,
            "status": "ok", "pred_label": "1", "segments": {"region": "eu"}}])
        t_emit = time.perf_counter()
        s = int(b.request_id[0] % np.uint64(a.shards))
        shards[s].ingest_inference.remote(b)
        while True:
            rows = ray.get(pub.series.remote("requests", None, None, "10s", model="probe"))
            total = sum(r["value"] for r in rows)
            if total >= seen + 1:
                break
            if time.perf_counter() - t_emit > 5:
                break
            time.sleep(0.01)
        lat.append((time.perf_counter() - t_emit) * 1000)
        seen = total
        time.sleep(0.05)
    bg_sent, bg_secs = ray.get(bg_run)
    p50, p99 = np.percentile(lat, [50, 99])
    print(f"freshness: {len(lat)} probes under {bg_sent / bg_secs:,.0f} events/s of background "
          f"load (target {a.fresh_rate:,.0f}); p50 {p50:.0f} ms, p99 {p99:.0f} ms, "
          f"max {max(lat):.0f} ms")
    print(f"pipeline: {rate:,.0f} events/s, {rate / base_rate:.1f}x per-event calls, "
          f"freshness p50 {p50:.0f} ms p99 {p99:.0f} ms, durability cost {100 * cost:.1f} %")
    ray.shutdown()


if __name__ == "__main__":
    main()
