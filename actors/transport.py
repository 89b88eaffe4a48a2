"""The Ray transport of the emitter: batches to the named shard actors, routed by request id.

Ray is imported only when the shard actors are looked up, so a monitored
deployment that is given another transport (a test's) never needs a cluster.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from kpistream.wire.batch import route

SHARDS_ENV = "KPISTREAM_SHARDS"   #: shard count for ``n_shards=None`` (else discovered)


class ShardTransport:
    """Sends batches to the named shard actors (``actors.remote``), found on first use.

    ``n_shards=None`` takes the count from the environment variable
    ``KPISTREAM_SHARDS`` or, failing that, discovers it: the consecutive
    shard actors ``kpistream-shard-0, 1, ...`` that exist, accepted once the
    publisher exists (it is created after every shard) or the count is the
    same on two probes.  Until the actors are found :meth:`ready` is false
    (and the emitter keeps its rows buffered); look-ups are retried at most
    every ``retry_s``.
    """

    def __init__(self, n_shards: int | None = None, namespace: str | None = None,
                 retry_s: float = 1.0) -> None:
        if n_shards is None and os.environ.get(SHARDS_ENV):
            n_shards = int(os.environ[SHARDS_ENV])
        if n_shards is not None and n_shards < 1:
            raise ValueError(f"n_shards must be >= 1, got {n_shards}")
        self._n = n_shards
        self._namespace = namespace
        self._retry_s = retry_s
        self._handles: list | None = None
        self._next_try = 0.0
        self._probed: int | None = None
        self.last_error: str | None = None

    @property
    def n_shards(self) -> int | None:
        return len(self._handles) if self._handles is not None else self._n

    def ready(self) -> bool:
        if self._handles is not None:
            return True
        now = time.monotonic()
        if now < self._next_try:
            return False
        self._next_try = now + self._retry_s
        try:
            self._handles = self._lookup()
        except Exception as e:  # not there yet: retried later
            self.last_error = f"{type(e).__name__}: {e}"
            return False
        return self._handles is not None

    def reset(self) -> None:
        """Forget the handles (after a failed send); the next use looks them up again."""
        self._handles = None

    def _lookup(self) -> list | None:
        import ray

        from actors.remote import NAMESPACE, PUBLISHER, shard_name

        ns = self._namespace or NAMESPACE
        if self._n is not None:
            return [ray.get_actor(shard_name(i), namespace=ns) for i in range(self._n)]
        handles = []
        while True:
            try:
                handles.append(ray.get_actor(shard_name(len(handles)), namespace=ns))
            except ValueError:
                break
        if not handles:
            raise LookupError(f"no shard actor {shard_name(0)!r} in namespace {ns!r}")
        try:
            ray.get_actor(PUBLISHER, namespace=ns)
            complete = True
        except ValueError:
            complete = self._probed == len(handles)
        self._probed = len(handles)
        if not complete:
            self._next_try = 0.0 if self._retry_s <= 0 else time.monotonic() + self._retry_s
            raise LookupError(f"found {len(handles)} shard actors; waiting for the count to settle")
        return handles

    def send(self, kind: str, batch: Any) -> Any:
        """``ingest_<kind>.remote`` on the owning shard(s): one ObjectRef, or a gather of them
        when the batch holds rows of several shards."""
        if self._handles is None and not self.ready():
            raise LookupError(self.last_error or "kpistream shard actors not found")
        handles = self._handles
        parts = route(batch, len(handles))
        if len(parts) == 1:
            s, _, part = parts[0]
            return self.call(handles[s], kind, part)
        return asyncio.gather(*(self.call(handles[s], kind, part) for s, _, part in parts))

    def report(self, emitter: str, stats: dict) -> None:
        """The emitter's counters to shard 0 (fire and forget), for /metrics."""
        if self._handles is None and not self.ready():
            return
        self._handles[0].report_emitter.remote(emitter, stats)

    @staticmethod
    def call(handle: Any, kind: str, batch: Any) -> Any:
        """``handle.ingest_inference.remote(batch)`` or ``ingest_feedback`` (an ObjectRef)."""
        if kind == "inference":
            return handle.ingest_inference.remote(batch)
        if kind == "feedback":
            return handle.ingest_feedback.remote(batch)
        raise ValueError(f"kind must be 'inference' or 'feedback', not {kind!r}")


ShardSink = ShardTransport   #: the name it had in app.monitor

__all__ = ["ShardTransport", "ShardSink", "SHARDS_ENV"]
