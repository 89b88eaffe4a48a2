"""The ``kpistream`` command line: replay, demo, generate, schema."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kpistream.errors import KpistreamError


def _cmd_replay(a: argparse.Namespace) -> int:
    from kpistream.spec.metrics import load_config
    from kpistream.replay import check_output, progress_to_stderr, replay_file, write_rows

    if a.out:
        check_output(a.out)
    cfg = load_config(a.config)
    df, summary = replay_file(a.events, cfg, batch_rows=a.batch_rows,
                              progress=None if a.quiet else progress_to_stderr, totals=a.totals)
    if a.out:
        write_rows(df, a.out)
    else:
        df.to_csv(sys.stdout, index=False)
    if not a.quiet:
        for line in summary.lines():
            print(line, file=sys.stderr)
        if a.out:
            print(f"wrote {a.out}", file=sys.stderr)
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from kpistream.synthetic import generate_stream

    s = generate_stream(a.requests, seed=a.seed)
    n = s.to_ndjson(a.out)
    print(f"wrote {n:,} events to {a.out}", file=sys.stderr)
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    """Generate a demo stream, replay it, print the last windows of the main KPIs."""
    import pandas as pd

    from kpistream.spec.metrics import load_config
    from kpistream.synthetic import generate_stream
    from kpistream.replay import progress_to_stderr, replay_file, write_rows
    from kpistream.windows.aggregate import ALL

    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    events = out_dir / "demo-events.ndjson"
    s = generate_stream(a.requests, seed=a.seed)
    s.to_ndjson(events)
    print(f"demo: {len(s):,} events ({a.requests:,} requests, 4 series, late, duplicate, "
          f"early-feedback and bad-clock events included) -> {events}")
    cfg = load_config(a.config)
    df, summary = replay_file(events, cfg, progress=progress_to_stderr, totals=True)
    write_rows(df, out_dir / "demo-windows.csv")
    for line in summary.lines():
        print(line)
    win = cfg.windows[-1]
    # every segment merged (rows labelled *): exact totals, not averages over regions
    show = df[(df["window"] == win.name) & df["metric"].isin(
        ["requests", "error_rate", "latency_p99", "accuracy", "f1", "mae", "ndcg_at_k", "ctr",
         "reward_mean", "cost_per_1k", "label_coverage"])]
    for seg in cfg.segments:
        show = show[show[seg] == ALL]
    # the latest window that the data covers whole (later ones hold only the stream's tail)
    data_end = df["window_start"].max() + pd.Timedelta(milliseconds=cfg.pane_ms)
    whole = show[show["window_end"] <= data_end]
    last = whole[whole["window_start"] == whole["window_start"].max()]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        merged = f", every {' and '.join(cfg.segments)} merged (*)" if cfg.segments else ""
        print(f"\nlast whole {win.name} window ({last['window_start'].max():%H:%M:%S}){merged}:")
        table = last.pivot_table(index=["model", "model_version", "variant"], columns="metric",
                                 values="value", aggfunc="first")
        if "requests" in table:
            table["requests"] = table["requests"].astype("Int64")
        print(table.round(4).to_string())
    print(f"\nall windows: {out_dir / 'demo-windows.csv'}")
    return 0


def _cmd_schema(a: argparse.Namespace) -> int:
    from kpistream.wire.schema import schema_text

    sys.stdout.write(schema_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kpistream", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("replay", help="events file (JSON, NDJSON, Parquet) -> tidy windows")
    r.add_argument("events", help="events file: .json, .ndjson/.jsonl (.gz), .parquet")
    r.add_argument("--config", "-c", default=None, help="metrics YAML (default: built-in)")
    r.add_argument("--out", "-o", default=None, help=".csv or .parquet (default: CSV to stdout)")
    r.add_argument("--batch-rows", type=int, default=50_000)
    r.add_argument("--quiet", "-q", action="store_true")
    r.add_argument("--totals", action="store_true",
                   help="also rows with every segment merged (segment value *)")
    r.set_defaults(fn=_cmd_replay)
    g = sub.add_parser("generate", help="write a synthetic demo stream as NDJSON")
    g.add_argument("out")
    g.add_argument("--requests", type=int, default=100_000)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=_cmd_generate)
    d = sub.add_parser("demo", help="generate a demo stream and replay it")
    d.add_argument("--requests", type=int, default=200_000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--config", "-c", default="configs/metrics.yaml"
                   if Path("configs/metrics.yaml").exists() else None)
    d.add_argument("--out-dir", default="out")
    d.set_defaults(fn=_cmd_demo)
    s = sub.add_parser("schema", help="print the wire-event JSON Schema")
    s.set_defaults(fn=_cmd_schema)
    a = ap.parse_args(argv)
    try:
        code = a.fn(a)
        sys.stdout.flush()
        return code
    except KpistreamError as e:
        print(f"kpistream: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (``kpistream replay ... | head``): stop quietly; point
        # stdout at devnull so the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
