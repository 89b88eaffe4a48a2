"""A data-only codec for the engine's objects (shard snapshots): the object graph as JSON plus
raw array buffers, read back without running code.

What it writes: ``None``, booleans, numbers and strings as JSON; lists, tuples, dicts (any
keys), sets, ``Counter`` and ``deque``; numpy arrays as raw little-endian buffers beside the
JSON (object arrays element by element) and numpy scalars by dtype; instances of classes
defined in ``kpistream`` as their class name and fields (``__dict__`` and ``__slots__``);
references to such classes, to numpy scalar types and to ``int``/``float``/``str``/``bool``
by name.  Shared references stay shared (an object met twice is written once), so a state
held by two tables is one state after a restore.

What reading does: builds those containers and arrays, and for a class name only looks up a
class of a ``kpistream`` module (or a numpy scalar type) and makes a bare instance
(``object.__new__``) whose fields are set from the data: no constructor, no
``__setstate__``, no other callable runs, unlike pickle.  ``externals`` maps objects that
are not part of the state (a clock, a back reference) to names written instead, and back.

Layout: ``KPS1``, a format version byte, the JSON length (u32), the JSON, then the buffers
(each 8-byte aligned), then the CRC-32 of everything before it.
"""

from __future__ import annotations

import importlib
import json
import struct
import zlib
from collections import Counter, deque
from typing import Any, Mapping

import numpy as np

__all__ = ["dumps", "loads", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_MAGIC = b"KPS1"
_HEAD = struct.Struct("<4sBI")
_CRC = struct.Struct("<I")
_BUILTIN_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "bytes": bytes}


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _allowed_class(name: str) -> type:
    """The class called ``name``, if it may be built from data (else ValueError)."""
    mod, _, qual = name.partition(":")
    if mod == "builtins" and qual in _BUILTIN_TYPES:
        return _BUILTIN_TYPES[qual]
    if mod.startswith("numpy"):
        t = getattr(np, qual, None)
        if isinstance(t, type) and issubclass(t, np.generic):
            return t
        raise ValueError(f"not a numpy scalar type: {name!r}")
    if not (mod == "kpistream" or mod.startswith("kpistream.")) or "<" in qual:
        raise ValueError(f"class {name!r} is not one of kpistream's")
    obj: Any = importlib.import_module(mod)
    for part in qual.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise ValueError(f"{name!r} is not a class")
    return obj


def _fields(o: Any) -> dict[str, Any]:
    out = dict(getattr(o, "__dict__", {}))
    for c in type(o).__mro__:
        slots = c.__dict__.get("__slots__", ())
        for s in (slots,) if isinstance(slots, str) else slots:
            if s not in ("__dict__", "__weakref__") and hasattr(o, s):
                out[s] = getattr(o, s)
    return out


class _Writer:
    def __init__(self, externals: Mapping[int, str]) -> None:
        self.ext = externals
        self.memo: dict[int, int] = {}
        self.keep: list[Any] = []          # memoised objects stay alive (ids stay unique)
        self.buffers: list[bytes] = []

    def _ref(self, o: Any) -> tuple[dict | None, int]:
        k = id(o)
        if k in self.memo:
            return {"$ref": self.memo[k]}, -1
        n = self.memo[k] = len(self.memo)
        self.keep.append(o)
        return None, n

    def enc(self, o: Any) -> Any:
        if o is None or isinstance(o, (bool, str)):
            return o
        if isinstance(o, int) and type(o) is int:
            return o
        if isinstance(o, float) and type(o) is float:
            return o
        if id(o) in self.ext:
            return {"$ext": self.ext[id(o)]}
        if isinstance(o, np.generic):
            return {"$np": o.dtype.str, "v": o.item() if o.dtype.kind != "V" else None}
        if isinstance(o, type):
            return {"$cls": _class_name(o)}
        ref, n = self._ref(o)
        if ref is not None:
            return ref
        if isinstance(o, np.ndarray):
            if o.dtype.kind == "O":
                return {"$id": n, "$oa": [self.enc(x) for x in o.ravel().tolist()],
                        "sh": list(o.shape)}
            a = np.ascontiguousarray(o)
            dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
            self.buffers.append(a.astype(dt, copy=False).tobytes())
            return {"$id": n, "$a": len(self.buffers) - 1, "dt": dt.str, "sh": list(o.shape)}
        if isinstance(o, bytes):
            self.buffers.append(o)
            return {"$id": n, "$b": len(self.buffers) - 1}
        if isinstance(o, list):
            return {"$id": n, "$l": [self.enc(x) for x in o]}
        if isinstance(o, tuple) and type(o) is tuple:
            return {"$id": n, "$t": [self.enc(x) for x in o]}
        if isinstance(o, Counter):
            return {"$id": n, "$C": [[self.enc(k), self.enc(v)] for k, v in o.items()]}
        if isinstance(o, dict) and type(o) is dict:
            return {"$id": n, "$d": [[self.enc(k), self.enc(v)] for k, v in o.items()]}
        if isinstance(o, (set, frozenset)):
            return {"$id": n, "$s" if isinstance(o, set) else "$fs": [self.enc(x) for x in o]}
        if isinstance(o, deque):
            return {"$id": n, "$q": [self.enc(x) for x in o], "max": o.maxlen}
        cls = type(o)
        name = _class_name(cls)
        _allowed_class(name)        # fail at write time, not at restore
        return {"$id": n, "$o": name, "f": {k: self.enc(v) for k, v in _fields(o).items()}}


