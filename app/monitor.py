"""The monitoring wrapper for a user's Ray Serve deployment (DESIGN.md, data path step 1, "Emit"):
subclass :class:`MonitoredModel` (or :class:`AliasFollowingModel` to serve an MLflow alias).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import time
from collections import Counter
from contextvars import ContextVar
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from actors.registry import Registry
from actors.transport import SHARDS_ENV, ShardSink, ShardTransport
from kpistream.wire.batch import InferenceBatch
from kpistream.wire.emitter import Emitter
from kpistream.wire.normalize import RowNormalizer
from kpistream.wire.schema import MAX_STR

log = logging.getLogger("kpistream.monitor")

REQUEST_ID_HEADER = "x-request-id"
_RID_HEADER = b"x-request-id"

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


class BadInput(ValueError):
    """The request's input is wrong (a missing field, the wrong number of features).

    Raised by ``predict``: the HTTP path answers 400 with the message and counts
    ``bad_requests``; :meth:`MonitoredModel.infer` re-raises it.  No inference
    event is recorded: the caller's mistake is not a model error.
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


def in_serve_replica() -> bool:
    """True inside a Ray Serve replica (found without importing Ray)."""
    import sys

    ctx = sys.modules.get("ray.serve.context")
    try:
        return ctx is not None and ctx._get_internal_replica_context() is not None
    except Exception:  # pragma: no cover - a Ray without that helper
        return False


# ---------------------------------------------------------------------------
# the wrapper


