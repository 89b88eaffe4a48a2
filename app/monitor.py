"""The monitoring wrapper for a user's Ray Serve deployment (DESIGN.md, data path step 1, "Emit").

Users subclass :class:`MonitoredModel` and implement ``async predict(payload)``;
the model code stays theirs::

    from ray import serve
    from app.monitor import MonitoredModel

    @serve.deployment
    class Churn(MonitoredModel):
        def __init__(self):
            super().__init__(model="churn", model_version="7")
            self.clf = load_model()

        async def predict(self, payload: dict):
            p = float(self.clf.predict_proba([payload["x"]])[0, 1])
            return {"label": int(p >= 0.5), "score": p}

        def segments(self, payload):            # optional: series labels
            return {"region": payload.get("region", "unknown")}

Each HTTP request (``__call__``) gets a request id (the caller's
``x-request-id`` header if it is 1..256 characters, else a per-replica random
prefix plus a counter), is timed around ``predict`` and answered with
``{"request_id": ..., "prediction": ...}`` and the header ``x-request-id``
(500 and ``{"request_id", "error"}`` when ``predict`` raises; 400 when the body
is not JSON, which is not an inference and records nothing).  Behind Ray
Serve's HTTP proxy every request already carries ``x-request-id`` (the
caller's, or one the proxy made) and the proxy puts it on the reply, so there
the wrapper uses that id and adds no second header.  The body's
``request_id`` is always the id the events carry.

A caller that already has a request id (the experiment ingress, :mod:`app.ingress`,
through a Serve DeploymentHandle) calls ``await handle.infer.remote(payload,
request_id)``: the same event, the same labels (this replica's ``variant``
and ``model_version``), and ``{"request_id", "prediction", "variant",
"model_version"}`` back, so a primary and a shadow scoring one request emit
events with the same ``request_id``.  ``predict`` raising
:class:`ModelUnavailable` (no model to answer with) is a 503 on HTTP, re-raised
by ``infer``, and records no event.  :class:`AliasFollowingModel` serves an
MLflow registered model's alias (``champion``, ``challenger``) and swaps in the
version the alias moves to, live.

What the request path does for monitoring is one tuple appended to a list:
no validation, no hashing, no dicts.  The reply never waits on kpistream; a
full buffer (``buffer_rows``) drops the event and counts it.

A background task in the replica's event loop (started on the first request)
flushes the buffer when it holds ``flush_rows`` rows or every ``flush_ms``:
rows become normalized records (:mod:`kpistream.wire.batch`; predictions are
normalized exactly as :mod:`kpistream.wire.schema` does, by a small fast
normalizer that hands anything unusual to ``schema.validate_rows``), one
:class:`~kpistream.wire.batch.InferenceBatch`, split by shard
(``hash(request_id) % N``), and each part goes to its shard actor with
``ingest_inference.remote(part)``.  At most ``max_in_flight`` sends are
outstanding; past that the flush task (never a request) awaits the oldest.
Send errors are counted (:meth:`MonitoredModel.monitor_stats`), never raised.

The sink is pluggable: any object with ``n_shards`` and ``send(kind, batch)``
returning an awaitable, a Ray ``ObjectRef`` or ``None`` (each batch it gets
holds one shard's rows: ``hash(request_id) % n_shards`` is the same for all
of them).  The default :class:`ShardSink` finds the named shard actors
(``kpistream-shard-<i>`` in namespace ``kpistream``) on first use.  This
module imports Ray only inside :class:`ShardSink`, so the wrapper is testable
without a cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import math
import os
import re
import secrets
import time
from collections import Counter, deque
from contextvars import ContextVar
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from kpistream.wire.batch import BASE_LABELS, InferenceBatch, shard_of, split_by_shard
from kpistream.wire.schema import (MAX_FEATURES, MAX_RANKING, MAX_SCORES, MAX_SEGMENTS, MAX_STR,
                              validate_rows)

log = logging.getLogger("kpistream.monitor")

REQUEST_ID_HEADER = "x-request-id"
_RID_HEADER = b"x-request-id"
SHARDS_ENV = "KPISTREAM_SHARDS"   #: shard count for ``n_shards=None`` (else discovered)

#: the version of the model that served the current request, when the model can change under
#: it (set by :meth:`AliasFollowingModel.loaded`; read back by the request path after predict)
_SERVED_VERSION: ContextVar[str | None] = ContextVar("kpistream_served_version", default=None)


class ModelUnavailable(RuntimeError):
    """There is no model to answer with (e.g. the MLflow alias it follows does not exist yet).

    Raised by ``predict`` (or :meth:`AliasFollowingModel.loaded`): the HTTP path
    answers 503 with the message, :meth:`MonitoredModel.infer` raises it to the
    caller (through a DeploymentHandle it arrives as a ``RayTaskError`` that is
    also an instance of this class), and no inference event is recorded.
    """


_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_perf_ns = time.perf_counter_ns


class _Reply(Response):
    """A JSON reply with its headers prebuilt (cheaper than ``JSONResponse(..., headers=)``)."""

    media_type = "application/json"

    def __init__(self, body: bytes, status_code: int, request_id: bytes | None) -> None:
        self.status_code = status_code
        self.background = None
        self.body = body
        self.raw_headers = [(b"content-length", str(len(body)).encode()),
                            (b"content-type", b"application/json")]
        if request_id is not None:
            self.raw_headers.append((_RID_HEADER, request_id))


def _in_serve_replica() -> bool:
    """True inside a Ray Serve replica (found without importing Ray)."""
    import sys

    ctx = sys.modules.get("ray.serve.context")
    try:
        return ctx is not None and ctx._get_internal_replica_context() is not None
    except Exception:  # pragma: no cover - a Ray without that helper
        return False


# ---------------------------------------------------------------------------
# sinks


class ShardSink:
    """Sends batches to the named shard actors (``actors.remote``), found on first use.

    ``n_shards=None`` takes the count from the environment variable
    ``KPISTREAM_SHARDS`` or, failing that, discovers it: the consecutive
    shard actors ``kpistream-shard-0, 1, ...`` that exist, accepted once the
    publisher exists (it is created after every shard) or the count is the
    same on two probes.  Until the actors are found :meth:`ready` is false
    (and the monitor keeps its rows buffered); look-ups are retried at most
    every ``retry_s``.
    """

    def __init__(self, n_shards: int | None = None, namespace: str | None = None,
                 retry_s: float = 1.0) -> None:
        if n_shards is None and os.environ.get(SHARDS_ENV):
            n_shards = int(os.environ[SHARDS_ENV])
        if n_shards is not None and n_shards < 1:
            raise ValueError(f"n_shards must be >= 1, got {n_shards}")
        self._n = n_shards
        self._namespace = namespace
        self._retry_s = retry_s
        self._handles: list | None = None
        self._next_try = 0.0
        self._probed: int | None = None
        self.last_error: str | None = None

    @property
    def n_shards(self) -> int | None:
        return len(self._handles) if self._handles is not None else self._n

    def ready(self) -> bool:
        if self._handles is not None:
            return True
        now = time.monotonic()
        if now < self._next_try:
            return False
        self._next_try = now + self._retry_s
        try:
            self._handles = self._lookup()
        except Exception as e:  # not there yet: retried later
            self.last_error = f"{type(e).__name__}: {e}"
            return False
        return self._handles is not None

    def reset(self) -> None:
        """Forget the handles (after a failed send); the next use looks them up again."""
        self._handles = None

    def _lookup(self) -> list | None:
        import ray

        from actors.remote import NAMESPACE, PUBLISHER, shard_name

        ns = self._namespace or NAMESPACE
        if self._n is not None:
            return [ray.get_actor(shard_name(i), namespace=ns) for i in range(self._n)]
        handles = []
        while True:
            try:
                handles.append(ray.get_actor(shard_name(len(handles)), namespace=ns))
            except ValueError:
                break
        if not handles:
            raise LookupError(f"no shard actor {shard_name(0)!r} in namespace {ns!r}")
        try:
            ray.get_actor(PUBLISHER, namespace=ns)
            complete = True
        except ValueError:
            complete = self._probed == len(handles)
        self._probed = len(handles)
        if not complete:
            self._next_try = 0.0 if self._retry_s <= 0 else time.monotonic() + self._retry_s
            raise LookupError(f"found {len(handles)} shard actors; waiting for the count to settle")
        return handles

    def send(self, kind: str, batch: Any) -> Any:
        if self._handles is None and not self.ready():
            raise LookupError(self.last_error or "kpistream shard actors not found")
        handles = self._handles
        n = len(handles)
        owner = shard_of(batch.request_id, n)
        first = int(owner[0])
        if n == 1 or bool((owner == first).all()):
            return self._call(handles[first], kind, batch)
        refs = [self._call(handles[i], kind, part)
                for i, part in enumerate(split_by_shard(batch, n)) if len(part)]
        return asyncio.gather(*refs)

    def report(self, emitter: str, stats: dict) -> None:
        """The emitter's counters to shard 0 (fire and forget), for /metrics."""
        if self._handles is None and not self.ready():
            return
        self._handles[0].report_emitter.remote(emitter, stats)

    @staticmethod
    def _call(handle: Any, kind: str, batch: Any) -> Any:
        if kind == "inference":
            return handle.ingest_inference.remote(batch)
        if kind == "feedback":
            return handle.ingest_feedback.remote(batch)
        raise ValueError(f"kind must be 'inference' or 'feedback', not {kind!r}")