def _plain_dtype(spec: str) -> np.dtype:
    """A dtype named in a snapshot: no object fields (pointers never come from bytes)."""
    dt = np.dtype(str(spec))
    if dt.hasobject:
        raise ValueError(f"dtype {spec!r} holds objects")
    return dt


class _Reader:
    def __init__(self, buffers: list[memoryview], externals: Mapping[str, Any]) -> None:
        self.buffers = buffers
        self.ext = externals
        self.memo: dict[int, Any] = {}

    def dec(self, d: Any) -> Any:
        if not isinstance(d, dict):
            if isinstance(d, list):
                raise ValueError("a bare list in a snapshot")
            return d
        if "$ref" in d:
            return self.memo[d["$ref"]]
        if "$ext" in d:
            return self.ext[d["$ext"]]
        if "$np" in d:
            return _plain_dtype(d["$np"]).type(d["v"])
        if "$cls" in d:
            return _allowed_class(d["$cls"])
        n = d["$id"]
        if "$a" in d:
            a = np.frombuffer(self.buffers[d["$a"]], dtype=_plain_dtype(d["dt"])).reshape(d["sh"])
            out: Any = a.copy()          # writable, owns its memory
        elif "$oa" in d:
            out = np.empty(len(d["$oa"]), dtype=object)
            self.memo[n] = out
            out[:] = [self.dec(x) for x in d["$oa"]] if d["$oa"] else []
            out = out.reshape(d["sh"])
        elif "$b" in d:
            out = bytes(self.buffers[d["$b"]])
        elif "$l" in d:
            out = []
            self.memo[n] = out
            out.extend(self.dec(x) for x in d["$l"])
        elif "$t" in d:
            out = tuple(self.dec(x) for x in d["$t"])
        elif "$C" in d:
            out = Counter()
            self.memo[n] = out
            for k, v in d["$C"]:
                out[self.dec(k)] = self.dec(v)
        elif "$d" in d:
            out = {}
            self.memo[n] = out
            for k, v in d["$d"]:
                out[self.dec(k)] = self.dec(v)
        elif "$s" in d:
            out = set()
            self.memo[n] = out
            out.update(self.dec(x) for x in d["$s"])
        elif "$fs" in d:
            out = frozenset(self.dec(x) for x in d["$fs"])
        elif "$q" in d:
            out = deque(maxlen=d["max"])
            self.memo[n] = out
            out.extend(self.dec(x) for x in d["$q"])
        elif "$o" in d:
            cls = _allowed_class(d["$o"])
            out = object.__new__(cls)
            self.memo[n] = out
            for k, v in d["f"].items():
                object.__setattr__(out, k, self.dec(v))
        else:
            raise ValueError(f"unknown snapshot node {sorted(d)[:3]}")
        self.memo[n] = out
        return out


def dumps(obj: Any, externals: Mapping[str, Any] | None = None) -> bytes:
    """``obj`` as data (see the module docstring); ``externals``: ``{name: object}`` written
    as their name."""
    w = _Writer({id(v): k for k, v in (externals or {}).items()})
    head = json.dumps(w.enc(obj), separators=(",", ":")).encode()
    parts = [_HEAD.pack(_MAGIC, FORMAT_VERSION, len(head)), head]
    pos = _HEAD.size + len(head)
    table = []
    for b in w.buffers:
        pad = -pos % 8
        parts.append(b"\0" * pad)
        pos += pad
        table.append((pos, len(b)))
        parts.append(b)
        pos += len(b)
    index = json.dumps(table).encode()
    parts += [index, struct.pack("<I", len(index))]
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def loads(data: bytes, externals: Mapping[str, Any] | None = None) -> Any:
    """The object :func:`dumps` wrote; ValueError if the data is damaged or of another
    format version, or names a class that may not be built."""
    if len(data) < _HEAD.size + 8:
        raise ValueError("snapshot too short")
    body, (crc,) = data[:-4], _CRC.unpack(data[-4:])
    if zlib.crc32(body) != crc:
        raise ValueError("snapshot checksum does not match")
    magic, ver, n = _HEAD.unpack_from(body)
    if magic != _MAGIC or ver != FORMAT_VERSION:
        raise ValueError(f"not a snapshot of format {FORMAT_VERSION} (magic {magic!r}, "
                         f"version {ver})")
    (ilen,) = struct.unpack_from("<I", body, len(body) - 4)
    table = json.loads(body[len(body) - 4 - ilen:len(body) - 4])
    view = memoryview(body)
    buffers = [view[off:off + size] for off, size in table]
    head = json.loads(body[_HEAD.size:_HEAD.size + n])
    return _Reader(buffers, externals or {}).dec(head)
