"""KpiClient against a real local HTTP server (http.server on a free loopback port)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from kpistream.wire.client import KpiClient


class Recorder(ThreadingHTTPServer):
    """Records every POST; replies like the sidecar (``accepted`` / ``rejected``).

    ``fail_next`` requests get ``fail_status`` first; rows with ``"bad": true`` are
    rejected; ``delay_s`` slows every reply.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.posts: list[tuple[str, list[dict]]] = []
        self.raw: list[bytes] = []
        self.connections: set = set()
        self.fail_next = 0
        self.fail_status = 503
        self.delay_s = 0.0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def rows(self, path: str | None = None) -> list[dict]:
        with self.lock:
            return [r for p, rows in self.posts if path in (None, p) for r in rows]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as the client expects

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        srv: Recorder = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with srv.lock:
            srv.connections.add(self.client_address)
            srv.raw.append(body)
            failing = srv.fail_next > 0
            if failing:
                srv.fail_next -= 1
        if srv.delay_s:
            time.sleep(srv.delay_s)
        if failing:
            return self._reply(srv.fail_status, {"error": "try again"})
        rows = [json.loads(line) for line in body.decode().split("\n") if line.strip()]
        with srv.lock:
            srv.posts.append((self.path, rows))
        rejected = [{"index": i, "field": "bad", "reason": "unknown_field",
                     "message": "bad is not a known field."}
                    for i, r in enumerate(rows) if r.get("bad")]
        self._reply(200, {"received": len(rows), "accepted": len(rows) - len(rejected),
                          "late": 0, "duplicates": 0, "rejected": rejected})

    def _reply(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    srv = Recorder()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def inference(i: int, **kw) -> dict:
    return {"request_id": f"r{i}", "model": "m", "model_version": "1", "variant": "primary",
            "latency_ms": 1.5, "status": "ok", "prediction": "a", **kw}


def test_batches_are_ndjson_and_fields_are_filled(server):
    with KpiClient(server.url, batch_rows=500, flush_s=60) as kpi:
        t0 = time.time_ns() // 1_000_000
        for i in range(1200):
            assert kpi.log_inference(**inference(i))
        assert kpi.flush(timeout=10)
        st = kpi.stats()
    sizes = [len(rows) for path, rows in server.posts]
    assert sizes == [500, 500, 200]
    assert {p for p, _ in server.posts} == {"/v1/events"}
    # the body is NDJSON: one JSON object per line
    for body in server.raw:
        lines = body.decode().strip().split("\n")
        assert all(isinstance(json.loads(x), dict) for x in lines)
    rows = server.rows()
    assert [r["request_id"] for r in rows] == [f"r{i}" for i in range(1200)]
    assert all(r["type"] == "inference" for r in rows)
    assert all(isinstance(r["ts"], int) and abs(r["ts"] - t0) < 60_000 for r in rows)
    assert len({r["event_id"] for r in rows}) == 1200
    assert rows[0]["prediction"] == "a" and rows[0]["latency_ms"] == 1.5
    assert st["sent_batches"] == 3 and st["sent_rows"] == 1200 and st["accepted"] == 1200
    assert st["buffered"] == 0 and st["dropped"] == 0 and st["failed_rows"] == 0
    # one keep-alive connection served every batch
    assert len(server.connections) == 1


def test_given_fields_are_kept(server):
    with KpiClient(server.url, flush_s=60) as kpi:
        kpi.log_inference(**inference(1, event_id="mine", ts=1_700_000_000_000))
        kpi.flush(timeout=10)
    (row,) = server.rows()
    assert row["event_id"] == "mine" and row["ts"] == 1_700_000_000_000


def test_feedback_goes_to_the_feedback_route(server):
    with KpiClient(server.url, flush_s=60) as kpi:
        kpi.log_inference(**inference(1))
        kpi.log_feedback("r1", "label", 1)
        kpi.log_feedback("r1", "click")
        kpi.log_feedback("r1", "relevance", {"a": 2.0}, ts=1_700_000_000_000)
        assert kpi.flush(timeout=10)
    assert [p for p, _ in server.posts] == ["/v1/events", "/v1/feedback"]
    fb = server.rows("/v1/feedback")
    assert [r["kind"] for r in fb] == ["label", "click", "relevance"]
    assert all(r["type"] == "feedback" and r["request_id"] == "r1" for r in fb)
    assert fb[0]["value"] == 1 and "value" not in fb[1] and fb[2]["value"] == {"a": 2.0}
    assert fb[2]["ts"] == 1_700_000_000_000
    assert len({r["event_id"] for r in fb}) == 3


def test_flush_by_age(server):
    kpi = KpiClient(server.url, batch_rows=1000, flush_s=0.1)
    try:
        for i in range(3):
            kpi.log_inference(**inference(i))
        deadline = time.monotonic() + 10
        while len(server.rows()) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(server.rows()) == 3
    finally:
        kpi.close()


def test_flush_by_size_before_the_timer(server):
    kpi = KpiClient(server.url, batch_rows=10, flush_s=60)
    try:
        for i in range(25):
            kpi.log_inference(**inference(i))
        deadline = time.monotonic() + 10
        while len(server.rows()) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [len(r) for _, r in server.posts][:2] == [10, 10]
        time.sleep(0.1)
        assert kpi.stats()["buffered"] == 5   # the partial batch waits for its age
    finally:
        kpi.close()
    assert len(server.rows()) == 25


def test_retry_after_503(server):
    server.fail_next = 2
    with KpiClient(server.url, flush_s=60, backoff_s=0.01) as kpi:
        for i in range(10):
            kpi.log_inference(**inference(i))
        assert kpi.flush(timeout=10)
        st = kpi.stats()
    assert len(server.raw) == 3                     # two 503s, then the same batch again
    assert server.raw[0] == server.raw[1] == server.raw[2]
    assert len(server.rows()) == 10
    assert st["retries"] == 2 and st["accepted"] == 10 and st["failed_rows"] == 0
    assert "503" in st["last_error"]


def test_retries_are_bounded(server):
    server.fail_next = 100
    with KpiClient(server.url, flush_s=60, max_retries=3, backoff_s=0.01) as kpi:
        for i in range(4):
            kpi.log_inference(**inference(i))
        assert kpi.flush(timeout=10)
        st = kpi.stats()
    assert len(server.raw) == 4                     # one try and three retries
    assert st["retries"] == 3 and st["failed_batches"] == 1 and st["failed_rows"] == 4
    assert st["accepted"] == 0


def test_client_error_is_not_retried(server):
    server.fail_next = 1
    server.fail_status = 413
    with KpiClient(server.url, flush_s=60, backoff_s=0.01) as kpi:
        kpi.log_inference(**inference(1))
        kpi.flush(timeout=10)
        kpi.log_inference(**inference(2))
        kpi.flush(timeout=10)
        st = kpi.stats()
    assert len(server.raw) == 2
    assert st["retries"] == 0 and st["failed_rows"] == 1 and st["accepted"] == 1


def test_connection_refused_is_retried_then_counted():
    srv = Recorder()          # bound, then closed: nothing listens on the port
    url = srv.url
    srv.server_close()
    kpi = KpiClient(url, flush_s=60, max_retries=2, backoff_s=0.01, timeout_s=1)
    kpi.log_inference(**inference(1))
    t0 = time.monotonic()
    assert kpi.flush(timeout=10)
    kpi.close()
    st = kpi.stats()
    assert time.monotonic() - t0 < 5
    assert st["retries"] == 2 and st["failed_rows"] == 1
    assert "Error" in st["last_error"]


def test_buffer_overflow_is_counted(server):
    server.delay_s = 0.0
    kpi = KpiClient(server.url, batch_rows=1000, flush_s=60, max_buffer=10)
    try:
        results = [kpi.log_inference(**inference(i)) for i in range(15)]
        assert results == [True] * 10 + [False] * 5
        st = kpi.stats()
        assert st["dropped"] == 5 and st["buffered"] == 10
        assert kpi.flush(timeout=10)
        assert kpi.log_inference(**inference(99))   # room again
    finally:
        kpi.close()
    assert len(server.rows()) == 11
    assert kpi.stats()["dropped"] == 5


def test_rejections_are_counted_with_event_ids(server):
    with KpiClient(server.url, flush_s=60) as kpi:
        kpi.log_inference(**inference(1))
        kpi.log_inference(**inference(2, bad=True, event_id="e-bad"))
        kpi.flush(timeout=10)
        st = kpi.stats()
    assert st["accepted"] == 1 and st["rejected"] == 1
    (rej,) = kpi.rejections
    assert rej["event_id"] == "e-bad" and rej["field"] == "bad" and rej["reason"] == "unknown_field"


def test_numpy_values_and_unserializable_rows(server):
    with KpiClient(server.url, flush_s=60) as kpi:
        kpi.log_inference(**inference(1, latency_ms=np.float32(2.5),
                                      prediction={"ranking": np.array([3, 1])}))
        kpi.log_inference(**inference(2, prediction=object()))
        kpi.flush(timeout=10)
        st = kpi.stats()
    (row,) = server.rows()
    assert row["latency_ms"] == 2.5 and row["prediction"] == {"ranking": [3, 1]}
    assert st["unserializable"] == 1 and st["failed_rows"] == 1


def test_close_flushes_and_later_events_are_dropped(server):
    kpi = KpiClient(server.url, flush_s=60)
    with kpi:
        kpi.log_inference(**inference(1))
    assert len(server.rows()) == 1
    assert not kpi._thread.is_alive()
    assert kpi.log_inference(**inference(2)) is False
    assert kpi.stats()["dropped"] == 1
    kpi.close()   # idempotent


def test_base_url_with_a_path_prefix(server):
    with KpiClient(server.url + "/kpi/", flush_s=60) as kpi:
        kpi.log_inference(**inference(1))
        kpi.flush(timeout=10)
    assert server.posts[0][0] == "/kpi/v1/events"


def test_bad_arguments():
    with pytest.raises(ValueError):
        KpiClient("ftp://x")
    with pytest.raises(ValueError):
        KpiClient(batch_rows=0)


# ---------------------------------------------------------------------------
# the HTTP helper and the HTTP transport on their own


def test_request_helper_answers_and_never_raises(server):
    from kpistream.wire.client import request

    r = request("POST", server.url + "/v1/events", b'{"a":1}\n',
                content_type="application/x-ndjson")
    assert r.ok and r.status == 200 and r.json()["accepted"] == 1
    assert r.headers["content-type"] == "application/json"
    assert server.posts[-1] == ("/v1/events", [{"a": 1}])
    server.fail_next, server.fail_status = 1, 503
    r = request("POST", server.url + "/x", b"{}")
    assert not r.ok and r.reason() == 'HTTP 503: {"error": "try again"}'
    srv = Recorder()          # bound, then closed: refused
    url = srv.url
    srv.server_close()
    r = request("GET", url + "/v1/health", timeout=1)
    assert r.status == 0 and not r.ok and r.reason().startswith("ConnectionRefusedError")
    assert request("GET", "ftp://nowhere/").status == 0


def test_http_transport_under_an_emitter_in_an_event_loop(server):
    import asyncio

    from kpistream.wire.client import HttpTransport
    from kpistream.wire.emitter import Emitter

    settled = []
    tr = HttpTransport(server.url, on_settled=settled.append)

    async def go():
        em = Emitter(tr, kind="feedback", flush_s=60, batch_rows=2)
        for i in range(5):
            em.put({"type": "feedback", "request_id": f"r{i}", "kind": "click",
                    "event_id": f"e{i}", "bad": i == 4})
        await em.aclose()
        return em.stats()

    st = asyncio.run(go())
    assert [len(rows) for _, rows in server.posts] == [2, 2, 1]
    assert {p for p, _ in server.posts} == {"/v1/feedback"} and settled == [2, 2, 1]
    assert st["sent_rows"] == 5 and st["accepted"] == 0   # the HTTP transport counts replies
    assert tr.stats()["accepted"] == 4 and tr.stats()["rejected"] == 1
    assert tr.rejections[0]["event_id"] == "e4"
    tr.close()


def test_the_client_imports_only_the_standard_library():
    import subprocess
    import sys

    code = ("import sys, kpistream.wire.client\n"
            "print(sorted(m for m in ('numpy', 'pandas', 'pydantic', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.stdout.strip() == "[]"


def test_many_threads_logging_lose_and_repeat_nothing(server):
    with KpiClient(server.url, batch_rows=50, flush_s=0.01) as kpi:
        def log(t):
            for i in range(300):
                kpi.log_inference(**inference(i, request_id=f"t{t}-{i}"))
                if i % 3 == 0:
                    kpi.log_feedback(f"t{t}-{i}", "click")

        threads = [threading.Thread(target=log, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert kpi.flush(timeout=30)
        st = kpi.stats()
    ids = [r["request_id"] for r in server.rows("/v1/events")]
    assert len(ids) == len(set(ids)) == 1200
    assert len(server.rows("/v1/feedback")) == 4 * 100
    assert all(len(rows) <= 50 for _, rows in server.posts)
    assert st["sent_rows"] == 1200 + 4 * 100 and st["dropped"] == 0 and st["buffered"] == 0