class MonitoredModel:
    """Base class of a monitored Serve deployment: subclass it and implement :meth:`predict`.

    ``model`` / ``model_version`` / ``variant`` / ``endpoint`` label every
    event (the series labels).  ``n_shards`` is the shard count of the
    sidecar (``None``: see :class:`~actors.transport.ShardTransport`).
    ``buffer_rows`` bounds the in-process buffer; ``flush_rows`` /
    ``flush_ms`` say when to flush; ``max_in_flight`` bounds outstanding
    sends; ``feature_sample`` is the fraction of requests whose inputs
    (:meth:`features`) travel with the event; ``sink`` replaces the shard
    actors (tests, other transports); ``send_timeout_s`` gives up on a send
    that long outstanding when the flush task must wait for it (counted as a
    send error); a failed or timed-out send goes again after a backoff, up to
    ``send_retries`` times (the shard drops what it already applied by event
    id), before its rows are counted as lost.

    Users subclass it and implement ``async predict(payload)``;
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
    by ``infer``, and records no event; :class:`BadInput` (the caller's input is
    wrong) likewise, with a 400.  :class:`AliasFollowingModel` serves an
    MLflow registered model's alias (``champion``, ``challenger``) and swaps in the
    version the alias moves to, live.

    What the request path does for monitoring is one tuple appended to the
    emitter's buffer (:class:`kpistream.wire.emitter.Emitter`): no validation, no
    hashing, no dicts.  The reply never waits on kpistream; a full buffer
    (``buffer_rows``) drops the event and counts it.  The emitter's flush task
    (in the replica's event loop, started on the first request) turns the rows
    into normalized records (:mod:`kpistream.wire.normalize`, the same results as
    :mod:`kpistream.wire.schema`), one
    :class:`~kpistream.wire.batch.InferenceBatch` split by shard, and sends each
    part through its transport, by default the shard actors
    (:class:`actors.transport.ShardTransport`, Ray imported only there).
    Any object with ``send(kind, batch)`` can be the ``sink`` instead (see
    :mod:`kpistream.wire.emitter`), so the wrapper is testable without a cluster.
    """

    def __init__(self, *, model: str, model_version: str, variant: str = "primary",
                 endpoint: str = "predict", n_shards: int | None = None,
                 buffer_rows: int = 65536, flush_rows: int = 512, flush_ms: float = 50.0,
                 max_in_flight: int = 8, feature_sample: float = 0.0, sink: Any = None,
                 send_timeout_s: float = 30.0, send_retries: int = 8) -> None:
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
        self._mon_sample = float(feature_sample)
        # request ids: a random per-replica prefix and a counter
        self._mon_id_prefix = secrets.token_hex(6) + "-"
        self._mon_ids = itertools.count(1)
        # Serve's HTTP proxy gives every request an x-request-id (the caller's, or one it
        # makes) and echoes it on the reply: there the wrapper adds no second header.
        self._mon_add_header = not in_serve_replica()
        # user hooks, only called when overridden
        cls = type(self)
        self._mon_seg_hook = self.segments if cls.segments is not MonitoredModel.segments else None
        self._mon_cost_hook = self.cost if cls.cost is not MonitoredModel.cost else None
        self._mon_extra = (self._mon_seg_hook is not None or self._mon_cost_hook is not None
                           or self._mon_sample > 0)
        self._mon_rng = None
        # True when the model can change under a request (AliasFollowingModel): the event then
        # carries the version predict() says it used (_SERVED_VERSION)
        self._mon_versioned = False
        # request-path counters: bad_requests, ids_replaced, hook_errors, reply_errors,
        # unavailable, infer_calls
        self._mon_n: Counter = Counter()
        # rows -> records (the normalizer), buffered and sent by the emitter
        self._mon_norm = RowNormalizer(model, variant, endpoint, on_error=self._note_error)
        self._mon_emitter = Emitter(
            sink if sink is not None else ShardTransport(n_shards), self._to_batch,
            buffer_rows=buffer_rows, flush_rows=flush_rows, flush_s=float(flush_ms) / 1000.0,
            max_in_flight=max_in_flight, send_timeout_s=send_timeout_s,
            max_retries=send_retries,
            name=self._mon_id_prefix.rstrip("-"), stats=self.monitor_stats,
            label=f"{model} {variant}")

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
                    self._mon_n["ids_replaced"] += 1
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
            self._mon_n["bad_requests"] += 1
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
                self._mon_n["reply_errors"] += 1
                reply = self._error_reply(rid, rid_b, e)
        except ModelUnavailable as e:   # nothing to answer with: not an inference
            self._mon_n["unavailable"] += 1
            return self._error_reply(rid, rid_b, e, 503)
        except BadInput as e:           # the caller's mistake: not an inference either
            self._mon_n["bad_requests"] += 1
            return self._error_reply(rid, rid_b, e, 400)
        except Exception as e:
            t1 = _perf_ns()
            ok = False
            pred = None
            reply = self._error_reply(rid, rid_b, e)
        if self._mon_versioned:
            version = _SERVED_VERSION.get() or version
        self._record(t0, rid, t1 - t0, ok, pred, payload, version)
        return reply

    async def available(self) -> str | None:
        """None when this replica can answer; else why not (never raises: the experiment
        ingress probes it while the model is missing)."""
        return None

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
        self._mon_n["infer_calls"] += 1
        version = self._mon_version
        if self._mon_versioned:
            _SERVED_VERSION.set(None)
        t0 = _perf_ns()
        try:
            pred = await self.predict(payload)
        except ModelUnavailable:
            self._mon_n["unavailable"] += 1
            raise
        except BadInput:
            self._mon_n["bad_requests"] += 1
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
        """One buffered row (the whole cost of monitoring on the request path): the steps of
        :meth:`Emitter.put <kpistream.wire.emitter.Emitter.put>`, inlined."""
        if self._mon_extra:
            segs, cost, feats = self._hooks(payload, pred if ok else None)
        else:
            segs = cost = feats = None
        em = self._mon_emitter
        if not em.running:
            em.start()
        buf = em.buf
        if len(buf) < em.cap:
            buf.append((t0, rid, lat_ns, ok, pred, segs, cost, feats, version))
            if len(buf) >= em.flush_rows:
                em.wake.set()
        else:
            em.dropped += 1

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
        self._mon_n["hook_errors"] += 1
        self._note_error(f"{name}() raised {type(e).__name__}: {e}")

    def _note_error(self, msg: str) -> None:
        self._mon_emitter.note_error(msg)

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
        em = self._mon_emitter.stats()
        norm = self._mon_norm.stats()
        n = self._mon_n
        return {
            "model": self._mon_model, "model_version": self._mon_version,
            "variant": self._mon_variant, "endpoint": self._mon_endpoint,
            "buffered": em["buffered"], "buffer_rows": em["buffer_rows"],
            "dropped": em["dropped"],
            "flushed_rows": em["flushed_rows"], "flushed_batches": em["flushed_batches"],
            "sent_batches": em["sent_batches"], "sent_rows": em["sent_rows"],
            "in_flight": em["in_flight"],
            "send_errors": em["send_errors"], "send_timeouts": em["send_timeouts"],
            "send_retries": em["send_retries"], "retry_waiting_rows": em["retry_waiting_rows"],
            "lost_rows": em["lost_rows"],
            **norm,
            "accepted": em["accepted"], "rejected": em["rejected"], "late": em["late"],
            "duplicates": em["duplicates"],
            "bad_requests": n["bad_requests"], "reply_errors": n["reply_errors"],
            "ids_replaced": n["ids_replaced"], "hook_errors": n["hook_errors"],
            "unavailable": n["unavailable"], "infer_calls": n["infer_calls"],
            "last_error": em["last_error"],
        }

    async def flush(self, wait: bool = True, timeout: float | None = None) -> None:
        """Flush the buffer now; with ``wait``, also wait for every outstanding send."""
        await self._mon_emitter.flush(wait, timeout)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop the flush task after a last flush (sends awaited up to ``timeout`` s)."""
        await self._mon_emitter.aclose(timeout)

    def __del__(self) -> Any:
        # Serve calls __del__ on graceful shutdown and awaits it if it returns a coroutine:
        # then the buffer gets a last flush.  Garbage collection outside Serve finds nothing
        # to do once aclose() has run (or no flush task ever started).
        try:
            em = self._mon_emitter
            task = em.task
            if em.closed or task is None or task.done():
                return None
            if asyncio.get_running_loop() is not task.get_loop():
                return None
        except (AttributeError, RuntimeError):
            return None
        return self.aclose()

    # ---------------------------------------------------------- rows -> batch
    def _to_batch(self, rows: list) -> InferenceBatch:
        """Buffered tuples -> normalized records -> one InferenceBatch."""
        return InferenceBatch.from_records(self._mon_norm.records(rows))

    def _records(self, rows: list) -> list[dict]:
        return self._mon_norm.records(rows)

    def _wire(self, *row: Any) -> dict:
        return self._mon_norm.wire(*row)


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
        if self._af_client is None:
            self._af_client = Registry(self._af_uri)
        return self._af_client.alias_version(self._af_name, self._af_alias)

    def load_version(self, version: str) -> Any:
        """Load ``models:/<registered_model>/<version>`` (blocking; called in a thread).
        By default an MLflow pyfunc model; override for a flavor's native object."""
        return Registry(self._af_uri).load_model(self._af_name, version)

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

    async def available(self) -> str | None:
        if self._af_task is None:
            self._start_alias_poller()
        if self._af_current is None:
            return (f"registered model {self._af_name!r} has no alias {self._af_alias!r} "
                    f"(yet)")
        return None

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
                "unavailable_requests": self._mon_n["unavailable"],
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
        if self._mon_emitter.closed or (self._af_task is not None and not self._af_task.done()):
            return
        self._af_task = asyncio.get_running_loop().create_task(
            self._alias_loop(), name="kpistream-alias-poll")

    async def _alias_loop(self) -> None:
        while not self._mon_emitter.closed:
            await asyncio.sleep(self._af_poll_s)
            if not self._mon_emitter.closed:
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
           "ShardTransport", "REQUEST_ID_HEADER", "SHARDS_ENV"]
