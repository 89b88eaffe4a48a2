"""The live demo's traffic driver: :func:`run_traffic` sends predictions and delayed labels
to the sidecar and injects a drift (the terminal view is :mod:`app.demo.view`)."""

from __future__ import annotations

import functools
import heapq
import json
import math
import os
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TextIO

from app.demo.view import (DISPLAY_METRICS, DISPLAY_WINDOWS, alert_lines, fetch_rows, kpi_table,
                           summary_lines)
from kpistream.wire.client import Reply, request

__all__ = [
    "DEFAULT_BASE_URL", "REGIONS", "DISPLAY_METRICS", "DISPLAY_WINDOWS", "DRIFT_FEATURES",
    "TrafficSummary", "default_data_dir", "default_tracking_uri", "demo_split", "demo_dataset",
    "drift_rows", "run_traffic", "main",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
REGIONS: tuple[str, ...] = ("eu", "us", "apac")
#: substrings of the feature names the drift shifts
DRIFT_FEATURES: tuple[str, ...] = ("texture", "area")
DEMO_TEST_SIZE = 0.3
_MAX_FEEDBACK_BATCH = 1000
_FEEDBACK_ATTEMPTS = 3
_MAX_LAG_S = 1.0


# --------------------------------------------------------------------- where things live

def default_data_dir() -> Path:
    """The project's data folder: ``$KPISTREAM_DATA_DIR``, else ``./data`` (absolute)."""
    return Path(os.environ.get("KPISTREAM_DATA_DIR") or "data").expanduser().resolve()


def default_tracking_uri() -> str:
    """The MLflow tracking (and registry) URI of the demo.

    ``$MLFLOW_TRACKING_URI`` if set, else the embedded SQLite store
    ``sqlite:///<data dir>/mlflow.db`` (absolute path, so Ray workers whatever
    their working directory find the same file).
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + str(default_data_dir() / "mlflow.db")


# --------------------------------------------------------------------------- data

@functools.lru_cache(maxsize=4)
def _split(seed: int):
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.data, data.target, test_size=DEMO_TEST_SIZE, random_state=seed,
        stratify=data.target)
    names = tuple(str(n) for n in data.feature_names)
    for a in (x_tr, x_te, y_tr, y_te):
        a.setflags(write=False)
    return x_tr, x_te, y_tr, y_te, names


def demo_split(seed: int = 0):
    """``(X_train, X_test, y_train, y_test, feature_names)`` of the demo data set.

    scikit-learn's bundled Wisconsin breast-cancer data (569 rows, 30 numeric
    features, no download), binary; label 1 (benign) is the positive class.
    A stratified 70/30 split with ``random_state=seed``: deterministic, so the
    model (trained on seed 0) and the traffic driver agree on the held-out rows.
    Arrays are read-only (cached); copy before changing them.
    """
    x_tr, x_te, y_tr, y_te, names = _split(int(seed))
    return x_tr, x_te, y_tr, y_te, list(names)


def demo_dataset(seed: int = 0):
    """The held-out rows: ``(X_test, y_test, feature_names)`` (see :func:`demo_split`)."""
    _, x_te, _, y_te, names = demo_split(seed)
    return x_te, y_te, names


def drift_rows(x, feature_names: Sequence[str], shift: float = 2.0, reference=None):
    """``x`` with the ``DRIFT_FEATURES`` columns shifted up by ``shift`` standard deviations.

    The standard deviations are those of ``reference`` (default: ``x``).
    Returns a new array.
    """
    import numpy as np

    x = np.array(x, dtype=float, copy=True)
    ref = x if reference is None else np.asarray(reference, dtype=float)
    ref = ref.reshape(-1, len(feature_names))
    cols = [i for i, n in enumerate(feature_names) if any(s in n for s in DRIFT_FEATURES)]
    x[..., cols] += shift * ref[:, cols].std(axis=0)
    return x


# ---------------------------------------------------------------------- bookkeeping

@dataclass
class TrafficSummary:
    """What one :func:`run_traffic` did (also printed at the end)."""

    sent: int = 0                 #: prediction requests sent (the readiness probe included)
    ok: int = 0                   #: 2xx replies
    errors: int = 0               #: failed requests (HTTP error or no answer)
    error_reasons: Counter = field(default_factory=Counter)
    skipped: int = 0              #: time slots skipped because the senders were > 1 s late
    no_request_id: int = 0        #: 2xx replies without x-request-id (no feedback possible)
    drifted: int = 0              #: requests sent with drifted inputs
    feedback_posted: int = 0      #: feedback events the sidecar accepted
    feedback_rejected: int = 0    #: feedback events it rejected (bad rows)
    feedback_failed: int = 0      #: feedback events given up after failed posts
    feedback_dropped: int = 0     #: labels not yet due when the run was stopped
    feedback_post_errors: int = 0  #: failed POST /v1/feedback calls (retried up to 3 times)
    correct: dict = field(default_factory=lambda: {"before": [0, 0], "after": [0, 0]})
    started: float = 0.0          #: time.monotonic() when traffic started
    elapsed_s: float = 0.0        #: the whole run (after the sidecar answered)
    sending_s: float = 0.0        #: the part spent sending (the rate is sent / sending_s)
    interrupted: bool = False     #: stopped by Ctrl-C or stop_event
    last_rejection: str = ""
    last_feedback_error: str = ""
    #: rule or detector -> seconds into the run when it was first seen firing / in drift
    alerts_fired: dict = field(default_factory=dict)

    def accuracy(self, phase: str) -> float | None:
        """Client-side accuracy of the replies, ``"before"`` or ``"after"`` the drift."""
        right, n = self.correct[phase]
        return right / n if n else None


class _Feedback:
    """Labels waiting for their delay: a heap of (due, seq, request_id, label)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.heap: list[tuple[float, int, str, Any]] = []
        self.retry: list[tuple[int, list[dict]]] = []   # (attempts, events)
        self.seq = 0

    def add(self, due: float, request_id: str, label: Any) -> None:
        with self.lock:
            self.seq += 1
            heapq.heappush(self.heap, (due, self.seq, request_id, label))

    def pop_due(self, now: float) -> list[tuple[str, Any]]:
        out = []
        with self.lock:
            while self.heap and self.heap[0][0] <= now:
                _, _, rid, label = heapq.heappop(self.heap)
                out.append((rid, label))
        return out

    def __len__(self) -> int:
        with self.lock:
            return len(self.heap) + sum(len(ev) for _, ev in self.retry)


