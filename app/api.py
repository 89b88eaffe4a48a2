"""The sidecar's HTTP face (:class:`SidecarAPI`, Ray Serve + FastAPI): ingest, query, health,
/metrics.
"""

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic_core import PydanticCustomError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from actors.transport import ShardTransport
from kpistream.wire.batch import FeedbackBatch, InferenceBatch, route
from kpistream.spec.metrics import config_from_dict
from kpistream.errors import Rejection
from kpistream.wire.schema import parse_payload, parse_rfc3339, validate_rows
from kpistream.windows.catalogue import STORED_METRICS
from kpistream.replay import iter_runs


def _message(e: BaseException) -> str:
    """An exception's text (a KeyError's without the quotes ``str`` adds)."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def jsonable(x: Any) -> Any:
    """NaN and infinities (not JSON) become null; numpy scalars plain numbers."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


api = FastAPI(title="kpistream", description="Live KPIs for ML models")

_QUERY_KEYS = {"metric", "start", "end", "resolution", "limit", "offset"}
_SPACE_OFFSET = re.compile(r".*\d \d{2}:\d{2}")   # "...10:00:00 02:00": a '+' sent unencoded


def query_time(name: str, value: str | None) -> int | None:
    """A ``start`` / ``end`` query value: epoch milliseconds or an RFC 3339 date-time with
    a timezone.  A ``+`` offset sent unencoded arrives as a space and is read as ``+``;
    anything else that is not a complete time is an error, never a silently wrong bound."""
    if value is None or value == "":
        return None
    if value.isdigit():
        return int(value)
    if _SPACE_OFFSET.fullmatch(value):
        value = f"{value[:-6]}+{value[-5:]}"
    try:
        return parse_rfc3339(value)
    except PydanticCustomError as e:
        raise ValueError(f"{name}: {e.message()} (epoch ms or RFC 3339 with Z or +HH:MM; "
                         f"encode '+' as %2B)") from None


@dataclass(frozen=True)
class SeriesQuery:
    """``GET /v1/series`` parameters, checked: ``metric`` (repeat or comma-separate;
    unknown names are an error), ``start`` / ``end`` (:func:`query_time`), ``resolution``,
    ``limit`` (rows per page, default 10,000, at most 100,000), ``offset``, and any series
    label as a filter (repeat or comma-separate for several values)."""

    metrics: list[str] | None
    labels: dict[str, list[str]]
    start: int | None
    end: int | None
    resolution: str | None
    limit: int
    offset: int

    @classmethod
    def from_params(cls, q: Any) -> "SeriesQuery":
        def values(key: str) -> list[str]:
            return [x for v in q.getlist(key) for x in v.split(",") if x]

        metrics = values("metric") or None
        unknown = sorted(set(metrics or ()) - set(STORED_METRICS))
        if unknown:
            raise ValueError(f"metric: unknown {', '.join(map(repr, unknown))} "
                             f"(known: {', '.join(STORED_METRICS)})")
        return cls(metrics, {k: values(k) for k in q.keys() if k not in _QUERY_KEYS},
                   query_time("start", q.get("start")), query_time("end", q.get("end")),
                   q.get("resolution") or None, _int_param(q, "limit", 10_000, 1, 100_000),
                   _int_param(q, "offset", 0, 0, None))


