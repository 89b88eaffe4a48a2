"""Retraining from the event archive: archived features + label feedback -> a new registered
model version under alias ``challenger`` (a Ray task), and the job launcher the trigger uses."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Mapping

import numpy as np

from actors.registry import TAG_MAX, Registry, normalize_tracking_uri

__all__ = ["train_from_archive", "launch_retrain", "load_training_data", "NotEnoughData",
           "default_trainer", "HYPER", "RetrainJobs"]

log = logging.getLogger(__name__)

HYPER = {"C": 1.0, "max_iter": 1000, "solver": "lbfgs"}   # of the default (and demo) model


class NotEnoughData(ValueError):
    """Too few labelled rows with features to train (or no archive at all)."""


def default_trainer(x: np.ndarray, y: np.ndarray, seed: int = 0):
    """The demo model's pipeline: StandardScaler + LogisticRegression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline([("scale", StandardScaler()),
                     ("clf", LogisticRegression(random_state=seed, **HYPER))]).fit(x, y)


# ---------------------------------------------------------------------------- data

def _read(root: str, kind: str, columns: list[str], keep: Callable):
    """Rows of one archive kind (Ray Data), filtered per block with ``keep(table) -> mask``;
    ``root`` a local path or a URI (``s3://...``)."""
    import pyarrow as pa
    import ray.data

    from actors.archive import archive_files

    if not archive_files(root, kind):
        return None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.read_parquet(f"{str(root).rstrip('/')}/{kind}",
                               file_extensions=["parquet"]).select_columns(columns)

    def select(t: pa.Table) -> pa.Table:
        return t.select(columns).filter(keep(t))

    return ds.map_batches(select, batch_format="pyarrow").to_pandas()


def load_training_data(archive_dir: str, *, since_ms: int | None = None,
                       until_ms: int | None = None, label_kind: str = "label") -> dict:
    """``{"x", "y", "feature_names", "rows_dropped", "data_from_ms", "data_to_ms",
    "inferences", "labels"}`` from the archive (:mod:`actors.archive` layout, read with
    ``ray.data.read_parquet``):

    - inferences that carry ``features`` (the sampled inputs), optionally only
      those with event time in ``[since_ms, until_ms)``; one row per request
      (the first to arrive: a shadow or canary scoring the same request adds no
      second row);
    - ``label`` feedback, the first label to arrive per request (the engine's
      rule too), joined on ``request_id_hash``.

    Features are the keys of the features objects, in the order they first
    appear (so a model trained on the demo's named features takes them in the
    same order as the serving wrapper feeds them); non-numeric values are
    coerced (NaN) and rows with a missing feature are left out (counted in
    ``rows_dropped``).  Labels are the canonical label strings, turned back
    into integers when every one is an integer.
    """
    import pandas as pd
    import pyarrow.compute as pc

    root = str(archive_dir)

    def inf_keep(t):
        m = pc.is_valid(t["features"])
        if since_ms is not None:
            m = pc.and_(m, pc.greater_equal(t["ts"], since_ms))
        if until_ms is not None:
            m = pc.and_(m, pc.less(t["ts"], until_ms))
        return m

    def fb_keep(t):
        return pc.and_(pc.equal(t["kind"], label_kind), pc.is_valid(t["label"]))

    inf = _read(root, "inference", ["request_id_hash", "ts", "features", "arrival"], inf_keep)
    if inf is None or inf.empty:
        raise NotEnoughData(f"no archived inferences with features under {root}/inference")
    fb = _read(root, "feedback", ["request_id_hash", "kind", "label", "arrival"], fb_keep)
    if fb is None or fb.empty:
        raise NotEnoughData(f"no archived {label_kind!r} feedback under {root}/feedback")
    inf = inf.sort_values("arrival", kind="stable").drop_duplicates("request_id_hash")
    fb = fb.sort_values("arrival", kind="stable").drop_duplicates("request_id_hash")
    joined = inf.merge(fb[["request_id_hash", "label"]], on="request_id_hash", how="inner")
    joined = joined.sort_values("arrival", kind="stable")
    feats = [json.loads(s) for s in joined["features"]]
    names = list(dict.fromkeys(k for f in feats for k in f))
    frame = pd.DataFrame.from_records(feats, columns=names).apply(pd.to_numeric, errors="coerce")
    ok = frame.notna().all(axis=1).to_numpy()
    labels = joined["label"].astype(str).to_numpy()[ok]
    try:
        y = np.array([int(v) for v in labels])
    except ValueError:
        y = labels.astype(object)
    ts = joined["ts"].to_numpy()[ok]
    return {"x": frame.to_numpy(dtype=float)[ok], "y": y, "feature_names": names,
            "rows_dropped": int((~ok).sum()), "inferences": int(len(inf)),
            "labels": int(len(fb)),
            "data_from_ms": int(ts.min()) if len(ts) else None,
            "data_to_ms": int(ts.max()) if len(ts) else None}


