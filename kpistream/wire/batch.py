"""Columnar event batches (:class:`InferenceBatch`, :class:`FeedbackBatch`): the in-memory form
every engine component updates from (numpy columns, never one Python object per event), plus
identifier hashing (:func:`hash_ids`) and shard routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

# ---------------------------------------------------------------------------
# identifiers and labels

_HASH_KEY = "kpistream-v1-key"  # 16 bytes: SipHash key, fixed forever (wire stable)

FEEDBACK_KINDS: tuple[str, ...] = (
    "label", "reward", "thumbs", "click", "conversion", "dwell", "relevance")
KIND_CODE: dict[str, int] = {k: i for i, k in enumerate(FEEDBACK_KINDS)}
KIND_LABEL, KIND_REWARD, KIND_THUMBS, KIND_CLICK, KIND_CONVERSION, KIND_DWELL, KIND_RELEVANCE = range(7)

#: A series key: (model, model_version, variant, endpoint, sorted segment items).
SeriesKey = tuple[str, str, str, str, tuple[tuple[str, str], ...]]
BASE_LABELS: tuple[str, ...] = ("model", "model_version", "variant", "endpoint")


def hash_ids(values: Sequence[str] | np.ndarray) -> np.ndarray:
    """Stable 64-bit hashes of string identifiers (never 0).

    Identifiers are hashed once, at the edge, into 64-bit integers with a keyed
    SipHash (``pandas.util.hash_array`` with a fixed key), which is stable
    across processes and machines: ``request_id`` hashes route events to shards
    and join inference with feedback, ``event_id`` hashes deduplicate.  The
    value ``0`` is reserved as "empty" for the hash tables, so a hash of 0 is
    mapped to 1.  With one million live keys the chance of any collision is
    about 3e-8.
    """
    arr = values if isinstance(values, np.ndarray) and values.dtype == object else np.asarray(
        list(values), dtype=object)
    if len(arr) == 0:
        return np.zeros(0, dtype=np.uint64)
    h = pd.util.hash_array(arr, hash_key=_HASH_KEY, categorize=False)
    h[h == 0] = 1
    return h


def hash_id(value: str) -> int:
    return int(hash_ids(np.array([value], dtype=object))[0])


def canonical_label(value: Any) -> str:
    """The one string form of a class label, so that 1, "1" and True compare as users expect.

    bool -> "true" / "false"; int -> decimal; str -> itself.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"not a label: {value!r}")


def series_key(model: str, model_version: str, variant: str, endpoint: str,
               segments: Mapping[str, str] | None) -> SeriesKey:
    segs = tuple(sorted(segments.items())) if segments else ()
    return (model, model_version, variant, endpoint or "", segs)


def series_labels(key: SeriesKey) -> dict[str, str]:
    out = dict(zip(BASE_LABELS, key[:4]))
    out.update(key[4])
    return out


def _encode(values: list, table: dict) -> np.ndarray:
    """Codes of ``values`` in a growing vocabulary ``table`` (None -> -1)."""
    out = np.empty(len(values), dtype=np.int32)
    setdefault = table.setdefault
    for i, v in enumerate(values):
        out[i] = -1 if v is None else setdefault(v, len(table))
    return out


def _csr(lists: list, with_grades: bool = False):
    """(offsets, item hashes[, grades]) for a list of lists / dicts / None."""
    n = len(lists)
    offsets = np.zeros(n + 1, dtype=np.int64)
    items: list[str] = []
    grades: list[float] = []
    for i, x in enumerate(lists):
        if x:
            if with_grades:
                if isinstance(x, Mapping):
                    items.extend(x.keys())
                    grades.extend(float(g) for g in x.values())
                else:
                    items.extend(x)
                    grades.extend([1.0] * len(x))
            else:
                items.extend(x)
        offsets[i + 1] = len(items)
    h = hash_ids(np.asarray(items, dtype=object)) if items else np.zeros(0, np.uint64)
    if with_grades:
        return offsets, h, np.asarray(grades, dtype=np.float64)
    return offsets, h


def _opt_float(values: Iterable) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


# ---------------------------------------------------------------------------
# batches

class _Columns:
    """Shared behaviour: row count, row selection, concatenation, size."""

    _ROW_COLS: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.ts)  # type: ignore[attr-defined]

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, c).nbytes for c in self._ROW_COLS)


