"""The one MLflow adapter: tracking URIs, experiments, runs, registered-model aliases and version
tags, logging and loading models; MLflow's errors become :class:`kpistream.errors.RegistryError`.

Every other module reaches MLflow through here (MLflow is imported lazily, on first use).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar
from urllib.parse import urlparse

from kpistream.errors import RegistryConflict, RegistryError, RegistryNotFound

__all__ = ["Registry", "RunRecord", "normalize_tracking_uri", "sqlite_path", "artifact_location",
           "store_lock", "mlflow_errors", "TAG_MAX"]

TAG_MAX = 5000                   # MLflow's limit on a tag value (longer values are cut)
_NOT_FOUND = frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"})
_CONFLICT = frozenset({"RESOURCE_ALREADY_EXISTS"})
# a missing alias: the SQLite store says INVALID_PARAMETER_VALUE, a server may say not found
_NO_ALIAS = _NOT_FOUND | {"INVALID_PARAMETER_VALUE"}


# ------------------------------------------------------------------------- URIs

def normalize_tracking_uri(uri: Any) -> str:
    """A URI as given; a bare path (a .db file or a folder) becomes an absolute SQLite URI."""
    uri = str(uri)
    db = sqlite_path(uri)
    if db is not None:
        return "sqlite:///" + str(db)
    if "://" in uri or uri.startswith("databricks"):
        return uri
    p = Path(uri).expanduser().resolve()
    if p.suffix not in (".db", ".sqlite", ".sqlite3"):
        p = p / "mlflow.db"
    return "sqlite:///" + str(p)


def sqlite_path(uri: str) -> Path | None:
    """The absolute database file of a ``sqlite:`` URI; None for other URIs and ``:memory:``."""
    if not uri.startswith("sqlite:"):
        return None
    path = urlparse(uri).path
    if uri.startswith("sqlite:////"):
        path = "/" + path.lstrip("/")
    elif uri.startswith("sqlite:///"):
        path = path[1:] if path.startswith("/") else path
    if not path or path == ":memory:":
        return None
    return Path(path).expanduser().resolve()


def prepare_store(uri: Any) -> str:
    """The normalised URI of a store whose tables exist (:meth:`Registry.initialize`):
    what an app builder hands its replicas, so that they never race to create them."""
    uri = normalize_tracking_uri(uri)
    Registry(uri).initialize()
    return uri


def artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside its database, not into ./mlruns."""
    db = sqlite_path(uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An exclusive inter-process lock beside a local SQLite store (``<db>.lock``); a no-op
    for any other store."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------- errors

def _translate(e: Exception) -> RegistryError:
    code = getattr(e, "error_code", None)
    cls = (RegistryNotFound if code in _NOT_FOUND else
           RegistryConflict if code in _CONFLICT else RegistryError)
    return cls(getattr(e, "message", None) or str(e), code)


@contextlib.contextmanager
def mlflow_errors() -> Iterator[None]:
    """Inside, an ``MlflowException`` is raised again as the matching :class:`RegistryError`
    (:class:`RegistryNotFound`, :class:`RegistryConflict`), chained to the original."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        raise _translate(e) from e


F = TypeVar("F", bound=Callable[..., Any])


def _mapped(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with mlflow_errors():
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(_clean_nan(x), default=str))


def _clean_nan(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {str(k): _clean_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean_nan(v) for v in x]
    return x


# ------------------------------------------------------------------------- store

@dataclass(frozen=True)
class RunRecord:
    """A tracking run as the project sees it: id, tags, where its artifacts live."""

    run_id: str
    tags: dict[str, str] = field(default_factory=dict)
    artifact_uri: str = ""


class Registry:
    """One MLflow tracking + registry store (the same URI for both).

    ``tracking_uri`` is used as given (normalise it first with
    :func:`normalize_tracking_uri`); None is MLflow's own default.  The client
    is made on first use.  Every method raises :class:`RegistryError` (or a
    subclass) for what the store refuses.
    """

    def __init__(self, tracking_uri: str | None) -> None:
        self.uri = tracking_uri
        self._client = None

    @property
    def _mlflow(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def initialize(self) -> None:
        """Create the store's tables now, once, under :func:`store_lock` (a fresh SQLite
        store is migrated by whichever process touches it first: replicas starting
        together raced on it).  The app builders call this before any replica starts."""
        with store_lock(self.uri or ""), mlflow_errors():
            self._mlflow.search_experiments(max_results=1)

    def activate(self) -> None:
        """Make this store MLflow's global one (``models:/`` URIs and fluent runs resolve
        through the global tracking and registry URIs); a no-op for the default store."""
        if self.uri:
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            mlflow.set_registry_uri(self.uri)

    # ---------------------------------------------------------------- experiments
    @_mapped
    def ensure_experiment(self, name: str, tags: Mapping[str, str] | None = None) -> str:
        """The id of experiment ``name``, created (artifacts beside a SQLite store) if missing."""
        exp = self._mlflow.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            with mlflow_errors():
                return self._mlflow.create_experiment(
                    name, artifact_location=artifact_location(self.uri) if self.uri else None,
                    tags=dict(tags or {}))
        except RegistryConflict:     # created meanwhile by another process
            return self._mlflow.get_experiment_by_name(name).experiment_id

    # ----------------------------------------------------------------------- runs
    @_mapped
    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, Any]) -> str:
        """A new (running) run with ``tags`` (as given); returns its id."""
        run = self._mlflow.create_run(experiment_id, start_time=None, run_name=run_name,
                                      tags=dict(tags))
        return run.info.run_id

    @_mapped
    def find_runs(self, experiment_id: str, filter_string: str, *, max_results: int,
                  order_by: Sequence[str] = ()) -> list[RunRecord]:
        """Runs of one experiment matching an MLflow search filter."""
        runs = self._mlflow.search_runs([experiment_id], filter_string, max_results=max_results,
                                        order_by=list(order_by) or None)
        return [RunRecord(r.info.run_id, dict(r.data.tags), r.info.artifact_uri) for r in runs]

    @_mapped
    def set_run_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set tags on a run in one call (values as strings, cut at :data:`TAG_MAX`)."""
        from mlflow.entities import RunTag

        self._mlflow.log_batch(run_id, tags=[RunTag(k, str(v)[:TAG_MAX])
                                             for k, v in tags.items()])

    @_mapped
    def log_run_data(self, run_id: str, params: Mapping[str, str],
                     metrics: Sequence[tuple[str, float, int]]) -> None:
        """Params, then metrics ``(key, value, timestamp_ms)`` at step 0, in batches."""
        from mlflow.entities import Metric, Param

        p = [Param(k, v) for k, v in params.items()]
        m = [Metric(k, v, ts, 0) for k, v, ts in metrics]
        for i in range(0, len(p), 100):
            self._mlflow.log_batch(run_id, params=p[i:i + 100])
        for i in range(0, len(m), 500):
            self._mlflow.log_batch(run_id, metrics=m[i:i + 500])

    @_mapped
    def log_dict(self, run_id: str, obj: Mapping[str, Any], artifact_file: str) -> None:
        """A JSON artifact of a run, as plain JSON (NaN / infinities -> null, anything else
        unknown -> str)."""
        self._mlflow.log_dict(run_id, _jsonable(obj), artifact_file)

    @_mapped
    def load_dict(self, run: RunRecord, artifact_file: str) -> dict:
        """A JSON artifact of a run, parsed."""
        from mlflow.artifacts import load_dict

        return load_dict(f"{run.artifact_uri}/{artifact_file}")

    @_mapped
    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._mlflow.set_terminated(run_id, status)

    # ---------------------------------------------------------- registered models
    @_mapped
    def ensure_registered_model(self, name: str, description: str | None = None) -> None:
        """Create registered model ``name`` unless it exists."""
        try:
            with mlflow_errors():
                self._mlflow.create_registered_model(name, description=description)
        except RegistryConflict:
            pass

    @_mapped
    def create_version(self, name: str, source: str, *, run_id: str | None = None,
                       tags: Mapping[str, Any] | None = None,
                       description: str | None = None) -> str:
        """Register ``source`` as a new version of ``name``; returns the version."""
        mv = self._mlflow.create_model_version(name, source, run_id=run_id, tags=dict(tags or {}),
                                               description=description)
        return str(mv.version)

    def alias_version(self, name: str, alias: str) -> str | None:
        """The version ``alias`` points to in registered model ``name``, or None if the model
        or the alias does not exist."""
        try:
            with mlflow_errors():
                return str(self._mlflow.get_model_version_by_alias(name, alias).version)
        except RegistryError as e:
            if e.code in _NO_ALIAS:
                return None
            raise

    @_mapped
    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._mlflow.set_registered_model_alias(name, alias, version)

    @_mapped
    def delete_alias(self, name: str, alias: str) -> None:
        self._mlflow.delete_registered_model_alias(name, alias)

    @_mapped
    def version_tags(self, name: str, version: str) -> dict[str, str]:
        """The tags of one model version (:class:`RegistryNotFound` if there is no such one)."""
        return dict(self._mlflow.get_model_version(name, str(version)).tags)

    @_mapped
    def set_version_tags(self, name: str, version: str, tags: Mapping[str, Any]) -> None:
        """Set tags on a model version (values as strings, cut at :data:`TAG_MAX`)."""
        for k, v in tags.items():
            self._mlflow.set_model_version_tag(name, version, k, str(v)[:TAG_MAX])

    # --------------------------------------------------------------------- models
    @_mapped
    def log_sklearn_model(self, experiment_id: str, model: Any, *, run_name: str,
                          tags: Mapping[str, Any], params: Mapping[str, Any],
                          metrics: Mapping[str, float], feature_names: list[str],
                          example: Any, metadata: Mapping[str, Any],
                          log_model_kwargs: Mapping[str, Any] | None = None) -> tuple[str, str]:
        """A training run: params, metrics, ``feature_names.json`` and the fitted scikit-learn
        ``model`` (its signature from ``example`` and what the model answers for it, the
        example itself, ``metadata``, pinned scikit-learn / MLflow requirements).

        Makes this store the global one first (fluent runs).  Returns ``(run_id, model_uri)``.
        """
        import mlflow
        import mlflow.sklearn
        import sklearn
        from mlflow.models import infer_signature

        self.activate()
        out = model.predict_proba(example) if hasattr(model, "predict_proba") else \
            model.predict(example)
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                              tags=dict(tags)) as run:
            mlflow.log_params(dict(params))
            mlflow.log_metrics(dict(metrics))
            mlflow.log_dict({"feature_names": feature_names}, "feature_names.json")
            info = mlflow.sklearn.log_model(
                model, name="model", signature=infer_signature(example, out),
                input_example=example, metadata=dict(metadata),
                # explicit requirements: no subprocess inferring them (seconds saved)
                pip_requirements=[f"scikit-learn=={sklearn.__version__}",
                                  f"mlflow=={mlflow.__version__}"], **dict(log_model_kwargs or {}))
        return run.info.run_id, info.model_uri

    @_mapped
    def load_model(self, name: str, version: str, flavor: str = "pyfunc") -> Any:
        """``models:/<name>/<version>`` loaded with ``mlflow.<flavor>`` (``pyfunc``: a pyfunc
        model; ``sklearn``: the estimator itself).  Makes this store the global one first."""
        self.activate()
        return importlib.import_module(f"mlflow.{flavor}").load_model(f"models:/{name}/{version}")
