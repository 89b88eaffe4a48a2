"""The sidecar application builder: ``serve run configs/serve.yaml`` imports this.

``build_app(args)`` takes typed arguments (pydantic) from the Serve config:
the metrics config file, the number of shards, the store directory and the
MLflow tracking URI.  Relative paths are resolved against the directory
``serve run`` was started from, so replicas (whose working directory may
differ) see absolute paths.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from kpistream.config import config_from_dict, read_yaml


class SidecarArgs(BaseModel):
    metrics_config: str = Field("configs/metrics.yaml", description="metric / window definitions")
    shards: int = Field(2, ge=1, le=256, description="number of shard actors")
    store_path: str = Field("data/store", description="time-series store directory")
    mlflow_tracking_uri: str = Field("sqlite:///data/mlflow.db")
    max_body_bytes: int = Field(8 << 20, ge=1024)
    publish_interval_s: float = Field(0.25, gt=0, le=60)
    archive_dir: str | None = Field(None, description="raw event archive (Parquet) directory; "
                                    "null: <store_path>/archive, \"\": no archive")


def load_metrics_config(path: str) -> dict:
    """The raw metrics config (validated here, so a bad file fails at deploy time)."""
    raw = read_yaml(Path(path).expanduser().resolve())
    config_from_dict(raw)
    return raw


def build_app(args: dict):
    from app.api import SidecarAPI

    a = SidecarArgs(**(args or {}))
    cfg = load_metrics_config(a.metrics_config)
    store = str(Path(a.store_path).expanduser().resolve())
    Path(store).mkdir(parents=True, exist_ok=True)
    return SidecarAPI.bind(cfg, a.shards, store, a.max_body_bytes, a.publish_interval_s,
                           **_archive_arg(SidecarAPI, a.archive_dir, store))


def _archive_arg(deployment, archive_dir: str | None, store: str) -> dict:
    """``{"archive_dir": absolute path | ""}`` for the API deployment.

    The shards' default is ``<store>/archive`` already; until the deployment
    takes ``archive_dir`` only that default can be used.
    """
    import inspect

    default = str(Path(store) / "archive")
    path = default if archive_dir is None else (
        str(Path(archive_dir).expanduser().resolve()) if archive_dir else "")
    cls = getattr(deployment, "func_or_class", deployment)
    if "archive_dir" in inspect.signature(cls.__init__).parameters:
        return {"archive_dir": path}
    if path != default:
        raise ValueError("archive_dir: this SidecarAPI does not take an archive directory; "
                         f"only the default {default} is available")
    return {}
