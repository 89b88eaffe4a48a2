"""The demo model: a small scikit-learn classifier registered in MLflow (trained on first use)
and served with monitoring, following its ``champion`` alias."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from actors.registry import Registry, normalize_tracking_uri, prepare_store, store_lock
from actors.retrain import HYPER, default_trainer
from app.monitor import AliasFollowingModel, BadInput
from app.demo.traffic import default_tracking_uri, demo_dataset, demo_split

__all__ = ["MODEL_NAME", "EXPERIMENT", "ALIAS", "ensure_demo_model", "champion_version",
           "train_demo_model", "load_demo_model", "demo_dataset", "demo_split", "DemoClassifier",
           "DemoAppArgs", "build_demo_app", "features_row"]

log = logging.getLogger(__name__)

MODEL_NAME = "kpistream-demo"
EXPERIMENT = "kpistream-demo"
ALIAS = "champion"
SPLIT_SEED = 0


# ------------------------------------------------------------------------- MLflow

def _normalize_uri(tracking_uri: str | os.PathLike | None) -> str:
    """A URI as given; a bare path (a .db file or a folder) becomes a SQLite URI; None is the
    embedded default.  SQLite paths become absolute, whatever a Ray worker's directory."""
    if tracking_uri is None:
        return default_tracking_uri()
    return normalize_tracking_uri(os.fspath(tracking_uri))


def _registry(uri: str) -> Registry:
    """The store at ``uri``, made MLflow's global one (``models:/`` URIs resolve through it)."""
    reg = Registry(uri)
    reg.activate()
    return reg


def champion_version(tracking_uri: str | os.PathLike | None = None, name: str = MODEL_NAME,
                     alias: str = ALIAS) -> str | None:
    """The version ``alias`` points to, or None if the model or the alias does not exist.
    ``tracking_uri`` may also be an ``MlflowClient`` (as before 0.2): its tracking URI is used."""
    if hasattr(tracking_uri, "get_model_version_by_alias"):
        tracking_uri = tracking_uri.tracking_uri
    return Registry(_normalize_uri(tracking_uri)).alias_version(name, alias)


def train_demo_model(seed: int = SPLIT_SEED):
    """Fit the demo classifier: ``(pipeline, held-out metrics, (X_test, y_test))``.

    A ``StandardScaler`` + ``LogisticRegression`` pipeline on the training rows
    of :func:`demo_split` (numpy arrays, columns in ``feature_names`` order).
    """
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    # fitted on plain arrays (columns in feature-name order): predicting one
    # row from a numpy array costs ~0.5 ms, from a named DataFrame ~2 ms
    x_tr, x_te, y_tr, y_te, _ = demo_split(seed)
    model = default_trainer(x_tr, y_tr, seed)
    pred = model.predict(x_te)
    score = model.predict_proba(x_te)[:, list(model.classes_).index(1)]
    metrics = {"test_accuracy": float(accuracy_score(y_te, pred)),
               "test_f1": float(f1_score(y_te, pred, pos_label=1)),
               "test_roc_auc": float(roc_auc_score(y_te, score)),
               "train_rows": float(len(y_tr)), "test_rows": float(len(y_te))}
    return model, metrics, (x_te, y_te)


def _register(reg: Registry, name: str) -> str:
    """Train, log a run, register a version; returns the new version (no alias set)."""
    t = time.perf_counter()
    model, metrics, (x_te, _) = train_demo_model(SPLIT_SEED)
    names = demo_split(SPLIT_SEED)[4]
    exp_id = reg.ensure_experiment(EXPERIMENT, {"kpistream.demo": "true"})
    run_id, model_uri = reg.log_sklearn_model(
        exp_id, model, run_name="demo-train", tags={"kpistream.demo": "true"},
        params={"estimator": "StandardScaler+LogisticRegression",
                "dataset": "sklearn.datasets.load_breast_cancer",
                "positive_label": 1, "split_seed": SPLIT_SEED, "test_size": 0.3, **HYPER},
        metrics=metrics, feature_names=names, example=x_te[:3].copy(),
        metadata={"feature_names": names, "positive_label": 1,
                  "output": "predict_proba columns = classes [0, 1]"})
    reg.ensure_registered_model(name, description="kpistream demo classifier "
                                "(breast cancer, label 1 = benign)")
    version = reg.create_version(name, model_uri, run_id=run_id, tags={"kpistream.demo": "true"},
                                 description=f"test accuracy {metrics['test_accuracy']:.3f}")
    log.info("kpistream demo: trained and registered %s version %s in %.1f s (accuracy %.3f)",
             name, version, time.perf_counter() - t, metrics["test_accuracy"])
    return version