# ---------------------------------------------------------------------------
# the fast normalizer (the same results as kpistream.wire.schema, for the common shapes)

_SEG_KEY_MATCH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*").fullmatch
_BASE = frozenset(BASE_LABELS)
_GOOD_SEG_KEYS: set[str] = set()
_UNSUPPORTED = object()   # "ask the schema": an unusual or invalid shape
_FLOAT_INT_BITS = 53      # ints that are exactly a float


def _label(v: Any) -> Any:
    t = type(v)
    if t is str:
        return v if 0 < len(v) <= MAX_STR else _UNSUPPORTED
    if t is bool:
        return "true" if v else "false"
    if t is int:
        if v.bit_length() <= 850:
            s = str(v)
            if len(s) <= MAX_STR:
                return s
    return _UNSUPPORTED


def _number(v: Any) -> Any:
    """A finite float (pydantic strict float: float, or an int)."""
    t = type(v)
    if t is float:
        return v if math.isfinite(v) else _UNSUPPORTED
    if t is int and v.bit_length() <= _FLOAT_INT_BITS:
        return float(v)
    return _UNSUPPORTED


def _prediction(p: Any) -> Any:
    """(pred_label, pred_score, pred_value, ranking), or _UNSUPPORTED."""
    t = type(p)
    if t is str or t is bool or t is int:
        lab = _label(p)
        return _UNSUPPORTED if lab is _UNSUPPORTED else (lab, None, None, None)
    if t is float:
        return (None, None, p, None) if math.isfinite(p) else _UNSUPPORTED
    if t is not dict:
        return _UNSUPPORTED
    if "ranking" in p:
        r = p["ranking"]
        if len(p) != 1 or type(r) is not list or len(r) > MAX_RANKING:
            return _UNSUPPORTED
        items = []
        for x in r:
            tx = type(x)
            if tx is str:
                if not 0 < len(x) <= MAX_STR:
                    return _UNSUPPORTED
                items.append(x)
            elif tx is int and x.bit_length() <= 850:
                s = str(x)
                if len(s) > MAX_STR:
                    return _UNSUPPORTED
                items.append(s)
            else:
                return _UNSUPPORTED
        if len(set(items)) != len(items):
            return _UNSUPPORTED
        return (None, None, None, items)
    if "label" not in p:
        return _UNSUPPORTED
    lab = _label(p["label"])
    if lab is _UNSUPPORTED:
        return _UNSUPPORTED
    score = scores = None
    for k, v in p.items():
        if k == "label":
            continue
        if k == "score":
            if v is not None:
                score = _number(v)
                if score is _UNSUPPORTED:
                    return _UNSUPPORTED
        elif k == "scores":
            if v is not None:
                if type(v) is not dict or len(v) > MAX_SCORES:
                    return _UNSUPPORTED
                scores = {}
                for sk, sv in v.items():
                    if type(sk) is not str or not 0 < len(sk) <= MAX_STR:
                        return _UNSUPPORTED
                    f = _number(sv)
                    if f is _UNSUPPORTED:
                        return _UNSUPPORTED
                    scores[sk] = f
        else:
            return _UNSUPPORTED
    if score is None and scores:
        score = scores.get(lab)
    return (lab, score, None, None)