@dataclass(slots=True, eq=False)
class InferenceBatch(_Columns):
    """One column per field; ``series`` and ``pred_label`` index the batch's vocabularies.

    :meth:`from_records` takes *normalized records*, what
    :mod:`kpistream.wire.schema` produces from valid wire events::

        {"event_id": str, "request_id": str, "ts": int (epoch ms), "model": str,
         "model_version": str, "variant": str, "endpoint": str ("" if absent),
         "latency_ms": float, "status": "ok" | "error",
         "pred_label": str | None, "pred_score": float | None,
         "pred_value": float | None, "ranking": list[str] | None,
         "segments": dict[str, str], "cost_usd": float | None,
         "tokens": int | None, "features": dict | None}
    """

    ts: np.ndarray            # int64 epoch ms
    event_id: np.ndarray      # uint64 hash
    request_id: np.ndarray    # uint64 hash
    series: np.ndarray        # int32 -> series_keys
    latency_ms: np.ndarray    # float64
    error: np.ndarray         # bool
    pred_label: np.ndarray    # int32 -> labels, -1 none
    pred_score: np.ndarray    # float64, NaN none
    pred_value: np.ndarray    # float64, NaN none (regression)
    cost_usd: np.ndarray      # float64, NaN none
    tokens: np.ndarray        # float64, NaN none
    rank_offsets: np.ndarray  # int64 (n+1,) CSR offsets into rank_items
    rank_items: np.ndarray    # uint64 item hashes
    series_keys: list         # list[SeriesKey]
    labels: list              # list[str]
    features: list | None = None  # sampled inputs, one dict or None per row

    _ROW_COLS = ("ts", "event_id", "request_id", "series", "latency_ms", "error",
                 "pred_label", "pred_score", "pred_value", "cost_usd", "tokens")

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]]) -> "InferenceBatch":
        keys: dict = {}
        labels: dict = {}
        series = _encode([series_key(r["model"], r["model_version"], r["variant"],
                                     r.get("endpoint") or "", r.get("segments"))
                          for r in records], keys)
        rank_offsets, rank_items = _csr([r.get("ranking") for r in records])
        feats = [r.get("features") for r in records]
        return cls(
            ts=np.array([r["ts"] for r in records], dtype=np.int64),
            event_id=hash_ids(np.array([r["event_id"] for r in records], dtype=object)),
            request_id=hash_ids(np.array([r["request_id"] for r in records], dtype=object)),
            series=series,
            latency_ms=np.array([r["latency_ms"] for r in records], dtype=np.float64),
            error=np.array([r["status"] == "error" for r in records], dtype=bool),
            pred_label=_encode([r.get("pred_label") for r in records], labels),
            pred_score=_opt_float(r.get("pred_score") for r in records),
            pred_value=_opt_float(r.get("pred_value") for r in records),
            cost_usd=_opt_float(r.get("cost_usd") for r in records),
            tokens=_opt_float(r.get("tokens") for r in records),
            rank_offsets=rank_offsets, rank_items=rank_items,
            series_keys=list(keys), labels=list(labels),
            features=feats if any(f is not None for f in feats) else None,
        )

    @classmethod
    def empty(cls) -> "InferenceBatch":
        return cls.from_records([])

    def take(self, idx: np.ndarray) -> "InferenceBatch":
        """Rows ``idx`` (an index array or a boolean mask), vocabularies kept."""
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx
        lo, hi = self.rank_offsets[idx], self.rank_offsets[idx + 1]
        lens = hi - lo
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        items = self.rank_items[ranges(lo, lens)] if len(self.rank_items) else self.rank_items
        kw = {c: getattr(self, c)[idx] for c in self._ROW_COLS}
        return InferenceBatch(**kw, rank_offsets=offsets, rank_items=items,
                              series_keys=self.series_keys, labels=self.labels,
                              features=None if self.features is None else [self.features[i] for i in idx])


@dataclass(slots=True, eq=False)
class FeedbackBatch(_Columns):
    """Feedback columns; :meth:`from_records` takes normalized records::

        {"event_id": str, "request_id": str, "ts": int (epoch ms),
         "kind": one of FEEDBACK_KINDS, "label": str | None,
         "value": float | None, "relevance": dict[str, float] | None}
    """

    ts: np.ndarray            # int64 epoch ms
    event_id: np.ndarray      # uint64
    request_id: np.ndarray    # uint64
    kind: np.ndarray          # int8 KIND_*
    label: np.ndarray         # int32 -> labels, -1 none
    value: np.ndarray         # float64, NaN none
    rel_offsets: np.ndarray   # int64 (n+1,) CSR offsets
    rel_items: np.ndarray     # uint64 item hashes
    rel_grades: np.ndarray    # float64
    labels: list              # list[str]

    _ROW_COLS = ("ts", "event_id", "request_id", "kind", "label", "value")

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]]) -> "FeedbackBatch":
        labels: dict = {}
        rel_offsets, rel_items, rel_grades = _csr([r.get("relevance") for r in records],
                                                  with_grades=True)
        return cls(
            ts=np.array([r["ts"] for r in records], dtype=np.int64),
            event_id=hash_ids(np.array([r["event_id"] for r in records], dtype=object)),
            request_id=hash_ids(np.array([r["request_id"] for r in records], dtype=object)),
            kind=np.array([KIND_CODE[r["kind"]] for r in records], dtype=np.int8),
            label=_encode([r.get("label") for r in records], labels),
            value=_opt_float(r.get("value") for r in records),
            rel_offsets=rel_offsets, rel_items=rel_items, rel_grades=rel_grades,
            labels=list(labels),
        )

    @classmethod
    def empty(cls) -> "FeedbackBatch":
        return cls.from_records([])

    def take(self, idx: np.ndarray) -> "FeedbackBatch":
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx
        lo, hi = self.rel_offsets[idx], self.rel_offsets[idx + 1]
        lens = hi - lo
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        sel = ranges(lo, lens)
        kw = {c: getattr(self, c)[idx] for c in self._ROW_COLS}
        return FeedbackBatch(**kw, rel_offsets=offsets, rel_items=self.rel_items[sel],
                             rel_grades=self.rel_grades[sel], labels=self.labels)


def ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for each pair, vectorized."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lens)
    out = np.ones(total, dtype=np.int64)
    nz = lens > 0
    s, l, e = starts[nz], lens[nz], ends[nz]
    out[0] = s[0]
    if len(s) > 1:
        out[e[:-1]] = s[1:] - (s[:-1] + l[:-1]) + 1
    return np.cumsum(out)


def concat_inference(batches: Sequence[InferenceBatch]) -> InferenceBatch:
    """One batch from many, vocabularies unified."""
    batches = [b for b in batches if len(b)]
    if not batches:
        return InferenceBatch.empty()
    if len(batches) == 1:
        return batches[0]
    keys: dict = {}
    labels: dict = {}
    cols: dict[str, list] = {c: [] for c in InferenceBatch._ROW_COLS}
    offs, items, feats = [np.zeros(1, np.int64)], [], []
    base = 0
    any_feats = any(b.features is not None for b in batches)
    for b in batches:
        smap = np.array([keys.setdefault(k, len(keys)) for k in b.series_keys], dtype=np.int32)
        lmap = np.array([labels.setdefault(k, len(labels)) for k in b.labels] + [-1], dtype=np.int32)
        for c in InferenceBatch._ROW_COLS:
            cols[c].append(getattr(b, c))
        cols["series"][-1] = smap[b.series] if len(smap) else b.series
        cols["pred_label"][-1] = lmap[b.pred_label]
        offs.append(b.rank_offsets[1:] + base)
        base += int(b.rank_offsets[-1])
        items.append(b.rank_items)
        if any_feats:
            feats.extend(b.features if b.features is not None else [None] * len(b))
    kw = {c: np.concatenate(v) for c, v in cols.items()}
    return InferenceBatch(**kw, rank_offsets=np.concatenate(offs),
                          rank_items=np.concatenate(items), series_keys=list(keys),
                          labels=list(labels), features=feats if any_feats else None)


def concat_feedback(batches: Sequence[FeedbackBatch]) -> FeedbackBatch:
    batches = [b for b in batches if len(b)]
    if not batches:
        return FeedbackBatch.empty()
    if len(batches) == 1:
        return batches[0]
    labels: dict = {}
    cols: dict[str, list] = {c: [] for c in FeedbackBatch._ROW_COLS}
    offs, items, grades = [np.zeros(1, np.int64)], [], []
    base = 0
    for b in batches:
        lmap = np.array([labels.setdefault(k, len(labels)) for k in b.labels] + [-1], dtype=np.int32)
        for c in FeedbackBatch._ROW_COLS:
            cols[c].append(getattr(b, c))
        cols["label"][-1] = lmap[b.label]
        offs.append(b.rel_offsets[1:] + base)
        base += int(b.rel_offsets[-1])
        items.append(b.rel_items)
        grades.append(b.rel_grades)
    kw = {c: np.concatenate(v) for c, v in cols.items()}
    return FeedbackBatch(**kw, rel_offsets=np.concatenate(offs), rel_items=np.concatenate(items),
                         rel_grades=np.concatenate(grades), labels=list(labels))


__all__ = [
    "InferenceBatch", "FeedbackBatch", "concat_inference", "concat_feedback", "hash_ids",
    "hash_id", "canonical_label", "series_key", "series_labels", "SeriesKey", "FEEDBACK_KINDS",
    "KIND_CODE", "BASE_LABELS", "shard_of", "route", "split_by_shard", "ranges",
]


def shard_of(request_id_hashes: np.ndarray, n_shards: int) -> np.ndarray:
    """The shard of each request: ``hash(request_id) % n_shards`` (stable everywhere)."""
    return (request_id_hashes % np.uint64(n_shards)).astype(np.int64)


def route(batch: "InferenceBatch | FeedbackBatch", n_shards: int) -> list:
    """Shard routing (the one place, for the wrapper, the HTTP API and the shard transport):
    ``(shard, row positions, rows)`` for each shard that gets rows, in shard order.

    A batch whose rows all go to one shard is passed on as it is.
    """
    n = len(batch)
    if n == 0:
        return []
    if n_shards == 1:
        return [(0, np.arange(n), batch)]
    owner = shard_of(batch.request_id, n_shards)
    first = int(owner[0])
    if bool((owner == first).all()):
        return [(first, np.arange(n), batch)]
    out = []
    for s in range(n_shards):
        rows = np.flatnonzero(owner == s)
        if len(rows):
            out.append((s, rows, batch.take(rows)))
    return out


def split_by_shard(batch: "InferenceBatch | FeedbackBatch", n_shards: int) -> list:
    """The batch's rows per shard (an empty batch for shards with none)."""
    if n_shards == 1:
        return [batch]
    s = shard_of(batch.request_id, n_shards)
    return [batch.take(np.flatnonzero(s == i)) for i in range(n_shards)]