# ------------------------------------------------------------------------ training

def _evaluate(model, x: np.ndarray, y: np.ndarray) -> dict:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    pred = model.predict(x)
    out = {"test_accuracy": float(accuracy_score(y, pred))}
    classes = list(getattr(model, "classes_", np.unique(y)))
    if len(classes) == 2:
        pos = 1 if 1 in classes else classes[-1]
        out["test_f1"] = float(f1_score(y, pred, pos_label=pos))
        if hasattr(model, "predict_proba") and len(np.unique(y)) == 2:
            score = model.predict_proba(x)[:, classes.index(pos)]
            out["test_roc_auc"] = float(roc_auc_score(y == pos, score))
    else:
        out["test_f1_macro"] = float(f1_score(y, pred, average="macro"))
    return out


def train_from_archive(archive_dir: str, tracking_uri: str, model_name: str, *,
                       alias: str = "challenger", since_ms: int | None = None,
                       until_ms: int | None = None, min_rows: int = 200,
                       trainer: Callable | None = None, reason: str = "manual",
                       parent_run_id: str | None = None, experiment: str = "kpistream-retrain",
                       test_size: float = 0.25, seed: int = 0, label_kind: str = "label",
                       log_model_kwargs: dict | None = None) -> dict:
    """Train on the archive, log, register, point ``alias`` at the new version.

    Callable in any process (:func:`launch_retrain` runs it as a Ray task).
    Data: :func:`load_training_data`.  Training: ``trainer(X_train, y_train)
    -> fitted estimator`` (numpy arrays; default: :func:`default_trainer`, the
    demo model's pipeline), evaluated on a stratified held-out split
    (``test_size``).  The run (experiment ``kpistream-retrain``) logs params
    (estimator, data window, rows, reason), metrics (``test_accuracy``,
    ``test_f1``, ``test_roc_auc`` for binary models with ``predict_proba``,
    row counts), ``feature_names.json`` and the model with its signature and
    an input example; the version registered from it is tagged
    ``kpistream.trained_on_rows``, ``kpistream.retrain_reason``,
    ``kpistream.retrain_run``, ``kpistream.data_from_ms`` / ``data_to_ms``
    (and ``kpistream.parent_run``, the trigger's run, if given), and alias
    ``alias`` points to it.  Everything is read into memory for training:
    meant for the tabular models a sidecar retrains, not for terabytes.

    Returns ``{"version", "run_id", "rows", "metrics", "model_name", "alias",
    "feature_names"}``; raises :class:`NotEnoughData` below ``min_rows``
    labelled rows.  ``log_model_kwargs`` go to ``mlflow.sklearn.log_model``
    (e.g. ``skops_trusted_types`` for a custom trainer's estimator: MLflow
    saves sklearn models with skops and refuses types it does not trust).
    """
    from sklearn.model_selection import train_test_split

    t0 = time.perf_counter()
    data = load_training_data(archive_dir, since_ms=since_ms, until_ms=until_ms,
                              label_kind=label_kind)
    x, y, names = data["x"], data["y"], data["feature_names"]
    if len(y) < min_rows:
        raise NotEnoughData(f"{len(y)} labelled rows with features in the archive, "
                            f"need min_rows={min_rows}")
    _, counts = np.unique(y, return_counts=True)
    if len(counts) < 2:
        raise NotEnoughData(f"all {len(y)} labelled rows have the same label")
    strat = y if counts.min() >= 2 else None
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed,
                                              stratify=strat)
    model = trainer(x_tr, y_tr) if trainer is not None else default_trainer(x_tr, y_tr, seed)
    metrics = _evaluate(model, x_te, y_te)
    metrics.update(rows=float(len(y)), train_rows=float(len(y_tr)), test_rows=float(len(y_te)),
                   rows_dropped=float(data["rows_dropped"]))
    estimator = ("StandardScaler+LogisticRegression" if trainer is None else
                 getattr(trainer, "__name__", type(model).__name__))

    reg = Registry(normalize_tracking_uri(tracking_uri))
    exp_id = reg.ensure_experiment(experiment, {"kpistream.kind": "retrain"})
    tags = {"kpistream.retrain": "true", "kpistream.model": model_name,
            "kpistream.retrain_reason": str(reason)[:TAG_MAX],
            "mlflow.note.content": f"retrained {model_name} on {len(y)} archived rows: {reason}"}
    if parent_run_id:
        tags["kpistream.parent_run"] = parent_run_id
    run_id, model_uri = reg.log_sklearn_model(
        exp_id, model, run_name=f"retrain-{model_name}", tags=tags,
        params={"estimator": estimator, "archive_dir": str(archive_dir),
                "since_ms": since_ms, "until_ms": until_ms, "min_rows": min_rows,
                "test_size": test_size, "seed": seed, "label_kind": label_kind,
                "n_features": len(names), "data_from_ms": data["data_from_ms"],
                "data_to_ms": data["data_to_ms"], "reason": str(reason)[:500],
                **({"hyper." + k: v for k, v in HYPER.items()} if trainer is None else {})},
        metrics=metrics, feature_names=names, example=x_te[:3].copy(),
        metadata={"feature_names": names, "trained_on_rows": int(len(y)),
                  "source": "kpistream archive"},
        log_model_kwargs=log_model_kwargs)
    reg.ensure_registered_model(model_name)
    vtags = {"kpistream.trained_on_rows": str(len(y)),
             "kpistream.retrain_reason": str(reason)[:TAG_MAX], "kpistream.retrain_run": run_id,
             "kpistream.data_from_ms": str(data["data_from_ms"]),
             "kpistream.data_to_ms": str(data["data_to_ms"])}
    if parent_run_id:
        vtags["kpistream.parent_run"] = parent_run_id
    version = reg.create_version(
        model_name, model_uri, run_id=run_id, tags=vtags,
        description=f"retrained on {len(y)} archived rows ({reason}); held-out accuracy "
                    f"{metrics['test_accuracy']:.3f}")
    reg.set_alias(model_name, alias, version)
    reg.set_run_tags(run_id, {"kpistream.registered_version": version})
    log.info("kpistream retrain: %s version %s from %d rows in %.1f s (accuracy %.3f)",
             model_name, version, len(y), time.perf_counter() - t0, metrics["test_accuracy"])
    return {"version": version, "run_id": run_id, "rows": int(len(y)), "metrics": metrics,
            "model_name": model_name, "alias": alias, "feature_names": names,
            "data_from_ms": data["data_from_ms"], "data_to_ms": data["data_to_ms"]}


