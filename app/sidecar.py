"""The sidecar application builder (:func:`build_app`): ``serve run configs/serve.yaml`` imports
this.  Its args: README, "Configuration".
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.archive import is_uri
from kpistream.spec.metrics import config_from_dict, read_yaml


class SidecarArgs(BaseModel):
    """The sidecar's ``args`` in a Serve config; a misspelled key fails the deployment."""

    model_config = ConfigDict(extra="forbid")
    metrics_config: str = Field("configs/metrics.yaml", description="metric / window definitions")
    shards: int = Field(2, ge=1, le=256, description="number of shard actors")
    store_path: str = Field("data/store", description="time-series store directory")
    mlflow_tracking_uri: str = Field("sqlite:///data/mlflow.db")
    max_body_bytes: int = Field(8 << 20, ge=1024)
    publish_interval_s: float = Field(0.25, gt=0, le=60)
    archive_dir: str | None = Field(None, description="raw event archive (Parquet): a directory "
                                    "or a pyarrow filesystem URI (s3://, gs://); null: "
                                    "<store_path>/archive, \"\": no archive")
    log_dir: str | None = Field(None, description="the shards' logs (what a restarted shard "
                                "replays); null: <store_path>/log, \"\": none")
    snapshot_every_s: float = Field(60.0, ge=-1, description="seconds between shard "
                                    "snapshots (a restart replays the log after the newest); "
                                    "-1: none (old log segments go by event time)")
    canary_config: str | None = Field(None,
                                      description="canary policy, experiments, retraining "
                                                  "triggers (null: none)")
    alerts_config: str | None = Field("configs/alerts.yaml",
                                      description="alert rules, detectors, input drift, webhooks "
                                                  "(null: none)")
    shard_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each shard needs (nodes that "
                                          "reach the log directory); shards spread over them")
    publisher_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources the publisher needs (the node "
                                          "whose disk holds the SQLite store)")

    @field_validator("log_dir")
    @classmethod
    def _log_on_a_filesystem(cls, v: str | None) -> str | None:
        if v and is_uri(v):
            raise ValueError("the shard log needs a filesystem path (it appends and fsyncs "
                             "before each answer); object stores have neither: use a local "
                             "disk or a shared filesystem mounted on every node (README, "
                             "\"Running on a cluster\")")
        return v


def load_metrics_config(path: str) -> dict:
    """The raw metrics config (validated here, so a bad file fails at deploy time)."""
    raw = read_yaml(Path(path).expanduser().resolve())
    config_from_dict(raw)
    return raw


def load_alerts_config(path: str | None, metrics: dict) -> dict | None:
    """The raw alerts config, checked against the metrics config (fails at deploy time)."""
    from kpistream.alerts.watcher import alerts_from_dict, check_windows

    if not path:
        return None
    raw = read_yaml(Path(path).expanduser().resolve())
    check_windows(alerts_from_dict(raw), config_from_dict(metrics))
    return raw


def build_app(args: dict):
    """The sidecar app from typed :class:`SidecarArgs` (the Serve config's ``args``).

    Relative paths are resolved against the directory ``serve run`` was
    started from, so replicas (whose working directory may differ) see
    absolute paths.
    """
    from app.api import SidecarAPI

    a = SidecarArgs(**(args or {}))
    cfg = load_metrics_config(a.metrics_config)
    store = str(Path(a.store_path).expanduser().resolve())
    Path(store).mkdir(parents=True, exist_ok=True)
    alerts = load_alerts_config(a.alerts_config, cfg)
    canary = load_canary(a.canary_config)
    from actors.registry import normalize_tracking_uri, prepare_store

    # with experiments, the MLflow store's tables are made here, before any replica starts
    uri = (prepare_store if canary is not None else normalize_tracking_uri)(a.mlflow_tracking_uri)
    return SidecarAPI.bind(cfg, a.shards, store, a.max_body_bytes, a.publish_interval_s,
                           alerts=alerts, archive_dir=_under_store(a.archive_dir, store, "archive"),
                           canary=canary, tracking_uri=uri,
                           log_dir=_under_store(a.log_dir, store, "log"),
                           snapshot_every_s=a.snapshot_every_s,
                           placement={"shards": a.shard_resources,
                                      "publisher": a.publisher_resources})


def load_canary(path: str | None) -> dict | None:
    """The raw canary config (validated here, so a bad file fails at deploy time)."""
    from actors.canary import load_canary_config

    if not path:
        return None
    raw = read_yaml(Path(path).expanduser().resolve())
    load_canary_config(raw)
    return raw


def _under_store(path: str | None, store: str, default: str) -> str:
    """A directory of durable state: ``<store>/<default>`` by default, ``""`` for none,
    else the path made absolute (replicas may run in another working directory)."""
    if path is None:
        return str(Path(store) / default)
    if is_uri(path):        # a filesystem URI (the archive: s3://, gs:// ...): as given
        return path
    return str(Path(path).expanduser().resolve()) if path else ""
