"""Retraining from the event archive, as a Ray task: archived features + label feedback -> a new
registered model version under alias ``challenger``.

:func:`train_from_archive` does the work (callable in any process);
:func:`launch_retrain` runs it as a Ray task (``num_cpus=1``) and returns the
ObjectRef (what :meth:`actors.trigger.Trigger.maybe_retrain` launches).

The data (:mod:`actors.archive` layout, read with ``ray.data.read_parquet``):

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

Training: ``trainer(X_train, y_train) -> fitted estimator`` (numpy arrays;
default: ``StandardScaler`` + ``LogisticRegression``, the demo model's
pipeline), evaluated on a stratified held-out split (``test_size``).  The
run (experiment ``kpistream-retrain``) logs params (estimator, data window,
rows, reason), metrics (``test_accuracy``, ``test_f1``, ``test_roc_auc`` for
binary models with ``predict_proba``, row counts), ``feature_names.json`` and
the model with its signature and an input example; the version registered
from it is tagged ``kpistream.trained_on_rows``, ``kpistream.retrain_reason``,
``kpistream.retrain_run``, ``kpistream.data_from_ms`` / ``data_to_ms`` (and
``kpistream.parent_run``, the trigger's run, if given), and alias
``challenger`` points to it.  Everything is read into memory for training:
meant for the tabular models a sidecar retrains, not for terabytes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from actors.registry import Registry, normalize_tracking_uri

__all__ = ["train_from_archive", "launch_retrain", "load_training_data", "NotEnoughData",
           "default_trainer"]

log = logging.getLogger(__name__)

_HYPER = {"C": 1.0, "max_iter": 1000, "solver": "lbfgs"}


class NotEnoughData(ValueError):
    """Too few labelled rows with features to train (or no archive at all)."""


def default_trainer(x: np.ndarray, y: np.ndarray, seed: int = 0):
    """The demo model's pipeline: StandardScaler + LogisticRegression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline([("scale", StandardScaler()),
                     ("clf", LogisticRegression(random_state=seed, **_HYPER))]).fit(x, y)


# ---------------------------------------------------------------------------- data

def _read(path: Path, columns: list[str], keep: Callable):
    """Rows of one archive kind (Ray Data), filtered per block with ``keep(table) -> mask``."""
    import pyarrow as pa
    import ray.data

    if not path.is_dir() or not any(path.glob("date=*/shard-*.parquet")):
        return None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.read_parquet(str(path), file_extensions=["parquet"]).select_columns(columns)

    def select(t: pa.Table) -> pa.Table:
        return t.select(columns).filter(keep(t))

    return ds.map_batches(select, batch_format="pyarrow").to_pandas()


def load_training_data(archive_dir: str, *, since_ms: int | None = None,
                       until_ms: int | None = None, label_kind: str = "label") -> dict:
    """``{"x", "y", "feature_names", "rows_dropped", "data_from_ms", "data_to_ms",
    "inferences", "labels"}`` from the archive (module docstring)."""
    import pandas as pd
    import pyarrow.compute as pc

    root = Path(archive_dir)

    def inf_keep(t):
        m = pc.is_valid(t["features"])
        if since_ms is not None:
            m = pc.and_(m, pc.greater_equal(t["ts"], since_ms))
        if until_ms is not None:
            m = pc.and_(m, pc.less(t["ts"], until_ms))
        return m

    def fb_keep(t):
        return pc.and_(pc.equal(t["kind"], label_kind), pc.is_valid(t["label"]))

    inf = _read(root / "inference", ["request_id_hash", "ts", "features", "arrival"], inf_keep)
    if inf is None or inf.empty:
        raise NotEnoughData(f"no archived inferences with features under {root / 'inference'}")
    fb = _read(root / "feedback", ["request_id_hash", "kind", "label", "arrival"], fb_keep)
    if fb is None or fb.empty:
        raise NotEnoughData(f"no archived {label_kind!r} feedback under {root / 'feedback'}")
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
    """Train on the archive, log, register, point ``alias`` at the new version (module docstring).

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
            "kpistream.retrain_reason": str(reason)[:5000],
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
                **({"hyper." + k: v for k, v in _HYPER.items()} if trainer is None else {})},
        metrics=metrics, feature_names=names, example=x_te[:3].copy(),
        metadata={"feature_names": names, "trained_on_rows": int(len(y)),
                  "source": "kpistream archive"},
        log_model_kwargs=log_model_kwargs)
    reg.ensure_registered_model(model_name)
    vtags = {"kpistream.trained_on_rows": str(len(y)),
             "kpistream.retrain_reason": str(reason)[:5000], "kpistream.retrain_run": run_id,
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
