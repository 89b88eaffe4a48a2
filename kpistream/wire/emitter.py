"""The emitter (:class:`Emitter`): buffer rows in process, flush them by size or age to a
transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from typing import Any, Callable, Protocol

log = logging.getLogger("kpistream.monitor")


class Transport(Protocol):
    """Where the emitter's batches go (only ``send`` is required)."""

    def send(self, kind: str, batch: Any) -> Any: ...


class Emitter:
    """Bounded buffer + flush task + in-flight bound + counters, over one transport.

    ``build(rows) -> batch`` turns the buffered rows into the batch to send
    (``len(batch)`` rows; None: send the list itself).  ``buffer_rows`` bounds
    the buffer (a full buffer drops the row and counts it); the buffer is
    flushed when it holds ``flush_rows`` rows or every ``flush_s`` seconds;
    at most ``max_in_flight`` sends are outstanding (past that the flush task
    awaits the oldest, up to ``send_timeout_s`` (None: no limit), then gives
    up on it and counts a send error).  A failed or timed-out send goes again
    after a backoff (``retry_backoff_s``, doubling, at most 5 s), up to
    ``max_retries`` times, while the rows waiting for a retry fit in
    ``buffer_rows``: at least once; receivers drop re-deliveries by event id.
    Only then are rows counted as lost.  While a send waits to go again, newer
    rows stay in the buffer (nothing overtakes it, so no receiver's watermark
    turns it late); a long outage fills the buffer, and rows beyond it are
    dropped and counted.  With ``batch_rows`` a send carries at
    most that many rows, and a flush started by size (not age) sends only
    full batches: the rest waits for its age (``flush_rows`` is then at least
    ``batch_rows``).  ``lock`` (a
    ``threading.Lock``) guards the buffer when other threads append to it
    (they hold it too).  ``name`` identifies this emitter in reports,
    ``stats`` is what :meth:`report` sends (default :meth:`stats`) and
    ``label`` prefixes the logged errors.  Errors are counted, never raised.

    Ray-free and transport-agnostic (the Ray shard actors, HTTP, a test's list).
    The caller's hot path appends a row to :attr:`Emitter.buf` itself (see
    :meth:`Emitter.put` for the exact steps); everything else happens in a flush
    task in the caller's event loop, never on the request path.

    A *transport* is any object with ``send(kind, batch)`` returning an awaitable
    (a coroutine, a future, a Ray ``ObjectRef``) or the result itself (``None``:
    sent, nothing to count).  Optional: ``n_shards`` (batches are split by shard,
    :func:`kpistream.wire.batch.route`, before sending when it is > 1),
    ``ready()`` (False or raising: the rows stay buffered; may be a coroutine
    function), ``reset()`` (called after a failed send), ``report(name, stats)``
    (the counters, about once a second).  A send's result (or a list of them)
    that is a dict with ``accepted`` / ``late`` / ``duplicates`` / ``rejected``
    is counted.
    """

    def __init__(self, transport: Any, build: Callable[[list], Any] | None = None, *,
                 kind: str = "inference", buffer_rows: int = 65536, flush_rows: int = 512,
                 flush_s: float = 0.05, max_in_flight: int = 8,
                 send_timeout_s: float | None = 30.0, batch_rows: int | None = None,
                 lock: Any = None, name: str = "", stats: Callable[[], dict] | None = None,
                 label: str = "", max_retries: int = 8, retry_backoff_s: float = 0.1) -> None:
        if buffer_rows < 1 or flush_rows < 1 or max_in_flight < 1:
            raise ValueError("buffer_rows, flush_rows and max_in_flight must be >= 1")
        if batch_rows is not None and batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        if not flush_s > 0:
            raise ValueError(f"flush_s must be > 0, got {flush_s}")
        self.transport = transport
        self.build = build
        self.kind = kind
        self.cap = int(buffer_rows)
        self.flush_rows = max(int(flush_rows), batch_rows or 0)   # the size trigger
        self.flush_s = float(flush_s)
        self.max_in_flight = int(max_in_flight)
        self.send_timeout_s = None if send_timeout_s is None else float(send_timeout_s)
        self.batch_rows = None if batch_rows is None else int(batch_rows)
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self._flushing: asyncio.Lock | None = None   # one flush at a time (keeps the order)
        self.name = name
        self.label = label
        self._report_stats = stats or self.stats
        # what the caller's hot path touches: buf, cap, flush_rows, wake, running, dropped
        self.buf: list = []
        self.running = False               # the flush task is alive
        self.wake = asyncio.Event()        # replaced by one of the flush task's loop
        self.dropped = 0
        self.closed = False
        self.task: asyncio.Task | None = None
        self._inflight: deque = deque()    # [future, rows, settled, part, attempt]
        # failed sends waiting to go again: (due, attempt, part), oldest first
        self._retry: deque = deque()
        self.max_retries = int(max_retries)
        self.retry_backoff_s = float(retry_backoff_s)
        self.pending = 0                   # sends neither answered nor abandoned
        self.c: Counter = Counter()
        self.last_error: str | None = None
        self._last_log = 0.0
        self._last_report = 0.0

    # ------------------------------------------------------------ the hot path
    def put(self, row: Any) -> bool:
        """Buffer one row (False: the buffer is full, the row is dropped and counted).

        Callers on a hot path inline these same steps instead of calling this.
        """
        if not self.running:
            self.start()
        buf = self.buf
        if len(buf) < self.cap:
            buf.append(row)
            if len(buf) >= self.flush_rows:
                self.wake.set()
            return True
        self.dropped += 1
        return False

    # ----------------------------------------------------------------- control
    def start(self) -> None:
        """Start the flush task in the running event loop (not after :meth:`aclose`)."""
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.task = loop.create_task(self._loop(), name="kpistream-monitor-flush")
        self.running = True
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if task is self.task:
            self.running = False

    async def flush(self, wait: bool = True, timeout: float | None = None) -> None:
        """Flush the buffer now; with ``wait``, also wait for every outstanding send (and
        send the failed ones again, without waiting for their backoff)."""
        await self.flush_once(by_size=False)
        if wait:
            await self.drain(timeout)
            if self._retry:
                if self._flushing is None:
                    self._flushing = asyncio.Lock()
                async with self._flushing:
                    await self._flush_once(False, force_retries=True)
                await self.drain(timeout)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop the flush task after a last flush (sends awaited up to ``timeout`` s)."""
        if self.closed:
            return
        self.closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        task = self.task
        if task is not None and not task.done():
            self.wake.set()          # the loop ends after the flush it is in
            await asyncio.wait({task}, timeout=timeout)
            if not task.done():
                task.cancel()
        try:
            await asyncio.wait_for(self.flush(wait=True), max(deadline - loop.time(), 0.001))
        except asyncio.TimeoutError:
            self.note_error(f"closing: sends still outstanding after {timeout} s")

    def stats(self) -> dict:
        """Buffered, dropped, flushed, sent, in flight, send errors, what the receivers said."""
        c = self.c
        return {"buffered": len(self.buf), "buffer_rows": self.cap, "dropped": self.dropped,
                "flushed_rows": c["flushed_rows"], "flushed_batches": c["flushes"],
                "sent_batches": c["sent_batches"], "sent_rows": c["sent_rows"],
                "in_flight": self.pending,
                "send_errors": c["send_errors"], "send_timeouts": c["send_timeouts"],
                "send_retries": c["send_retries"], "retry_waiting_rows": sum(
                    len(p) for _, _, p in self._retry),
                "lost_rows": c["lost_rows"],
                "accepted": c["accepted"], "rejected": c["rejected"], "late": c["late"],
                "duplicates": c["duplicates"], "last_error": self.last_error}

    def note_error(self, msg: str) -> None:
        """Keep ``msg`` as the last error; log it at most once a minute."""
        self.last_error = msg
        now = time.monotonic()
        if now - self._last_log >= 60.0:
            self._last_log = now
            log.warning("kpistream monitor (%s): %s", self.label, msg)

    # ------------------------------------------------------------- the flushing
    def report(self) -> None:
        """Hand the counters to the transport (for /metrics) about once a second."""
        now = time.monotonic()
        report = getattr(self.transport, "report", None)
        if report is None or now - self._last_report < 1.0:
            return
        self._last_report = now
        try:
            report(self.name, self._report_stats())
        except Exception as e:  # the receiver may be away: counted, never raised
            self.c["report_errors"] += 1
            self.last_error = f"report: {type(e).__name__}: {e}"

    async def _loop(self) -> None:
        wake = self.wake
        period = self.flush_s
        while not self.closed:
            self.report()
            by_size = True
            if len(self.buf) < self.flush_rows:
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), period)
                except asyncio.TimeoutError:
                    by_size = False
            if not self.closed and not await self.flush_once(by_size):
                await asyncio.sleep(period)   # the transport is not ready: no busy loop

    async def flush_once(self, by_size: bool = False) -> bool:
        """Send what is buffered (``by_size`` with ``batch_rows``: the full batches); False
        when the transport is not ready (the rows stay).  Never raises."""
        if self._flushing is None:
            self._flushing = asyncio.Lock()
        async with self._flushing:
            return await self._flush_once(by_size)

    async def _flush_once(self, by_size: bool, force_retries: bool = False) -> bool:
        self._reap()
        if not self.buf and not self._retry:
            return True
        tr = self.transport
        try:
            ready = getattr(tr, "ready", None)
            if ready is not None:
                r = ready()
                if not (await r if asyncio.iscoroutine(r) else r):
                    return False
            n_shards = int(getattr(tr, "n_shards", None) or 1)
        except Exception as e:
            self.note_error(f"sink not ready: {type(e).__name__}: {e}")
            return False
        await self._resend_due(force_retries)
        if self._retry:
            # in order: nothing newer overtakes a failed send (a receiver's watermark would
            # make it late); meanwhile the buffer holds the new rows, within its bound
            return True
        size = self.batch_rows
        with self._lock:
            rows = self.buf
            if size is not None and by_size:   # the full batches (the rest waits for its age)
                k = len(rows) // size * size
                rows, self.buf = rows[:k], rows[k:]
            else:
                self.buf = []
        if not rows:
            return True
        chunks = [rows] if size is None else [rows[i:i + size] for i in range(0, len(rows), size)]
        for chunk in chunks:
            try:
                batch = chunk if self.build is None else self.build(chunk)
            except Exception as e:  # a bug, not bad data: count the rows as lost
                self.c["lost_rows"] += len(chunk)
                self.note_error(f"building the batch failed: {type(e).__name__}: {e}")
                continue
            c = self.c
            c["flushes"] += 1
            c["flushed_rows"] += len(chunk)
            if not len(batch):
                continue
            if n_shards > 1:   # imported here: the HTTP client needs no numpy / pandas
                from kpistream.wire.batch import route

                parts = [p for _, _, p in route(batch, n_shards)]
            else:
                parts = [batch]
            for part in parts:
                await self._send(part)
        return True

    async def _resend_due(self, force: bool = False) -> None:
        """Send again the failed sends whose backoff is over (``force``: all of them)."""
        now = time.monotonic()
        for _ in range(len(self._retry)):      # one pass: what fails again waits its turn
            if not (force or self._retry[0][0] <= now):
                break
            _, attempt, part = self._retry.popleft()
            self.c["retried_rows"] += len(part)
            await self._send(part, attempt)

    async def _send(self, part: Any, attempt: int = 0) -> None:
        n = len(part)
        await self._limit_in_flight()
        try:
            res = self.transport.send(self.kind, part)
            fut = asyncio.ensure_future(res) if hasattr(res, "__await__") else None
        except Exception as e:
            self._send_failed(n, e, part, attempt)
            return
        c = self.c
        c["sent_batches"] += 1
        c["sent_rows"] += n
        if fut is None:
            self._count(res)
        else:
            entry = [fut, n, False, part, attempt]
            self._inflight.append(entry)
            self.pending += 1
            fut.add_done_callback(lambda f, entry=entry: self._on_done(entry))

    def _reap(self) -> None:
        q = self._inflight
        while q and (q[0][2] or q[0][0].done()):
            q.popleft()

    async def _limit_in_flight(self) -> None:
        q = self._inflight
        while True:
            self._reap()
            if len(q) < self.max_in_flight:
                return
            entry = q[0]
            done, _ = await asyncio.wait({entry[0]}, timeout=self.send_timeout_s)
            if not done and not entry[2]:
                entry[2] = True   # abandoned: a late result is ignored
                self.pending -= 1
                self.c["send_timeouts"] += 1
                self._send_failed(entry[1], TimeoutError(
                    f"a send was outstanding for more than {self.send_timeout_s} s"),
                    entry[3], entry[4])

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for the outstanding sends (up to ``timeout`` s)."""
        futs = {e[0] for e in self._inflight if not e[2] and not e[0].done()}
        if futs:
            await asyncio.wait(futs, timeout=timeout)
        self._reap()

    def _on_done(self, entry: list) -> None:
        if entry[2]:
            return
        entry[2] = True
        self.pending -= 1
        fut = entry[0]
        if fut.cancelled():
            self._send_failed(entry[1], asyncio.CancelledError("send cancelled"), entry[3],
                              entry[4])
            return
        exc = fut.exception()
        if exc is not None:
            self._send_failed(entry[1], exc, entry[3], entry[4])
            return
        self._count(fut.result())

    def _count(self, res: Any) -> None:
        """Count a receiver's report(s): ``accepted``, ``late``, ``duplicates``, ``rejected``."""
        for rep in res if isinstance(res, list) else (res,):
            if isinstance(rep, dict):
                c = self.c
                c["accepted"] += int(rep.get("accepted", 0))
                c["late"] += int(rep.get("late", 0))
                c["duplicates"] += int(rep.get("duplicates", 0))
                c["rejected"] += len(rep.get("rejected") or ())

    def _send_failed(self, rows: int, e: BaseException, part: Any = None,
                     attempt: int = 0) -> None:
        """A send failed or timed out: it goes again after a backoff (the receiver drops
        what it already applied by event id), up to ``max_retries`` times while the rows
        waiting for a retry stay within the buffer's bound; past that the rows are lost
        and counted."""
        self.c["send_errors"] += 1
        waiting = sum(len(p) for _, _, p in self._retry)
        if part is not None and attempt < self.max_retries and not self.closed \
                and waiting + rows <= self.cap:
            delay = min(self.retry_backoff_s * (2 ** attempt), 5.0)
            self._retry.append((time.monotonic() + delay, attempt + 1, part))
            self.c["send_retries"] += 1
        else:
            self.c["lost_rows"] += rows
        reset = getattr(self.transport, "reset", None)
        if reset is not None:
            try:
                reset()
            except Exception:
                pass
        self.note_error(f"send failed: {type(e).__name__}: {e}")


__all__ = ["Emitter", "Transport"]
