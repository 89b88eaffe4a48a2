"""The traffic layer of a shadow or canary experiment: one Serve ingress
(:class:`ExperimentIngress`) in front of two models, built by :func:`build_experiment_app`
(its ``serve.yaml`` args: README, "Configuration").
"""

# no `from __future__ import annotations`: FastAPI must see the real Request annotation in
# the replica, where this class arrives serialized
import asyncio
import hashlib
import importlib
import itertools
import json
import logging
import secrets
import time
from collections import Counter
from typing import Any, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from starlette.responses import Response

from app.monitor import REQUEST_ID_HEADER, BadInput, ModelUnavailable, in_serve_replica
from kpistream.wire.schema import MAX_STR

log = logging.getLogger("kpistream.ingress")

__all__ = ["ExperimentConfig", "ArmArgs", "ExperimentAppArgs", "ExperimentIngress",
           "build_experiment_app", "bucket", "routes_to_challenger", "is_mirrored",
           "CONTROLLER", "CONTROLLER_NAMESPACE", "VARIANT_HEADER", "BUCKETS"]

CONTROLLER = "kpistream-canary"
CONTROLLER_NAMESPACE = "kpistream"
VARIANT_HEADER = "x-kpistream-variant"
BUCKETS = 10_000
HALT_STATES = frozenset({"rollback", "halt"})


# ---------------------------------------------------------------------------
# deterministic assignment


def bucket(salt: str, key: str) -> int:
    """``hash(salt, key) mod 10000``: stable across processes and runs (BLAKE2b, not ``hash``)."""
    h = hashlib.blake2b(salt.encode("utf-8", "surrogatepass"), digest_size=8)
    h.update(b"\x00")
    h.update(key.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest(), "big") % BUCKETS


def _threshold(fraction: float) -> int:
    return int(round(fraction * BUCKETS))


def routes_to_challenger(experiment: str, key: str, weight: float) -> bool:
    """Canary: whether ``key`` (the sticky key) goes to the challenger at ``weight``."""
    return bucket("canary:" + experiment, key) < _threshold(weight)


def is_mirrored(experiment: str, request_id: str, fraction: float) -> bool:
    """Shadow: whether the request ``request_id`` is mirrored at ``mirror_fraction``."""
    return bucket("mirror:" + experiment, request_id) < _threshold(fraction)


# ---------------------------------------------------------------------------
# typed args


