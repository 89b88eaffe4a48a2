"""The demo, end to end (the README's main job: ``make demo``).

1. Trains a small scikit-learn classifier on a data set shipped with
   scikit-learn and registers it in a local MLflow store (SQLite under
   ``data/``) with the alias ``champion`` (skipped if it exists).
2. Starts ``serve run configs/serve.yaml``: the sidecar (shards, publisher,
   store, /metrics, alerts, the canary controller) and, at ``/demo``, a
   shadow experiment: the primary follows ``models:/kpistream-demo@champion``,
   the challenger follows the alias ``challenger`` (none at first).
3. Drives traffic with labels arriving seconds later and a drift injected
   halfway, showing live KPIs, alerts and detectors in the terminal and where
   to look.  The drift fires the alerts; the accuracy alert launches a
   retraining job that registers a challenger; the shadow comparison promotes
   it; the MLflow UI shows every step.

Ctrl-C stops the traffic, then Serve, cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/serve.yaml"))
    ap.add_argument("--data-dir", default=str(ROOT / "data"))
    ap.add_argument("--rate", type=float, default=40.0, help="requests per second")
    ap.add_argument("--duration", type=float, default=None, help="seconds (default: until Ctrl-C)")
    ap.add_argument("--drift-at", type=float, default=90.0, help="seconds until the drift")
    ap.add_argument("--port", type=int, default=8000)
    a = ap.parse_args(argv)

    data = Path(a.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    tracking = f"sqlite:///{(data / 'mlflow.db').resolve()}"
    os.environ.setdefault("KPISTREAM_DATA_DIR", str(data.resolve()))

    print("kpistream demo")
    print(f"  1/3 MLflow: training and registering the demo model ({tracking}) ...", flush=True)
    from app.demo.model import ensure_demo_model

    t0 = time.time()
    uri, version = ensure_demo_model(tracking)
    print(f"      {uri} -> version {version} ({time.time() - t0:.0f} s)")

    log = data / "serve.log"
    serve_bin = Path(sys.executable).with_name("serve")
    cmd = [str(serve_bin) if serve_bin.exists() else "serve", "run", a.config]
    print(f"  2/3 Ray Serve: {' '.join(cmd[1:])}  (log: {log})", flush=True)
    with open(log, "ab") as fh:
        # its own session (so Ctrl-C reaches the traffic first), with the default
        # SIGINT handler even if this process was started with SIGINT ignored
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        from app.demo.traffic import run_traffic

        print("  3/3 traffic: predictions, labels 2-10 s later, a drift at "
              f"{a.drift_at:.0f} s; Ctrl-C to stop\n", flush=True)
        summary = run_traffic(base_url=f"http://127.0.0.1:{a.port}", model_path="/demo",
                              rate_per_s=a.rate, duration_s=a.duration, drift_at_s=a.drift_at,
                              tracking_uri=tracking, wait_ready_s=300)
        del summary
    except KeyboardInterrupt:
        pass
    except ConnectionError as e:
        print(f"\nthe sidecar did not come up: {e}\nsee {log}", file=sys.stderr)
        return 1
    finally:
        # stop Serve before anything else can fail (stdout may be gone by now);
        # a second Ctrl-C must not cut the shutdown short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _say("\nstopping Ray Serve ...")
        for sig, wait_s in ((signal.SIGINT, 60), (signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait_s)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
    _say(f"stored KPIs: {data / 'store'} (open them with notebooks/kpis.ipynb); "
         f"MLflow: mlflow ui --backend-store-uri {tracking}")
    return 0


def _say(msg: str) -> None:
    try:
        print(msg, flush=True)
    except OSError:  # the terminal or pipe went away with the Ctrl-C
        pass


if __name__ == "__main__":
    sys.exit(main())
