"""A small Python client for servers outside Ray (:class:`KpiClient`): log inferences and
feedback to the sidecar; :func:`request` is a one-shot stdlib HTTP helper.
"""

from __future__ import annotations

import asyncio
import atexit
import http.client
import json
import secrets
import threading
import time
import urllib.parse
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any

from kpistream.wire.emitter import Emitter

__all__ = ["KpiClient", "HttpTransport", "Reply", "request"]

_PATHS = {"inference": "/v1/events", "feedback": "/v1/feedback"}
_KINDS = ("inference", "feedback")


def _default(o: Any) -> Any:
    """JSON for values that ``json`` does not know (numpy scalars and arrays, sets)."""
    f = getattr(o, "tolist", None)   # numpy scalar or array, without importing numpy
    if callable(f):
        return f()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if callable(getattr(o, "isoformat", None)):   # datetime (ts); the server wants a timezone
        return o.isoformat()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                           default=_default).encode


# ---------------------------------------------------------------------------
# HTTP, the one place


def _connection(scheme: str, host: str, port: int | None,
                timeout: float) -> http.client.HTTPConnection:
    cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    return cls(host, port, timeout=timeout)


def _exchange(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None,
              headers: dict) -> tuple[int, dict[str, str], bytes, bool]:
    """One request on ``conn``: (status, lower-cased headers, body, the server closes)."""
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, resp.will_close


@dataclass
class Reply:
    """An HTTP answer; ``status`` 0 when there was none (refused, reset, timeout: ``error``)."""

    status: int
    headers: dict[str, str]
    body: bytes
    error: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8")) if self.body else None

    def reason(self) -> str:
        if self.status == 0:
            return self.error
        text = self.body[:160].decode("utf-8", "replace").strip().replace("\n", " ")
        return f"HTTP {self.status}" + (f": {text}" if text else "")


def request(method: str, url: str, body: bytes | None = None, *,
            content_type: str = "application/json", timeout: float = 5.0) -> Reply:
    """One HTTP exchange on a fresh connection (never through a proxy); never raises for a
    failed exchange (status 0 and ``error``)."""
    conn = None
    try:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"unknown url type: {url!r}")
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        conn = _connection(u.scheme, u.hostname, u.port, timeout)
        status, hdrs, data, _ = _exchange(conn, method, path, body, headers)
        return Reply(status, hdrs, data)
    except (OSError, http.client.HTTPException, ValueError) as e:  # refused, reset, timeout
        reason = getattr(e, "reason", e)
        return Reply(0, {}, b"", reason if isinstance(reason, str)
                     else f"{type(reason).__name__}: {reason}")
    finally:
        if conn is not None:
            conn.close()


class _HTTPError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}")


# ---------------------------------------------------------------------------
# the HTTP transport