class ExperimentConfig(BaseModel):
    """The ingress's own settings."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = Field("default", min_length=1, max_length=MAX_STR,
                            description="the experiment's name (asked of the controller; salts "
                                        "the hashes, so experiments split independently)")
    mode: Literal["shadow", "canary"] = "shadow"
    mirror_fraction: float = Field(1.0, ge=0.0, le=1.0,
                                   description="shadow: share of requests mirrored")
    max_mirror_in_flight: int = Field(64, ge=1, description="shadow: mirrors outstanding per "
                                                           "ingress replica; more are dropped")
    mirror_timeout_s: float = Field(30.0, gt=0, description="a mirror outstanding this long is "
                                                            "cancelled and counted as an error")
    unavailable_backoff_s: float = Field(1.0, ge=0.05, description="seconds between probes of a "
                                                                   "challenger that said it "
                                                                   "has no model")
    sticky_key: str | None = Field("user_id", description="canary: payload field (else header) "
                                                          "the split is sticky on; None: the "
                                                          "request id")
    weights: list[float] = Field(default_factory=lambda: [0.05, 0.25, 0.5, 1.0], min_length=1,
                                 description="canary: the challenger's share at each step")
    initial_step: int = Field(0, ge=0, description="canary: the step until a controller speaks")
    control_poll_s: float = Field(1.0, gt=0, description="seconds between controller polls")
    controller: str = Field(CONTROLLER, min_length=1)
    controller_namespace: str = Field(CONTROLLER_NAMESPACE, min_length=1)
    controller_timeout_s: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "ExperimentConfig":
        for w in self.weights:
            if not 0.0 <= w <= 1.0:
                raise ValueError(f"weights must lie in [0, 1], got {w}")
        if self.initial_step >= len(self.weights):
            raise ValueError(f"initial_step {self.initial_step} is past the last of "
                             f"{len(self.weights)} weights")
        return self


class ArmArgs(BaseModel):
    """One side of the experiment: a MonitoredModel deployment and its constructor args."""

    model_config = ConfigDict(extra="forbid")

    import_path: str = Field("app.demo.model:DemoClassifier",
                             description="module:attribute of a Serve deployment (or a class) "
                                         "whose constructor takes variant=")
    variant: str | None = Field(None, min_length=1, max_length=MAX_STR,
                                description="its events' variant (challenger default: the mode)")
    init_args: dict[str, Any] = Field(default_factory=dict,
                                      description="constructor keyword args (over shared ones)")
    deployment_options: dict[str, Any] = Field(default_factory=dict,
                                               description="Deployment.options(...), e.g. "
                                                           "num_replicas, name")


class ExperimentAppArgs(ExperimentConfig):
    """Typed args of :func:`build_experiment_app`: the ingress config plus the two arms."""

    primary: ArmArgs = Field(default_factory=lambda: ArmArgs(variant="primary",
                                                             init_args={"alias": "champion"}))
    challenger: ArmArgs = Field(default_factory=lambda: ArmArgs(
        init_args={"alias": "challenger"}))
    shared_init_args: dict[str, Any] = Field(
        default_factory=dict, description="constructor args of both arms (tracking_uri, "
                                          "model_name, n_shards, alias_poll_s ...); a relative "
                                          "tracking_uri is made absolute here")
    ingress_options: dict[str, Any] = Field(default_factory=dict,
                                            description="ExperimentIngress.options(...)")

    def ingress_config(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if k in ExperimentConfig.model_fields}


# ---------------------------------------------------------------------------
# the ingress

experiment_api = FastAPI(title="kpistream experiment ingress",
                         description="primary / shadow mirror / weighted canary split")


class _PrefixIsRoot:
    """``POST <route_prefix>`` (no trailing slash) reaches the ``/`` route, not a 307 redirect
    (FastAPI cannot declare an empty path in a Serve ingress class)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            if path == "" or path == scope.get("root_path", ""):
                scope = dict(scope, path=path + "/")
        await self.app(scope, receive, send)


experiment_api.add_middleware(_PrefixIsRoot)


def _json(obj: Any, status: int, headers: dict[str, str]) -> Response:
    body = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(body, status, headers=headers, media_type="application/json")