def _feedback_event(request_id: str, label: Any) -> dict:
    return {"type": "feedback", "event_id": f"fb-{request_id}", "request_id": request_id,
            "ts": int(time.time() * 1000), "kind": "label", "value": label}


# ---------------------------------------------------------------------- the driver

class _Driver:
    """One :func:`run_traffic` run.

    Threads: ``n_threads`` senders (each takes the next time slot ``i /
    rate_per_s``, sleeps until it and sends; a slot more than a second late is
    skipped and counted, so a slow server never causes a burst), one feedback
    poster (every ``feedback_every_s`` it posts the labels that are due), and
    the calling thread, which prints the live view and handles Ctrl-C.
    Everything is stdlib (threads; HTTP through
    :func:`kpistream.wire.client.request`) plus scikit-learn's bundled data
    set, imported lazily: no Ray, no MLflow.
    """

    def __init__(self, *, base_url: str, model_path: str, rate_per_s: float,
                 duration_s: float | None, drift_at_s: float | None,
                 label_delay_s: tuple[float, float], seed: int, display_every_s: float | None,
                 stop_event: threading.Event | None, out: TextIO, n_threads: int,
                 regions: Sequence[str], drift_regions: Iterable[str] | None,
                 drift_shift: float, feedback_every_s: float, wait_ready_s: float,
                 timeout_s: float, model: str | None, tracking_uri: str | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be > 0, got {rate_per_s!r}")
        lo, hi = (float(label_delay_s[0]), float(label_delay_s[1]))
        if not 0 <= lo <= hi:
            raise ValueError(f"label_delay_s must be (low, high) with 0 <= low <= high, "
                             f"got {label_delay_s!r}")
        if not regions:
            raise ValueError("regions must not be empty")
        self.base = base_url.rstrip("/")
        self.model_url = self.base + "/" + model_path.strip("/") if model_path.strip("/") \
            else self.base + "/"
        self.rate = float(rate_per_s)
        self.duration = duration_s
        self.drift_at = drift_at_s
        self.delay = (lo, hi)
        self.seed = seed
        self.display_every = display_every_s
        self.stop_event = stop_event
        self.out = out
        self.n_threads = max(1, int(n_threads))
        self.regions = tuple(regions)
        self.drift_regions = frozenset(regions if drift_regions is None else drift_regions)
        self.feedback_every = max(0.01, float(feedback_every_s))
        self.wait_ready = wait_ready_s
        self.timeout = timeout_s
        self.model = model
        self.tracking_uri = tracking_uri
        self.clock = clock

        x, y, names = demo_dataset(0)
        self.names = list(names)
        self.y = [int(v) for v in y]
        self.x = [[float(v) for v in row] for row in x]
        self.x_drift = [[float(v) for v in row] for row in drift_rows(x, names, drift_shift)]

        self.summary = TrafficSummary()
        self.lock = threading.Lock()
        self.feedback = _Feedback()
        self.stop = threading.Event()        # senders stop
        self.fb_stop = threading.Event()     # feedback poster stops (after a last flush)
        self.next_slot = 0
        self.t0 = 0.0
        self.drift_announced = False

    # -- output
    def say(self, text: str) -> None:
        try:
            self.out.write(text + "\n")
            self.out.flush()
        except (ValueError, OSError):  # closed stream: keep going silently
            pass

    # -- requests
    def payload(self, rng: random.Random, drifted: bool) -> tuple[dict, int, str]:
        i = rng.randrange(len(self.y))
        region = rng.choice(self.regions)
        drifted = drifted and region in self.drift_regions
        row = self.x_drift[i] if drifted else self.x[i]
        feats = {n: round(v, 6) for n, v in zip(self.names, row)}
        return {"features": feats, "region": region}, self.y[i], "after" if drifted else ""

    def send(self, payload: dict) -> Reply:
        body = json.dumps(payload, separators=(",", ":")).encode()
        return request("POST", self.model_url, body, timeout=self.timeout)

    def record(self, resp: Reply, label: int, phase: str, rng: random.Random) -> None:
        s = self.summary
        with self.lock:
            s.sent += 1
            if phase:
                s.drifted += 1
            if not resp.ok:
                s.errors += 1
                s.error_reasons[f"HTTP {resp.status}" if resp.status else
                                resp.error.split(":")[0] or "no answer"] += 1
                return
            s.ok += 1
        try:
            data = resp.json()
        except (ValueError, UnicodeDecodeError):
            data = None
        rid = resp.headers.get("x-request-id")
        if not rid and isinstance(data, dict):
            rid = data.get("request_id")
        pred = data.get("prediction") if isinstance(data, dict) else None
        if isinstance(pred, dict):
            pred = pred.get("label")
        with self.lock:
            if pred is not None:
                c = s.correct["after" if phase else "before"]
                c[0] += int(str(pred).lower() in (str(label), "true" if label else "false"))
                c[1] += 1
            if not rid:
                s.no_request_id += 1
                return
        self.feedback.add(self.clock() + rng.uniform(*self.delay), str(rid), label)

    def slot_rng(self, i: int) -> random.Random:
        """Slot ``i``'s own generator: row, region and label delay depend on (seed, i) only,
        not on which sender thread takes the slot."""
        return random.Random(self.seed * 1_000_003 + i)

    def sender(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                i = self.next_slot
                self.next_slot += 1
            at = i / self.rate
            if self.duration is not None and at >= self.duration:
                return
            wait = self.t0 + at - self.clock()
            if wait > 0:
                if self.stop.wait(wait):
                    return
            elif -wait > _MAX_LAG_S:   # far behind schedule: skip rather than burst
                with self.lock:
                    self.summary.skipped += 1
                continue
            drifted = self.drift_at is not None and at >= self.drift_at
            rng = self.slot_rng(i)
            payload, label, phase = self.payload(rng, drifted)
            self.record(self.send(payload), label, phase, rng)

    # -- feedback
    def post_feedback(self, events: list[dict]) -> bool:
        body = ("\n".join(json.dumps(e, separators=(",", ":")) for e in events) + "\n").encode()
        resp = request("POST", self.base + "/v1/feedback", body,
                     content_type="application/x-ndjson", timeout=self.timeout)
        if not resp.ok:
            with self.lock:
                self.summary.feedback_post_errors += 1
                self.summary.last_feedback_error = resp.reason()[:200]
            if 400 <= resp.status < 500 and resp.status not in (404, 408, 429):
                with self.lock:   # the sidecar refuses the batch as such: no use retrying
                    self.summary.feedback_failed += len(events)
                return True
            return False
        try:
            data = resp.json()
        except (ValueError, UnicodeDecodeError):
            data = None
        accepted, rejected = len(events), []
        if isinstance(data, dict):
            accepted = int(data.get("accepted", accepted) or 0)
            rejected = data.get("rejected") or []
        with self.lock:
            self.summary.feedback_posted += accepted
            self.summary.feedback_rejected += len(rejected)
            if rejected:
                self.summary.last_rejection = str(rejected[0])[:200]
        return True

    def flush_feedback(self, now: float | None = None) -> None:
        due = self.feedback.pop_due(self.clock() if now is None else now)
        batches: list[tuple[int, list[dict]]] = []
        with self.feedback.lock:
            batches.extend(self.feedback.retry)
            self.feedback.retry = []
        events = [_feedback_event(rid, label) for rid, label in due]
        for j in range(0, len(events), _MAX_FEEDBACK_BATCH):
            batches.append((0, events[j:j + _MAX_FEEDBACK_BATCH]))
        for attempts, evs in batches:
            if self.post_feedback(evs):
                continue
            if attempts + 1 >= _FEEDBACK_ATTEMPTS:
                with self.lock:
                    self.summary.feedback_failed += len(evs)
            else:
                with self.feedback.lock:
                    self.feedback.retry.append((attempts + 1, evs))

    def feedback_loop(self) -> None:
        while not self.fb_stop.wait(self.feedback_every):
            self.flush_feedback()
        self.flush_feedback()   # what is due now; the rest is dropped (counted)

    # -- readiness
    def wait_until_ready(self) -> bool:
        """Send the first request until the model answers; False if stopped or timed out."""
        rng = self.slot_rng(0)
        t_end = self.clock() + self.wait_ready
        last_msg = -math.inf
        first = True
        while True:
            payload, label, phase = self.payload(rng, False)
            resp = self.send(payload)
            if resp.ok:
                if not first:
                    self.say(f"the model at {self.model_url} answers; starting traffic")
                self.record(resp, label, phase, rng)
                return True
            now = self.clock()
            if now >= t_end:
                self.say(f"gave up: the model at {self.model_url} did not answer within "
                         f"{self.wait_ready:.0f} s ({resp.reason()}).")
                return False
            if now - last_msg >= 10 or first:
                self.say(f"waiting for the model at {self.model_url} ({resp.reason()}); is the "
                         f"sidecar up (serve run configs/serve.yaml)? retrying for up to "
                         f"{max(0.0, t_end - now):.0f} s ...")
                last_msg = now
            first = False
            if self.interrupt_wait(1.0):
                return False

    def interrupt_wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True as soon as the caller's stop_event is set."""
        end = self.clock() + seconds
        while True:
            if self.stop_event is not None and self.stop_event.is_set():
                return True
            left = end - self.clock()
            if left <= 0:
                return False
            time.sleep(min(0.05, left))

    # -- live view (app.demo.view)
    def elapsed(self) -> float:
        return self.clock() - self.t0 if self.t0 else 0.0

    def status_line(self) -> str:
        s = self.summary
        el = max(1e-9, self.clock() - self.t0)
        rate_el = max(1e-9, s.sending_s or el)
        with self.lock:
            sent, ok, err, posted = s.sent, s.ok, s.errors, s.feedback_posted
            rej, failed = s.feedback_rejected, s.feedback_failed
        pending = len(self.feedback)
        if self.drift_at is None:
            drift = "no drift"
        elif el < self.drift_at:
            drift = f"drift in {self.drift_at - el:.0f}s"
        else:
            drift = "DRIFTED"
        extra = f", rejected {rej}" if rej else ""
        extra += f", failed {failed}" if failed else ""
        return (f"[{el:6.1f}s] sent {sent} ({sent / rate_el:.1f}/s)  ok {ok}  errors {err}  | "
                f"feedback posted {posted}, pending {pending}{extra}  | {drift}")

    def display(self) -> None:
        rows, problem = fetch_rows(self.base, self.model, self.timeout)
        lines = [self.status_line()]
        if problem:
            lines.append("  " + problem)
        else:
            lines.extend(kpi_table(rows, int(time.time() * 1000)))
            lines.extend(alert_lines(self.base, self.timeout, self.elapsed,
                                     self.summary.alerts_fired))
        self.say("\n".join(lines))

    # -- the whole run
    def banner(self) -> None:
        uri = self.tracking_uri or default_tracking_uri()
        drift = (f"drift at {self.drift_at:g} s ({'+'.join(DRIFT_FEATURES)} features shifted, "
                 f"regions {', '.join(sorted(self.drift_regions))})"
                 if self.drift_at is not None else "no drift")
        dur = f"for {self.duration:g} s" if self.duration is not None else "until Ctrl-C"
        self.say("\n".join([
            f"kpistream demo traffic: {self.rate:g} req/s to {self.model_url} {dur}; labels "
            f"{self.delay[0]:g}-{self.delay[1]:g} s after each reply; {drift}",
            "where to look:",
            "  Ray dashboard (Serve tab):  http://127.0.0.1:8265",
            f"  Prometheus exposition:      {self.base}/metrics",
            f"  KPI series (JSON):          {self.base}/v1/series?metric=accuracy&resolution=10s",
            f"  alerts and detectors:       {self.base}/v1/alerts",
            f"  MLflow runs and aliases:    mlflow ui --backend-store-uri {uri}"
            "   (then http://127.0.0.1:5000)",
            "Ctrl-C stops (labels already due are posted first).",
        ]))

    def finish(self) -> None:
        s = self.summary
        s.elapsed_s = self.clock() - self.t0 if self.t0 else 0.0
        if self.t0 and not s.sending_s:
            s.sending_s = s.elapsed_s
        self.say("\n".join(summary_lines(s)))

    def run(self) -> TrafficSummary:
        self.banner()
        senders: list[threading.Thread] = []
        poster: threading.Thread | None = None
        s = self.summary
        try:
            if not self.wait_until_ready():
                s.interrupted = bool(self.stop_event is not None and self.stop_event.is_set())
                if not s.interrupted:
                    raise ConnectionError(f"the demo model at {self.model_url} is not answering "
                                          f"after {self.wait_ready:.0f} s")
                return s
            self.t0 = s.started = self.clock()
            self.next_slot = 1           # the readiness probe used slot 0
            poster = threading.Thread(target=self.feedback_loop, name="kps-feedback",
                                      daemon=True)
            poster.start()
            for k in range(self.n_threads):
                t = threading.Thread(target=self.sender, name=f"kps-sender-{k}", daemon=True)
                t.start()
                senders.append(t)
            next_display = self.t0 + (self.display_every or math.inf)
            while any(t.is_alive() for t in senders):
                if self.stop_event is not None and self.stop_event.is_set():
                    s.interrupted = True
                    break
                now = self.clock()
                if self.drift_at is not None and not self.drift_announced \
                        and now - self.t0 >= self.drift_at:
                    self.drift_announced = True
                    self.say(f"*** drift injected at {self.drift_at:g} s: "
                             f"{'+'.join(DRIFT_FEATURES)} features now read high ***")
                if now >= next_display:
                    self.display()
                    next_display = max(next_display + self.display_every, self.clock())
                time.sleep(0.05)
            self.stop.set()
            for t in senders:
                t.join()
            s.sending_s = self.clock() - self.t0
            if not s.interrupted:
                # natural end: wait for the labels still on their way
                while len(self.feedback) and not (
                        self.stop_event is not None and self.stop_event.is_set()):
                    time.sleep(0.05)
                s.interrupted = bool(self.stop_event is not None and self.stop_event.is_set())
                if self.display_every and not s.interrupted:
                    self.display()     # the last view, all labels posted
        except KeyboardInterrupt:
            s.interrupted = True
        finally:
            self.stop.set()
            for t in senders:
                t.join(self.timeout + 1)
            if poster is not None:
                self.fb_stop.set()
                poster.join(2 * self.timeout + 1)
            with self.feedback.lock:
                s.feedback_dropped = len(self.feedback.heap)
                s.feedback_failed += sum(len(ev) for _, ev in self.feedback.retry)
            self.finish()
        return s


def run_traffic(base_url: str = DEFAULT_BASE_URL, model_path: str = "/demo",
                rate_per_s: float = 50, duration_s: float | None = None,
                drift_at_s: float | None = 60, label_delay_s: tuple[float, float] = (2, 10),
                seed: int = 0, display_every_s: float | None = 2,
                stop_event: threading.Event | None = None, out: TextIO = sys.stdout, *,
                n_threads: int = 4, regions: Sequence[str] = REGIONS,
                drift_regions: Iterable[str] | None = None, drift_shift: float = 2.0,
                feedback_every_s: float = 0.5, wait_ready_s: float = 120,
                timeout_s: float = 5.0, model: str | None = "kpistream-demo",
                tracking_uri: str | None = None) -> TrafficSummary:
    """Drive the demo: predictions at ``rate_per_s``, delayed labels, a drift, a live view.

    Sends ``{"features": {name: value}, "region": r}`` built from the held-out
    rows (``regions`` uniformly) to ``base_url + model_path`` with
    ``n_threads`` concurrent senders, remembers each reply's ``x-request-id``
    and the row's true label, and posts one ``label`` feedback event per reply
    after a uniform random delay in ``label_delay_s`` (NDJSON batches to
    ``/v1/feedback`` every ``feedback_every_s``), as a real label source would.
    The rows are the model's held-out test rows (:func:`demo_dataset`, the
    split :mod:`app.demo.model` trains on), so the true labels are known.

    The drift: from ``drift_at_s`` (None: never) the texture and area features
    (``DRIFT_FEATURES``) of the rows sent to ``drift_regions`` (None: every
    region) are shifted up by ``drift_shift`` standard deviations, as if a new
    scanner calibration read them high.  The model, trained before, then calls
    many benign rows malignant: on the held-out rows accuracy falls from about
    0.96 to about 0.61.

    Every ``display_every_s`` (None: never) it prints the latest ``10s`` and
    ``1m`` KPI windows of ``model`` per variant from ``/v1/series`` with the
    counts so far (:mod:`app.demo.view`).

    Runs ``duration_s`` seconds (None: until Ctrl-C or ``stop_event``).  At a
    natural end it waits for the labels still due; on Ctrl-C / ``stop_event``
    it posts only the labels already due and counts the rest as dropped.
    Before starting it retries the first request for up to ``wait_ready_s``
    (the sidecar may still be starting) and raises ``ConnectionError`` if the
    model never answers.  HTTP errors during the run are counted, never fatal.
    Returns a :class:`TrafficSummary` (also printed).  ``tracking_uri`` only
    feeds the printed ``mlflow ui`` command.
    """
    return _Driver(base_url=base_url, model_path=model_path, rate_per_s=rate_per_s,
                   duration_s=duration_s, drift_at_s=drift_at_s, label_delay_s=label_delay_s,
                   seed=seed, display_every_s=display_every_s, stop_event=stop_event, out=out,
                   n_threads=n_threads, regions=regions, drift_regions=drift_regions,
                   drift_shift=drift_shift, feedback_every_s=feedback_every_s,
                   wait_ready_s=wait_ready_s, timeout_s=timeout_s, model=model,
                   tracking_uri=tracking_uri).run()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m app.demo.traffic``: run the driver from a terminal."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m app.demo.traffic",
                                 description="Drive the live kpistream demo (see the module "
                                             "docstring).")
    ap.add_argument("--url", default=DEFAULT_BASE_URL, help="the sidecar (Serve HTTP) base URL")
    ap.add_argument("--model-path", default="/demo")
    ap.add_argument("--rate", type=float, default=50, help="requests per second")
    ap.add_argument("--duration", type=float, default=None, help="seconds (default: until Ctrl-C)")
    ap.add_argument("--drift-at", type=float, default=60, help="seconds; negative: no drift")
    ap.add_argument("--label-delay", type=float, nargs=2, default=(2, 10), metavar=("LO", "HI"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--display-every", type=float, default=2)
    ap.add_argument("--tracking-uri", default=None, help="shown in the mlflow ui hint")
    a = ap.parse_args(argv)
    try:
        s = run_traffic(a.url, a.model_path, a.rate, a.duration,
                        None if a.drift_at < 0 else a.drift_at, tuple(a.label_delay), a.seed,
                        a.display_every, tracking_uri=a.tracking_uri)
    except ConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if s.sent else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
