"""The one place where kpistream's plain classes become Ray actors (:func:`ensure_actors`,
:func:`ensure_canary`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

import ray

from actors.canary import Canary, load_canary_config
from actors.publisher import Publisher
from actors.shard import Shard

NAMESPACE = "kpistream"
PUBLISHER = "kpistream-publisher"
CANARY = "kpistream-canary"


def shard_name(i: int) -> str:
    return f"kpistream-shard-{i}"


class _PublisherOfShards(Publisher):
    """The publisher, wired to the shards by name; ticks in its own thread.

    Each shard is pulled on its own: a collect that has not answered within
    ``pull_timeout_s`` stays outstanding and is read on a later tick (never
    dropped; one outstanding for 30 s is asked again, with a resync), a shard
    that died is skipped
    until it is back (restarted from its log, it sends its state again), and
    the other shards' data keeps flowing.  Windows that need the missing shard
    stay provisional (its watermark holds the global one back).  Health names
    the shard and the reason.
    """

    def __init__(self, config: Mapping[str, Any], store_path: str, n_shards: int,
                 interval_s: float = 0.25, alerts: Mapping[str, Any] | None = None,
                 pull_timeout_s: float = 2.0, restart_grace_s: float = 30.0) -> None:
        self._handles = [ray.get_actor(shard_name(i), namespace=NAMESPACE)
                         for i in range(n_shards)]
        self._outstanding: list[Any] = [None] * n_shards
        self._since: list[float | None] = [None] * n_shards
        # a (re)started publisher holds nothing yet: each shard sends everything it holds once
        self._resync = set(range(n_shards))
        self.pull_timeout_s = pull_timeout_s
        self.abandon_s = 30.0
        self.shard_problems: dict[int, str] = {}
        self._all_up_since = self._started = time.monotonic()
        self.restart_grace_s = 0.0
        super().__init__(config, store_path, pull=self._pull, n_sources=n_shards, alerts=alerts)
        if self.store.watermark is not None:     # a restart over existing state
            self.restart_grace_s = restart_grace_s
        self.start(interval_s)

    def _pull(self) -> list:
        now = time.monotonic()
        if self.shard_problems:
            self._all_up_since = now
        # idle shards move their watermark on processing time only once every shard has been
        # up for the lateness, and not in the first restart_grace_s after this publisher
        # restarted: while one is down, or the sidecar restarts, senders wait (HTTP batches
        # span shards, emitters retry), so quiet is not the end of traffic, and the events
        # sent again when it is back must not find their windows closed
        idle_ok = (now - self._all_up_since >= self.cfg.lateness_ms / 1000
                   and now - self._started >= self.restart_grace_s)
        for i, h in enumerate(self._handles):
            if self._outstanding[i] is None:
                self._outstanding[i] = h.collect.remote(self.acked_watermark,
                                                        i in self._resync, idle_ok)
                self._since[i] = now
        refs = list(self._outstanding)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.pull_timeout_s)
        ready = set(ready)
        out = []
        for i, ref in enumerate(refs):
            if ref not in ready:
                age = time.monotonic() - self._since[i]
                self.shard_problems[i] = f"collect outstanding for {age:.1f} s"
                if age > self.abandon_s:
                    # lost in a restart: ask again, for everything (the shard keeps what
                    # it handed out until the stored watermark passes it: nothing is lost)
                    self._outstanding[i] = None
                    self._resync.add(i)
                continue
            self._outstanding[i] = None
            try:
                out.append(ray.get(ref))
                self.shard_problems.pop(i, None)
                self._resync.discard(i)
            except Exception as e:   # dead (restarting from its log) or failing
                self.shard_problems[i] = f"{type(e).__name__}: {str(e)[:200]}"
                # the collect may have run and its answer been lost ("may or may not have
                # been executed"): ask for everything next time (what it handed out is kept
                # until stored, so nothing is lost)
                self._resync.add(i)
        return out

    def health(self) -> dict:
        h = super().health()
        h["shard_problems"] = {str(k): v for k, v in self.shard_problems.items()}
        if self.shard_problems:
            h["status"] = "degraded"
        return h


class _CanaryOfPublisher(Canary):
    """The canary controller, reading the publisher by name, acting through MLflow.

    The triggers (one per registered model, :class:`actors.trigger.Trigger`)
    live in this actor's process: they only talk to MLflow and launch the
    retraining as a Ray task, so they need no actor of their own.
    """

    def __init__(self, canary_config: Mapping[str, Any], tracking_uri: str,
                 archive_dir: str | None = None, interval_s: float = 1.0) -> None:
        from actors.trigger import Trigger

        cfg = load_canary_config(canary_config)
        pub = ray.get_actor(PUBLISHER, namespace=NAMESPACE)
        a = cfg.actions
        triggers = {name: Trigger(tracking_uri, name, mode=a.mode, cooldown_s=a.cooldown_ms / 1000,
                                  retrain_cooldown_s=a.retrain_cooldown_ms / 1000,
                                  archive_dir=archive_dir or None)
                    for name in cfg.registered_models}
        super().__init__(
            cfg, triggers=triggers,
            summary=lambda spec, version, since, primary_version: ray.get(
                pub.paired_summary.remote(spec.model, spec.challenger_variant, version, since,
                                          spec.primary_variant, primary_version)),
            notifications=lambda seq, epoch: ray.get(pub.transitions.remote(seq, epoch)),
            labelled=lambda: ray.get(pub.counters.remote())["counters"].get("join_pairs", 0))
        self.start(interval_s)


# Actors hold state, not CPUs: num_cpus=0 so that a small machine can host the
# shards, the publisher and the Serve replicas together.  Restarted on failure.
ShardActor = ray.remote(num_cpus=0, max_restarts=-1)(Shard)
PublisherActor = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=8)(_PublisherOfShards)
CanaryActor = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=4)(_CanaryOfPublisher)


def ensure_actors(config: Mapping[str, Any], n_shards: int, store_path: str,
                  publish_interval_s: float = 0.25, alerts: Mapping[str, Any] | None = None,
                  archive_dir: str | None = None, log_dir: str | None = None,
                  placement: Mapping[str, Mapping[str, float]] | None = None,
                  snapshot_every_s: float = 60.0) -> tuple[list, Any]:
    """(shard handles, publisher handle), created on first call, found by name after.

    The shards archive the raw events they accept under ``archive_dir``
    (None: ``<store_path>/archive``; ``""``: no archive), and log every input
    under ``log_dir/shard-<i>`` before they answer (None: ``<store_path>/log``;
    ``""``: no log, and a restarted shard starts empty), with a snapshot of their state
    there every ``snapshot_every_s`` (negative: none).

    Shards spread over the cluster's nodes (``SPREAD``), so a node lost takes few of them;
    ``placement``: ``{"shards": {resource: amount}, "publisher": {...}}``, custom Ray
    resources they need (on a multi-node cluster: the nodes that reach the log
    directory, the node whose disk holds the SQLite store).  A restarted actor goes
    to any node that has them.

    Actors are named (``kpistream-shard-<i>``, ``kpistream-publisher``,
    ``kpistream-canary``) in the ``kpistream`` namespace, so the Ray dashboard
    says what each one is, and any Serve replica can find them by name.  :func:`ensure_actors` creates them if
    they do not exist yet (idempotent: every replica may call it).
    """
    if archive_dir is None:
        archive_dir = os.path.join(store_path, "archive")
    if log_dir is None:
        log_dir = os.path.join(store_path, "log")
    placement = placement or {}
    shards = [ShardActor.options(name=shard_name(i), namespace=NAMESPACE, get_if_exists=True,
                                 lifetime="detached", scheduling_strategy="SPREAD",
                                 resources=dict(placement.get("shards") or {})).remote(
                  i, dict(config), archive_dir=archive_dir or None,
                  log_dir=os.path.join(log_dir, f"shard-{i}") if log_dir else None,
                  log_options={"snapshot_every_s": snapshot_every_s})
              for i in range(n_shards)]
    ray.get([s.ping.remote() for s in shards])
    pub = PublisherActor.options(name=PUBLISHER, namespace=NAMESPACE, get_if_exists=True,
                                 lifetime="detached",
                                 resources=dict(placement.get("publisher") or {})).remote(
        dict(config), store_path, n_shards, publish_interval_s, alerts)
    ray.get(pub.health.remote())
    return shards, pub


def ensure_canary(canary_config: Mapping[str, Any], tracking_uri: str,
                  archive_dir: str | None = None) -> Any:
    """The canary controller actor (after :func:`ensure_actors`); None without experiments
    or retraining triggers in the config."""
    cfg = load_canary_config(canary_config)
    if not cfg.experiments and not (cfg.retrain.on_alerts or cfg.retrain.every_labelled):
        return None
    h = CanaryActor.options(name=CANARY, namespace=NAMESPACE, get_if_exists=True,
                            lifetime="detached").remote(dict(canary_config), tracking_uri,
                                                        archive_dir)
    ray.get(h.traffic.remote(""))
    return h
