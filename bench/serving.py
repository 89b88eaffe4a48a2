"""What the monitoring wrapper costs a Ray Serve deployment (a benchmark that prints figures).

The same trivial model is served twice in one Ray Serve instance: ``bare`` (a
plain deployment returning the same JSON) and ``monitored`` (the same model
through :class:`app.monitor.MonitoredModel`, sending its events to two real
shard actors).  ``--null-sink`` adds a third arm whose wrapper sends nowhere
(the wrapper's own cost, without the shards' ingest on this machine).

Each round drives every arm, in alternating order, with the same closed-loop
load: ``--concurrency`` keep-alive HTTP/1.1 connections from a separate
client process (a raw asyncio client, so the client costs as little CPU as
possible), ``--warmup`` seconds unmeasured then ``--seconds`` measured.  Per
round: throughput and p50 latency of each arm, and the monitored/bare
ratios; the figures are the medians of the per-round ratios.  On a shared
machine throughput swings with whatever else runs, so each run also reports
the server side's CPU time per request (this driver's process tree: Ray's
raylet, GCS, Serve controller and proxy, the replicas and the shards, less
what the idle instance uses), which other load moves less.  ``--flush-ms``
sets the wrapper's flush age (default 50 ms, the wrapper's default).

The in-path cost is measured directly, in-process: the wrapper's
``__call__`` against the same handler without the monitoring (same body
read, JSON decode, predict and reply), on requests shaped like those Serve's
proxy passes, in interleaved rounds: the best round of each, subtracted
(other processes on the machine only ever add time; the median difference
is printed beside it).  Also printed: the bookkeeping
statements alone (id + timers + tuple append) and the flush work per event
(off the request path).

The last line reads::

    serving: throughput <ratio>x, p50 <ratio>x, in-path <us> us per request
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BODY = b'{"x": 0.7}'


# ---------------------------------------------------------------------------
# the load generator (runs in its own process: --load)


async def _connection(host: str, port: int, request: bytes, t_measure: float, t_end: float,
                      lats: list, counts: dict) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    perf = time.perf_counter
    try:
        while True:
            t0 = perf()
            if t0 >= t_end:
                break
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            low = head.lower()
            i = low.find(b"\r\ncontent-length:")
            if i >= 0:
                j = low.index(b"\r\n", i + 2)
                await reader.readexactly(int(low[i + 17:j]))
            else:   # chunked
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            t1 = perf()
            counts["all"] += 1
            if t0 >= t_measure:
                lats.append(t1 - t0)
                if status != 200:
                    counts["errors"] += 1
    finally:
        writer.close()


async def _load(host: str, port: int, path: str, seconds: float, warmup: float,
                concurrency: int) -> dict:
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
               ).encode() + BODY
    lats: list[float] = []
    counts = {"all": 0, "errors": 0}
    t_measure = time.perf_counter() + warmup
    t_end = t_measure + seconds
    await asyncio.gather(*(_connection(host, port, request, t_measure, t_end, lats, counts)
                           for _ in range(concurrency)))
    lats.sort()
    n = len(lats)
    return {"n": n, "all": counts["all"], "errors": counts["errors"], "rps": n / seconds,
            "p50_ms": lats[n // 2] * 1e3 if n else float("nan"),
            "p99_ms": lats[min(n - 1, int(n * 0.99))] * 1e3 if n else float("nan")}


def tree_cpu_s() -> float:
    """CPU seconds used so far by this process and its descendants (Ray's processes: this
    driver started the local Ray instance)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def run_load(port: int, path: str, seconds: float, warmup: float, concurrency: int,
             idle_cpu: float = 0.0) -> dict:
    """One closed-loop run from a client process; adds the server side's CPU per request
    (less ``idle_cpu``, the CPU seconds per second the idle instance uses anyway)."""
    c0, t0 = tree_cpu_s(), time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--load", str(port), path, str(seconds), str(warmup),
         str(concurrency)], capture_output=True, text=True, check=True)
    cpu = tree_cpu_s() - c0 - idle_cpu * (time.perf_counter() - t0)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["cpu_ms"] = cpu * 1e3 / max(res["all"], 1)
    return res


# ---------------------------------------------------------------------------
# the model, bare and monitored


async def predict(payload: dict):
    x = float(payload.get("x", 0.0))
    return {"label": int(x > 0.5), "score": x}


class NullSink:
    n_shards = 2

    def send(self, kind, batch):
        return None


def deployments(flush_ms: float = 50.0):
    from ray import serve
    from starlette.responses import JSONResponse

    from app.monitor import MonitoredModel

    opts = dict(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)

    @serve.deployment(**opts)
    class Bare:
        async def __call__(self, request):
            payload = await request.json()
            pred = await predict(payload)
            return JSONResponse({"request_id": "0f1e2d3c4b5a-1234", "prediction": pred})

    @serve.deployment(**opts)
    class Monitored(MonitoredModel):
        def __init__(self, null_sink: bool = False) -> None:
            super().__init__(model="bench", model_version="1", n_shards=2, flush_ms=flush_ms,
                             sink=NullSink() if null_sink else None)

        async def predict(self, payload: dict):
            return await predict(payload)

    return Bare, Monitored