def ensure_demo_model(tracking_uri: str | os.PathLike | None = None,
                      name: str = MODEL_NAME) -> tuple[str, str]:
    """Make sure ``name`` has a ``champion``; returns ``("models:/<name>@champion", version)``.

    If the alias is missing it trains a classifier (standard scaling +
    logistic regression) on scikit-learn's bundled breast-cancer data set
    (binary, label 1 = benign is the positive class; no download), logs a run
    in the experiment ``kpistream-demo`` (params, held-out accuracy / F1 /
    ROC AUC, the model with a signature and an input example), registers a
    version and points ``champion`` at it (MLflow aliases, not stages).  The
    held-out rows are :func:`demo_dataset` (``app.demo.traffic``, Ray-
    and MLflow-free, so the traffic driver can import them).

    ``tracking_uri`` is the MLflow tracking and registry URI (set globally
    with ``mlflow.set_tracking_uri`` / ``set_registry_uri``); None is the
    embedded default ``sqlite:///<data dir>/mlflow.db``; a bare path is a
    SQLite file (or a folder holding ``mlflow.db``).  Idempotent: with the
    alias present nothing is trained or registered.

    Safe when several processes call it at once: a local SQLite store is
    guarded by an exclusive file lock (``<db>.lock``) around the
    check-train-register-alias sequence, so two replicas starting at once
    train once.  For a remote tracking server (no lock) a racing replica may
    register a second version, but the alias is set only if still unset, and
    every caller returns (and loads) the version the alias ends up on.
    """
    uri = _normalize_uri(tracking_uri)
    with store_lock(uri):
        reg = _registry(uri)
        version = reg.alias_version(name, ALIAS)
        if version is None:
            new = _register(reg, name)
            if reg.alias_version(name, ALIAS) is None:   # nobody was faster
                reg.set_alias(name, ALIAS, new)
            version = reg.alias_version(name, ALIAS)
            if version is None:  # pragma: no cover - the store lost the alias
                raise RuntimeError(f"could not set alias {ALIAS!r} on model {name!r}")
    return f"models:/{name}@{ALIAS}", version


def load_demo_model(tracking_uri: str | os.PathLike | None = None, name: str = MODEL_NAME):
    """``(sklearn pipeline, version)`` of the champion, registering it first if needed.

    Loads ``models:/<name>/<version>`` of the version the alias resolved to,
    so the version reported is the one loaded even if the alias moves meanwhile.
    """
    _, version = ensure_demo_model(tracking_uri, name)
    return Registry(_normalize_uri(tracking_uri)).load_model(name, version, "sklearn"), version


# ------------------------------------------------------------------------ serving