def _int_param(q: Any, name: str, default: int, lo: int, hi: int | None) -> int:
    v = q.get(name)
    if v is None or v == "":
        return default
    if not v.isdigit() or int(v) < lo or (hi is not None and int(v) > hi):
        raise ValueError(f"{name}: expected an integer from {lo}"
                         f"{f' to {hi}' if hi is not None else ''}, got {v!r}")
    return int(v)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class SidecarAPI:
    """The sidecar's HTTP routes (README, "HTTP API").

    Thin on purpose: it decodes and validates request bodies, routes rows to the
    shard actors by ``hash(request_id) % N``, and forwards queries to the
    publisher actor.  Everything stateful lives in :mod:`actors`.

    Routes (DESIGN.md's HTTP contract):

    - ``POST /v1/events``   — inference (and feedback) events: one JSON object, a
      JSON array or NDJSON; at most ``max_body_bytes``.
    - ``POST /v1/feedback`` — feedback events only (``type`` may be omitted).
      Both reply ``{"accepted", "late", "duplicates", "rejected": [{"index",
      "field", "reason", "message"}]}``; one bad row never sinks the batch.
    - ``GET /v1/series``    — tidy rows from the store (:class:`SeriesQuery`):
      ``metric``, ``start``, ``end`` (RFC 3339 with a timezone, or epoch ms),
      ``resolution``, ``limit`` / ``offset`` (a ``Link: rel="next"`` header when
      there is more), and any series label as a filter (``model=churn``);
      repeated or comma-separated values combine.
    - ``GET /v1/alerts``    — pending and firing alerts with their evidence, the
      drift detectors and input-drift tests, webhook counters; ``?since=<seq>``
      adds the transition log after that sequence number.
    - ``GET /v1/canary``    — shadow / canary experiments: the latest decision
      with its evidence, the traffic step, outcomes, decisions awaiting approval;
      ``POST /v1/canary/approve`` / ``reject`` with ``{"decision_id", "by"}``.
    - ``GET /metrics``      — Prometheus text exposition.
    - ``GET /v1/health``    — publisher and shard status.
    """

    def __init__(self, config: dict, n_shards: int, store_path: str,
                 max_body_bytes: int = 8 << 20, publish_interval_s: float = 0.25,
                 alerts: dict | None = None, archive_dir: str | None = None,
                 canary: dict | None = None, tracking_uri: str | None = None,
                 log_dir: str | None = None, placement: dict | None = None,
                 snapshot_every_s: float = 60.0) -> None:
        from actors.remote import ensure_actors

        self.cfg = config_from_dict(config)
        self.n_shards = n_shards
        self.max_body = max_body_bytes
        self.shards, self.pub = ensure_actors(config, n_shards, store_path, publish_interval_s,
                                             alerts=alerts, archive_dir=archive_dir,
                                             log_dir=log_dir, placement=placement,
                                             snapshot_every_s=snapshot_every_s)
        self.canary = None
        if canary is not None and tracking_uri:
            from actors.remote import ensure_canary

            self.canary = ensure_canary(canary, tracking_uri, archive_dir)
        self.received = 0
        self.too_large = 0
        self.ingest_timeout_s = 30.0

    # ---------------------------------------------------------------- ingest
    async def _ingest(self, request: Request, expect: str | None) -> JSONResponse:
        body = await request.body()
        if len(body) > self.max_body:
            self.too_large += 1
            raise HTTPException(413, f"body of {len(body)} bytes is over the limit of "
                                     f"{self.max_body} bytes: send smaller batches")
        rows = parse_payload(body)
        self.received += len(rows)
        res = validate_rows(rows, now_ms=time.time_ns() // 1_000_000,
                            max_future_ms=self.cfg.max_future_ms, expect=expect)
        rejected = list(res.rejections)
        calls = []
        inf_pos = iter(res.inference_index)
        fb_pos = iter(res.feedback_index)
        for kind, recs in iter_runs(res):
            pos = np.array([next(inf_pos if kind == "inference" else fb_pos) for _ in recs])
            batch = (InferenceBatch if kind == "inference" else FeedbackBatch).from_records(recs)
            for s, rows_s, part in route(batch, self.n_shards):
                calls.append((ShardTransport.call(self.shards[s], kind, part), pos[rows_s]))
        if res.rejections:   # counted on /metrics like the shards' own rejections
            calls.append((self.shards[self.received % self.n_shards].count_rejected.remote(
                res.tally()), None))
        try:   # a stuck shard: the sender gets a 503 and sends again (duplicates dropped)
            reports = await asyncio.wait_for(asyncio.gather(*(ref for ref, _ in calls)),
                                             self.ingest_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(503, f"a shard did not answer within {self.ingest_timeout_s:g} "
                                     f"s: send the batch again (events already applied are "
                                     f"dropped as duplicates)") from None
        except (RayActorError, ActorUnavailableError) as e:
            raise HTTPException(503, f"a shard is restarting ({type(e).__name__}): send the "
                                     f"batch again (events already applied are dropped as "
                                     f"duplicates)") from None
        accepted = late = dups = 0
        for rep, (_, pos) in zip(reports, calls):
            if pos is None:
                continue
            accepted += rep["accepted"]
            late += rep["late"]
            dups += rep["duplicates"]
            for r in rep["rejected"]:
                rejected.append(Rejection(int(pos[r["index"]]), r["field"], r["reason"],
                                          r["message"]))
        rejected.sort(key=lambda r: r.index)
        return JSONResponse({"received": len(rows), "accepted": accepted, "late": late,
                             "duplicates": dups, "rejected": [r.as_dict() for r in rejected]})

    @api.post("/v1/events")
    async def events(self, request: Request) -> JSONResponse:
        return await self._ingest(request, None)

    @api.post("/v1/feedback")
    async def feedback(self, request: Request) -> JSONResponse:
        return await self._ingest(request, "feedback")

    # ---------------------------------------------------------------- query
    @api.get("/v1/series")
    async def series(self, request: Request) -> JSONResponse:
        try:
            q = SeriesQuery.from_params(request.query_params)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        try:
            rows = await self.pub.series.remote(q.metrics, q.start, q.end, q.resolution,
                                                limit=q.limit + 1, offset=q.offset, **q.labels)
        except Exception as e:  # a bad filter or resolution comes back as a clear 400
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, (ValueError, KeyError)):
                raise HTTPException(400, _message(cause)) from None
            raise
        headers = {}
        if len(rows) > q.limit:   # more: RFC 8288 link to the next page
            rows = rows[:q.limit]
            nxt = request.url.include_query_params(offset=q.offset + q.limit, limit=q.limit)
            headers["Link"] = f'<{nxt}>; rel="next"'
        return JSONResponse(rows, headers=headers)

    @api.get("/v1/alerts")
    async def alerts(self, request: Request) -> JSONResponse:
        """Pending and firing alerts with evidence; detectors; input drift; notifications.

        ``?state=firing`` (or pending) filters the alerts, ``?since=<seq>`` adds
        the notifications after that sequence number (the transition log).
        """
        body = await self.pub.alerts.remote()
        state = request.query_params.get("state")
        if state:
            if state not in ("pending", "firing"):
                raise HTTPException(400, f"state: expected pending or firing, got {state!r}")
            body["alerts"] = [a for a in body["alerts"] if a["state"] == state]
        since = request.query_params.get("since")
        if since is not None:
            if not since.isdigit():
                raise HTTPException(400, f"since: expected a sequence number, got {since!r}")
            body["transitions"] = await self.pub.notifications.remote(int(since))
        return JSONResponse(jsonable(body))

    @api.get("/v1/canary")
    async def canary_status(self) -> JSONResponse:
        """Live experiments: the latest decision with its evidence, steps, outcomes."""
        if self.canary is None:
            return JSONResponse({"experiments": [], "pending_approval": [],
                                 "detail": "no experiments configured (canary_config)"})
        return JSONResponse(jsonable(await self.canary.status.remote()))

    async def _approval(self, request: Request, approve: bool) -> JSONResponse:
        if self.canary is None:
            raise HTTPException(404, "no experiments configured (canary_config)")
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, "body: expected JSON {\"decision_id\": ..., \"by\": ...}")
        if not isinstance(body, dict) or "decision_id" not in body:
            raise HTTPException(400, "decision_id: missing (a string from GET /v1/canary's "
                                     "pending_approval)")
        if not isinstance(body["decision_id"], str):
            raise HTTPException(400, f"decision_id: expected a string, got "
                                     f"{type(body['decision_id']).__name__}")
        by = body.get("by")
        if not isinstance(by, str) or not by:
            raise HTTPException(400, "by: missing (who approves or rejects)")
        method = self.canary.approve if approve else self.canary.reject
        try:
            rec = await method.remote(body["decision_id"], by)
        except Exception as e:
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, KeyError):
                raise HTTPException(404, _message(cause)) from None
            raise
        return JSONResponse(jsonable(rec))

    @api.post("/v1/canary/approve")
    async def canary_approve(self, request: Request) -> JSONResponse:
        return await self._approval(request, True)

    @api.post("/v1/canary/reject")
    async def canary_reject(self, request: Request) -> JSONResponse:
        return await self._approval(request, False)

    @api.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        text = await self.pub.metrics_text.remote()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/v1/health")
    async def health(self) -> JSONResponse:
        async def ping(ref, timeout_s: float = 2.0):
            return await asyncio.wait_for(ref, timeout_s)

        pub, *pings = await asyncio.gather(ping(self.pub.health.remote(), 5.0),
                                           *(ping(s.ping.remote()) for s in self.shards),
                                           return_exceptions=True)
        if isinstance(pub, BaseException):
            pub = {"status": "degraded", "publisher": f"{type(pub).__name__}: {pub}"[:300]}
        down = {str(i): ("no answer within 2 s" if isinstance(p, asyncio.TimeoutError)
                         else f"{type(p).__name__}: {p}"[:300])
                for i, p in enumerate(pings) if isinstance(p, BaseException)}
        body = {**pub, "shards_alive": len(pings) - len(down), "n_shards": self.n_shards}
        if down:
            body["shards_down"] = down
            body["status"] = "degraded"
        return JSONResponse(jsonable(body))
