"""The shard log (:class:`ShardLog`): every input of a shard's engine, written before the shard
answers, read back in order when a restarted shard rebuilds its state.

A plain class (no Ray import), owned by one shard (:class:`actors.shard.Shard`).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from kpistream.errors import InputError
from kpistream.wire.frames import decode_batch, encode_batch

__all__ = ["ShardLog", "LogRecord", "RECORD_TYPES"]

log = logging.getLogger("kpistream.log")

#: record type -> code in the file
RECORD_TYPES = {"inference": 1, "feedback": 2, "advance": 3, "flush": 4, "collect": 5,
                "rejected": 6}
_NAMES = {v: k for k, v in RECORD_TYPES.items()}
# magic, version, type, seq, now_ms, payload length, crc32 of the payload
_HEAD = struct.Struct("<4sBBQqII")
_MAGIC = b"KPL1"
_VERSION = 1
_I64 = struct.Struct("<q")


@dataclass(frozen=True)
class LogRecord:
    """One input of the engine: ``type`` (a key of :data:`RECORD_TYPES`), its sequence
    number, the shard's clock when it was applied, and the payload (a batch, a
    watermark, a rejection tally or None)."""

    type: str
    seq: int
    now_ms: int
    payload: Any


class ShardLog:
    """Append-only segments ``<dir>/<first seq>.log`` of framed records.

    Each record: a fixed header (magic, format version, type, sequence number,
    the clock reading the engine used, payload length, CRC-32) and a data-only
    payload (:mod:`kpistream.wire.frames` for batches; no pickle).
    :meth:`append` writes through to the operating system before it returns, so
    a killed process loses nothing it acknowledged; ``fsync_s`` bounds what a
    machine crash can lose (0: fsync every record).  A record torn by a crash
    at the end of the last segment is cut off on open; damage anywhere else is
    an error, never skipped.

    Snapshots (:meth:`write_snapshot`): every ``snapshot_every_s`` the shard
    writes its whole state as ``snapshot-<seq>.snap`` (data only:
    :mod:`kpistream.store.dataonly`), tagged with the last record it covers; a
    restart loads the newest that reads back intact and replays only the records
    after it (:meth:`replay`).  Segments that the two newest snapshots cover are
    deleted.  Without snapshots (``snapshot_every_s < 0``) :meth:`truncate`
    deletes whole segments whose events are all older than a cutoff (the shard
    passes the time before which no event can change an open window any more).
    """

    def __init__(self, root: str | os.PathLike, *, segment_bytes: int = 64 << 20,
                 fsync_s: float = 1.0, max_future_ms: int | None = None,
                 snapshot_every_s: float = 60.0) -> None:
        self.root = Path(root)
        #: how often the shard writes a snapshot of its state (at a collect); 0: at every
        #: collect, negative: never (then old segments go by event time, see truncate)
        self.snapshot_every_s = snapshot_every_s
        self.snapshots_written = 0
        self.snapshot_bytes = 0
        self.snapshot_s = 0.0             # the last snapshot's encode + write time
        self.snapshot_seq = 0             # the log position the newest snapshot covers
        self._snapshot_at = time.monotonic()
        # event times further ahead of a record's clock than this were refused by the
        # engine: they do not keep a segment alive
        self.max_future_ms = max_future_ms
        self.root.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.fsync_s = fsync_s
        self.seq = 0                      # the last sequence number written
        self.bytes = 0
        self.records = 0
        self.truncated_segments = 0
        self.cut_tail = 0                 # bytes of a torn last record cut off on open
        self._fh = None
        self._seg_max_ts: dict[Path, int] = {}   # segment -> largest event time in it
        self._last_sync = time.monotonic()
        #: the engine's watermark, written at the head of every new segment, so that a
        #: replay that starts there (earlier segments truncated) judges lateness as before
        self.watermark_fn = None

    # ------------------------------------------------------------------ read
    def segments(self) -> list[Path]:
        return sorted(self.root.glob("*.log"), key=lambda p: int(p.stem))

    def replay(self, after_seq: int = 0) -> Iterator[LogRecord]:
        """Every record after ``after_seq`` (a snapshot's position) in order; call once,
        before the first :meth:`append`."""
        segs = self.segments()
        for i, seg in enumerate(segs):
            self.bytes += seg.stat().st_size
            if i + 1 < len(segs) and int(segs[i + 1].stem) - 1 <= after_seq:
                self._seg_max_ts[seg] = -(1 << 63)      # covered by the snapshot
                continue
            max_ts = -(1 << 63)
            for rec in self._read(seg, last=i == len(segs) - 1):
                self.seq = rec.seq
                self.records += 1
                if rec.type in ("inference", "feedback"):
                    max_ts = max(max_ts, self._max_ts(rec.payload, rec.now_ms))
                if rec.seq > after_seq:
                    yield rec
            self._seg_max_ts[seg] = max_ts
        self.seq = max(self.seq, after_seq)

    def _read(self, seg: Path, last: bool) -> Iterator[LogRecord]:
        data = seg.read_bytes()
        off = 0
        while off < len(data):
            bad = None
            if off + _HEAD.size > len(data):
                bad = "a header cut short"
            else:
                magic, ver, typ, seq, now, n, crc = _HEAD.unpack_from(data, off)
                end = off + _HEAD.size + n
                if magic != _MAGIC or ver != _VERSION or typ not in _NAMES:
                    bad = f"no record header (magic {magic!r}, version {ver}, type {typ})"
                elif end > len(data):
                    bad = "a payload cut short"
                elif zlib.crc32(data[off + _HEAD.size:end]) != crc:
                    bad = "a payload whose checksum does not match"
            if bad is not None:
                if not last:
                    raise InputError(f"{seg}: damaged at byte {off} ({bad}); the segments "
                                     f"after it are intact, so it is not a torn write")
                # a torn write at the very end: what the crash left half written
                self.cut_tail = len(data) - off
                log.warning("shard log %s: cut %d bytes of a torn record at byte %d (%s)",
                            seg, self.cut_tail, off, bad)
                with open(seg, "r+b") as f:
                    f.truncate(off)
                return
            payload = memoryview(data)[off + _HEAD.size:end]
            name = _NAMES[typ]
            yield LogRecord(name, seq, now, self._decode(name, payload))
            off = end

    def _max_ts(self, batch: Any, now_ms: int) -> int:
        ts = batch.ts
        if self.max_future_ms is not None:
            ts = ts[ts <= now_ms + self.max_future_ms]
        return int(ts.max()) if len(ts) else -(1 << 63)

    @staticmethod
    def _decode(name: str, payload: memoryview) -> Any:
        if name in ("inference", "feedback"):
            return decode_batch(payload)
        if name == "advance":
            return _I64.unpack(payload)[0]
        if name == "rejected":
            return [tuple(t) for t in json.loads(bytes(payload))]
        return None

    # ----------------------------------------------------------------- write
    def append(self, type_: str, now_ms: int, payload: Any = None) -> int:
        """Write one record; returns its sequence number."""
        if type_ in ("inference", "feedback"):
            body = encode_batch(payload)
        elif type_ == "advance":
            body = _I64.pack(int(payload))
        elif type_ == "rejected":
            body = json.dumps([list(t) for t in payload]).encode()
        else:
            body = b""
        fh = self._file()
        self._frame(fh, type_, now_ms, body)
        fh.flush()                      # to the OS: a killed process loses nothing
        if type_ in ("inference", "feedback"):
            seg = Path(fh.name)
            self._seg_max_ts[seg] = max(self._seg_max_ts.get(seg, -(1 << 63)),
                                        self._max_ts(payload, now_ms))
        now = time.monotonic()
        if self.fsync_s <= 0 or now - self._last_sync >= self.fsync_s:
            os.fsync(fh.fileno())
            self._last_sync = now
        return self.seq

    def _file(self):
        fh = self._fh
        if fh is not None and fh.tell() >= self.segment_bytes:
            os.fsync(fh.fileno())
            fh.close()
            fh = self._fh = None
        if fh is None:
            path = self.root / f"{self.seq + 1:016d}.log"
            fh = self._fh = open(path, "ab")
            self._seg_max_ts.setdefault(path, -(1 << 63))
            wm = self.watermark_fn() if self.watermark_fn is not None else None
            if wm is not None and wm > -(1 << 62):
                self._frame(fh, "advance", 0, _I64.pack(int(wm)))
        return fh

    def _frame(self, fh, type_: str, now_ms: int, body: bytes) -> None:
        """One framed record, the next sequence number."""
        self.seq += 1
        fh.write(_HEAD.pack(_MAGIC, _VERSION, RECORD_TYPES[type_], self.seq, int(now_ms),
                            len(body), zlib.crc32(body)) + body)
        self.bytes += _HEAD.size + len(body)
        self.records += 1

    def sync(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._last_sync = time.monotonic()

    # ------------------------------------------------------------- snapshots
    def snapshots(self) -> list[tuple[int, Path]]:
        """``(log position, file)`` of the snapshots on disk, newest first."""
        out = []
        for p in self.root.glob("snapshot-*.snap"):
            try:
                out.append((int(p.stem.split("-", 1)[1]), p))
            except ValueError:
                continue
        return sorted(out, reverse=True)

    @property
    def snapshot_due(self) -> bool:
        return (self.snapshot_every_s >= 0 and self.seq > self.snapshot_seq
                and time.monotonic() - self._snapshot_at >= self.snapshot_every_s)

    def write_snapshot(self, data: bytes, seconds: float = 0.0) -> Path:
        """``data`` as the snapshot of the state after record :attr:`seq`, atomically
        (a temporary file, fsync, rename, fsync of the directory).  The two newest stay
        (a damaged newest falls back to the one before); the segments whose records
        both cover are deleted."""
        t0 = time.perf_counter()
        self.sync()
        path = self.root / f"snapshot-{self.seq:016d}.snap"
        tmp = self.root / f".{path.name}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        snaps = self.snapshots()
        for _, old in snaps[2:]:
            old.unlink(missing_ok=True)
        if len(snaps) >= 2:
            self._drop_covered(snaps[1][0])
        self.snapshots_written += 1
        self.snapshot_bytes = len(data)
        self.snapshot_seq = self.seq
        self.snapshot_s = seconds + time.perf_counter() - t0
        self._snapshot_at = time.monotonic()
        return path

    def restored_from(self, seq: int) -> None:
        """A shard loaded the snapshot at ``seq`` (the next is due a period later)."""
        self.snapshot_seq = seq
        self._snapshot_at = time.monotonic()

    def _drop_covered(self, seq: int) -> int:
        """Delete the closed segments whose records are all at or before ``seq``."""
        current = Path(self._fh.name) if self._fh is not None else None
        segs = self.segments()
        n = 0
        for seg, nxt in zip(segs, segs[1:]):
            if seg == current or int(nxt.stem) - 1 > seq:
                break
            self._delete(seg)
            n += 1
        return n

    def _delete(self, seg: Path) -> None:
        """One closed segment gone (counted)."""
        self.bytes -= seg.stat().st_size
        seg.unlink()
        self._seg_max_ts.pop(seg, None)
        self.truncated_segments += 1

    def truncate(self, before_ts: int) -> int:
        """Delete the closed segments whose events are all older than ``before_ts``;
        returns how many."""
        current = Path(self._fh.name) if self._fh is not None else None
        n = 0
        for seg in self.segments():
            if seg == current:
                break
            if self._seg_max_ts.get(seg, before_ts) >= before_ts:
                break          # in order: a later segment cannot go before this one
            self._delete(seg)
            n += 1
        return n

    def close(self) -> None:
        if self._fh is not None:
            self.sync()
            self._fh.close()
            self._fh = None

    def stats(self) -> dict:
        return {"seq": self.seq, "records": self.records, "bytes": self.bytes,
                "segments": len(self._seg_max_ts), "truncated_segments": self.truncated_segments,
                "cut_tail_bytes": self.cut_tail, "snapshots": self.snapshots_written,
                "snapshot_seq": self.snapshot_seq, "snapshot_bytes": self.snapshot_bytes,
                "snapshot_s": self.snapshot_s}