def features_row(payload: Any, names: list[str]) -> list[float]:
    """``payload["features"]`` (a {name: value} object or a list in ``names`` order) -> a row.

    Raises :class:`~app.monitor.BadInput` (a ValueError; HTTP 400) naming the problem
    (missing, wrong count, non-numeric).
    """
    if not isinstance(payload, dict) or "features" not in payload:
        raise BadInput('the body must be a JSON object with "features": {name: value} or '
                       f"a list of {len(names)} numbers")
    feats = payload["features"]
    if isinstance(feats, dict):
        missing = [n for n in names if n not in feats]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise BadInput(f"features missing: {', '.join(map(repr, missing[:3]))}{more}")
        values = [feats[n] for n in names]
    elif isinstance(feats, (list, tuple)):
        if len(feats) != len(names):
            raise BadInput(f"features must have {len(names)} values, got {len(feats)}")
        values = list(feats)
    else:
        raise BadInput(f"features must be an object or a list, got {type(feats).__name__}")
    row = []
    for n, v in zip(names, values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise BadInput(f"feature {n!r} must be a finite number, got {v!r}")
        row.append(float(v))
    return row


class _DemoModel:
    """One loaded version of the demo classifier (swapped as a whole)."""

    __slots__ = ("clf", "classes", "pos")

    def __init__(self, clf) -> None:
        self.clf = clf
        self.classes = list(clf.classes_)
        self.pos = self.classes.index(1)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class DemoClassifier(AliasFollowingModel):
    """The demo classifier behind ``/demo``, monitored by kpistream, following an MLflow alias.

    Request body: ``{"features": {name: value, ...} | [30 values], "region": "eu"}``;
    reply (by :class:`MonitoredModel`): ``{"request_id": ..., "prediction":
    {"label": 0 | 1, "score": P(1)}}`` with header ``x-request-id``; through a
    DeploymentHandle, :meth:`~app.monitor.MonitoredModel.infer`.

    It serves ``models:/<model_name>@<alias>`` and follows the alias
    (:class:`~app.monitor.AliasFollowingModel`, checked every ``alias_poll_s``
    seconds): when ``champion`` moves, the replica loads the new version off
    the event loop and swaps it in without dropping a request, and later
    events carry the new ``model_version``.  With ``alias="champion"`` the
    replica first makes sure the champion exists (:func:`ensure_demo_model`:
    the very first start trains one); any other alias (``challenger``) may be
    missing, and then the replica answers 503 until it appears.  ``variant``
    labels its events (``primary``, ``shadow``, ``canary``).  Each replica calls
    :func:`ensure_demo_model` first (so the first start trains; later starts
    only resolve the alias).

    The deployment decorator is applied here (``num_replicas=1``,
    ``ray_actor_options={"num_cpus": 0}``: the model is tiny and the sidecar
    runs on small machines); change it per application with
    ``DemoClassifier.options(...)`` or in the Serve config file.
    """

    def __init__(self, tracking_uri: str | None = None, model_name: str = MODEL_NAME,
                 n_shards: int | None = None, feature_sample: float = 0.0,
                 alias: str = ALIAS, alias_poll_s: float = 5.0,
                 variant: str = "primary") -> None:
        uri = _normalize_uri(tracking_uri)
        if alias == ALIAS:
            ensure_demo_model(uri, model_name)     # the first start trains the champion
        else:
            _registry(uri)
        self.feature_names = demo_dataset(SPLIT_SEED)[2]
        super().__init__(registered_model=model_name, alias=alias, alias_poll_s=alias_poll_s,
                         tracking_uri=uri, variant=variant, endpoint="predict",
                         n_shards=n_shards, feature_sample=feature_sample)

    def load_version(self, version: str) -> _DemoModel:
        """The scikit-learn pipeline of ``models:/<model_name>/<version>`` (in a thread)."""
        return _DemoModel(Registry(self._af_uri).load_model(self._af_name, version, "sklearn"))

    @property
    def clf(self):
        """The scikit-learn pipeline serving now (None while the alias does not exist)."""
        cur = self._af_current
        return cur.model.clf if cur is not None else None

    def _predict_row(self, m: _DemoModel, row: list[float]) -> dict:
        import numpy as np

        proba = m.clf.predict_proba(np.asarray([row], dtype=float))[0]
        best = max(range(len(proba)), key=proba.__getitem__)
        return {"label": int(m.classes[best]), "score": round(float(proba[m.pos]), 6)}

    async def predict(self, payload: dict) -> dict:
        m = self.loaded()            # before any await: one request, one model version
        return self._predict_row(m, features_row(payload, self.feature_names))

    def segments(self, payload: dict) -> dict[str, str] | None:
        """``{"region": payload["region"]}``; ``"unknown"`` when the request has none, so the
        configured ``region`` segment is always set."""
        region = payload.get("region") if isinstance(payload, dict) else None
        return {"region": str(region)[:64] if region not in (None, "") else "unknown"}

    def features(self, payload: dict) -> dict | None:
        """The inputs a sampled event carries (``feature_sample``): ``{feature name: value}``."""
        try:
            return dict(zip(self.feature_names, features_row(payload, self.feature_names)))
        except ValueError:
            return None


class DemoAppArgs(BaseModel):
    """Typed args of :func:`build_demo_app` (Serve validates them)."""

    model_config = ConfigDict(extra="forbid")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking/registry URI; default sqlite:///<data dir>/mlflow.db "
                          "(KPISTREAM_DATA_DIR, else ./data), made absolute here")
    model_name: str = MODEL_NAME
    n_shards: int | None = Field(None, ge=1, description="kpistream shards (None: the default)")
    feature_sample: float = Field(0.0, ge=0.0, le=1.0,
                                  description="share of requests whose features travel with "
                                              "their inference event (for drift detectors)")
    alias: str = Field(ALIAS, min_length=1, description="the MLflow alias served and followed")
    alias_poll_s: float = Field(5.0, gt=0, description="seconds between alias checks")
    variant: str = Field("primary", min_length=1, description="the events' variant label")


def build_demo_app(args: DemoAppArgs):
    """Serve app builder: ``DemoClassifier.bind(...)`` (a dict of args works too).

    Mounted by the sidecar at ``/demo``::

        applications:
          - name: demo
            route_prefix: /demo
            import_path: app.demo.model:build_demo_app
            args: {tracking_uri: "sqlite:////abs/data/mlflow.db", n_shards: 2}
    """
    if not isinstance(args, DemoAppArgs):
        args = DemoAppArgs.model_validate(dict(args or {}))
    # resolved on the driver (replicas may run in another working directory), and the
    # store's tables made here, before the replicas start
    uri = prepare_store(_normalize_uri(args.tracking_uri))
    return DemoClassifier.bind(tracking_uri=uri, model_name=args.model_name,
                               n_shards=args.n_shards, feature_sample=args.feature_sample,
                               alias=args.alias, alias_poll_s=args.alias_poll_s,
                               variant=args.variant)

