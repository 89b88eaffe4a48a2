"""A demo time-series store, built from the demo stream without Ray (:func:`build_demo_store`,
``python -m kpistream.demo_store``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kpistream.spec.metrics import EngineConfig, config_from_dict
from kpistream.synthetic import generate_stream
from kpistream.engine import FAR_FUTURE, Engine
from kpistream.store.db import db_file, store_files
from kpistream.store.series import SeriesStore

__all__ = ["DEMO_CONFIG", "build_demo_store"]

#: The engine config of the demo store: ``configs/metrics.yaml``'s windows,
#: time rules and the ``region`` segment (10 s panes, 60 s label delay).
DEMO_CONFIG: EngineConfig = config_from_dict({
    "time": {"lateness": "5s", "label_delay": "60s", "max_future": "5m"},
    "windows": [{"name": "10s", "type": "tumbling", "size": "10s"},
                {"name": "1m", "type": "sliding", "size": "60s", "step": "10s"}],
    "series": {"segments": ["region"]},
})


def build_demo_store(path: str | Path, n_requests: int = 20_000, *, seed: int = 0,
                     rate_per_s: float = 20.0, config: EngineConfig | None = None,
                     final: bool = True, overwrite: bool = False, batch_size: int = 512,
                     collect_every: int = 16) -> Path:
    """Write the KPIs of a demo stream into a new store at ``path``; returns its file.

    ``n_requests`` at ``rate_per_s`` sets the span of event time (the default,
    20,000 at 20/s, is about 17 minutes).  Every ``collect_every`` batches of
    ``batch_size`` events the engine's partials are written with the engine's
    watermark and rolled up, like the live publisher; ``final=True`` then ends
    the input (every window final), ``final=False`` stops there, leaving the
    last panes and the running minute and hour provisional, as a live store
    looks.  An existing store at ``path`` is an error unless ``overwrite``.

    :func:`build_demo_store` runs :func:`kpistream.synthetic.generate_stream` through the
    engine and writes every collect into a :class:`~kpistream.store.series.SeriesStore`
    the way the live publisher does (10 s panes with :meth:`SeriesStore.write`,
    then :meth:`SeriesStore.rollup` to ``1m`` and ``1h``).  It is what
    ``notebooks/kpis.ipynb`` reads when no sidecar has written a store yet::

        python -m kpistream.demo_store data/store            # every window final
        python -m kpistream.demo_store data/store --live     # the tail still provisional

    or in Python::

        from kpistream.demo_store import build_demo_store
        build_demo_store("data/store", n_requests=20_000)
    """
    cfg = config or DEMO_CONFIG
    file = db_file(path)
    if file.exists():
        if not overwrite:
            raise FileExistsError(f"{file}: a store exists here (pass overwrite=True)")
        for f in store_files(file):
            f.unlink(missing_ok=True)
    stream = generate_stream(n_requests, seed=seed, rate_per_s=rate_per_s)
    engine = Engine(cfg)
    with SeriesStore(path, cfg) as store:
        def publish(provisional: bool) -> None:
            wm = engine.emit_watermark
            store.write(engine.collect(), wm)
            store.rollup(wm, provisional=provisional)

        n = 0
        for i, (kind, batch) in enumerate(stream.batches(batch_size), 1):
            (engine.ingest_inference if kind == "inference" else engine.ingest_feedback)(batch)
            if i % collect_every == 0:
                # final roll-ups every time, the running minute and hour now and then
                publish(provisional=n % 8 == 0)
                n += 1
        if final:
            engine.flush()
            store.write(engine.collect(), FAR_FUTURE)
            store.rollup(FAR_FUTURE)
        else:
            publish(provisional=True)
        return store.file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kpistream.demo_store",
                                 description="Write a demo KPI store (no Ray needed).")
    ap.add_argument("path", nargs="?", default="data/store",
                    help="store directory or .sqlite file (default: data/store)")
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=20.0, help="requests per second of event time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--live", action="store_true",
                    help="stop mid-stream: the last windows stay provisional")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    file = build_demo_store(a.path, a.requests, seed=a.seed, rate_per_s=a.rate,
                            final=not a.live, overwrite=a.overwrite)
    with SeriesStore(file, readonly=True) as store:
        print(json.dumps(store.info(), indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
