"""The trigger: canary decisions and retraining requests become MLflow actions (alias moves,
version tags, retraining jobs), idempotently, each recorded as a run."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections import deque
from typing import Any, Callable, Mapping

from actors.registry import TAG_MAX, Registry, RunRecord, normalize_tracking_uri
from actors.retrain import RetrainJobs, launch_retrain
from kpistream.clock import Clock, SystemClock
from kpistream.errors import RegistryError

__all__ = ["Trigger", "ACTIONS"]

log = logging.getLogger(__name__)

ACTIONS = ("promote", "rollback", "halt", "inconclusive", "wait")
MOVING = ("promote", "rollback", "halt")          # actions that change the registry
FINAL = ("applied", "dry_run", "stale", "rejected")
PREVIOUS_ALIAS = "previous-champion"
T = "kpistream."                                  # tag prefix


def _key(model: str, decision_id: str) -> str:
    """The lookup tag of a decision: a hash of (registered model, decision id)."""
    return hashlib.sha1(f"{model}\0{decision_id}".encode()).hexdigest()[:32]


def _param_key(k: str) -> str:
    """An MLflow-safe name (alphanumerics, _ - . / and spaces)."""
    out = "".join(c if c.isalnum() or c in "_-./ " else "_" for c in str(k))
    return out[:250] or "_"


def _flatten(d: Any, prefix: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, Mapping):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[_param_key(prefix)] = json.dumps(d, default=str)[:6000] if not isinstance(
            d, str) else d[:6000]
    return out


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None if x is None else float(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# -------------------------------------------------------------------------- trigger

class Trigger:
    """Decisions and retraining requests -> MLflow.

    A plain class (no module-level Ray import; :mod:`actors.remote` makes it an
    actor).  MLflow is both where the actions land and the trigger's memory, so
    a restarted trigger neither repeats nor forgets one; what lands where:
    README, "Shadow, canary and MLflow actions".

    :meth:`apply` returns a record whose ``status`` is ``applied``,
    ``dry_run``, ``awaiting_approval``, ``cooldown``, ``stale``, ``rejected``,
    ``duplicate`` (a decision id seen before; ``first_status`` says how it
    ended) or ``ignored`` (``wait``).  It acts at most once per decision id,
    also across a crash between steps.  It acts on its own registered model
    (``model_name``); a decision's ``model`` is kept in the record only.
    """

    def __init__(self, tracking_uri: str, model_name: str, *, champion_alias: str = "champion",
                 challenger_alias: str = "challenger",
                 decisions_experiment: str = "kpistream-decisions", mode: str = "auto",
                 cooldown_s: float = 600.0, clock: Clock | None = None,
                 previous_alias: str = PREVIOUS_ALIAS, retrain_cooldown_s: float = 3600.0,
                 archive_dir: str | None = None, retrain_options: Mapping[str, Any] | None = None,
                 history_size: int = 1000) -> None:
        if mode not in ("auto", "dry_run", "approval"):
            raise ValueError(f"mode must be auto, dry_run or approval, got {mode!r}")
        self.uri = normalize_tracking_uri(tracking_uri)
        self.model_name = model_name
        self.champion_alias = champion_alias
        self.challenger_alias = challenger_alias
        self.previous_alias = previous_alias
        self.experiment_name = decisions_experiment
        self.mode = mode
        self.cooldown_ms = int(cooldown_s * 1000)
        self.clock = clock or SystemClock()
        self.archive_dir = archive_dir
        self.retrain_options = dict(retrain_options or {})
        self._lock = threading.RLock()
        self.registry = Registry(self.uri)
        self._exp_id: str | None = None
        self._last_move_ms: int | None = None    # loaded from MLflow on first use
        self._pending: dict[str, dict] | None = None
        self._history: deque = deque(maxlen=history_size)
        self._jobs = RetrainJobs(self.registry, lambda: self.experiment_id, model_name,
                                 dry_run=mode == "dry_run", cooldown_s=retrain_cooldown_s,
                                 clock=self.clock,
                                 launch=self._default_launch if archive_dir else None,
                                 history=self._history, lock=self._lock)

    # ---------------------------------------------------------------- MLflow access
    @property
    def experiment_id(self) -> str:
        if self._exp_id is None:
            self._exp_id = self.registry.ensure_experiment(self.experiment_name,
                                                           {T + "kind": "decisions"})
        return self._exp_id

    def _alias_version(self, alias: str, name: str | None = None) -> str | None:
        return self.registry.alias_version(name or self.model_name, alias)

    def alias_version(self, alias: str) -> str | None:
        """The version ``alias`` points to in the registered model, or None."""
        return self._alias_version(alias)

    def version_decision(self, version: str) -> str | None:
        """The decision recorded on a model version (``kpistream.decision`` tag), or None."""
        try:
            return self.registry.version_tags(self.model_name, str(version)).get(T + "decision")
        except RegistryError:
            return None

    def _find_run(self, decision_id: str) -> RunRecord | None:
        runs = self.registry.find_runs(
            self.experiment_id,
            f"tags.`{T}decision_key` = '{_key(self.model_name, decision_id)}'",
            max_results=5, order_by=["attributes.start_time ASC"])
        runs = [r for r in runs if r.tags.get(T + "decision_id") == str(decision_id)]
        return runs[0] if runs else None

    def _tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self.registry.set_run_tags(run_id, tags)

    def _version_tags(self, name: str, version: str, tags: Mapping[str, Any]) -> None:
        self.registry.set_version_tags(name, version, tags)

    # ---------------------------------------------------------------- decisions
    def apply(self, decision: Mapping[str, Any]) -> dict:
        """Act on one canary decision (class docstring); returns the outcome record."""
        d = self._check(decision)
        with self._lock:
            if d["action"] == "wait":       # not in history: the canary waits every tick
                return self._record(d, "ignored", None, None, None, detail="wait: nothing to do")
            run = self._find_run(d["id"])
            if run is not None:
                status = run.tags.get(T + "status", "")
                if status in FINAL or status == "awaiting_approval":
                    rec = self._record(d, "duplicate", run.run_id,
                                       run.tags.get(T + "alias_before"),
                                       run.tags.get(T + "alias_after"),
                                       detail=f"decision already {status}")
                    rec["first_status"] = status
                    return rec                  # a no-op: not in history either
                run_id = run.run_id        # in progress (crash) or cooldown: resume
                resumed = run.tags
            else:
                run_id = self._start_run(d, decision)
                resumed = {}
            if self.mode == "dry_run":
                return self._finish(d, run_id, self._dry_run(d))
            if self.mode == "approval" and d["action"] in MOVING and \
                    resumed.get(T + "approved_by") is None:
                self._tags(run_id, {T + "status": "awaiting_approval"})
                self._pending_map()[d["id"]] = d
                rec = self._record(d, "awaiting_approval", run_id, self._champion(), None,
                                   detail="waiting for approve() or reject()")
                return self._remember(rec)
            return self._finish(d, run_id, self._act(d, run_id, resumed))

    def pending(self) -> list[dict]:
        """Decisions waiting for approval (also those recorded before a restart)."""
        with self._lock:
            return [dict(d) for d in self._pending_map().values()]

    def approve(self, decision_id: str, by: str) -> dict:
        """Apply a waiting decision now (stale and cooldown checked now)."""
        with self._lock:
            d = self._pending_map().get(str(decision_id))
            if d is None:
                raise KeyError(f"no decision {decision_id!r} is waiting for approval")
            run = self._find_run(d["id"])
            run_id = run.run_id
            self._tags(run_id, {T + "approved_by": by, T + "approved_at_ms": self.clock.now_ms(),
                                T + "status": "in_progress"})
            del self._pending[d["id"]]
            rec = self._act(d, run_id, {**run.tags, T + "approved_by": by})
            rec["approved_by"] = by
            return self._finish(d, run_id, rec)

    def reject(self, decision_id: str, by: str) -> dict:
        """Drop a waiting decision; recorded (status ``rejected``), nothing moves."""
        with self._lock:
            d = self._pending_map().get(str(decision_id))
            if d is None:
                raise KeyError(f"no decision {decision_id!r} is waiting for approval")
            run = self._find_run(d["id"])
            self._tags(run.run_id, {T + "rejected_by": by,
                                         T + "rejected_at_ms": self.clock.now_ms()})
            del self._pending[d["id"]]
            champ = self._champion()
            rec = self._record(d, "rejected", run.run_id, champ, champ,
                               detail=f"rejected by {by}")
            rec["rejected_by"] = by
            return self._finish(d, run.run_id, rec)

    def history(self) -> list[dict]:
        """The outcome records of this trigger's calls, oldest first (bounded).

        Only calls that did something (a run recorded, a status changed, a job
        launched or held back); ``wait`` and ``duplicate`` answers are not kept.
        """
        with self._lock:
            return [dict(r) for r in self._history]

    def decided(self, experiment: str, limit: int = 50) -> list[dict]:
        """The decisions of ``experiment`` recorded in MLflow (newest last, at most
        ``limit``), read back from their runs' tags: what a restarted controller shows
        as its experiment's past."""
        runs = self.registry.find_runs(
            self.experiment_id, f"tags.`{T}experiment` = '{experiment}'", max_results=limit,
            order_by=["attributes.start_time DESC"])
        out = []
        for r in reversed(runs):
            t = r.tags
            if t.get(T + "model") != self.model_name:
                continue
            at = t.get(T + "decided_at_ms", "")
            out.append({"experiment": experiment, "decision_id": t.get(T + "decision_id"),
                        "action": t.get(T + "decision"), "status": t.get(T + "status"),
                        "challenger_version": t.get(T + "challenger_version") or None,
                        "primary_version": t.get(T + "primary_version") or None,
                        "alias_before": t.get(T + "alias_before"),
                        "alias_after": t.get(T + "alias_after"),
                        "decided_at_ms": int(at) if at.isdigit() else None,
                        "run_id": r.run_id, "source": "mlflow"})
        return out

    def status(self) -> dict:
        with self._lock:
            return {"mode": self.mode, "model": self.model_name, "tracking_uri": self.uri,
                    "pending": len(self._pending or {}), "last_alias_move_ms": self._last_move_ms,
                    "cooldown_s": self.cooldown_ms / 1000, "decisions": len(self._history),
                    "retrain": self.retrain_status()}

    # -- steps
    def _check(self, decision: Mapping[str, Any]) -> dict:
        if not isinstance(decision, Mapping):
            raise TypeError("a decision is a dict")
        d = dict(decision)
        if not d.get("id"):
            raise ValueError("decision: 'id' is required (unique per decision)")
        d["id"] = str(d["id"])
        if d.get("action") not in ACTIONS:
            raise ValueError(f"decision {d['id']}: action must be one of {', '.join(ACTIONS)}, "
                             f"got {d.get('action')!r}")
        if d["action"] in ("promote", "rollback", "halt", "inconclusive") and \
                d.get("challenger_version") in (None, ""):
            raise ValueError(f"decision {d['id']}: 'challenger_version' is required")
        d.setdefault("model", self.model_name)
        for k in ("primary_version", "challenger_version"):
            if d.get(k) is not None:
                d[k] = str(d[k])
        return d

    def _start_run(self, d: dict, original: Mapping[str, Any]) -> str:
        name = self.model_name
        tags = {
            T + "decision": d["action"], T + "decision_id": d["id"],
            T + "decision_key": _key(self.model_name, d["id"]), T + "model": name,
            T + "experiment": d.get("experiment", ""),
            T + "primary_version": d.get("primary_version") or "",
            T + "challenger_version": d.get("challenger_version") or "",
            T + "mode": self.mode, T + "dry_run": str(self.mode == "dry_run").lower(),
            T + "status": "in_progress", T + "decided_at_ms": d.get("at_ms", ""),
            "mlflow.note.content": f"**{d['action']}** {name} v{d.get('challenger_version')} "
                                   f"vs v{d.get('primary_version')}: {d.get('reason', '')}",
        }
        for m in d.get("metrics") or []:
            if isinstance(m, Mapping) and m.get("metric") and m.get("verdict") is not None:
                tags[_param_key(f"{T}verdict.{m['metric']}")] = m["verdict"]
        run_id = self.registry.create_run(
            self.experiment_id, f"{d['action']}-{name}-v{d.get('challenger_version')}",
            {k: str(v)[:TAG_MAX] for k, v in tags.items()})
        now = self.clock.now_ms()
        params = _flatten(d.get("policy") or {}, "policy")
        metrics: list[tuple[str, float, int]] = []
        for m in d.get("metrics") or []:
            if not isinstance(m, Mapping) or not m.get("metric"):
                continue
            for f in ("estimate", "lower", "upper", "margin", "harm", "n"):
                v = _num(m.get(f))
                if v is not None:
                    metrics.append((_param_key(f"{m['metric']}.{f}"), v, now))
        for k, v in (d.get("srm") or {}).items():
            x = _num(v)
            if x is not None:
                metrics.append((_param_key(f"srm.{k}"), x, now))
            else:
                self._tags(run_id, {_param_key(f"{T}srm.{k}"): v})
        self.registry.log_run_data(run_id, params, metrics)
        self.registry.log_dict(run_id, dict(original), "decision.json")
        return run_id

    def _champion(self, name: str | None = None) -> str | None:
        return self._alias_version(self.champion_alias, name)

    def _dry_run(self, d: dict) -> dict:
        champ = self._champion()
        after = d["challenger_version"] if d["action"] == "promote" else champ
        detail = f"dry run: would {d['action']}"
        if d["action"] in MOVING and champ != d.get("primary_version"):
            detail += f" (but it is stale: champion is v{champ})"
        elif d["action"] == "promote" and self._in_cooldown():
            detail += " (but the cooldown would hold it)"
        return self._record(d, "dry_run", None, champ, after, detail=detail)

    def _in_cooldown(self) -> bool:
        last = self._last_move()
        return last is not None and self.clock.now_ms() - last < self.cooldown_ms

    def _last_move(self) -> int | None:
        if self._last_move_ms is None:
            runs = self.registry.find_runs(self.experiment_id,
                                           f"tags.`{T}alias_moved` = 'true'", max_results=50,
                                           order_by=["attributes.start_time DESC"])
            times = [int(r.tags.get(T + "alias_moved_at_ms", "0")) for r in runs
                     if r.tags.get(T + "model") == self.model_name]
            self._last_move_ms = max(times) if times else -1
        return None if self._last_move_ms < 0 else self._last_move_ms

    def _act(self, d: dict, run_id: str, resumed: Mapping[str, str]) -> dict:
        name = self.model_name        # a trigger acts on its registered model only
        action = d["action"]
        champ = self._champion(name)
        if action == "inconclusive":
            self._tag_challenger(d, run_id)
            return self._record(d, "applied", run_id, champ, champ,
                                detail="recorded; champion stays")
        # crash recovery: this decision's own move already happened
        moving_from = resumed.get(T + "moving_from")
        ours = moving_from is not None and action == "promote" and \
            champ == d["challenger_version"]
        if not ours and champ != d.get("primary_version"):
            return self._record(d, "stale", run_id, champ, champ,
                                detail=f"the champion is v{champ}, not the decision's primary "
                                       f"v{d.get('primary_version')}")
        if action in ("rollback", "halt"):
            self._tag_challenger(d, run_id, {T + "rolled_back": "true",
                                             T + "rollback_reason": d.get("reason", "")})
            self._drop_challenger_alias(name, d["challenger_version"])
            return self._record(d, "applied", run_id, champ, champ,
                                detail=f"{action}: challenger v{d['challenger_version']} "
                                       f"rolled back; champion stays v{champ}")
        # promote
        before = moving_from or champ
        if not ours and self._in_cooldown():
            left = (self._last_move_ms + self.cooldown_ms - self.clock.now_ms()) / 1000
            self._tags(run_id, {T + "status": "cooldown"})
            return self._record(d, "cooldown", run_id, champ, champ,
                                detail=f"last champion move {self.cooldown_ms / 1000 - left:.0f} s "
                                       f"ago; cooldown {left:.0f} s more")
        new = d["challenger_version"]
        self._tags(run_id, {T + "moving_from": before or ""})    # before anything moves
        before = before or None
        if before is not None and before != new:
            if self._alias_version(self.previous_alias, name) != before:
                self.registry.set_alias(name, self.previous_alias, before)
            self._version_tags(name, before, {T + "replaced_by": new,
                                              T + "demoted_by_run": run_id,
                                              T + "demoted_by_decision": d["id"]})
        now = self.clock.now_ms()
        if self._champion(name) != new:
            self.registry.set_alias(name, self.champion_alias, new)
        self._tags(run_id, {T + "alias_moved": "true", T + "alias_moved_at_ms":
                            resumed.get(T + "alias_moved_at_ms") or now})
        self._last_move_ms = int(resumed.get(T + "alias_moved_at_ms") or now)
        self._tag_challenger(d, run_id, {T + "promoted_from": before or "",
                                         T + "promoted_at_ms": self._last_move_ms})
        self._drop_challenger_alias(name, new)
        return self._record(d, "applied", run_id, before, new,
                            detail=f"{self.champion_alias} v{before} -> v{new}; v{before} is "
                                   f"{self.previous_alias}")

    def _tag_challenger(self, d: dict, run_id: str, extra: Mapping[str, Any] | None = None):
        self._version_tags(self.model_name, d["challenger_version"], {
            T + "decision": d["action"], T + "decision_id": d["id"], T + "decision_run": run_id,
            T + "decision_reason": d.get("reason", ""), **(extra or {})})

    def _drop_challenger_alias(self, name: str, version: str) -> None:
        if self._alias_version(self.challenger_alias, name) == version:
            self.registry.delete_alias(name, self.challenger_alias)

    def _record(self, d: dict, status: str, run_id: str | None, before, after, *,
                detail: str = "") -> dict:
        return {"decision_id": d["id"], "action": d["action"], "status": status,
                "run_id": run_id, "alias_before": before, "alias_after": after,
                "model": self.model_name,
                "primary_version": d.get("primary_version"),
                "challenger_version": d.get("challenger_version"), "mode": self.mode,
                "reason": d.get("reason", ""), "detail": detail, "at_ms": self.clock.now_ms()}

    def _finish(self, d: dict, run_id: str, rec: dict) -> dict:
        rec["run_id"] = run_id
        tags = {T + "status": rec["status"]}
        if rec.get("alias_before") is not None:
            tags[T + "alias_before"] = rec["alias_before"]
        if rec.get("alias_after") is not None:
            tags[T + "alias_after"] = rec["alias_after"]
        self._tags(run_id, tags)
        self.registry.log_dict(run_id, rec, "outcome.json")
        if rec["status"] in FINAL:
            self.registry.end_run(run_id, "FINISHED")
        return self._remember(rec)

    def _remember(self, rec: dict) -> dict:
        self._history.append(dict(rec))
        log.info("kpistream trigger: %s %s -> %s (%s)", rec["action"], rec["decision_id"],
                 rec["status"], rec.get("detail", ""))
        return rec

    def _pending_map(self) -> dict[str, dict]:
        """Waiting decisions; after a restart, rebuilt from the runs that wait."""
        if self._pending is None:
            self._pending = {}
            runs = self.registry.find_runs(
                self.experiment_id, f"tags.`{T}status` = 'awaiting_approval'",
                max_results=1000, order_by=["attributes.start_time ASC"])
            for r in runs:
                if r.tags.get(T + "model") != self.model_name:
                    continue
                try:
                    d = self.registry.load_dict(r, "decision.json")
                    self._pending[str(d["id"])] = self._check(d)
                except Exception as e:  # noqa: BLE001 - a broken record is reported, not fatal
                    log.warning("kpistream trigger: cannot reload waiting decision of run %s: "
                                "%s", r.run_id, e)
        return self._pending

    # ---------------------------------------------------------------- retraining
    def maybe_retrain(self, reason: str, evidence: Mapping[str, Any] | None = None,
                      launch: Callable[..., Any] | None = None) -> dict:
        """Launch a retraining job unless one runs or the retrain cooldown holds
        (:meth:`actors.retrain.RetrainJobs.maybe_retrain`)."""
        return self._jobs.maybe_retrain(reason, evidence, launch)

    def retrain_status(self) -> dict:
        """``{"status": "idle" | "running" | "done" | "failed", ...}`` of the last job."""
        return self._jobs.status()

    def _default_launch(self, reason: str, parent_run_id: str):
        """:func:`actors.retrain.launch_retrain` on ``archive_dir`` with ``retrain_options``."""
        return launch_retrain(self.archive_dir, self.uri, self.model_name,
                              alias=self.challenger_alias, reason=reason,
                              parent_run_id=parent_run_id, **self.retrain_options)