class HttpTransport:
    """The emitter's HTTP transport: posts NDJSON batches of wire events to the sidecar.

    ``send(kind, rows)`` posts at once (blocking, on one keep-alive
    connection), retrying as the module says, and counts the outcome; it
    never raises.  ``on_settled(n)`` hears of every batch sent or given up on.
    """

    def __init__(self, base_url: str, timeout_s: float = 5, max_retries: int = 5,
                 backoff_s: float = 0.1, max_backoff_s: float = 5.0,
                 headers: dict[str, str] | None = None, keep_rejections: int = 100,
                 on_settled: Any = None) -> None:
        u = urllib.parse.urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self._scheme, self._host, self._port = u.scheme, u.hostname, u.port
        self._prefix = u.path.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self._headers = {"Content-Type": "application/x-ndjson", **(headers or {})}
        self._on_settled = on_settled
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self.stopping = False            # closing: back off briefly
        self.rejections: deque = deque(maxlen=keep_rejections)
        self.counts = {"sent_batches": 0, "sent_rows": 0, "accepted": 0, "rejected": 0,
                       "late": 0, "duplicates": 0, "failed_rows": 0, "failed_batches": 0,
                       "retries": 0, "unserializable": 0}
        self.last_error: str | None = None

    def send(self, kind: str, rows: list[dict]) -> None:
        try:
            self._post_batch(kind, rows)
        finally:
            if self._on_settled is not None:
                self._on_settled(len(rows))

    def stats(self) -> dict:
        with self._lock:
            return dict(self.counts)

    def close(self) -> None:
        self._reset_conn()

    def _post_batch(self, kind: str, batch: list[dict]) -> None:
        lines: list[str] = []
        ids: list[Any] = []
        for ev in batch:
            try:
                lines.append(_encode(ev))
                ids.append(ev.get("event_id"))
            except (TypeError, ValueError) as e:
                self._count("unserializable", 1)
                self._count("failed_rows", 1)
                self.last_error = f"event {ev.get('event_id')!r} is not JSON: {e}"
        if not lines:
            return
        body = ("\n".join(lines) + "\n").encode("utf-8")
        delay = self.backoff_s
        for attempt in range(self.max_retries + 1):
            try:
                reply = self._request(_PATHS[kind], body)
            except _HTTPError as e:
                self.last_error = str(e)
                if e.status != 429 and e.status < 500:   # the batch itself is refused
                    break
            except (OSError, http.client.HTTPException) as e:  # connection refused, reset, timeout
                self.last_error = f"{type(e).__name__}: {e}"
                self._reset_conn()
            else:
                self._record(reply, len(lines), ids)
                return
            if attempt == self.max_retries:
                break
            self._count("retries", 1)
            self._sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)
        with self._lock:
            self.counts["failed_batches"] += 1
            self.counts["failed_rows"] += len(lines)

    def _sleep(self, s: float) -> None:
        """Back off ``s`` seconds (shortened to 0.05 s once closing)."""
        time.sleep(min(s, 0.05) if self.stopping else s)

    def _record(self, reply: bytes, n: int, ids: list) -> None:
        try:
            rep = json.loads(reply) if reply else {}
        except ValueError:
            rep = {}
        if not isinstance(rep, dict):
            rep = {}
        rejected = rep.get("rejected") or []
        accepted = rep.get("accepted", n - len(rejected))
        with self._lock:
            st = self.counts
            st["sent_batches"] += 1
            st["sent_rows"] += n
            st["accepted"] += int(accepted or 0)
            st["rejected"] += len(rejected)
            st["late"] += int(rep.get("late") or 0)
            st["duplicates"] += int(rep.get("duplicates") or 0)
        for r in rejected:
            if isinstance(r, dict):
                i = r.get("index")
                eid = ids[i] if isinstance(i, int) and 0 <= i < len(ids) else None
                self.rejections.append({**r, "event_id": eid})

    def _count(self, key: str, n: int) -> None:
        with self._lock:
            self.counts[key] += n

    def _reset_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # pragma: no cover
                pass
            self._conn = None

    def _request(self, path: str, body: bytes) -> bytes:
        if self._conn is None:
            self._conn = _connection(self._scheme, self._host, self._port, self.timeout_s)
        try:
            status, _, data, will_close = _exchange(self._conn, "POST", self._prefix + path,
                                                    body, self._headers)
        except BaseException:
            self._reset_conn()
            raise
        if will_close:
            self._reset_conn()
        if status >= 300:
            raise _HTTPError(status, data)
        return data


# ---------------------------------------------------------------------------
# the client: emitters over the HTTP transport, in a background thread


