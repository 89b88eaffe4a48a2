"""Alert notifications out of the pipeline (:class:`Notifier`, :class:`WebhookSender`): log
lines, webhooks, and a pollable log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, deque
from typing import Any, Callable, Iterable

from kpistream.alerts.rules import Notification
from kpistream.alerts.watcher import WebhookSpec

log = logging.getLogger("kpistream.alerts")

__all__ = ["Notifier", "WebhookSender", "notification_id"]


def notification_id(n: Notification) -> str:
    """A stable id of one transition (rule, series, state, since)."""
    raw = json.dumps([n.rule, sorted(n.series.items()), n.state, n.since])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _url_key(url: str) -> str:
    """A webhook's name in saved state: a hash, since its URL may hold a secret."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def _body(n: Notification, seq: int) -> dict:
    return {"id": notification_id(n), "seq": seq, "kind": "kpistream.alert", **n.as_dict()}


class WebhookSender:
    """One URL: a bounded queue and a thread that posts with retries and backoff."""

    def __init__(self, spec: WebhookSpec, max_queue: int = 10_000,
                 sleep: Callable[[float], None] | None = None) -> None:
        self.spec = spec
        self.counters: Counter = Counter()
        self.last_error: str | None = None
        self._q: deque = deque(maxlen=max_queue)
        #: the notification ``seq`` through which every posting is over (delivered, refused
        #: or given up): what a restarted publisher need not post again
        self.done_seq = 0
        self._cv = threading.Condition()
        self._stop = False
        self._sleep = sleep
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"kpistream-webhook-{spec.url[:40]}")
        self._thread.start()

    def submit(self, body: dict) -> None:
        with self._cv:
            if len(self._q) == self._q.maxlen:
                self.counters["dropped"] += 1
            self._q.append(body)
            self.counters["queued"] += 1
            self._cv.notify()

    @property
    def pending(self) -> int:
        return len(self._q)

    def _wait(self, seconds: float) -> bool:
        """Sleep (interruptible by close); False when closing."""
        if self._sleep is not None:
            self._sleep(seconds)
            return not self._stop
        with self._cv:
            self._cv.wait_for(lambda: self._stop, timeout=seconds)
        return not self._stop

    def _post(self, body: dict, attempt: int) -> tuple[bool, bool, str]:
        """(delivered, retry, note) for one attempt."""
        data = json.dumps(body, default=str).encode()
        headers = {"content-type": "application/json", "user-agent": "kpistream",
                   "x-kpistream-notification-id": body["id"],
                   "x-kpistream-attempt": str(attempt + 1), **dict(self.spec.headers)}
        req = urllib.request.Request(self.spec.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.spec.timeout_s) as resp:
                resp.read()
                return True, False, str(resp.status)
        except urllib.error.HTTPError as e:
            retry = e.code in (408, 429) or e.code >= 500
            return False, retry, f"HTTP {e.code}"
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            return False, True, f"{type(e).__name__}: {getattr(e, 'reason', e)}"

    def _deliver(self, body: dict) -> None:
        for attempt in range(self.spec.retries + 1):
            ok, retry, note = self._post(body, attempt)
            if ok:
                self.counters["delivered"] += 1
                return
            self.last_error = note
            self.counters["attempt_errors"] += 1
            if not retry:
                self.counters["rejected"] += 1
                log.warning("webhook %s rejected notification %s: %s", self.spec.url,
                            body["id"], note)
                return
            if attempt == self.spec.retries:
                break
            self.counters["retries"] += 1
            delay = min(self.spec.max_backoff_s, self.spec.backoff_s * 2 ** attempt)
            if not self._wait(delay * random.uniform(0.8, 1.2)):
                self.counters["abandoned"] += 1
                return
        self.counters["failed"] += 1
        log.warning("webhook %s: notification %s not delivered after %d attempts (%s)",
                    self.spec.url, body["id"], self.spec.retries + 1, self.last_error)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._q or self._stop)
                if self._stop and not self._q:
                    return
                if self._stop:
                    return
                body = self._q.popleft()
            try:
                self._deliver(body)
            except Exception as e:  # never let the sender die
                self.counters["failed"] += 1
                self.last_error = repr(e)
            self.done_seq = max(self.done_seq, int(body.get("seq", 0)))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the queue is empty (tests, shutdown)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self._q and self.counters["queued"] == (
                    self.counters["delivered"] + self.counters["failed"]
                    + self.counters["rejected"] + self.counters["dropped"]
                    + self.counters["abandoned"]):
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self.counters["abandoned"] += len(self._q)   # never delivered: counted
            self._q.clear()
            self._cv.notify_all()
        self._thread.join(timeout=2)