_task = None


def launch_retrain(archive_dir: str, tracking_uri: str, model_name: str, **kwargs: Any):
    """:func:`train_from_archive` as a Ray task (``num_cpus=1``, no automatic retry): an ObjectRef."""
    global _task
    import ray

    if _task is None:
        _task = ray.remote(num_cpus=1, max_retries=0)(train_from_archive)
    return _task.remote(str(archive_dir), tracking_uri, model_name, **kwargs)


T = "kpistream."                                  # tag prefix


class RetrainJobs:
    """At most one retraining job at a time, with its own cooldown, each launch recorded.

    :meth:`maybe_retrain` records why (a run in the trigger's decisions
    experiment tagged ``kpistream.decision=retrain``, the evidence as
    ``evidence.json``) and launches the job (:func:`launch_retrain` through
    the trigger, or the ``launch`` callable given), which registers a new
    version under alias ``challenger``; the run gets the outcome
    (``kpistream.status`` done / failed, ``kpistream.retrain_version``,
    ``result.json``) when :meth:`status` sees the job finish.  With
    ``dry_run`` nothing is launched (status ``dry_run``).  Records go to the
    shared ``history``; ``lock`` is the owner's (the trigger's) lock.
    """

    def __init__(self, registry: Registry, experiment_id: Callable[[], str], model_name: str, *,
                 dry_run: bool, cooldown_s: float, clock: Any,
                 launch: Callable[..., Any] | None, history: Any, lock: Any) -> None:
        self.registry = registry
        self._experiment_id = experiment_id
        self.model_name = model_name
        self.dry_run = dry_run
        self.cooldown_ms = int(cooldown_s * 1000)
        self.clock = clock
        self.launch = launch
        self._history = history
        self._lock = lock
        self._job: dict | None = None        # the last launched job
        self._last_ms: int | None = None

    def maybe_retrain(self, reason: str, evidence: Mapping[str, Any] | None = None,
                      launch: Callable[..., Any] | None = None) -> dict:
        """Launch a retraining job unless one runs or the retrain cooldown holds.

        ``launch(reason=..., parent_run_id=...)`` starts the job and returns a
        handle: a Ray ObjectRef, a ``concurrent.futures.Future``, or the result
        dict itself (synchronous); default: the ``launch`` given at construction.
        Returns ``{"status": "launched" | "running" | "cooldown" | "unavailable"
        | "dry_run" | "failed", ...}``.
        """
        with self._lock:
            now = self.clock.now_ms()
            cur = self.status()
            base = {"reason": reason, "at_ms": now}
            if cur["status"] == "running":
                rec = {**base, "status": "running", "run_id": cur.get("run_id"),
                       "detail": "a retraining job is still running"}
                return self._remember(rec)
            if self._last_ms is not None and now - self._last_ms < self.cooldown_ms:
                left = (self._last_ms + self.cooldown_ms - now) / 1000
                rec = {**base, "status": "cooldown", "run_id": cur.get("run_id"),
                       "detail": f"last retraining launched {(now - self._last_ms) / 1000:.0f}"
                                 f" s ago; cooldown {left:.0f} s more"}
                return self._remember(rec)
            if self.dry_run:
                return self._remember({**base, "status": "dry_run",
                                       "detail": "dry run: would launch retraining"})
            launch = launch or self.launch
            if launch is None:
                return self._remember({**base, "status": "unavailable",
                                       "detail": "no archive_dir and no launch"})
            run_id = self.registry.create_run(
                self._experiment_id(), f"retrain-{self.model_name}",
                {T + "decision": "retrain", T + "model": self.model_name,
                 T + "status": "launched", T + "retrain_reason": str(reason)[:TAG_MAX],
                 "mlflow.note.content": f"**retrain** {self.model_name}: {reason}"})
            self.registry.log_dict(run_id, {"reason": reason, "evidence": dict(evidence or {}),
                                            "at_ms": now}, "evidence.json")
            try:
                handle = launch(reason=reason, parent_run_id=run_id)
            except Exception as e:  # noqa: BLE001 - recorded, reported, never raised
                self.registry.set_run_tags(run_id, {T + "status": "failed", T + "error": repr(e)})
                self.registry.end_run(run_id, "FAILED")
                return self._remember({**base, "status": "failed", "run_id": run_id,
                                       "detail": repr(e)})
            self._last_ms = now
            self._job = {"handle": handle, "run_id": run_id, "reason": reason,
                         "launched_at_ms": now, "result": None, "error": None, "done": False}
            return self._remember({**base, "status": "launched", "run_id": run_id,
                                   "detail": "retraining launched"})

    def status(self) -> dict:
        """``{"status": "idle" | "running" | "done" | "failed", ...}`` of the last job."""
        with self._lock:
            job = self._job
            if job is None:
                return {"status": "idle"}
            if not job["done"]:
                done, result, error = _poll(job["handle"])
                if done:
                    job.update(done=True, result=result, error=error,
                               finished_at_ms=self.clock.now_ms())
                    self._close(job)
            out = {k: v for k, v in job.items() if k != "handle"}
            out["status"] = ("running" if not job["done"] else
                             "failed" if job["error"] else "done")
            return out

    def _close(self, job: dict) -> None:
        try:
            if job["error"]:
                self.registry.set_run_tags(job["run_id"], {T + "status": "failed",
                                                           T + "error": job["error"][:TAG_MAX]})
                self.registry.end_run(job["run_id"], "FAILED")
            else:
                res = job["result"] if isinstance(job["result"], Mapping) else {}
                self.registry.set_run_tags(job["run_id"], {
                    T + "status": "done", T + "retrain_version": res.get("version", ""),
                    T + "retrain_run": res.get("run_id", "")})
                self.registry.log_dict(job["run_id"], dict(res), "result.json")
                self.registry.end_run(job["run_id"], "FINISHED")
        except Exception as e:  # noqa: BLE001
            log.warning("kpistream trigger: cannot record the retraining result: %s", e)

    def _remember(self, rec: dict) -> dict:
        rec = {"decision_id": None, "action": "retrain", **rec}
        self._history.append(dict(rec))
        return rec


def _poll(handle: Any) -> tuple[bool, Any, str | None]:
    """(done, result, error) of a launched job, without blocking."""
    if handle is None or isinstance(handle, Mapping):
        return True, handle, None
    if hasattr(handle, "done") and hasattr(handle, "result"):     # concurrent Future
        if not handle.done():
            return False, None, None
        try:
            return True, handle.result(), None
        except Exception as e:  # noqa: BLE001
            return True, None, repr(e)
    import ray

    ready, _ = ray.wait([handle], timeout=0)
    if not ready:
        return False, None, None
    try:
        return True, ray.get(handle), None
    except Exception as e:  # noqa: BLE001
        return True, None, f"{type(e).__name__}: {e}"[:2000]