def _segments(s: Any) -> Any:
    if s is None:
        return {}
    if type(s) is not dict or len(s) > MAX_SEGMENTS:
        return _UNSUPPORTED
    good = _GOOD_SEG_KEYS
    for k, v in s.items():
        if k not in good:
            if (type(k) is not str or not 0 < len(k) <= MAX_STR or not _SEG_KEY_MATCH(k)
                    or k.startswith("__") or k in _BASE):
                return _UNSUPPORTED
            if len(good) < 4096:
                good.add(k)
        if type(v) is not str or not 0 < len(v) <= MAX_STR:
            return _UNSUPPORTED
    return s


def _cost(c: Any) -> Any:
    """(usd, tokens) or _UNSUPPORTED."""
    if c is None:
        return (None, None)
    if type(c) is not dict:
        return _UNSUPPORTED
    usd = tokens = None
    for k, v in c.items():
        if v is None:
            continue
        if k == "usd":
            usd = _number(v)
            if usd is _UNSUPPORTED or usd < 0:
                return _UNSUPPORTED
        elif k == "tokens":
            if type(v) is not int or v < 0:
                return _UNSUPPORTED
            tokens = v
        else:
            return _UNSUPPORTED
    return (usd, tokens)


def _features(f: Any) -> tuple[dict | None, int]:
    """Sampled inputs, reduced to what the wire format allows: (features, entries dropped).

    Features are optional context, so an entry the schema would reject (a
    nested value, a long string, a non-finite number, a bad key) is dropped,
    not the whole event.
    """
    if f is None:
        return None, 0
    if type(f) is not dict:
        return None, 1
    out: dict = {}
    dropped = 0
    for k, v in f.items():
        if len(out) >= MAX_FEATURES or type(k) is not str or not 0 < len(k) <= MAX_STR:
            dropped += 1
            continue
        t = type(v)
        if v is None or t is bool or t is int or t is str and len(v) <= MAX_STR \
                or t is float and math.isfinite(v):
            out[k] = v
        else:
            dropped += 1
    return out, dropped


# ---------------------------------------------------------------------------
# the wrapper