class Notifier:
    """Fans notifications out to the log, webhooks and the pollable notification log.

    A plain module (no Ray).  :class:`Notifier` takes each
    :class:`kpistream.alerts.rules.Notification` from the publisher's tick and returns
    at once: webhooks are posted by one background thread per URL from a bounded
    queue, so a slow or dead receiver never blocks the pipeline (a full queue
    drops the oldest and counts it).

    Webhook delivery: ``POST`` of the notification as JSON (the
    :meth:`Notification.as_dict` body plus ``id``, ``kind`` and ``sent_at``), with
    headers ``content-type: application/json``, ``x-kpistream-notification-id``
    (stable per transition: receivers can deduplicate on it) and
    ``x-kpistream-attempt``.  A 2xx answer is a delivery; a 4xx other than 408 /
    429 is final (counted as ``rejected``, not retried: the receiver said no); a
    connection error, a timeout, 408, 429 or a 5xx is retried up to ``retries``
    times, waiting ``backoff * 2**attempt`` seconds (at most ``max_backoff``)
    with +-20 % jitter.  Each transition is posted until one attempt succeeds, so
    a receiver that answers gets it exactly once (unless it times out after
    accepting, which the id header lets it detect).

    The notification log (:meth:`Notifier.since`) is the hook for later actions
    (retraining, canary): an actor polls ``since(seq)`` and gets every
    notification after ``seq`` with its sequence number, bounded to the latest
    ``log_size``.
    """

    def __init__(self, webhooks: Iterable[WebhookSpec] = (), log_transitions: bool = True,
                 log_size: int = 1000) -> None:
        self.senders = [WebhookSender(w) for w in webhooks]
        self.log_transitions = log_transitions
        self.seq = 0
        self.epoch = uuid.uuid4().hex[:12]   # a new log: readers of an old one start over
        self.recent: deque[tuple[int, dict]] = deque(maxlen=log_size)
        self.counts: Counter = Counter()   # (rule, state) -> notifications
        self._lock = threading.Lock()

    def __call__(self, n: Notification) -> None:
        with self._lock:
            self.seq += 1
            seq = self.seq
            body = _body(n, seq)
            self.recent.append((seq, body))
            self.counts[(n.rule, n.state)] += 1
        if self.log_transitions:
            summary = n.annotations.get("summary") or ""
            log.warning("alert %s %s -> %s %s %s", n.rule, n.previous, n.state,
                        ",".join(f"{k}={v}" for k, v in n.series.items()), summary)
        for s in self.senders:
            if n.state in s.spec.states:
                s.submit(body)

    def log(self, seq: int = 0, epoch: str | None = None, limit: int = 1000) -> dict:
        """``{"epoch", "last_seq", "items"}``: the transitions after ``seq`` of log
        ``epoch`` (all of this log's when ``epoch`` is another one's)."""
        with self._lock:
            after = seq if epoch == self.epoch else 0
            return {"epoch": self.epoch, "last_seq": self.seq,
                    "items": [b for s, b in self.recent if s > after][:limit]}

    def since(self, seq: int = 0, limit: int = 1000) -> list[dict]:
        """Notifications after ``seq`` (oldest first), each with its ``seq``."""
        with self._lock:
            return [b for s, b in self.recent if s > seq][:limit]

    def to_dict(self) -> dict[str, Any]:
        """The log (epoch, sequence, recent notifications), the counts, and how far each
        webhook got, as JSON-able data (:meth:`restore`)."""
        with self._lock:
            return {"epoch": self.epoch, "seq": self.seq, "recent": [b for _, b in self.recent],
                    "counts": [[r, st, n] for (r, st), n in self.counts.items()],
                    "webhooks": {_url_key(s.spec.url): s.done_seq for s in self.senders}}

    def restore(self, data: dict[str, Any]) -> int:
        """Continue the log of a restarted publisher (same epoch, so readers carry on
        from their sequence number) and post again what a webhook had not finished when
        the state was saved (the notification id lets receivers drop a repeat).  Returns
        the notifications queued again."""
        with self._lock:
            self.epoch = str(data["epoch"])
            self.seq = int(data["seq"])
            self.recent.clear()
            self.recent.extend((int(b["seq"]), b) for b in data.get("recent", []))
            self.counts = Counter({(r, st): int(n) for r, st, n in data.get("counts", [])})
            bodies = list(self.recent)
        done = data.get("webhooks", {})
        again = 0
        for s in self.senders:
            # a webhook added since is not sent the old notifications
            s.done_seq = int(done.get(_url_key(s.spec.url), data["seq"]))
            for seq, body in bodies:
                if seq > s.done_seq and body.get("state") in s.spec.states:
                    s.submit(body)
                    again += 1
        return again

    def stats(self) -> dict[str, Any]:
        return {"seq": self.seq,
                "notifications": {f"{r}|{s}": n for (r, s), n in self.counts.items()},
                "webhooks": [{"url": s.spec.url, "pending": s.pending, **dict(s.counters),
                              "last_error": s.last_error} for s in self.senders]}

    def flush(self, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        return all(s.flush(max(0.0, end - time.monotonic())) for s in self.senders)

    def close(self) -> None:
        for s in self.senders:
            s.close()