class KpiClient:
    """Buffers events and posts them to the kpistream sidecar from a background thread.

    Standard library only (``http.client`` keep-alive connections, ``threading``,
    ``asyncio``), so any Python server can use it::

        from kpistream.wire.client import KpiClient

        kpi = KpiClient("http://127.0.0.1:8000")
        kpi.log_inference(request_id=rid, model="churn", model_version="7", variant="primary",
                          latency_ms=12.5, status="ok", prediction={"label": 1, "score": 0.83})
        ...
        kpi.log_feedback(rid, "label", 1)
        kpi.close()                 # or: with KpiClient(...) as kpi: ...

    ``log_*`` only append to an in-memory buffer (they never block on the
    network and never raise for a full buffer: the event is dropped and
    counted).  A background thread runs one :class:`~kpistream.wire.emitter.Emitter`
    per kind over the HTTP transport (:class:`HttpTransport`): NDJSON batches of
    at most ``batch_rows`` events go to ``POST /v1/events`` (inference) and
    ``POST /v1/feedback`` when ``batch_rows`` are waiting or every ``flush_s``.
    Connection errors, timeouts, 429 and 5xx replies are retried with
    exponential backoff (``max_retries`` times, then the batch is dropped and
    counted); another 4xx drops the batch at once.  Each reply's
    ``{"accepted": n, "rejected": [{"index", "field", "reason", "message"}]}`` is
    counted, and the most recent rejections are kept in :attr:`KpiClient.rejections`
    (with the ``event_id`` of the rejected row).  Events are validated by the
    server, not here.

    Missing fields are filled: ``type``, ``ts`` (epoch milliseconds, now) and
    ``event_id`` (unique: a random per-client prefix and a counter).
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", batch_rows: int = 500,
                 flush_s: float = 0.5, max_buffer: int = 100_000, timeout_s: float = 5,
                 max_retries: int = 5, backoff_s: float = 0.1, max_backoff_s: float = 5.0,
                 headers: dict[str, str] | None = None, keep_rejections: int = 100) -> None:
        if batch_rows < 1 or max_buffer < 1:
            raise ValueError("batch_rows and max_buffer must be >= 1")
        if not flush_s > 0:
            raise ValueError(f"flush_s must be > 0, got {flush_s}")
        self.transport = HttpTransport(base_url, timeout_s, max_retries, backoff_s,
                                       max_backoff_s, headers, keep_rejections,
                                       on_settled=self._settle)
        self.base_url = base_url.rstrip("/")
        self.batch_rows = int(batch_rows)
        self.flush_s = float(flush_s)
        self.max_buffer = int(max_buffer)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self._id_prefix = secrets.token_hex(8) + "-"
        self._ids = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # one emitter per kind; posts happen one at a time in the background thread
        self._em = {k: Emitter(self.transport, kind=k, buffer_rows=self.max_buffer,
                               flush_rows=self.batch_rows, flush_s=self.flush_s,
                               max_in_flight=1, send_timeout_s=None,
                               batch_rows=self.batch_rows, lock=self._lock,
                               label=f"client {k}")
                    for k in _KINDS}
        self._enqueued = 0      # events accepted into the buffer, ever
        self._settled = 0       # events sent, or given up on
        self._dropped = 0
        self._closed = False
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,),
                                        name="kpistream-client", daemon=True)
        self._thread.start()
        started.wait()
        ref = weakref.ref(self)
        self._atexit = lambda: (lambda c: c is not None and c.close(timeout=2.0))(ref())
        atexit.register(self._atexit)

    @property
    def rejections(self) -> deque:
        """The most recent rejections (with the ``event_id`` of the rejected row)."""
        return self.transport.rejections

    @property
    def last_error(self) -> str | None:
        return self.transport.last_error

    # ------------------------------------------------------------------ logging
    def log_inference(self, **fields: Any) -> bool:
        """Buffer one inference event (the wire fields of DESIGN.md); False if dropped."""
        return self._put("inference", fields)

    def log_feedback(self, request_id: str, kind: str, value: Any = None, **fields: Any) -> bool:
        """Buffer one feedback event for ``request_id``; False if dropped.

        ``value`` may be omitted for clicks and conversions (it means true).
        """
        fields["request_id"] = request_id
        fields["kind"] = kind
        if value is not None:
            fields["value"] = value
        return self._put("feedback", fields)

    def _put(self, kind: str, ev: dict) -> bool:
        ev.setdefault("type", kind)
        if "ts" not in ev:
            ev["ts"] = time.time_ns() // 1_000_000
        em = self._em[kind]
        with self._lock:
            if self._closed or self._buffered() >= self.max_buffer:
                self._dropped += 1
                return False
            if "event_id" not in ev:
                self._ids += 1
                ev["event_id"] = f"{self._id_prefix}{self._ids}"
            buf = em.buf
            buf.append(ev)
            self._enqueued += 1
            full = len(buf) == self.batch_rows
        if full:
            self._loop.call_soon_threadsafe(em.wake.set)
        return True

    def _buffered(self) -> int:
        return sum(len(em.buf) for em in self._em.values())

    # ------------------------------------------------------------- flush/close
    def flush(self, timeout: float | None = None) -> bool:
        """Send everything buffered now; True when it was sent (or given up on) in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._enqueued
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._flush_all(), self._loop)
        with self._cond:
            while self._settled < target and self._thread.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return self._settled >= target

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush, then stop the background thread. Later events are dropped and counted."""
        if self._closed:
            return
        self.flush(timeout)
        with self._cond:
            self._closed = True
        self.transport.stopping = True
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        self._thread.join(timeout)
        self.transport.close()
        try:
            atexit.unregister(self._atexit)
        except Exception:  # pragma: no cover
            pass

    def __enter__(self) -> "KpiClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def stats(self) -> dict:
        """Counters: buffered, sent (batches, rows), accepted, rejected, late, duplicates,
        dropped (buffer full or closed), failed (given up after retries), retries."""
        st = self.transport.stats()
        with self._lock:
            st["dropped"] = self._dropped
            st["buffered"] = self._buffered()
        st["last_error"] = self.transport.last_error
        return st

    # -------------------------------------------------------- background thread
    def _settle(self, n: int) -> None:
        with self._cond:
            self._settled += n
            self._cond.notify_all()

    def _run(self, started: threading.Event) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)

        def begin() -> None:
            for em in self._em.values():
                em.start()
            started.set()

        loop.call_soon(begin)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _flush_all(self) -> None:
        for kind in _KINDS:   # inference first
            await self._em[kind].flush_once()

    async def _shutdown(self) -> None:
        for kind in _KINDS:
            await self._em[kind].aclose(timeout=self.timeout_s)
        asyncio.get_running_loop().stop()
