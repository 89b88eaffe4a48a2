"""A small Python client for servers outside Ray: log inferences and feedback to the sidecar.

Standard library only (``urllib`` for the address, ``http.client`` for
keep-alive connections, ``threading``), so any Python server can use it::

    from kpistream.wire.client import KpiClient

    kpi = KpiClient("http://127.0.0.1:8000")
    kpi.log_inference(request_id=rid, model="churn", model_version="7", variant="primary",
                      latency_ms=12.5, status="ok", prediction={"label": 1, "score": 0.83})
    ...
    kpi.log_feedback(rid, "label", 1)
    kpi.close()                 # or: with KpiClient(...) as kpi: ...

``log_*`` only append to an in-memory buffer (they never block on the
network and never raise for a full buffer: the event is dropped and
counted).  A background thread posts NDJSON batches of at most
``batch_rows`` events to ``POST /v1/events`` (inference) and
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

from __future__ import annotations

import atexit
import http.client
import json
import secrets
import threading
import time
import urllib.parse
import weakref
from collections import deque
from typing import Any

__all__ = ["KpiClient"]

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


class _HTTPError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}")


class KpiClient:
    """Buffers events and posts them to the kpistream sidecar from a background thread."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", batch_rows: int = 500,
                 flush_s: float = 0.5, max_buffer: int = 100_000, timeout_s: float = 5,
                 max_retries: int = 5, backoff_s: float = 0.1, max_backoff_s: float = 5.0,
                 headers: dict[str, str] | None = None, keep_rejections: int = 100) -> None:
        u = urllib.parse.urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        if batch_rows < 1 or max_buffer < 1:
            raise ValueError("batch_rows and max_buffer must be >= 1")
        if not flush_s > 0:
            raise ValueError(f"flush_s must be > 0, got {flush_s}")
        self.base_url = base_url.rstrip("/")
        self._scheme, self._host, self._port = u.scheme, u.hostname, u.port
        self._prefix = u.path.rstrip("/")
        self.batch_rows = int(batch_rows)
        self.flush_s = float(flush_s)
        self.max_buffer = int(max_buffer)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self._headers = {"Content-Type": "application/x-ndjson", **(headers or {})}
        self._id_prefix = secrets.token_hex(8) + "-"
        self._ids = 0
        self._bufs: dict[str, deque] = {k: deque() for k in _KINDS}
        self._n_buffered = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._enqueued = 0      # events accepted into the buffer, ever
        self._settled = 0       # events sent, or given up on
        self._flush_wanted = False
        self._closed = False
        self._stop = False
        self._conn: http.client.HTTPConnection | None = None
        self.rejections: deque = deque(maxlen=keep_rejections)
        self._stats = {"sent_batches": 0, "sent_rows": 0, "accepted": 0, "rejected": 0,
                       "late": 0, "duplicates": 0, "dropped": 0, "failed_rows": 0,
                       "failed_batches": 0, "retries": 0, "unserializable": 0}
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="kpistream-client", daemon=True)
        self._thread.start()
        ref = weakref.ref(self)
        self._atexit = lambda: (lambda c: c is not None and c.close(timeout=2.0))(ref())
        atexit.register(self._atexit)

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
        with self._lock:
            if self._closed or self._n_buffered >= self.max_buffer:
                self._stats["dropped"] += 1
                return False
            if "event_id" not in ev:
                self._ids += 1
                ev["event_id"] = f"{self._id_prefix}{self._ids}"
            self._bufs[kind].append(ev)
            self._n_buffered += 1
            self._enqueued += 1
            if len(self._bufs[kind]) == self.batch_rows:
                self._cond.notify_all()
        return True

    # ------------------------------------------------------------- flush/close
    def flush(self, timeout: float | None = None) -> bool:
        """Send everything buffered now; True when it was sent (or given up on) in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._enqueued
            self._flush_wanted = True
            self._cond.notify_all()
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
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._conn is not None:
            self._conn.close()
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
        with self._lock:
            st = dict(self._stats)
            st["buffered"] = self._n_buffered
        st["last_error"] = self.last_error
        return st

    # -------------------------------------------------------- background thread
    def _run(self) -> None:
        while True:
            with self._cond:
                deadline = time.monotonic() + self.flush_s
                while not (self._stop or self._flush_wanted
                           or any(len(b) >= self.batch_rows for b in self._bufs.values())):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                stop = self._stop
                # woken early by a full batch: send the full batches, the rest waits its age
                full_only = not (stop or self._flush_wanted) and time.monotonic() < deadline
                self._flush_wanted = False
            self._send_all(full_only)
            if stop:
                return

    def _send_all(self, full_only: bool = False) -> None:
        """Post the buffered events, batch by batch (inference first)."""
        for kind in _KINDS:
            while True:
                with self._lock:
                    buf = self._bufs[kind]
                    n = min(len(buf), self.batch_rows)
                    if full_only and n < self.batch_rows:
                        n = 0
                    batch = [buf.popleft() for _ in range(n)]
                    self._n_buffered -= n
                if not batch:
                    break
                try:
                    self._post_batch(kind, batch)
                finally:
                    with self._cond:
                        self._settled += len(batch)
                        self._cond.notify_all()

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
            self._stats["failed_batches"] += 1
            self._stats["failed_rows"] += len(lines)

    def _sleep(self, s: float) -> None:
        """Back off ``s`` seconds (shortened to 0.05 s once closing)."""
        time.sleep(min(s, 0.05) if self._stop else s)

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
            st = self._stats
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
            self._stats[key] += n

    # -------------------------------------------------------------------- HTTP
    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = (http.client.HTTPSConnection if self._scheme == "https"
                   else http.client.HTTPConnection)
            self._conn = cls(self._host, self._port, timeout=self.timeout_s)
        return self._conn

    def _reset_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # pragma: no cover
                pass
            self._conn = None

    def _request(self, path: str, body: bytes) -> bytes:
        conn = self._connection()
        try:
            conn.request("POST", self._prefix + path, body=body, headers=self._headers)
            resp = conn.getresponse()
            data = resp.read()
        except BaseException:
            self._reset_conn()
            raise
        if resp.will_close:
            self._reset_conn()
        if resp.status >= 300:
            raise _HTTPError(resp.status, data)
        return data