def _cause(e: BaseException) -> BaseException:
    """The user's exception behind a RayTaskError (which is also an instance of it)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def _message(e: BaseException) -> str:
    c = _cause(e)
    msg = f"{type(c).__name__}: {c}"
    return msg if len(msg) <= 500 else msg[:499] + "…"


def _replica_id() -> str | None:
    try:
        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        return getattr(rid, "unique_id", None) or str(rid or getattr(ctx, "replica_tag", ""))
    except Exception:
        return None


# Everything the routes use is defined above this point: ``serve.ingress`` freezes (pickles)
# the FastAPI app, and with it the route functions' globals, when the class is decorated.
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(experiment_api)
class ExperimentIngress:
    """Routes each request to the primary or the challenger; mirrors in shadow mode.

    ``primary`` and ``challenger`` are DeploymentHandles of MonitoredModel
    deployments (bound applications at build time); ``config`` an
    :class:`ExperimentConfig` or its dict.

    Both arms are :class:`~app.monitor.MonitoredModel` s called with
    :meth:`~app.monitor.MonitoredModel.infer` and the request's id, so the
    primary's and the challenger's inference events carry the **same**
    ``request_id`` with their own ``variant``, and meet in one shard.

    Routes (relative to the app's ``route_prefix``):

    - ``POST /`` -- a JSON body, passed as is to the model's ``predict``; reply
      ``{"request_id", "prediction", "variant", "model_version"}`` with headers
      ``x-request-id`` and ``x-kpistream-variant`` (the variant that answered).
      400 when the body is not JSON, 500 ``{"request_id", "error"}`` when the
      model raised, 503 when it has no model (its MLflow alias does not exist).
    - ``GET /v1/experiment`` -- the live config (mode, weight, step, state, what
      the controller said last) and this replica's counters (counters are per
      ingress replica).

    Modes:

    - ``shadow`` -- the primary answers.  A request is mirrored to the
      challenger when ``bucket(request_id) < mirror_fraction * 10000`` (a keyed
      hash of the request id, so which requests are mirrored is reproducible),
      as a task of its own: the reply never waits for it and its failures are
      only counted (``mirror_errors``; ``mirror_timeouts`` past
      ``mirror_timeout_s``).  At most ``max_mirror_in_flight`` mirrors are
      outstanding per ingress replica; above that the mirror is dropped and
      counted (``mirror_dropped``), never queued.  A challenger that answers
      "unavailable" (no ``challenger`` alias yet) is sent no more requests until
      a probe of its ``available()`` (every ``unavailable_backoff_s``) says it
      has a model; the requests not mirrored meanwhile are counted as
      ``mirror_unavailable`` (so ``mirrored`` counts only mirrors sent).
    - ``canary`` -- a weighted split, sticky on ``sticky_key`` (a payload field,
      or else a header of that name; else the request id): the challenger
      answers when ``bucket(key) < weight * 10000``, so a key that reached the
      canary at one weight stays there at every larger weight.  The weight is
      ``weights[initial_step]`` until a controller says otherwise.  If the
      challenger is unavailable the primary answers (``canary_fallbacks``).

    The controller: every ``control_poll_s`` seconds a background task (never
    the request path) looks up the named Ray actor ``controller`` (default
    ``kpistream-canary``, namespace ``kpistream``) and, if it exists, calls
    ``traffic(experiment) -> {"mode", "weight", "step", "state"}``.  Its answer
    replaces mode and weight (``weight`` wins; a ``step`` alone indexes
    ``weights``); ``state`` ``"rollback"`` or ``"halt"`` sends everything to the
    primary and stops mirroring.  Without a controller (or while it fails) the
    last known traffic stays; errors are counted.
    """

    def __init__(self, primary, challenger, config: dict | ExperimentConfig | None = None
                 ) -> None:
        cfg = config if isinstance(config, ExperimentConfig) else \
            ExperimentConfig.model_validate(dict(config or {}))
        self._cfg = cfg
        self._primary = primary
        self._challenger = challenger
        self._mirror_salt = "mirror:" + cfg.experiment
        self._canary_salt = "canary:" + cfg.experiment
        # the traffic now (the controller may change it)
        self._mode = cfg.mode
        self._step: int | None = cfg.initial_step
        self._weight = cfg.weights[cfg.initial_step]
        self._state = "configured"
        self._source = "config"
        self._mirror_t = _threshold(cfg.mirror_fraction)
        # request ids when the caller gave none (behind Serve's proxy there always is one)
        self._id_prefix = secrets.token_hex(6) + "-"
        self._ids = itertools.count(1)
        self._add_rid_header = not in_serve_replica()
        # mirrors
        self._mirror_in_flight = 0
        self._mirror_tasks: set[asyncio.Task] = set()
        # why the challenger cannot answer (None: it can); a probe task clears it
        self._challenger_down: str | None = None
        self._probe_task: asyncio.Task | None = None
        self._mirror_last_error: str | None = None
        self._c: Counter = Counter()
        self._routed: Counter = Counter()
        # each arm's variant label, as its replies say (for the header of an error reply)
        self._arm_variant = {"primary": "primary", "challenger": "challenger"}
        # the controller
        self._ctl = None
        self._ctl_task: asyncio.Task | None = None
        self._ctl_found = False
        self._ctl_last: dict | None = None
        self._ctl_last_ok: float | None = None
        self._ctl_error: str | None = None
        self._started = time.monotonic()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._start_controller_poll()

    # ------------------------------------------------------------- routing
    def _sticky(self, payload: Any, request: Request, rid: str) -> str:
        key = self._cfg.sticky_key
        if key:
            if isinstance(payload, dict):
                v = payload.get(key)
                if v is not None and v != "":
                    return str(v)
            v = request.headers.get(key) or request.headers.get(key.replace("_", "-"))
            if v:
                return v
            self._c["sticky_key_missing"] += 1
        return rid

    @experiment_api.post("/")
    async def predict(self, request: Request) -> Response:
        if self._ctl_task is None:
            self._start_controller_poll()
        rid = request.headers.get(REQUEST_ID_HEADER)
        if not rid or len(rid) > MAX_STR:
            rid = f"{self._id_prefix}{next(self._ids)}"
        headers = {REQUEST_ID_HEADER: rid} if self._add_rid_header else {}
        body = await request.body()
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            self._c["bad_requests"] += 1
            headers[VARIANT_HEADER] = "none"       # no model saw it
            return _json({"request_id": rid, "error": "the request body is not valid JSON"},
                         400, headers)
        c = self._c
        c["requests"] += 1
        halted = self._state in HALT_STATES
        if halted:
            c["halted_requests"] += 1
        to_challenger = False
        mode = self._mode
        if mode == "canary" and not halted and self._weight > 0:
            to_challenger = bucket(self._canary_salt, self._sticky(payload, request, rid)) \
                < _threshold(self._weight)
        elif mode == "shadow" and not halted and self._mirror_t > 0:
            if bucket(self._mirror_salt, rid) < self._mirror_t:
                self._mirror(payload, rid)
            else:
                c["mirror_sampled_out"] += 1

        arm = "challenger" if to_challenger else "primary"
        try:
            if to_challenger and self._challenger_down is not None:
                c["canary_fallbacks"] += 1
                arm = "primary"
                out = await self._primary.infer.remote(payload, rid)
            elif to_challenger:
                try:
                    out = await self._challenger.infer.remote(payload, rid)
                except ModelUnavailable as e:
                    c["canary_fallbacks"] += 1
                    self._challenger_unavailable(e)
                    arm = "primary"
                    out = await self._primary.infer.remote(payload, rid)
            else:
                out = await self._primary.infer.remote(payload, rid)
        except ModelUnavailable as e:
            c["unavailable"] += 1
            headers[VARIANT_HEADER] = self._arm_variant[arm]
            return _json({"request_id": rid, "error": _message(e)}, 503, headers)
        except BadInput as e:
            c["bad_requests"] += 1
            headers[VARIANT_HEADER] = self._arm_variant[arm]
            return _json({"request_id": rid, "error": _message(e)}, 400, headers)
        except Exception as e:
            c["errors"] += 1
            c[f"errors_{arm}"] += 1
            headers[VARIANT_HEADER] = self._arm_variant[arm]
            return _json({"request_id": rid, "error": _message(e)}, 500, headers)
        variant = str(out.get("variant", ""))
        self._arm_variant[arm] = variant
        self._routed[variant] += 1
        headers[VARIANT_HEADER] = variant
        try:
            return _json({"request_id": rid, "prediction": out.get("prediction"),
                          "variant": variant, "model_version": out.get("model_version")},
                         200, headers)
        except (TypeError, ValueError) as e:   # a prediction that is not JSON
            c["errors"] += 1
            c[f"errors_{arm}"] += 1
            return _json({"request_id": rid, "error": f"the prediction is not JSON: {e}"},
                         500, headers)

    # ------------------------------------------------------------- mirrors
    def _mirror(self, payload: Any, rid: str) -> None:
        """Fire and forget: never awaited by the request, never raises."""
        c = self._c
        if self._challenger_down is not None:
            c["mirror_unavailable"] += 1
            return
        if self._mirror_in_flight >= self._cfg.max_mirror_in_flight:
            c["mirror_dropped"] += 1
            return
        try:
            resp = self._challenger.infer.remote(payload, rid)
        except Exception as e:  # the handle refused (e.g. back pressure)
            c["mirror_errors"] += 1
            self._note_mirror_error(e)
            return
        self._mirror_in_flight += 1
        c["mirrored"] += 1
        task = asyncio.ensure_future(self._await_mirror(resp))
        self._mirror_tasks.add(task)
        task.add_done_callback(self._mirror_tasks.discard)

    async def _await_mirror(self, resp) -> None:
        c = self._c
        try:
            await asyncio.wait_for(resp, self._cfg.mirror_timeout_s)
            c["mirror_ok"] += 1
        except ModelUnavailable as e:
            c["mirror_unavailable"] += 1
            self._challenger_unavailable(e)
        except asyncio.TimeoutError as e:
            c["mirror_timeouts"] += 1
            c["mirror_errors"] += 1
            self._note_mirror_error(e)
            try:
                resp.cancel()
            except Exception:
                pass
        except asyncio.CancelledError:
            c["mirror_errors"] += 1
            raise
        except Exception as e:
            c["mirror_errors"] += 1
            self._note_mirror_error(e)
        finally:
            self._mirror_in_flight -= 1

    def _challenger_unavailable(self, e: BaseException) -> None:
        """The challenger said it has no model: no more requests to it until a probe
        (``available()``, which never raises: no traceback per attempt in the replica
        logs) finds it can answer; one log line per change of state."""
        if self._challenger_down is None:
            self._challenger_down = _message(e)
            log.info("kpistream experiment %s: challenger unavailable (%s); no requests to it "
                     "until it has a model", self._cfg.experiment, self._challenger_down)
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.get_running_loop().create_task(
                self._probe_challenger(), name="kpistream-challenger-probe")

    async def _probe_challenger(self) -> None:
        while self._challenger_down is not None:
            await asyncio.sleep(self._cfg.unavailable_backoff_s)
            try:
                reason = await self._challenger.available.remote()
            except Exception as e:   # counted; the next probe tries again
                self._c["probe_errors"] += 1
                self._note_mirror_error(e)
                continue
            self._c["probes"] += 1
            if reason is None:
                log.info("kpistream experiment %s: challenger available again",
                         self._cfg.experiment)
                self._challenger_down = None
            else:
                self._challenger_down = str(reason)

    def _note_mirror_error(self, e: BaseException) -> None:
        self._mirror_last_error = _message(e) if not isinstance(e, asyncio.TimeoutError) else \
            f"mirror outstanding for more than {self._cfg.mirror_timeout_s} s"

    # ---------------------------------------------------------- controller
    def _start_controller_poll(self) -> None:
        if self._ctl_task is not None and not self._ctl_task.done():
            return
        self._ctl_task = asyncio.get_running_loop().create_task(
            self._control_loop(), name="kpistream-experiment-control")

    async def _control_loop(self) -> None:
        while True:
            try:
                await self.poll_controller()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # pragma: no cover - poll_controller never raises
                self._ctl_error = _message(e)
            await asyncio.sleep(self._cfg.control_poll_s)

    async def poll_controller(self) -> dict | None:
        """Ask the controller once (the background task does this every ``control_poll_s``).
        Returns its answer, or None when it does not exist or failed (counted)."""
        cfg = self._cfg
        c = self._c
        c["controller_polls"] += 1
        if self._ctl is None:
            import ray

            try:
                self._ctl = await asyncio.to_thread(ray.get_actor, cfg.controller,
                                                    namespace=cfg.controller_namespace)
            except ValueError:   # no such actor (yet): keep the traffic as it is
                self._ctl_found = False
                return None
            except Exception as e:
                c["controller_errors"] += 1
                self._ctl_error = _message(e)
                return None
        self._ctl_found = True
        try:
            res = await asyncio.wait_for(self._ctl.traffic.remote(cfg.experiment),
                                         cfg.controller_timeout_s)
        except Exception as e:   # gone, or failing: look it up again next time
            c["controller_errors"] += 1
            self._ctl_error = _message(e)
            self._ctl = None
            return None
        try:
            self._apply(res)
        except ValueError as e:
            c["controller_errors"] += 1
            self._ctl_error = f"bad answer {res!r:.200}: {e}"
            return None
        self._ctl_last = dict(res)
        self._ctl_last_ok = time.monotonic()
        self._ctl_error = None
        return res

    def _apply(self, res: Any) -> None:
        if not isinstance(res, dict):
            raise ValueError("traffic() must return a dict")
        cfg = self._cfg
        mode = res.get("mode", self._mode)
        if mode not in ("shadow", "canary"):
            raise ValueError(f"mode must be 'shadow' or 'canary', got {mode!r}")
        step = res.get("step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool)
                                 or step < 0):
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        weight = res.get("weight")
        if weight is None:
            if step is None:
                weight = self._weight
            elif step < len(cfg.weights):
                weight = cfg.weights[step]
            else:
                raise ValueError(f"step {step} is past the last of {len(cfg.weights)} weights")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be a number in [0, 1], got {weight!r}")
        state = res.get("state", self._state)
        if not isinstance(state, str) or not state:
            raise ValueError(f"state must be a non-empty string, got {state!r}")
        changed = (mode, float(weight), step, state) != (self._mode, self._weight, self._step,
                                                        self._state)
        self._mode, self._weight, self._step, self._state = mode, float(weight), step, state
        self._source = "controller"
        if changed:
            self._c["controller_updates"] += 1
            log.info("kpistream experiment %s: mode %s, weight %s, step %s, state %s",
                     cfg.experiment, mode, weight, step, state)

    # -------------------------------------------------------------- status
    @experiment_api.get("/v1/experiment")
    async def experiment(self) -> Response:
        return _json(self.status(), 200, {})

    def status(self) -> dict:
        cfg = self._cfg
        c = self._c
        now = time.monotonic()
        counters = {k: c[k] for k in (
            "requests", "mirrored", "mirror_ok", "mirror_dropped", "mirror_errors",
            "mirror_timeouts", "mirror_unavailable", "mirror_sampled_out", "canary_fallbacks",
            "unavailable", "errors", "errors_primary", "errors_challenger", "bad_requests",
            "halted_requests", "sticky_key_missing", "controller_polls", "controller_errors",
            "controller_updates", "probes", "probe_errors")}
        counters["routed"] = dict(self._routed)
        counters["challenger_unavailable"] = self._challenger_down
        counters["mirror_in_flight"] = self._mirror_in_flight
        return {
            "experiment": cfg.experiment, "mode": self._mode, "state": self._state,
            "weight": self._weight, "step": self._step, "source": self._source,
            "halted": self._state in HALT_STATES,
            "config": cfg.model_dump(),
            "controller": {"name": cfg.controller, "namespace": cfg.controller_namespace,
                           "found": self._ctl_found, "last": self._ctl_last,
                           "last_ok_age_s": (None if self._ctl_last_ok is None
                                             else round(now - self._ctl_last_ok, 3)),
                           "last_error": self._ctl_error},
            "counters": counters,
            "last_mirror_error": self._mirror_last_error,
            "replica": _replica_id(), "uptime_s": round(now - self._started, 3),
        }

    def __del__(self) -> None:
        task = self._ctl_task
        if task is not None and not task.done():
            try:
                task.cancel()
            except RuntimeError:
                pass


# ---------------------------------------------------------------------------
# the app builder


def _import(path: str) -> Any:
    mod, sep, attr = path.partition(":")
    if not sep:
        mod, _, attr = path.rpartition(".")
    if not mod or not attr:
        raise ValueError(f"import_path must be 'module:attribute', got {path!r}")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _bind_arm(arm: ArmArgs, shared: dict, variant: str):
    from ray.serve.deployment import Deployment

    target = _import(arm.import_path)
    if isinstance(target, Deployment):
        dep = target
    elif isinstance(target, type):
        dep = serve.deployment(target)
    else:
        raise TypeError(f"{arm.import_path} is neither a Serve deployment nor a class")
    kwargs = {**shared, **arm.init_args, "variant": variant}
    if kwargs.get("tracking_uri"):
        # resolved on the driver (replicas may run in another working directory), and the
        # store's tables made here, before the replicas start (they raced to make them)
        from actors.registry import prepare_store

        kwargs["tracking_uri"] = prepare_store(kwargs["tracking_uri"])
    opts = {"name": f"{dep.name}-{variant}", **arm.deployment_options}
    return dep.options(**opts).bind(**kwargs)


def build_experiment_app(args: ExperimentAppArgs):
    """Serve app builder: ``ExperimentIngress`` bound to the primary and the challenger.

    Each arm is ``<import_path>.options(name="<Deployment>-<variant>", ...)
    .bind(**shared_init_args, **init_args, variant=...)``; the defaults serve
    the demo classifier's ``champion`` (variant ``primary``) against its
    ``challenger`` (variant = the mode: ``shadow`` or ``canary``).
    """
    if not isinstance(args, ExperimentAppArgs):
        args = ExperimentAppArgs.model_validate(dict(args or {}))
    primary = _bind_arm(args.primary, args.shared_init_args, args.primary.variant or "primary")
    challenger_variant = args.challenger.variant or args.mode
    if challenger_variant == (args.primary.variant or "primary"):
        raise ValueError(f"primary and challenger need different variants, both are "
                         f"{challenger_variant!r}")
    challenger = _bind_arm(args.challenger, args.shared_init_args, challenger_variant)
    ingress = ExperimentIngress.options(**args.ingress_options) if args.ingress_options \
        else ExperimentIngress
    return ingress.bind(primary, challenger, args.ingress_config())
