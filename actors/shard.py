"""The shard (:class:`Shard`): one engine over the events whose ``hash(request_id) % N`` is its
index.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any, Mapping, Sequence

from kpistream.wire.batch import FeedbackBatch, InferenceBatch
from kpistream.clock import Clock, SystemClock
from kpistream.spec.metrics import EngineConfig, config_from_dict
from kpistream.engine import Engine, Partial
from kpistream.engine.families import final_after_ms
from kpistream.errors import ConfigError, InputError
from kpistream.store.codec import config_to_json
from kpistream.store.dataonly import dumps, loads
from kpistream.wire.schema import validate_rows


class _ShardClock:
    """The engine's clock: the shard's, or the reading a record is applied at."""

    def __init__(self, shard: "Shard") -> None:
        self._shard = shard

    def now_ms(self) -> int:
        now = self._shard._now
        return self._shard.clock.now_ms() if now is None else now


class Shard:
    """One engine over one shard of the requests.

    A plain class (no Ray import): :mod:`actors.remote` makes it a Ray actor, and
    tests drive it directly.  An inference, its feedback and the shadow's
    prediction for the same request all arrive at the same shard, so the join
    needs no shuffle.

    Live, event time and processing time meet here: when no event has arrived
    for ``lateness`` (processing time, an idle source), :meth:`Shard.collect`
    moves the watermark to ``now - lateness`` so that windows close when
    traffic stops; while events flow, event time alone drives it.  It returns
    the cumulative partial states of every pane touched since the last call,
    for the publisher to merge.

    With ``log_dir`` every input of the engine is written to the shard log
    (:class:`actors.log.ShardLog`) before the shard answers, and a shard started
    on an existing log replays it first: it comes back with its whole state
    (README, "Faults and durability").  Final partials stay with the shard until
    the publisher's stored watermark (``collect(acked_watermark)``) passes them,
    so a publisher that lost a round can ask for everything again (``resync``).

    With ``archive_dir`` every batch the engine accepted rows of is also kept
    for the raw event archive (:class:`actors.archive.EventArchive`: Parquet
    under ``archive_dir``); ``collect`` writes the files by size or age.
    """

    def __init__(self, index: int, config: EngineConfig | Mapping[str, Any] | None = None,
                 clock: Clock | None = None, processing_time_watermark: bool = True,
                 archive_dir: str | None = None, archive_options: Mapping[str, Any] | None = None,
                 log_dir: str | None = None, log_options: Mapping[str, Any] | None = None,
                 ) -> None:
        if isinstance(config, Mapping):
            config = config_from_dict(config)
        self.index = index
        self.cfg = config or EngineConfig()
        self.clock = clock or SystemClock()
        # the engine reads the time through this: fixed to the logged reading while a record
        # is applied, so that a replay judges "far future" exactly as the first pass did
        self._now: int | None = None
        self.engine = Engine(self.cfg, _ShardClock(self))
        self.processing_time_watermark = processing_time_watermark
        self.batches = Counter()
        self.busy_s = 0.0
        self.last_event_ms = self.clock.now_ms()
        self.emitters: dict[str, tuple[dict, int]] = {}
        self.archive = None
        if archive_dir:
            from actors.archive import EventArchive

            self.archive = EventArchive(archive_dir, index, clock=self.clock,
                                        **{"background": True, **(archive_options or {})})
        # final partials handed out but not yet stored by the publisher (its acknowledged
        # watermark is below their deadline): sent again if it asks for everything
        self._unacked: dict[tuple, Partial] = {}
        self._resync = False      # the next collect sends everything (after a replay)
        self.recovery: dict[str, Any] = {}
        self.log = None
        if log_dir:
            from actors.log import ShardLog

            self.log = ShardLog(log_dir, **{"max_future_ms": self.cfg.max_future_ms,
                                            **(log_options or {})})
            self._recover()
            self.log.watermark_fn = lambda: self.engine.wm.watermark

    # --------------------------------------------------------------- the log
    #: the layout of a snapshot's content (another one is skipped, as a damaged one is)
    SNAPSHOT_VERSION = 1
    #: metrics settings that may change between a snapshot and the shard that loads it
    RETUNABLE = frozenset({"lateness_ms", "max_future_ms", "label_delay_ms"})

    def _snapshot(self) -> None:
        """The whole state (engine, final partials not yet acknowledged, counts) as a
        data-only snapshot at the log's current position."""
        t0 = time.perf_counter()
        # the log position it covers is in the file's name (ShardLog.write_snapshot)
        data = dumps({"version": self.SNAPSHOT_VERSION,
                      "config": config_to_json(self.cfg), "engine": self.engine,
                      "unacked": self._unacked, "batches": self.batches},
                     externals={"clock": self.engine.clock, "config": self.cfg})
        self.log.write_snapshot(data, time.perf_counter() - t0)

    def _load_snapshot(self) -> int:
        """The newest snapshot that reads back (a damaged one is skipped, with a warning);
        returns the log position it covers (0: none, replay everything)."""
        for seq, path in self.log.snapshots():
            t0 = time.perf_counter()
            try:
                st = loads(path.read_bytes(), externals={"clock": _ShardClock(self),
                                                         "config": self.cfg})
                if st.get("version") != self.SNAPSHOT_VERSION:
                    raise ValueError(f"snapshot layout {st.get('version')!r}")
                self._check_config(st["config"], path)
            except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
                logging.getLogger("kpistream.log").warning(
                    "shard %d: snapshot %s not loaded (%s); trying an older one", self.index,
                    path.name, e)
                self.recovery.setdefault("snapshots_skipped", []).append(f"{path.name}: {e}")
                continue
            self.engine, self._unacked, self.batches = st["engine"], st["unacked"], st["batches"]
            # settings the engine's parts copied when built (a retuned lateness, say)
            self.engine.wm.lateness_ms = self.cfg.lateness_ms
            self.engine.wm.max_future_ms = self.engine.checks.max_future_ms = \
                self.cfg.max_future_ms
            self.log.restored_from(seq)
            self.recovery.update(snapshot_seq=seq, snapshot_load_s=time.perf_counter() - t0)
            return seq
        return 0

    def _check_config(self, saved: str, path) -> None:
        """A snapshot made under another metrics config is loaded if only
        :attr:`RETUNABLE` settings changed; any other change (windows, families,
        segments...) would make its state mean something else, and the log it
        covers is gone, so the shard refuses to start and says what to do."""
        old, new = json.loads(saved), json.loads(config_to_json(self.cfg))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if set(changed) - self.RETUNABLE:
            raise ConfigError(
                "metrics_config", f"shard {self.index}: its state in {path.parent} was made "
                f"with another metrics config (changed: {', '.join(changed)}), which it cannot "
                f"carry over: deploy with a new store_path (or log_dir), or delete "
                f"{path.parent} to start this shard afresh")

    def _recover(self) -> None:
        """Rebuild the state: the newest snapshot, then every input of the log after it in
        order, with the clock readings it had (also the collects: they expire join
        entries).  Runs before the shard takes any call, so a restarted shard answers
        with its whole state."""
        t0 = time.perf_counter()
        n = events = 0
        after = self._load_snapshot()
        segs = self.log.segments()
        if not after and segs and int(segs[0].stem) > 1 and self.log.snapshots():
            # the records before the first segment are only in snapshots, none of which
            # reads back: a replay would rebuild part of the state, so stop instead
            raise InputError(f"shard {self.index}: no snapshot in {self.log.root} reads back "
                             f"({'; '.join(self.recovery.get('snapshots_skipped', [])) or 'none'})"
                             f" and the log before record {segs[0].stem.lstrip('0')} is gone; "
                             f"move the directory aside to start this shard empty")
        for rec in self.log.replay(after):
            n += 1
            if rec.type in ("inference", "feedback"):
                events += len(rec.payload.ts)
            out = self._apply(rec.type, rec.now_ms, rec.payload)
            if rec.type == "collect":
                self._keep_unacked(out)
        self.recovery.update(records=n, events=events, seconds=time.perf_counter() - t0,
                             unacked_partials=len(self._unacked),
                             cut_tail_bytes=self.log.cut_tail)
        if n or after:
            self.last_event_ms = self.clock.now_ms()
            self._resync = True

    def _apply(self, kind: str, now_ms: int, payload: Any) -> Any:
        """One engine input at clock reading ``now_ms`` (live and in replay alike)."""
        self._now = now_ms
        try:
            if kind == "inference":
                return self.engine.ingest_inference(payload)
            if kind == "feedback":
                return self.engine.ingest_feedback(payload)
            if kind == "advance":
                return self.engine.advance(payload)
            if kind == "flush":
                return self.engine.flush()
            if kind == "collect":
                return self.engine.collect()
            if kind == "rejected":
                for typ, fld, reason in payload:
                    self.engine.counters[f"{typ}_in"] += 1
                    self.engine.rejected[(fld, reason)] += 1
                return None
            raise ValueError(f"unknown engine input {kind!r}")
        finally:
            self._now = None

    def _input(self, kind: str, payload: Any = None) -> Any:
        """Log (if there is a log), then apply: nothing is acknowledged that a restarted
        shard would not have."""
        now = self.clock.now_ms()
        if self.log is not None:
            self.log.append(kind, now, payload)
        return self._apply(kind, now, payload)

    # ------------------------------------------------------------------ input
    def ingest_inference(self, batch: InferenceBatch) -> dict:
        t0 = time.perf_counter()
        rep = self._input("inference", batch)
        if self.archive is not None and rep.accepted:
            self.archive.append("inference", batch)
        self.busy_s += time.perf_counter() - t0
        self.last_event_ms = self.clock.now_ms()
        self.batches["inference"] += 1
        return rep.as_dict()

    def ingest_feedback(self, batch: FeedbackBatch) -> dict:
        t0 = time.perf_counter()
        rep = self._input("feedback", batch)
        if self.archive is not None and rep.accepted:
            self.archive.append("feedback", batch)
        self.busy_s += time.perf_counter() - t0
        self.last_event_ms = self.clock.now_ms()
        self.batches["feedback"] += 1
        return rep.as_dict()

    def ingest(self, batches: Sequence[tuple[str, Any]]) -> list[dict]:
        """Several ``("inference"|"feedback", batch)`` in one call (one actor round trip)."""
        return [self.ingest_inference(b) if k == "inference" else self.ingest_feedback(b)
                for k, b in batches]

    def ingest_rows(self, rows: list, expect: str | None = None) -> dict:
        """Wire rows (decoded JSON): validated here, then ingested in arrival order."""
        from kpistream.replay import iter_runs

        res = validate_rows(rows, now_ms=self.clock.now_ms(), max_future_ms=self.cfg.max_future_ms,
                            expect=expect)
        self.count_rejected(res.tally())
        out = {"accepted": 0, "rejected": [r.as_dict() for r in res.rejections]}
        for kind, recs in iter_runs(res):
            if kind == "inference":
                rep = self.ingest_inference(InferenceBatch.from_records(recs))
            else:
                rep = self.ingest_feedback(FeedbackBatch.from_records(recs))
            out["accepted"] += rep["accepted"]
        return out

    def count_rejected(self, tally: Sequence[tuple[str, str, str]]) -> None:
        """Rows refused before they reached the engine (wire validation here or in an HTTP
        replica): ``(type, field, reason)`` each (:meth:`ValidationResult.tally`).  Counted
        as received (by type; ``unknown`` when the row had none) and as rejected, like
        the rows the engine refuses itself."""
        if tally:
            self._input("rejected", [tuple(t) for t in tally])

    # ----------------------------------------------------------------- output
    def _keep_unacked(self, parts) -> None:
        for p in parts:
            if p.final and p.space == "time":
                self._unacked[(p.space, p.key, p.series, p.family)] = p

    def _ack(self, acked_watermark: int) -> None:
        """Forget the final partials the publisher has stored (their windows are final at
        its acknowledged watermark)."""
        delay = self.cfg.label_delay_ms
        for k in [k for k, p in self._unacked.items()
                  if p.end_ms + final_after_ms(p.family, delay) <= acked_watermark]:
            del self._unacked[k]

    def collect(self, acked_watermark: int | None = None, resync: bool = False,
                idle_advance: bool = True) -> tuple[list[Partial], int, dict]:
        """(partials since the last call, watermark, stats) for the publisher.

        ``acked_watermark``: the publisher's emitted (and stored) watermark over all
        shards: final partials below it are forgotten, and the log keeps what a replay
        needs above it (None: nothing is dropped).  ``resync`` (a restarted publisher
        asks; a shard restarted from its log does it once by itself): every state held
        and every final partial not yet acknowledged, not only what changed.
        ``idle_advance=False``: the watermark does not move on processing time now (the
        publisher says so while a shard is down: senders wait for it, so the others are
        idle without traffic having stopped)."""
        t0 = time.perf_counter()
        now = self.clock.now_ms()
        if self.processing_time_watermark and idle_advance \
                and now - self.last_event_ms >= self.cfg.lateness_ms \
                and now - self.cfg.lateness_ms > self.engine.wm.watermark:
            self._input("advance", now - self.cfg.lateness_ms)
        if acked_watermark is not None:
            self._ack(int(acked_watermark))
        parts = self._input("collect")
        self._keep_unacked(parts)
        if resync or self._resync:
            self._resync = False
            got = {(p.space, p.key, p.series, p.family) for p in parts}
            held = [p for p in (*self._unacked.values(), *self.engine.held_partials())
                    if (p.space, p.key, p.series, p.family) not in got]
            parts = held + list(parts)
        if self.log is not None:
            if self.log.snapshot_every_s >= 0:
                if self.log.snapshot_due:
                    self._snapshot()          # and the segments it covers go
            elif acked_watermark is not None:
                self._truncate_log(acked_watermark)
        if self.archive is not None:
            self.archive.maybe_flush()
        self.busy_s += time.perf_counter() - t0
        return parts, self.engine.emit_watermark, self.stats()

    def _truncate_log(self, acked_watermark: int) -> None:
        """Segments whose events are all so old that no open window, join entry or dedup
        entry can depend on them any more: older than the watermark (the lower of this
        shard's and the publisher's stored one) minus the label delay, the longest window
        and the lateness, with a pane to spare.  A replay then re-sends partials only for
        panes the publisher already holds as final, which it refuses."""
        wm = min(self.engine.wm.watermark, int(acked_watermark))
        if wm <= -(1 << 62):
            return
        longest = max((w.size for w in self.cfg.windows if w.is_time), default=0)
        self.log.truncate(wm - self.cfg.label_delay_ms - longest - self.cfg.lateness_ms
                          - self.cfg.pane_ms)

    def flush(self) -> tuple[list[Partial], int, dict]:
        """End of input (tests, shutdown): every window becomes final."""
        self._input("flush")
        if self.archive is not None:
            self.archive.flush()
        return self.collect(None)

    def stats(self) -> dict:
        st = self.engine.stats()
        st["shard"] = self.index
        st["batches"] = dict(self.batches)
        st["busy_s"] = self.busy_s
        st["late_by_series"] = {"|".join(k[:4]): n for k, n in self.engine.late_by_series.items()}
        # replicas silent for 10 minutes are gone (restarted or scaled down)
        now = self.clock.now_ms()
        for k in [k for k, (_, t) in self.emitters.items() if now - t > 600_000]:
            del self.emitters[k]
        st["emitters"] = {k: v for k, (v, _) in self.emitters.items()}
        if self.archive is not None:
            st["archive"] = self.archive.stats()
        if self.log is not None:
            st["log"] = {**self.log.stats(), "recovery": self.recovery}
        return st

    def report_emitter(self, emitter: str, stats: dict) -> None:
        """A monitored replica's own counters (buffer drops, send errors), for /metrics."""
        self.emitters[emitter] = (dict(stats), self.clock.now_ms())

    def ping(self) -> int:
        return self.index

    def pid(self) -> int:
        """This process's id (fault-injection tests kill it)."""
        import os

        return os.getpid()