# ---------------------------------------------------------------------------
# the in-path cost, in-process


class _FakeRequest:
    """What ``MonitoredModel.__call__`` reads of a request: ``scope["headers"]`` and ``body()``."""

    __slots__ = ("scope", "_body")

    def __init__(self, headers: list, body: bytes) -> None:
        self.scope = {"headers": headers}
        self._body = body

    async def body(self) -> bytes:
        return self._body


def in_path_cost(n: int = 50_000, rounds: int = 7) -> dict:
    from app.monitor import MonitoredModel, _dumps, _Reply

    class M(MonitoredModel):
        async def predict(self, payload):
            return await predict(payload)

    class Baseline:
        """The same handler without the monitoring: body, JSON, predict, reply."""

        async def predict(self, payload):   # as the subclass of the wrapper has it
            return await predict(payload)

        async def __call__(self, request):
            body = await request.body()
            payload = json.loads(body) if body else {}
            pred = await self.predict(payload)
            return _Reply(_dumps({"request_id": "0f1e2d3c4b5a-1234", "prediction": pred}
                                 ).encode(), 200, None)

    # headers as Serve's proxy passes them (its RequestIdMiddleware appends x-request-id)
    headers = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"python-urllib/3.11"),
               (b"accept-encoding", b"identity"), (b"content-type", b"application/json"),
               (b"content-length", b"10"), (b"connection", b"keep-alive"),
               (b"x-request-id", b"5e4b4b0e-0a56-4a3c-9a3a-6f1f2b1c8d7e")]
    reqs = [_FakeRequest(headers, BODY) for _ in range(n)]

    async def timed(h) -> float:
        t = time.perf_counter()
        for r in reqs:
            await h(r)
        return (time.perf_counter() - t) / n * 1e6

    async def go() -> tuple[list, list]:
        m = M(model="bench", model_version="1", sink=NullSink(), buffer_rows=10 * n,
              flush_rows=10 * n, flush_ms=3_600_000)
        b = Baseline()
        mon, base = [], []
        await timed(m)
        await timed(b)
        for r in range(rounds):
            m._mon_emitter.buf.clear()
            for h, out in ((m, mon), (b, base)) if r % 2 == 0 else ((b, base), (m, mon)):
                out.append(await timed(h))
        await m.aclose(timeout=0.1)
        return mon, base

    mon, base = asyncio.run(go())
    # the least disturbed round of each (other processes only ever add time)
    return {"monitored_us": min(mon), "baseline_us": min(base),
            "in_path_us": min(mon) - min(base),
            "in_path_median_us": statistics.median(a - b for a, b in zip(mon, base))}


def bookkeeping_cost(n: int = 200_000) -> float:
    """The bookkeeping statements alone: id making, two timer reads, one tuple append (us)."""
    prefix = "0f1e2d3c4b5a-"
    ids = itertools.count(1)
    perf = time.perf_counter_ns
    pred = {"label": 1, "score": 0.7}
    best = float("inf")
    for _ in range(5):
        buf: list = []
        t = time.perf_counter()
        for _ in range(n):
            rid = f"{prefix}{next(ids)}"
            t0 = perf()
            t1 = perf()
            if len(buf) < 10 * n:
                buf.append((t0, rid, t1 - t0, True, pred, None, None, None, "1"))
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def flush_cost(n: int = 512, reps: int = 20) -> float:
    """Rows -> records -> InferenceBatch -> split by shard, per event (us), off the request path."""
    from app.monitor import MonitoredModel
    from kpistream.wire.batch import split_by_shard

    class M(MonitoredModel):
        async def predict(self, payload):
            return None

    m = M(model="bench", model_version="1", sink=NullSink())
    t0 = time.perf_counter_ns()
    rows = [(t0 + i, f"0f1e2d3c4b5a-{i}", 120_000, True, {"label": i % 2, "score": 0.7},
             None, None, None, "1") for i in range(n)]
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        split_by_shard(m._to_batch(rows), 2)
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


# ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--null-sink", action="store_true",
                    help="add an arm whose wrapper sends nowhere")
    ap.add_argument("--flush-ms", type=float, default=50.0,
                    help="the wrapper's flush_ms (its default: 50)")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from actors.remote import NAMESPACE, ShardActor, shard_name

    print(f"in-path (in-process, {os.cpu_count()} cores) ...", flush=True)
    ip = in_path_cost()
    book = bookkeeping_cost()
    fl = flush_cost()

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        shards = [ShardActor.options(name=shard_name(i), namespace=NAMESPACE).remote(i)
                  for i in range(2)]
        ray.get([s.ping.remote() for s in shards])
        Bare, Monitored = deployments(args.flush_ms)
        serve.run(Bare.bind(), name="bare", route_prefix="/bare")
        handle = serve.run(Monitored.bind(), name="monitored", route_prefix="/monitored")
        arms = {"bare": "/bare", "monitored": "/monitored"}
        if args.null_sink:
            serve.run(Monitored.bind(True), name="monitored-null", route_prefix="/null")
            arms["null-sink"] = "/null"
        for path in arms.values():   # warm every path once
            run_load(port, path, 1.0, 0.5, args.concurrency)
        c0, t0 = tree_cpu_s(), time.perf_counter()
        time.sleep(3.0)
        idle = (tree_cpu_s() - c0) / (time.perf_counter() - t0)
        print(f"idle Ray + Serve instance: {idle:.3f} CPU seconds per second (subtracted from "
              f"the CPU per request)")
        print(f"{args.rounds} rounds x {len(arms)} arms, {args.concurrency} keep-alive "
              f"connections, {args.warmup:g} s warm-up + {args.seconds:g} s each", flush=True)
        results: dict[str, list[dict]] = {a: [] for a in arms}
        busy0 = sum(x["busy_s"] for x in ray.get([s.stats.remote() for s in shards]))
        acc0 = handle.monitor_stats.remote().result()["accepted"]
        sent_monitored = 0
        for r in range(args.rounds):
            order = list(arms) if r % 2 == 0 else list(reversed(arms))   # ABBA
            line = [f"round {r + 1:2d}:"]
            for arm in order:
                res = run_load(port, arms[arm], args.seconds, args.warmup, args.concurrency,
                               idle)
                results[arm].append(res)
                if arm == "monitored":
                    sent_monitored += res["all"]
                line.append(f"{arm} {res['rps']:4.0f} req/s p50 {res['p50_ms']:5.1f} ms "
                            f"p99 {res['p99_ms']:5.1f} ms cpu {res['cpu_ms']:.2f} ms/req"
                            + (f" ({res['errors']} errors)" if res["errors"] else ""))
            m, b = results["monitored"][-1], results["bare"][-1]
            line.append(f"| {m['rps'] / b['rps']:.3f}x, p50 {m['p50_ms'] / b['p50_ms']:.3f}x, "
                        f"cpu {m['cpu_ms'] / b['cpu_ms']:.3f}x")
            print("  ".join(line), flush=True)

        def ratios(arm: str, key: str = "rps") -> float:
            return statistics.median(m[key] / b[key]
                                     for m, b in zip(results[arm], results["bare"]))

        time.sleep(1.0)   # the last flush (50 ms) and the shards' replies
        st = handle.monitor_stats.remote().result()
        busy = sum(x["busy_s"] for x in ray.get([s.stats.remote() for s in shards])) - busy0
        print(f"monitored replica: {st['sent_rows']} events sent, {st['accepted']} accepted by "
              f"the shards, {st['dropped']} dropped, {st['send_errors']} send errors, "
              f"{st['flushed_batches']} flushes ({sent_monitored} requests in the rounds); "
              f"shards' time inside ingest {busy * 1e6 / max(st['accepted'] - acc0, 1):.1f} us "
              f"per event in the rounds (wall clock)")
        for arm in arms:
            if arm != "bare":
                print(f"{arm}: throughput {ratios(arm):.3f}x, p50 {ratios(arm, 'p50_ms'):.3f}x, "
                      f"server CPU per request {ratios(arm, 'cpu_ms'):.3f}x of bare "
                      f"({statistics.median(r['cpu_ms'] for r in results[arm]):.2f} vs "
                      f"{statistics.median(r['cpu_ms'] for r in results['bare']):.2f} ms; "
                      f"medians of {args.rounds} rounds)")
        print(f"in-process: wrapper __call__ {ip['monitored_us']:.2f} us vs the same handler "
              f"without monitoring {ip['baseline_us']:.2f} us (best rounds; median difference "
              f"{ip['in_path_median_us']:.2f} us); bookkeeping statements alone {book:.2f} us; "
              f"flush work {fl:.2f} us per event (off the request path)")
        thr, p50 = ratios("monitored"), ratios("monitored", "p50_ms")
        print(f"serving: throughput {thr:.3f}x, p50 {p50:.3f}x, in-path "
              f"{max(ip['in_path_us'], 0.0):.2f} us per request")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        port, path, seconds, warmup, conc = sys.argv[2:7]
        print(json.dumps(asyncio.run(_load("127.0.0.1", int(port), path, float(seconds),
                                           float(warmup), int(conc)))))
        raise SystemExit(0)
    raise SystemExit(main())
