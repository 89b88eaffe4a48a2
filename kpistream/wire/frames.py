"""Columnar batches as bytes and back (:func:`encode_batch`, :func:`decode_batch`).

Data only, never pickle: a length-prefixed JSON header (the batch's kind, its
arrays' names, dtypes and lengths, the series keys, class labels and sampled
features) followed by the arrays' raw bytes.  The shard log
(:mod:`actors.log`) stores a shard's input in this form; decoding gives a batch
equal, field by field, to the one encoded.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import numpy as np

from kpistream.errors import InputError
from kpistream.wire.batch import FeedbackBatch, InferenceBatch

__all__ = ["FORMAT_VERSION", "encode_batch", "decode_batch"]

#: bumped when the layout changes; a reader refuses versions it does not know
FORMAT_VERSION = 1
_LEN = struct.Struct("<I")
_KINDS = {"inference": InferenceBatch, "feedback": FeedbackBatch}
# numeric dtypes a batch may hold (anything else is refused: no objects, no pickles)
_DTYPES = frozenset(("<i8", "<u8", "<i4", "|i1", "|b1", "<f8"))


def encode_batch(batch: InferenceBatch | FeedbackBatch) -> bytes:
    """``batch`` as bytes (:func:`decode_batch` reads them back)."""
    kind = "inference" if isinstance(batch, InferenceBatch) else "feedback"
    arrays, meta = [], []
    head: dict[str, Any] = {"v": FORMAT_VERSION, "kind": kind}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, np.ndarray):
            a = np.ascontiguousarray(v)
            if a.dtype.str not in _DTYPES:
                a = a.astype(a.dtype.newbyteorder("<"))
            meta.append([f.name, a.dtype.str, int(a.shape[0])])
            arrays.append(a.tobytes())
    head["arrays"] = meta
    head["labels"] = list(batch.labels)
    if kind == "inference":
        head["series_keys"] = [[k[0], k[1], k[2], k[3], [list(p) for p in k[4]]]
                               for k in batch.series_keys]
        head["features"] = batch.features
    hb = json.dumps(head, separators=(",", ":"), allow_nan=False).encode()
    return _LEN.pack(len(hb)) + hb + b"".join(arrays)


def decode_batch(data: bytes | memoryview) -> InferenceBatch | FeedbackBatch:
    """The batch :func:`encode_batch` wrote (InputError naming the problem otherwise)."""
    mv = memoryview(data)
    if len(mv) < _LEN.size:
        raise InputError("batch frame: shorter than its header")
    (n,) = _LEN.unpack_from(mv, 0)
    try:
        head = json.loads(bytes(mv[_LEN.size:_LEN.size + n]))
    except ValueError as e:
        raise InputError(f"batch frame: header is not JSON ({e})") from None
    if head.get("v") != FORMAT_VERSION:
        raise InputError(f"batch frame: format version {head.get('v')!r} "
                         f"(this reader knows {FORMAT_VERSION})")
    cls = _KINDS.get(head.get("kind"))
    if cls is None:
        raise InputError(f"batch frame: unknown kind {head.get('kind')!r}")
    off = _LEN.size + n
    kw: dict[str, Any] = {}
    for name, dt, length in head["arrays"]:
        if dt not in _DTYPES:
            raise InputError(f"batch frame: column {name!r} has dtype {dt!r}")
        dtype = np.dtype(dt)
        size = dtype.itemsize * int(length)
        if off + size > len(mv):
            raise InputError(f"batch frame: column {name!r} runs past the end")
        kw[name] = np.frombuffer(mv[off:off + size], dtype=dtype).copy()
        off += size
    if off != len(mv):
        raise InputError(f"batch frame: {len(mv) - off} bytes after the last column")
    kw["labels"] = list(head["labels"])
    if cls is InferenceBatch:
        kw["series_keys"] = [(k[0], k[1], k[2], k[3], tuple(tuple(p) for p in k[4]))
                             for k in head["series_keys"]]
        kw["features"] = head.get("features")
    return cls(**kw)
