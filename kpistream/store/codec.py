"""How values go into the store's SQLite columns and come back: metric states (pickled),
series keys, label dicts, the engine config, the resolutions and checkpoints (JSON).

Every stored encoding is here, so a new state format changes this module only.
States are pickles: open only store files you trust.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import zlib
from typing import Any, Sequence

from kpistream.engine.states import MetricState
from kpistream.spec.metrics import EngineConfig, WindowSpec
from kpistream.store.resolutions import Resolution
from kpistream.wire.batch import SeriesKey

__all__ = ["PICKLE_PROTOCOL", "config_from_json", "config_to_json", "decode_checkpoint",
           "decode_state", "encode_checkpoint", "encode_state", "key_from_json", "key_to_json",
           "labels_to_json", "resolutions_from_json", "resolutions_to_json"]

PICKLE_PROTOCOL = 5


# ------------------------------------------------------------------- states

def encode_state(state: MetricState) -> bytes:
    """The ``states.state`` blob of a metric state."""
    return pickle.dumps(state, PICKLE_PROTOCOL)


#: modules the state classes lived in before the 0.2 layout: stores written then still load
MOVED_MODULES = {"kpistream.states": "kpistream.engine.states",
                 "kpistream.sketch": "kpistream.engine.sketch",
                 "kpistream.paired": "kpistream.engine.paired",
                 "kpistream.features": "kpistream.engine.features",
                 "kpistream.batch": "kpistream.wire.batch",
                 "kpistream.config": "kpistream.spec.metrics"}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(MOVED_MODULES.get(module, module), name)


def decode_state(blob: bytes) -> MetricState:
    """A fresh state object from a ``states.state`` blob."""
    return _Unpickler(io.BytesIO(blob)).load()


# ------------------------------------------------------------------- series

def key_to_json(key: SeriesKey) -> str:
    """The ``series.key`` text of a series key (compact JSON, unique per key)."""
    return json.dumps([key[0], key[1], key[2], key[3], [list(kv) for kv in key[4]]],
                      separators=(",", ":"))


def key_from_json(text: str) -> SeriesKey:
    k = json.loads(text)
    return (k[0], k[1], k[2], k[3], tuple((a, b) for a, b in k[4]))


def labels_to_json(labels: dict[str, str]) -> str:
    """The ``series.labels`` text (written for other readers; this package reads the key)."""
    return json.dumps(labels)


# --------------------------------------------------------------------- meta

def config_to_json(config: EngineConfig) -> str:
    """The ``meta.config`` text; ``extra`` that is not JSON-able is stored empty."""
    d: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if f.name == "windows":
            v = [dataclasses.asdict(w) for w in v]
        elif f.name == "extra":
            try:
                v = json.loads(json.dumps(dict(v)))
            except (TypeError, ValueError):
                v = {}
        elif isinstance(v, tuple):
            v = list(v)
        d[f.name] = v
    return json.dumps(d, sort_keys=True)


def config_from_json(text: str) -> EngineConfig:
    """The config back; keys this version does not know are ignored."""
    d = json.loads(text)
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    kw: dict[str, Any] = {}
    for k, v in d.items():
        if k not in known:
            continue
        if k == "windows":
            v = tuple(WindowSpec(**w) for w in v)
        elif isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    return EngineConfig(**kw)


def resolutions_to_json(res: Sequence[Resolution]) -> str:
    """The ``meta.resolutions`` text."""
    return json.dumps([dataclasses.asdict(r) for r in res])


def resolutions_from_json(text: str) -> tuple[Resolution, ...]:
    return tuple(Resolution(**r) for r in json.loads(text))


# -------------------------------------------------------------- checkpoints

def _plain(x: Any) -> Any:
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)   # evidence text only: state that is restored is plain data already


def encode_checkpoint(data: Any) -> bytes:
    """The ``checkpoints.body`` blob: JSON (NaN and infinities kept), compressed.
    Data only: reading it back builds dicts, lists, strings and numbers, never code."""
    return zlib.compress(json.dumps(data, default=_plain, separators=(",", ":")).encode(), 1)


def decode_checkpoint(blob: bytes) -> Any:
    return json.loads(zlib.decompress(blob))
