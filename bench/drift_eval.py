"""Drift detectors on streams with known change points (prints figures; not a test).

Streams are per-window error counts: each sample is one window of ``--trials``
requests (200 by default), errors ~ Binomial(trials, p_t).

* step:  p = 10 % for ``--change`` windows, then 15 %;
* ramp:  p = 10 % until the change, then rising linearly to 15 % over ``--ramp`` windows;
* null:  p = 10 % throughout (false alarms).

Detectors, all on the same streams:

* kpistream ``Cusum`` (one-sided up, shift 5 points, fed the aggregates
  ``update(errors, trials)``) and ``Ewma`` (lam 0.2, one-sided up), both
  calibrated to the budget ARL0 = ``--arl0`` windows (10,000 by default,
  i.e. one false alarm per 10k samples on average);
* River ``ADWIN`` (delta 0.002, River's default) and ``PageHinkley``
  (mode up, delta = half the shift) fed the window rates.  River has no
  budget calibration, so Page-Hinkley's threshold is *matched to the same
  budget* here: bisection on separate simulated no-change streams until it
  makes as many false alarms as the budget allows (the comparison is then
  delay at equal false-alarm rates; ADWIN keeps its default delta, its
  false alarms are already far below the budget).

Accounting: an alarm before the change point is a false alarm (the detector
resets and keeps going); the delay is (first alarm at or after the change) -
(change point), in samples (windows); no alarm within ``--horizon`` samples
after the change is a miss.  "False alarms per 10k" is measured on the null
streams.  The last line summarises the best kpistream detector (smallest
median step delay among those within the budget) against the best River
detector (smallest median step delay).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from kpistream.alerts.detectors import Adwin, Cusum, Ewma, PageHinkley

P0, P1 = 0.10, 0.15


def make_streams(kind: str, reps: int, length: int, change: int, ramp: int, trials: int,
                 rng: np.random.Generator) -> np.ndarray:
    p = np.full(length, P0)
    if kind == "step":
        p[change:] = P1
    elif kind == "ramp":
        p[change:] = np.minimum(P1, P0 + (P1 - P0) * (np.arange(length - change) + 1) / ramp)
    return rng.binomial(trials, np.broadcast_to(p, (reps, length)))


def ph_threshold(arl0: float, trials: int, rng: np.random.Generator, streams: int = 20,
                 length: int = 10_000) -> float:
    """Page-Hinkley's raw threshold giving ``length * streams / arl0`` false alarms (bisection)."""
    null = rng.binomial(trials, P0, size=(streams, length)) / trials
    target = null.size / arl0

    def alarms(th: float) -> int:
        n = 0
        for row in null:
            det = PageHinkley(delta=(P1 - P0) / 2, threshold=th, mode="up")
            for r in row.tolist():
                det.update(r)
            n += len(det.detections)
        return n

    lo, hi = 0.005, 0.5
    for _ in range(12):
        mid = (lo * hi) ** 0.5
        if alarms(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


_PH: dict[tuple, float] = {}


def detectors(arl0: float, trials: int) -> dict[str, object]:
    return {
        "kpistream CUSUM": Cusum(P0, P1 - P0, arl0, trials=trials),
        "kpistream EWMA(0.2)": Ewma(P0, None, 0.2, arl0, side="up"),
        "River ADWIN": Adwin(delta=0.002),
        "River PageHinkley": PageHinkley(delta=(P1 - P0) / 2, threshold=_PH[(arl0, trials)],
                                         mode="up"),
    }


def feed(name: str, det, errors: np.ndarray, trials: int) -> list[int]:
    if name.startswith("kpistream"):
        upd = det.update
        for e in errors.tolist():
            upd(e, trials)
    else:
        upd = det.update
        for r in (errors / trials).tolist():
            upd(r)
    return det.detections


def run(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    length = args.change + args.horizon
    step = make_streams("step", args.reps, length, args.change, args.ramp, args.trials, rng)
    ramp = make_streams("ramp", args.reps, length, args.change, args.ramp, args.trials, rng)
    null = make_streams("null", args.null_streams, args.null_length, 0, 1, args.trials, rng)
    t = time.perf_counter()
    _PH[(args.arl0, args.trials)] = ph_threshold(args.arl0, args.trials,
                                                 np.random.default_rng(args.seed + 1))
    print(f"Page-Hinkley threshold matched to the budget: {_PH[(args.arl0, args.trials)]:.4f} "
          f"({time.perf_counter() - t:.1f} s)")
    names = list(detectors(args.arl0, args.trials))
    print(f"budget: ARL0 = {args.arl0:,.0f} samples (windows of {args.trials} requests) "
          f"= {1e4 / args.arl0:.2f} false alarms per 10k samples; error rate {P0:.0%} -> {P1:.0%}")
    print(f"streams: step/ramp {args.reps} x {length} samples (change at {args.change}, "
          f"ramp over {args.ramp}); null {args.null_streams} x {args.null_length:,} samples")
    res: dict[str, dict[str, float]] = {}
    for name in names:
        t = time.perf_counter()
        out: dict[str, float] = {}
        for kind, data in (("step", step), ("ramp", ramp)):
            delays, misses, early = [], 0, 0
            for row in data:
                det = detectors(args.arl0, args.trials)[name]
                dets = feed(name, det, row, args.trials)
                early += sum(1 for i in dets if i < args.change)
                after = [i for i in dets if i >= args.change]
                if after:
                    delays.append(after[0] - args.change)
                else:
                    misses += 1
            out[f"{kind}_delay"] = float(np.median(delays)) if delays else float("nan")
            out[f"{kind}_p90"] = float(np.percentile(delays, 90)) if delays else float("nan")
            out[f"{kind}_miss"] = misses / len(data)
            out[f"{kind}_early"] = early
        fa = 0
        for row in null:
            det = detectors(args.arl0, args.trials)[name]
            fa += len(feed(name, det, row, args.trials))
        out["fa_per_10k"] = fa / null.size * 1e4
        out["seconds"] = time.perf_counter() - t
        res[name] = out
        print(f"{name:20s} step: median delay {out['step_delay']:5.1f} (p90 {out['step_p90']:5.1f}), "
              f"misses {out['step_miss']:.3f} | ramp: median delay {out['ramp_delay']:6.1f} "
              f"(p90 {out['ramp_p90']:6.1f}), misses {out['ramp_miss']:.3f} | "
              f"false alarms {out['fa_per_10k']:.2f} per 10k | {out['seconds']:.1f} s")
    ours = {n: r for n, r in res.items() if n.startswith("kpistream")}
    within = {n: r for n, r in ours.items() if r["fa_per_10k"] <= 1e4 / args.arl0 * 1.5} or ours
    best = min(within, key=lambda n: (within[n]["step_miss"], within[n]["step_delay"]))
    river = {n: r for n, r in res.items() if n.startswith("River")}
    rbest = min(river, key=lambda n: (river[n]["step_miss"], river[n]["step_delay"]))
    print(f"best kpistream: {best}; best River: {rbest} "
          f"(River false alarms {river[rbest]['fa_per_10k']:.2f} per 10k)")
    b = res[best]
    print(f"drift: delay {b['step_delay']:g} samples, misses {b['step_miss']:g}, "
          f"false alarms {b['fa_per_10k']:.2f} per 10k, River delay {river[rbest]['step_delay']:g}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="drift detectors on streams with known change points")
    ap.add_argument("--arl0", type=float, default=10_000.0)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--change", type=int, default=500)
    ap.add_argument("--horizon", type=int, default=500)
    ap.add_argument("--ramp", type=int, default=200)
    ap.add_argument("--null-streams", type=int, default=40)
    ap.add_argument("--null-length", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