class MonitoredModel:
    """Base class of a monitored Serve deployment: subclass it and implement :meth:`predict`.

    ``model`` / ``model_version`` / ``variant`` / ``endpoint`` label every
    event (the series labels).  ``n_shards`` is the shard count of the
    sidecar (``None``: see :class:`ShardSink`).  ``buffer_rows`` bounds the
    in-process buffer; ``flush_rows`` / ``flush_ms`` say when to flush;
    ``max_in_flight`` bounds outstanding sends; ``feature_sample`` is the
    fraction of requests whose inputs (:meth:`features`) travel with the
    event; ``sink`` replaces the shard actors (tests, other transports);
    ``send_timeout_s`` gives up on a send that long outstanding when the
    flush task must wait for it (counted as a send error).
    """

    def __init__(self, *, model: str, model_version: str, variant: str = "primary",
                 endpoint: str = "predict", n_shards: int | None = None,
                 buffer_rows: int = 65536, flush_rows: int = 512, flush_ms: float = 50.0,
                 max_in_flight: int = 8, feature_sample: float = 0.0, sink: Any = None,
                 send_timeout_s: float = 30.0) -> None:
        for name, v in (("model", model), ("model_version", model_version),
                        ("variant", variant)):
            _check_name(name, v)
        if not isinstance(endpoint, str) or len(endpoint) > MAX_STR:
            raise ValueError(f"endpoint must be a string of at most {MAX_STR} characters")
        if buffer_rows < 1 or flush_rows < 1 or max_in_flight < 1:
            raise ValueError("buffer_rows, flush_rows and max_in_flight must be >= 1")
        if not flush_ms > 0:
            raise ValueError(f"flush_ms must be > 0, got {flush_ms}")
        if not 0.0 <= feature_sample <= 1.0:
            raise ValueError(f"feature_sample must lie in [0, 1], got {feature_sample}")
        self._mon_model = model
        self._mon_version = model_version
        self._mon_variant = variant
        self._mon_endpoint = endpoint
        self._mon_sink = sink if sink is not None else ShardSink(n_shards)
        self._mon_cap = int(buffer_rows)
        self._mon_flush_rows = int(flush_rows)
        self._mon_flush_s = float(flush_ms) / 1000.0
        self._mon_max_in_flight = int(max_in_flight)
        self._mon_send_timeout_s = float(send_timeout_s)
        self._mon_sample = float(feature_sample)
        # request ids: a random per-replica prefix and a counter
        self._mon_id_prefix = secrets.token_hex(6) + "-"
        self._mon_ids = itertools.count(1)
        # Serve's HTTP proxy gives every request an x-request-id (the caller's, or one it
        # makes) and echoes it on the reply: there the wrapper adds no second header.
        self._mon_add_header = not _in_serve_replica()
        # user hooks, only called when overridden
        cls = type(self)
        self._mon_seg_hook = self.segments if cls.segments is not MonitoredModel.segments else None
        self._mon_cost_hook = self.cost if cls.cost is not MonitoredModel.cost else None
        self._mon_extra = (self._mon_seg_hook is not None or self._mon_cost_hook is not None
                           or self._mon_sample > 0)
        # True when the model can change under a request (AliasFollowingModel): the event then
        # carries the version predict() says it used (_SERVED_VERSION)
        self._mon_versioned = False
        # the buffer and the flush task
        self._mon_buf: list = []
        self._mon_task: asyncio.Task | None = None
        self._mon_running = False             # the flush task is alive
        self._mon_wake = asyncio.Event()      # replaced by one of the flush task's loop
        self._mon_inflight: deque = deque()   # [future, rows, settled]
        self._mon_pending = 0                 # sends neither answered nor abandoned
        self._mon_closed = False
        self._mon_rng = None
        # counters
        self._mon_dropped = 0
        self._mon_bad_requests = 0
        self._mon_ids_replaced = 0
        self._mon_hook_errors = 0
        self._mon_reply_errors = 0
        self._mon_unavailable = 0
        self._mon_infer_calls = 0
        self._mon_c: Counter = Counter()
        self._mon_rejections: Counter = Counter()
        self._mon_last_error: str | None = None
        self._mon_last_log = 0.0
        self._mon_last_report = 0.0

    # ------------------------------------------------------------ user hooks
    async def predict(self, payload: Any) -> Any:
        """The model: the request's JSON body in, the wire prediction out (a class label,
        ``{"label", "score"?, "scores"?}``, ``{"ranking": [...]}`` or a float)."""
        raise NotImplementedError("subclasses of MonitoredModel implement predict()")

    def segments(self, payload: Any) -> dict[str, str] | None:
        """Segment labels of this request's series (e.g. ``{"region": "eu"}``)."""
        return None

    def cost(self, payload: Any, prediction: Any) -> dict | None:
        """What this request cost: ``{"usd": float?, "tokens": int?}``."""
        return None

    def features(self, payload: Any) -> dict | None:
        """The inputs kept for a sampled request (``feature_sample``): by default the payload
        when it is a JSON object (entries that are not scalars are dropped at the flush)."""
        return payload if isinstance(payload, dict) else None

    # ---------------------------------------------------------- request path
    async def __call__(self, request: Request) -> Response:
        rid_b = None
        for k, v in request.scope["headers"]:
            if k == _RID_HEADER:
                if 0 < len(v) <= MAX_STR:
                    rid_b = v
                else:
                    self._mon_ids_replaced += 1
                break
        if rid_b is None:
            rid = f"{self._mon_id_prefix}{next(self._mon_ids)}"
            rid_b = rid.encode()
        else:
            rid = rid_b.decode("latin-1")
        if not self._mon_add_header:
            rid_b = None
        body = await request.body()
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            self._mon_bad_requests += 1
            return _Reply(_dumps({"request_id": rid, "error": "the request body is not valid "
                                  "JSON"}).encode(), 400, rid_b)
        version = self._mon_version
        if self._mon_versioned:
            _SERVED_VERSION.set(None)
        t0 = _perf_ns()
        try:
            pred = await self.predict(payload)
            t1 = _perf_ns()
            ok = True
            try:
                reply = _Reply(_dumps({"request_id": rid, "prediction": pred}).encode(), 200,
                               rid_b)
            except (TypeError, ValueError) as e:   # not JSON: the request failed
                ok = False
                self._mon_reply_errors += 1
                reply = self._error_reply(rid, rid_b, e)
        except ModelUnavailable as e:   # nothing to answer with: not an inference
            self._mon_unavailable += 1
            return self._error_reply(rid, rid_b, e, 503)
        except Exception as e:
            t1 = _perf_ns()
            ok = False
            pred = None
            reply = self._error_reply(rid, rid_b, e)
        if self._mon_versioned:
            version = _SERVED_VERSION.get() or version
        self._record(t0, rid, t1 - t0, ok, pred, payload, version)
        return reply

    async def infer(self, payload: Any, request_id: str | None = None) -> dict:
        """Score ``payload`` for a caller that already has a request id (a DeploymentHandle).

        The same inference event as the HTTP path (this replica's ``model``,
        ``model_version``, ``variant``, ``endpoint``; event id
        ``<request_id>:<variant>``), so two variants scoring one request emit
        events with the same ``request_id`` and their own ``variant``.  Returns
        ``{"request_id", "prediction", "variant", "model_version"}``.  When
        ``predict`` raises, the error event is recorded and the exception
        re-raised; :class:`ModelUnavailable` is re-raised and records nothing.
        ``request_id=None`` makes one (as the HTTP path does).
        """
        if request_id is None:
            request_id = f"{self._mon_id_prefix}{next(self._mon_ids)}"
        elif type(request_id) is not str or not 0 < len(request_id) <= MAX_STR:
            raise ValueError(f"request_id must be a string of 1..{MAX_STR} characters, "
                             f"got {request_id!r:.80}")
        self._mon_infer_calls += 1
        version = self._mon_version
        if self._mon_versioned:
            _SERVED_VERSION.set(None)
        t0 = _perf_ns()
        try:
            pred = await self.predict(payload)
        except ModelUnavailable:
            self._mon_unavailable += 1
            raise
        except Exception:
            t1 = _perf_ns()
            if self._mon_versioned:
                version = _SERVED_VERSION.get() or version
            self._record(t0, request_id, t1 - t0, False, None, payload, version)
            raise
        t1 = _perf_ns()
        if self._mon_versioned:
            version = _SERVED_VERSION.get() or version
        self._record(t0, request_id, t1 - t0, True, pred, payload, version)
        return {"request_id": request_id, "prediction": pred, "variant": self._mon_variant,
                "model_version": version}

    def _record(self, t0: int, rid: str, lat_ns: int, ok: bool, pred: Any, payload: Any,
                version: str) -> None:
        """One buffered row (the whole cost of monitoring on the request path)."""
        if self._mon_extra:
            segs, cost, feats = self._hooks(payload, pred if ok else None)
        else:
            segs = cost = feats = None
        if not self._mon_running:
            self._start_flusher()
        buf = self._mon_buf
        if len(buf) < self._mon_cap:
            buf.append((t0, rid, lat_ns, ok, pred, segs, cost, feats, version))
            if len(buf) >= self._mon_flush_rows:
                self._mon_wake.set()
        else:
            self._mon_dropped += 1

    def _error_reply(self, rid: str, rid_b: bytes | None, e: BaseException,
                     status: int = 500) -> Response:
        msg = f"{type(e).__name__}: {e}"
        if len(msg) > 500:
            msg = msg[:499] + "…"
        return _Reply(_dumps({"request_id": rid, "error": msg}).encode(), status, rid_b)

    def _hooks(self, payload: Any, pred: Any) -> tuple:
        segs = cost = feats = None
        if self._mon_seg_hook is not None:
            try:
                segs = self._mon_seg_hook(payload)
            except Exception as e:
                self._hook_failed("segments", e)
        if self._mon_cost_hook is not None:
            try:
                cost = self._mon_cost_hook(payload, pred)
            except Exception as e:
                self._hook_failed("cost", e)
        if self._mon_sample:
            if self._mon_rng is None:
                import random
                self._mon_rng = random.Random().random
            if self._mon_sample >= 1.0 or self._mon_rng() < self._mon_sample:
                try:
                    feats = self.features(payload)
                except Exception as e:
                    self._hook_failed("features", e)
        return segs, cost, feats

    def _hook_failed(self, name: str, e: Exception) -> None:
        self._mon_hook_errors += 1
        self._note_error(f"{name}() raised {type(e).__name__}: {e}")

    # ------------------------------------------------------- public controls
    def set_version(self, model_version: str) -> None:
        """Label the events of later requests with ``model_version`` (the champion moved)."""
        _check_name("model_version", model_version)
        self._mon_version = model_version

    @property
    def model_version(self) -> str:
        return self._mon_version

    def monitor_stats(self) -> dict:
        """Counters for /metrics: rows buffered, dropped, flushed, sent, and what shards said."""
        c = self._mon_c
        return {
            "model": self._mon_model, "model_version": self._mon_version,
            "variant": self._mon_variant, "endpoint": self._mon_endpoint,
            "buffered": len(self._mon_buf), "buffer_rows": self._mon_cap,
            "dropped": self._mon_dropped,
            "flushed_rows": c["flushed_rows"], "flushed_batches": c["flushes"],
            "sent_batches": c["sent_batches"], "sent_rows": c["sent_rows"],
            "in_flight": self._mon_pending,
            "send_errors": c["send_errors"], "send_timeouts": c["send_timeouts"],
            "lost_rows": c["lost_rows"],
            "error_events": c["error_events"],
            "invalid": c["invalid"],
            "invalid_by_reason": {f"{f}:{r}": n
                                  for (f, r), n in dict(self._mon_rejections).items()},
            "features_dropped": c["features_dropped"],
            "accepted": c["accepted"], "rejected": c["rejected"], "late": c["late"],
            "duplicates": c["duplicates"],
            "bad_requests": self._mon_bad_requests, "reply_errors": self._mon_reply_errors,
            "ids_replaced": self._mon_ids_replaced, "hook_errors": self._mon_hook_errors,
            "unavailable": self._mon_unavailable, "infer_calls": self._mon_infer_calls,
            "last_error": self._mon_last_error,
        }

    async def flush(self, wait: bool = True, timeout: float | None = None) -> None:
        """Flush the buffer now; with ``wait``, also wait for every outstanding send."""
        await self._flush_once()
        if wait:
            await self._drain(timeout)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop the flush task after a last flush (sends awaited up to ``timeout`` s)."""
        if self._mon_closed:
            return
        self._mon_closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        task = self._mon_task
        if task is not None and not task.done():
            self._mon_wake.set()          # the loop ends after the flush it is in
            await asyncio.wait({task}, timeout=timeout)
            if not task.done():
                task.cancel()
        try:
            await asyncio.wait_for(self.flush(wait=True), max(deadline - loop.time(), 0.001))
        except asyncio.TimeoutError:
            self._note_error(f"closing: sends still outstanding after {timeout} s")

    def __del__(self) -> Any:
        # Serve calls __del__ on graceful shutdown and awaits it if it returns a coroutine:
        # then the buffer gets a last flush.  Garbage collection outside Serve finds nothing
        # to do once aclose() has run (or no flush task ever started).
        try:
            task = self._mon_task
            if self._mon_closed or task is None or task.done():
                return None
            if asyncio.get_running_loop() is not task.get_loop():
                return None
        except (AttributeError, RuntimeError):
            return None
        return self.aclose()

    # -------------------------------------------------------------- flushing
    def _start_flusher(self) -> None:
        if self._mon_closed:
            return
        loop = asyncio.get_running_loop()
        self._mon_wake = asyncio.Event()
        self._mon_task = loop.create_task(self._flush_loop(), name="kpistream-monitor-flush")
        self._mon_running = True
        self._mon_task.add_done_callback(self._flusher_ended)

    def _flusher_ended(self, task: asyncio.Task) -> None:
        if task is self._mon_task:
            self._mon_running = False

    def _report(self) -> None:
        """Hand the counters to the sidecar (for /metrics) about once a second."""
        now = time.monotonic()
        report = getattr(self._mon_sink, "report", None)
        if report is None or now - self._mon_last_report < 1.0:
            return
        self._mon_last_report = now
        try:
            report(self._mon_id_prefix.rstrip("-"), self.monitor_stats())
        except Exception as e:  # the sidecar may be away: counted, never raised
            self._mon_c["report_errors"] += 1
            self._mon_last_error = f"report: {type(e).__name__}: {e}"

    async def _flush_loop(self) -> None:
        wake = self._mon_wake
        period = self._mon_flush_s
        while not self._mon_closed:
            self._report()
            if len(self._mon_buf) < self._mon_flush_rows:
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), period)
                except asyncio.TimeoutError:
                    pass
            if not self._mon_closed and not await self._flush_once():
                await asyncio.sleep(period)   # the sink is not ready: no busy loop

    async def _flush_once(self) -> bool:
        """Send what is buffered; False when the sink is not ready (the rows stay).
        Never raises."""
        self._reap()
        if not self._mon_buf:
            return True
        sink = self._mon_sink
        try:
            ready = getattr(sink, "ready", None)
            if ready is not None:
                r = ready()
                if not (await r if asyncio.iscoroutine(r) else r):
                    return False
            n_shards = int(sink.n_shards or 1)
        except Exception as e:
            self._note_error(f"sink not ready: {type(e).__name__}: {e}")
            return False
        rows, self._mon_buf = self._mon_buf, []
        try:
            batch = self._to_batch(rows)
        except Exception as e:  # a bug, not bad data: count the rows as lost
            self._mon_c["lost_rows"] += len(rows)
            self._note_error(f"building the batch failed: {type(e).__name__}: {e}")
            return True
        c = self._mon_c
        c["flushes"] += 1
        c["flushed_rows"] += len(rows)
        if not len(batch):
            return True
        parts = split_by_shard(batch, n_shards) if n_shards > 1 else [batch]
        for part in parts:
            n = len(part)
            if not n:
                continue
            await self._limit_in_flight()
            try:
                res = sink.send("inference", part)
                fut = None if res is None else asyncio.ensure_future(res)
            except Exception as e:
                self._send_failed(n, e)
                continue
            c["sent_batches"] += 1
            c["sent_rows"] += n
            if fut is not None:
                entry = [fut, n, False]
                self._mon_inflight.append(entry)
                self._mon_pending += 1
                fut.add_done_callback(lambda f, entry=entry: self._on_done(entry))
        return True

    def _reap(self) -> None:
        q = self._mon_inflight
        while q and (q[0][2] or q[0][0].done()):
            q.popleft()

    async def _limit_in_flight(self) -> None:
        q = self._mon_inflight
        while True:
            self._reap()
            if len(q) < self._mon_max_in_flight:
                return
            entry = q[0]
            done, _ = await asyncio.wait({entry[0]}, timeout=self._mon_send_timeout_s)
            if not done and not entry[2]:
                entry[2] = True   # abandoned: a late result is ignored
                self._mon_pending -= 1
                self._mon_c["send_timeouts"] += 1
                self._send_failed(entry[1], TimeoutError(
                    f"a send was outstanding for more than {self._mon_send_timeout_s} s"))

    async def _drain(self, timeout: float | None) -> None:
        futs = {e[0] for e in self._mon_inflight if not e[2] and not e[0].done()}
        if futs:
            await asyncio.wait(futs, timeout=timeout)
        self._reap()

    def _on_done(self, entry: list) -> None:
        if entry[2]:
            return
        entry[2] = True
        self._mon_pending -= 1
        fut = entry[0]
        if fut.cancelled():
            self._send_failed(entry[1], asyncio.CancelledError("send cancelled"))
            return
        exc = fut.exception()
        if exc is not None:
            self._send_failed(entry[1], exc)
            return
        res = fut.result()
        for rep in res if isinstance(res, list) else (res,):
            if isinstance(rep, dict):
                c = self._mon_c
                c["accepted"] += int(rep.get("accepted", 0))
                c["late"] += int(rep.get("late", 0))
                c["duplicates"] += int(rep.get("duplicates", 0))
                c["rejected"] += len(rep.get("rejected") or ())

    def _send_failed(self, rows: int, e: BaseException) -> None:
        self._mon_c["send_errors"] += 1
        self._mon_c["lost_rows"] += rows
        reset = getattr(self._mon_sink, "reset", None)
        if reset is not None:
            try:
                reset()
            except Exception:
                pass
        self._note_error(f"send failed: {type(e).__name__}: {e}")

    def _note_error(self, msg: str) -> None:
        self._mon_last_error = msg
        now = time.monotonic()
        if now - self._mon_last_log >= 60.0:
            self._mon_last_log = now
            log.warning("kpistream monitor (%s %s): %s", self._mon_model, self._mon_variant, msg)

    # ---------------------------------------------------------- rows -> batch
    def _to_batch(self, rows: list) -> InferenceBatch:
        """Buffered tuples -> normalized records -> one InferenceBatch."""
        return InferenceBatch.from_records(self._records(rows))

    def _records(self, rows: list) -> list[dict]:
        offset = time.time_ns() - _perf_ns()   # perf_counter -> wall clock, now
        model, variant, endpoint = self._mon_model, self._mon_variant, self._mon_endpoint
        suffix = ":" + variant
        out: list[dict] = []
        slow: list[dict] = []
        c = self._mon_c
        errors = feats_dropped = 0
        for t0, rid, lat_ns, ok, pred, segs, cost, feats, version in rows:
            ts = (t0 + offset) // 1_000_000
            eid = rid + suffix
            if len(eid) > MAX_STR:
                eid = hashlib.blake2b(eid.encode(), digest_size=16).hexdigest()
            if feats is not None:
                feats, d = _features(feats)
                feats_dropped += d
            if ok:
                p = _prediction(pred)
            else:
                errors += 1
                p = (None, None, None, None)
            s = _segments(segs)
            co = _cost(cost)
            if p is _UNSUPPORTED or s is _UNSUPPORTED or co is _UNSUPPORTED:
                slow.append(self._wire(eid, rid, ts, version, lat_ns, ok, pred, segs, cost, feats))
                continue
            out.append({
                "event_id": eid, "request_id": rid, "ts": ts, "model": model,
                "model_version": version, "variant": variant, "endpoint": endpoint,
                "latency_ms": lat_ns / 1e6, "status": "ok" if ok else "error",
                "pred_label": p[0], "pred_score": p[1], "pred_value": p[2], "ranking": p[3],
                "segments": s, "cost_usd": co[0], "tokens": co[1], "features": feats})
        c["error_events"] += errors
        c["features_dropped"] += feats_dropped
        if slow:
            res = validate_rows(slow, now_ms=time.time_ns() // 1_000_000, expect="inference")
            out.extend(res.inference)
            if res.rejections:
                c["invalid"] += len(res.rejections)
                for r in res.rejections:
                    self._mon_rejections[(r.field, r.reason)] += 1
                self._note_error(f"event rejected: {res.rejections[-1].message}")
        return out

    def _wire(self, eid: str, rid: str, ts: int, version: str, lat_ns: int, ok: bool,
              pred: Any, segs: Any, cost: Any, feats: Any) -> dict:
        return {"type": "inference", "event_id": eid, "request_id": rid, "ts": ts,
                "model": self._mon_model, "model_version": version,
                "variant": self._mon_variant, "endpoint": self._mon_endpoint,
                "latency_ms": lat_ns / 1e6, "status": "ok" if ok else "error",
                "prediction": pred if ok else None, "segments": segs, "cost": cost,
                "features": feats}


# ---------------------------------------------------------------------------
# a model that follows an MLflow registered-model alias


class _Loaded:
    """One loaded model version (swapped as a whole: model and version never disagree)."""

    __slots__ = ("model", "version")

    def __init__(self, model: Any, version: str) -> None:
        self.model = model
        self.version = version


class AliasFollowingModel(MonitoredModel):
    """A :class:`MonitoredModel` that serves ``models:/<registered_model>@<alias>`` and follows it.

    Subclasses implement :meth:`load_version` (blocking: runs in a thread) and
    ``predict``, taking the model with :meth:`loaded` (before their first
    ``await``, so one request uses one model throughout)::

        @serve.deployment
        class Churn(AliasFollowingModel):
            def __init__(self, alias="champion", variant="primary"):
                super().__init__(registered_model="churn", alias=alias, variant=variant,
                                 tracking_uri="sqlite:////data/mlflow.db")

            def load_version(self, version):
                return mlflow.sklearn.load_model(f"models:/churn/{version}")

            async def predict(self, payload):
                clf = self.loaded()
                return int(clf.predict([payload["x"]])[0])

    The constructor resolves the alias and loads that version (so a replica
    starts with a model when the alias exists).  A background task in the
    replica's event loop (started in the constructor inside Serve, else on the
    first request) resolves the alias every ``alias_poll_s`` seconds, off the
    event loop; when it points to another version, that version is loaded in a
    thread and swapped in with one assignment: requests already running finish
    on the model they took, later ones get the new one, none is dropped, and
    :meth:`set_version` makes later events carry the new ``model_version``
    (each event carries the version of the model that actually served it).

    While the alias does not exist (no ``challenger`` yet) :meth:`loaded`
    raises :class:`ModelUnavailable`: HTTP 503 with a clear message,
    :meth:`infer` raises it, and no event is recorded.  If the alias is
    removed after a version was loaded, ``on_alias_removed="keep"`` (the
    default) keeps serving that version (a deleted ``champion`` must not take
    the service down) and ``"unavailable"`` stops answering.  Errors while
    resolving or loading are counted (:meth:`alias_stats`) and retried at the
    next poll; the current model keeps serving.
    """

    def __init__(self, *, registered_model: str, alias: str = "champion",
                 alias_poll_s: float = 5.0, tracking_uri: str | None = None,
                 on_alias_removed: str = "keep", model: str | None = None,
                 **monitor_kw: Any) -> None:
        _check_name("registered_model", registered_model)
        _check_name("alias", alias)
        if not alias_poll_s > 0:
            raise ValueError(f"alias_poll_s must be > 0, got {alias_poll_s}")
        if on_alias_removed not in ("keep", "unavailable"):
            raise ValueError("on_alias_removed must be 'keep' or 'unavailable', "
                             f"got {on_alias_removed!r}")
        self._af_name = registered_model
        self._af_alias = alias
        self._af_poll_s = float(alias_poll_s)
        self._af_uri = tracking_uri
        self._af_on_removed = on_alias_removed
        self._af_client = None
        self._af_current: _Loaded | None = None
        self._af_last: _Loaded | None = None     # kept for an alias that comes back
        self._af_task: asyncio.Task | None = None
        self._af_lock: asyncio.Lock | None = None
        self._af_alias_exists = False
        self._af_c: Counter = Counter()
        self._af_last_error: str | None = None
        self._af_last_poll: float | None = None
        version = self.resolve_alias()
        if version is not None:
            self._af_alias_exists = True
            self._af_current = self._af_last = _Loaded(self.load_version(version), version)
            self._af_c["loads"] += 1
        super().__init__(model=model or registered_model, model_version=version or "none",
                         **monitor_kw)
        self._mon_versioned = True
        try:
            asyncio.get_running_loop()
        except RuntimeError:   # not in an event loop (a plain test): started on first use
            return
        self._start_alias_poller()

    # ------------------------------------------------------------ to override
    def resolve_alias(self) -> str | None:
        """The version the alias points to now, or None if the model or the alias does not
        exist.  Blocking (called in a thread); raises on other errors (counted, retried)."""
        from mlflow.exceptions import MlflowException

        if self._af_client is None:
            from mlflow import MlflowClient

            self._af_client = MlflowClient(tracking_uri=self._af_uri,
                                           registry_uri=self._af_uri)
        try:
            return str(self._af_client.get_model_version_by_alias(self._af_name,
                                                                  self._af_alias).version)
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE",
                                "NOT_FOUND"):
                return None
            raise

    def load_version(self, version: str) -> Any:
        """Load ``models:/<registered_model>/<version>`` (blocking; called in a thread).
        By default an MLflow pyfunc model; override for a flavor's native object."""
        import mlflow
        import mlflow.pyfunc

        if self._af_uri:
            mlflow.set_tracking_uri(self._af_uri)
            mlflow.set_registry_uri(self._af_uri)
        return mlflow.pyfunc.load_model(f"models:/{self._af_name}/{version}")

    # --------------------------------------------------------------- serving
    def loaded(self) -> Any:
        """The model to answer this request with (the one :meth:`load_version` returned).

        Raises :class:`ModelUnavailable` while the alias does not exist.  Notes
        the version for this request's event.
        """
        if self._af_task is None:
            self._start_alias_poller()
        cur = self._af_current
        if cur is None:
            raise ModelUnavailable(
                f"registered model {self._af_name!r} has no alias {self._af_alias!r} (yet): "
                f"this replica has no model to answer with; it checks again every "
                f"{self._af_poll_s:g} s")
        _SERVED_VERSION.set(cur.version)
        return cur.model

    @property
    def alias(self) -> str:
        return self._af_alias

    def alias_stats(self) -> dict:
        """Alias following: the version served, polls, swaps, errors."""
        cur = self._af_current
        c = self._af_c
        return {"registered_model": self._af_name, "alias": self._af_alias,
                "alias_exists": self._af_alias_exists,
                "version": cur.version if cur is not None else None,
                "available": cur is not None, "alias_poll_s": self._af_poll_s,
                "polls": c["polls"], "poll_errors": c["poll_errors"], "loads": c["loads"],
                "load_errors": c["load_errors"], "swaps": c["swaps"],
                "unavailable_requests": self._mon_unavailable,
                "last_poll_age_s": (None if self._af_last_poll is None
                                    else round(time.monotonic() - self._af_last_poll, 3)),
                "last_error": self._af_last_error}

    def monitor_stats(self) -> dict:
        st = super().monitor_stats()
        st["alias"] = self.alias_stats()
        return st

    async def refresh_alias(self) -> bool:
        """Resolve the alias now and swap if it moved; True when a new version was swapped in.
        Never raises (errors are counted in :meth:`alias_stats`)."""
        if self._af_lock is None:
            self._af_lock = asyncio.Lock()
        async with self._af_lock:
            return await self._refresh()

    async def _refresh(self) -> bool:
        c = self._af_c
        try:
            version = await asyncio.to_thread(self.resolve_alias)
        except Exception as e:
            c["poll_errors"] += 1
            self._alias_error(f"resolving {self._af_name}@{self._af_alias}: "
                              f"{type(e).__name__}: {e}")
            return False
        c["polls"] += 1
        self._af_last_poll = time.monotonic()
        cur = self._af_current
        if version is None:
            if self._af_alias_exists:
                log.warning("kpistream: alias %s@%s was removed; %s", self._af_name,
                            self._af_alias, "keeping the loaded version"
                            if self._af_on_removed == "keep" else "no longer answering")
            self._af_alias_exists = False
            if self._af_on_removed == "unavailable":
                self._af_current = None
            return False
        self._af_alias_exists = True
        if cur is not None and cur.version == version:
            return False
        last = self._af_last
        if last is not None and last.version == version:
            new = last
        else:
            try:
                model = await asyncio.to_thread(self.load_version, version)
            except Exception as e:
                c["load_errors"] += 1
                self._alias_error(f"loading {self._af_name} version {version}: "
                                  f"{type(e).__name__}: {e}")
                return False
            c["loads"] += 1
            new = _Loaded(model, version)
        # the swap: one assignment (requests that took the old model finish on it)
        self._af_current = self._af_last = new
        self.set_version(version)
        c["swaps"] += 1
        log.info("kpistream: %s@%s now serves version %s (was %s)", self._af_name,
                 self._af_alias, version, cur.version if cur is not None else "none")
        return True

    def _alias_error(self, msg: str) -> None:
        self._af_last_error = msg
        self._note_error(msg)

    def _start_alias_poller(self) -> None:
        if self._mon_closed or (self._af_task is not None and not self._af_task.done()):
            return
        self._af_task = asyncio.get_running_loop().create_task(
            self._alias_loop(), name="kpistream-alias-poll")

    async def _alias_loop(self) -> None:
        while not self._mon_closed:
            await asyncio.sleep(self._af_poll_s)
            if not self._mon_closed:
                await self.refresh_alias()

    async def aclose(self, timeout: float = 5.0) -> None:
        task = self._af_task
        if task is not None and not task.done():
            task.cancel()
        await super().aclose(timeout)


def _check_name(name: str, v: Any) -> None:
    if not isinstance(v, str) or not 0 < len(v) <= MAX_STR:
        raise ValueError(f"{name} must be a non-empty string of at most {MAX_STR} characters, "
                         f"got {v!r}")


__all__ = ["MonitoredModel", "AliasFollowingModel", "ModelUnavailable", "ShardSink",
           "REQUEST_ID_HEADER", "SHARDS_ENV"]
