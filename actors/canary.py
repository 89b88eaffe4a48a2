"""The canary controller (:class:`Canary`): experiments, decisions, traffic steps and retraining
triggers.  Its ``configs/canary.yaml`` keys: README, "Configuration".
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from actors.ticker import Ticker
from kpistream.decide.policy import CanaryPolicy, policy_from_spec
from kpistream.clock import Clock, SystemClock
from kpistream.spec.canary import CanaryFile
from kpistream.spec.common import format_duration, parse, read_yaml
from kpistream.errors import ConfigError

log = logging.getLogger("kpistream.canary")

__all__ = ["ExperimentSpec", "RetrainSpec", "ActionsSpec", "CanaryConfig", "load_canary_config",
           "Canary"]

MODES = ("shadow", "canary")


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    model: str
    registered_model: str
    primary_variant: str = "primary"
    challenger_variant: str = "shadow"
    mode: str = "shadow"
    steps: tuple[float, ...] = (1.0,)
    settle_ms: int = 5_000
    interval_ms: int = 5_000


@dataclass(frozen=True)
class RetrainSpec:
    on_alerts: tuple[str, ...] = ()
    every_labelled: int | None = None
    model: str | None = None


@dataclass(frozen=True)
class ActionsSpec:
    mode: str = "auto"
    cooldown_ms: int = 600_000
    retrain_cooldown_ms: int = 3_600_000


@dataclass(frozen=True)
class CanaryConfig:
    policy: CanaryPolicy
    experiments: tuple[ExperimentSpec, ...] = ()
    retrain: RetrainSpec = RetrainSpec()
    actions: ActionsSpec = ActionsSpec()

    @property
    def registered_models(self) -> tuple[str, ...]:
        names = [s.registered_model for s in self.experiments]
        if self.retrain.model:
            names.append(self.retrain.model)
        return tuple(dict.fromkeys(names))


def load_canary_config(source: str | Path | Mapping[str, Any] | None) -> CanaryConfig:
    """``configs/canary.yaml`` (path or mapping): the policy, the experiments, retraining."""
    raw: Mapping[str, Any] = {}
    if isinstance(source, (str, Path)):
        raw = read_yaml(source) or {}
    elif source is not None:
        raw = source
    if not isinstance(raw, Mapping):
        raise ConfigError("<root>", "expected a mapping")
    spec = parse(CanaryFile, raw)
    a = spec.actions
    return CanaryConfig(policy_from_spec(spec),
                        tuple(ExperimentSpec(**e.spec_kwargs()) for e in spec.experiments),
                        RetrainSpec(**spec.retrain),
                        ActionsSpec(a.mode, a.cooldown, a.retrain_cooldown))


@dataclass
class _Run:
    version: str
    primary_version: str | None
    started_ms: int
    step: int = 0
    step_started_ms: int = 0
    status: str = "running"     # running | promoted | rolled_back | halted | inconclusive
    #                             | awaiting_approval | rejected | stale | ended
    last: dict | None = None    # the latest decision (as_dict) with its summary counts
    last_at: int | None = None
    outcome: dict | None = None  # the trigger's record of the final decision
    events: list = field(default_factory=list)   # steps, cooldowns, approvals


_FINAL = {"promote": "promoted", "rollback": "rolled_back", "halt": "halted",
          "inconclusive": "inconclusive"}


class Canary:
    """Runs every configured experiment.

    A plain class (no Ray import); :mod:`actors.remote` makes it the named actor
    ``kpistream-canary`` that the experiment ingress polls for its traffic and
    ``GET /v1/canary`` reads.  Everything it needs comes in as callables, so a
    test can wire it to a plain publisher and trigger.

    **An experiment run** starts when the registered model's ``challenger``
    alias points to a version the controller has not run yet (a retraining
    registers one; so can a person) and the champion exists.  Each ``interval``
    it asks the publisher for the paired summary since the run (shadow) or the
    step (canary) started and asks the policy for a decision.  ``wait`` keeps
    going.  In canary mode a ``promote`` before the last step moves to the next
    weight (recorded, no MLflow action) and starts that step's analysis after
    ``settle`` (the ingress polls every second); each step is its own analysis,
    with the policy's minimum and maximum durations and samples.  Anything else
    goes to the trigger (:class:`actors.trigger.Trigger`): a decision run in
    MLflow, the aliases moved (promote) or the challenger marked (rollback,
    halt), and the run ends -- except ``cooldown`` (tried again next interval)
    and ``awaiting_approval`` (until someone approves or rejects it through the
    API).  The decision id is
    ``<experiment>/v<challenger>-vs-v<champion>/step<i>/<action>``: a retried or
    restarted controller sends the same id, and the trigger acts at most once
    per id.  A restarted controller does not run a version again that MLflow
    says was decided (its ``kpistream.decision`` tag), and picks up a decision
    still awaiting approval.  A run ends when the ``challenger`` alias moves
    away, or when the champion moves (the primary arm would mix versions: a new
    run starts against the new champion); a decision it left waiting for
    approval is withdrawn (rejected).

    **Traffic** (:meth:`traffic`): what the ingress routes -- the current step's
    weight while a canary runs, 0 after a rollback, halt or inconclusive end
    (everything to the primary), and after a promotion too (the primary serves
    the promoted version once its replicas follow the ``champion`` alias).

    **Retraining**: the controller polls the publisher's alert transitions; a
    rule named in ``retrain.on_alerts`` entering ``firing``, or
    ``every_labelled`` new labelled requests, calls the trigger's
    ``maybe_retrain`` (which has its own cooldown and launches the training
    job on Ray).
    """

    def __init__(self, config: CanaryConfig | str | Path | Mapping[str, Any] | None, *,
                 summary: Callable[[ExperimentSpec, str, int, str | None], dict],
                 triggers: Mapping[str, Any] | None = None,
                 notifications: Callable[[int, str | None], dict] | None = None,
                 labelled: Callable[[], int] | None = None,
                 clock: Clock | None = None, history: int = 50) -> None:
        self.cfg = config if isinstance(config, CanaryConfig) else load_canary_config(config)
        self.policy = self.cfg.policy
        self.summary = summary
        # registered model -> Trigger (apply, approve, reject, pending, history,
        # maybe_retrain, alias_version)
        self.triggers = dict(triggers or {})
        self.notifications = notifications
        self.labelled = labelled
        self.clock = clock or SystemClock()
        self.runs: dict[str, _Run | None] = {s.name: None for s in self.cfg.experiments}
        self.past: dict[str, deque] = {s.name: deque(maxlen=history) for s in self.cfg.experiments}
        self._next: dict[str, int] = {s.name: 0 for s in self.cfg.experiments}
        # experiments whose past decisions were read back from MLflow (after a restart)
        self._restored: set[str] = set()
        # (challenger, champion) pairs a run was started (or skipped) for
        self._seen_versions: dict[str, set[tuple]] = {s.name: set() for s in self.cfg.experiments}
        self._alert_seq = 0
        self._alert_epoch: str | None = None
        self._labelled_at: int | None = None
        self.retrains: deque = deque(maxlen=history)
        self.errors: dict[str, str] = {}
        self._lock = threading.RLock()
        self._ticker = Ticker(self.tick, "kpistream-canary", on_error=self._tick_failed)

    # ------------------------------------------------------------------ loop
    def tick(self) -> list[dict]:
        """One round over every experiment (and the retraining triggers); returns the
        records of the decisions sent to the trigger this round."""
        out = []
        with self._lock:
            for spec in self.cfg.experiments:
                try:
                    rec = self._experiment(spec)
                    self.errors.pop(spec.name, None)
                except Exception as e:  # one failing experiment must not stop the others
                    self.errors[spec.name] = repr(e)
                    log.warning("canary %s: %r", spec.name, e)
                    continue
                if rec is not None:
                    out.append(rec)
            try:
                self._retrain_triggers()
                self.errors.pop("retrain", None)
            except Exception as e:
                self.errors["retrain"] = repr(e)
        return out

    def _end(self, spec: ExperimentSpec, run: _Run, why: str, now: int) -> None:
        """End a live run whose ground moved; a decision it left waiting is withdrawn."""
        if run.status == "awaiting_approval" and run.outcome:
            try:
                self.triggers[spec.registered_model].reject(run.outcome["decision_id"],
                                                            f"kpistream-canary: {why}")
            except Exception as e:  # already decided or gone: nothing to withdraw
                run.events.append({"at": now, "event": "withdraw failed", "error": repr(e)})
        run.status = "ended"
        run.events.append({"at": now, "event": why})
        self.past[spec.name].append(self._run_dict(spec, run))
        self.runs[spec.name] = None
        log.warning("canary %s: run for version %s ended: %s", spec.name, run.version, why)

    def _experiment(self, spec: ExperimentSpec) -> dict | None:
        now = self.clock.now_ms()
        trig = self.triggers.get(spec.registered_model)
        if trig is None:
            return None
        champion = trig.alias_version("champion")
        challenger = trig.alias_version("challenger")
        run = self.runs[spec.name]
        if run is not None and run.status in ("running", "awaiting_approval"):
            if challenger != run.version:
                self._end(spec, run, f"challenger alias moved to {challenger}", now)
                run = None
            elif champion != run.primary_version:
                # the primary arm would mix versions: start over against the new champion
                self._end(spec, run, f"champion moved to {champion}", now)
                run = None
        pair = (challenger, champion)
        if (run is None or run.status not in ("running", "awaiting_approval")) \
                and challenger is not None and champion is not None \
                and challenger != champion and pair not in self._seen_versions[spec.name]:
            self._seen_versions[spec.name].add(pair)
            prior = trig.version_decision(challenger)
            waiting = [d for d in trig.pending() if str(d.get("challenger_version")) == challenger
                       and str(d.get("primary_version")) == champion]
            if prior is not None and not waiting:
                # decided before (e.g. before this controller restarted): not run again
                if run is None or run.version != challenger:
                    self.past[spec.name].append({"experiment": spec.name,
                                                 "challenger_version": challenger,
                                                 "primary_version": champion,
                                                 "status": f"decided before: {prior}"})
            else:
                if run is not None:
                    self.past[spec.name].append(self._run_dict(spec, run))
                run = self.runs[spec.name] = _Run(challenger, champion, now, 0, now)
                self._next[spec.name] = 0
                if waiting:   # a decision awaiting approval survives a restart
                    run.status = "awaiting_approval"
                    run.outcome = {"decision_id": waiting[0]["id"],
                                   "action": waiting[0].get("action"),
                                   "status": "awaiting_approval"}
                log.warning("canary %s: experiment started, challenger version %s vs champion "
                            "%s (%s)", spec.name, challenger, champion, spec.mode)
        if run is None:
            return None
        if run.status == "awaiting_approval":
            return self._check_approval(spec, run)
        if run.status != "running" or now < self._next[spec.name]:
            return None
        self._next[spec.name] = now + spec.interval_ms
        since = run.step_started_ms + (spec.settle_ms if spec.mode == "canary" and run.step
                                       else 0)
        if now < since:
            return None
        summary = self.summary(spec, run.version, since, run.primary_version)
        share = None
        if spec.mode == "canary":
            share = spec.steps[run.step]
        d = self.policy.decide(summary, (now - since) / 1000, mode=spec.mode,
                               expected_share=share)
        dd = d.as_dict()
        run.last, run.last_at = dd, now
        if d.action == "wait":
            return None
        # at a last weight of 100 % nothing is left to compare with: passing the step before
        # it promotes
        last = len(spec.steps) - 1 - (1 if spec.steps[-1] >= 1.0 else 0)
        if spec.mode == "canary" and d.action == "promote" and run.step < last:
            run.step += 1
            run.step_started_ms = now
            run.events.append({"at": now, "event": "step passed", "step": run.step - 1,
                               "next_weight": spec.steps[run.step], "reason": dd["reason"]})
            log.warning("canary %s: step %d passed, weight now %g", spec.name, run.step - 1,
                        spec.steps[run.step])
            return None
        return self._send(spec, run, dd, now)

    def _decision(self, spec: ExperimentSpec, run: _Run, dd: dict, now: int) -> dict:
        pol = self.policy
        # stable across retries and restarts: the trigger acts at most once per id
        return {**dd, "id": f"{spec.name}/v{run.version}-vs-v{run.primary_version}/"
                            f"step{run.step}/{dd['action']}",
                "experiment": spec.name, "model": spec.registered_model,
                "primary_version": run.primary_version, "challenger_version": run.version,
                "at_ms": now, "step": run.step,
                "weight": spec.steps[run.step] if spec.mode == "canary" else None,
                "policy": {"alpha": pol.alpha, "mode": spec.mode, "min_samples": pol.min_samples,
                           "min_duration": format_duration(pol.min_duration_ms),
                           "max_duration": format_duration(pol.max_duration_ms),
                           "srm_alpha": pol.srm_alpha, "steps": list(spec.steps),
                           "metrics": {m.name: {"margin": m.margin, "harm": m.harm,
                                                "role": m.role} for m in pol.metrics}}}

    def _send(self, spec: ExperimentSpec, run: _Run, dd: dict, now: int) -> dict | None:
        decision = self._decision(spec, run, dd, now)
        rec = self.triggers[spec.registered_model].apply(decision)
        status = rec.get("status")
        run.events.append({"at": now, "event": "decision", "action": dd["action"],
                           "status": status, "decision_id": decision["id"]})
        if status == "cooldown":
            return rec                      # tried again next interval
        if status == "awaiting_approval":
            run.status = "awaiting_approval"
            run.outcome = rec
            return rec
        if status == "duplicate":
            status = rec.get("first_status", status)
        run.outcome = rec
        run.status = {"applied": _FINAL.get(dd["action"], "ended"),
                      "dry_run": _FINAL.get(dd["action"], "ended")}.get(status, status or "ended")
        log.warning("canary %s: %s (%s) for version %s: %s", spec.name, dd["action"], status,
                    run.version, dd.get("reason"))
        return rec

    def _check_approval(self, spec: ExperimentSpec, run: _Run) -> dict | None:
        trig = self.triggers.get(spec.registered_model)
        if trig is None or run.outcome is None:
            return None
        did = run.outcome.get("decision_id")
        hist = {h.get("decision_id"): h for h in trig.history()}
        h = hist.get(did)
        if h is None or h.get("status") == "awaiting_approval":
            return None
        run.outcome = h
        st = h.get("status")
        run.status = _FINAL.get(h.get("action"), "ended") if st == "applied" else (st or "ended")
        run.events.append({"at": self.clock.now_ms(), "event": "approval", "status": st})
        return h

    # ------------------------------------------------------------------ retraining
    def _retrain_triggers(self) -> None:
        r = self.cfg.retrain
        if self.triggers.get(r.model) is None or not (r.on_alerts or r.every_labelled):
            return
        if r.on_alerts and self.notifications is not None:
            log_ = self.notifications(self._alert_seq, self._alert_epoch)
            if log_["epoch"] != self._alert_epoch:
                # a (re)started publisher: its log starts over; a (re)started controller
                # starts from the current end (it does not replay old transitions)
                first = self._alert_epoch is None
                self._alert_epoch, self._alert_seq = log_["epoch"], 0
                if first:
                    self._alert_seq = int(log_["last_seq"])
                    return
            for n in log_["items"]:
                self._alert_seq = max(self._alert_seq, int(n.get("seq", 0)))
                if n.get("rule") in r.on_alerts and n.get("state") == "firing":
                    self._retrain(f"alert {n['rule']} firing",
                                  {"alert": {k: n.get(k) for k in ("rule", "series", "since",
                                                                   "annotations", "id")}})
        if r.every_labelled and self.labelled is not None:
            n = int(self.labelled())
            if self._labelled_at is None:
                self._labelled_at = n
            elif n - self._labelled_at >= r.every_labelled:
                self._labelled_at = n
                self._retrain(f"{r.every_labelled} new labelled requests",
                              {"labelled_total": n})

    def _retrain(self, reason: str, evidence: dict) -> None:
        rec = self.triggers[self.cfg.retrain.model].maybe_retrain(reason, evidence)
        self.retrains.append({"at": self.clock.now_ms(), "reason": reason, **rec})
        log.warning("canary: retraining (%s): %s", reason, rec.get("status"))

    # ------------------------------------------------------------------ queries
    def traffic(self, experiment: str) -> dict:
        """What the ingress routes for ``experiment`` (polled every second)."""
        spec = next((s for s in self.cfg.experiments if s.name == experiment), None)
        if spec is None:
            return {"state": "unknown"}
        # no lock: a tick may hold it through MLflow and publisher calls, and the ingress
        # polls every second; reading one run object is atomic enough here
        run = self.runs.get(spec.name)
        if run is None:
            return {"mode": spec.mode, "weight": 0.0, "step": 0, "state": "idle"}
        state = {"promoted": "promoted", "rolled_back": "rollback", "halted": "halt"}.get(
            run.status, run.status)
        running = run.status in ("running", "awaiting_approval")
        if run.status == "awaiting_approval" and (run.outcome or {}).get("action") in (
                "rollback", "halt"):
            # a harmful challenger loses its traffic while a person decides
            running = False
            state = "rollback" if run.outcome["action"] == "rollback" else "halt"
        weight = (spec.steps[run.step] if spec.mode == "canary" else 1.0) if running else 0.0
        return {"mode": spec.mode, "weight": weight, "step": run.step, "state": state,
                "challenger_version": run.version}

    def _run_dict(self, spec: ExperimentSpec, run: _Run) -> dict:
        now = self.clock.now_ms()
        return {"experiment": spec.name, "model": spec.model, "mode": spec.mode,
                "challenger_version": run.version, "primary_version": run.primary_version,
                "status": run.status, "started_ms": run.started_ms,
                "elapsed_s": (now - run.started_ms) / 1000, "step": run.step,
                "weight": spec.steps[run.step] if spec.mode == "canary" else None,
                "step_started_ms": run.step_started_ms, "decision": run.last,
                "decided_at_ms": run.last_at, "outcome": run.outcome, "events": list(run.events)}

    def _restore_past(self, spec: ExperimentSpec) -> None:
        """Once per experiment: the decisions MLflow holds, before this controller's own
        (a restarted controller's ``past`` starts from them, marked ``source: mlflow``)."""
        if spec.name in self._restored or spec.registered_model not in self.triggers:
            return
        try:
            old = self.triggers[spec.registered_model].decided(spec.name,
                                                              self.past[spec.name].maxlen or 50)
        except Exception as e:   # MLflow down: try again on the next status
            self.errors[f"history {spec.name}"] = repr(e)
            return
        self.errors.pop(f"history {spec.name}", None)
        self._restored.add(spec.name)
        run = self.runs[spec.name]
        mine = {(p.get("outcome") or {}).get("decision_id")
                for p in (*self.past[spec.name], self._run_dict(spec, run) if run else {})}
        keep = [d for d in old if d["decision_id"] not in mine]
        past = self.past[spec.name]
        rest = list(past)
        past.clear()
        past.extend(keep + rest)

    def status(self) -> dict:
        """The live state of every experiment (GET /v1/canary)."""
        with self._lock:
            exps = []
            for spec in self.cfg.experiments:
                self._restore_past(spec)
                run = self.runs[spec.name]
                exps.append({"experiment": spec.name, "model": spec.model, "mode": spec.mode,
                             "variants": [spec.primary_variant, spec.challenger_variant],
                             "steps": list(spec.steps),
                             "current": self._run_dict(spec, run) if run else None,
                             "past": list(self.past[spec.name]),
                             "traffic": self.traffic(spec.name),
                             "error": self.errors.get(spec.name)})
            pending = []
            for name, trig in self.triggers.items():
                try:
                    pending.extend({"model": name, **p} for p in trig.pending())
                except Exception as e:
                    self.errors[f"trigger {name}"] = repr(e)
            return {"experiments": exps, "pending_approval": pending,
                    "retrains": list(self.retrains), "errors": dict(self.errors),
                    "policy": {"alpha": self.policy.alpha,
                               "min_samples": self.policy.min_samples,
                               "min_duration": format_duration(self.policy.min_duration_ms),
                               "max_duration": format_duration(self.policy.max_duration_ms),
                               "metrics": [{"metric": m.name, "margin": m.margin,
                                            "harm": m.harm, "role": m.role}
                                           for m in self.policy.metrics]}}

    def _trigger_of(self, decision_id: str):
        for spec in self.cfg.experiments:
            if decision_id.startswith(spec.name + "/") and spec.registered_model in self.triggers:
                return self.triggers[spec.registered_model]
        raise KeyError(f"no experiment owns decision {decision_id!r}")

    def approve(self, decision_id: str, by: str) -> dict:
        rec = self._trigger_of(decision_id).approve(decision_id, by)
        with self._lock:
            for spec in self.cfg.experiments:
                run = self.runs[spec.name]
                if run is not None and run.status == "awaiting_approval":
                    self._check_approval(spec, run)
        return rec

    def reject(self, decision_id: str, by: str) -> dict:
        rec = self._trigger_of(decision_id).reject(decision_id, by)
        with self._lock:
            for spec in self.cfg.experiments:
                run = self.runs[spec.name]
                if run is not None and run.status == "awaiting_approval":
                    self._check_approval(spec, run)
        return rec

    # ------------------------------------------------------------------ thread
    def start(self, interval_s: float = 1.0) -> bool:
        """Tick in a background thread every ``interval_s`` (idempotent)."""
        return self._ticker.start(interval_s)

    def stop(self) -> None:
        self._ticker.stop()

    def _tick_failed(self, e: Exception) -> None:   # tick() catches its own; never die
        self.errors["tick"] = repr(e)
