"""The live demo's terminal view: the KPI table, alert lines and the end-of-run report."""

from __future__ import annotations

import math
import time
import urllib.parse
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, Callable

from kpistream.wire.client import request

__all__ = ["DISPLAY_METRICS", "DISPLAY_WINDOWS", "kpi_table", "fetch_rows", "alert_lines",
           "summary_lines"]

DISPLAY_METRICS: tuple[str, ...] = ("requests", "error_rate", "latency_p99", "accuracy", "f1",
                                    "label_coverage")
DISPLAY_WINDOWS: tuple[str, ...] = ("10s", "1m")
_LOOKBACK_S = {"10s": 60, "1m": 180}


def _num(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _ms(x: Any) -> int | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return int(x)
    if isinstance(x, str):
        s = x.strip()
        if s.lstrip("-").isdigit():
            return int(s)
        try:
            dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
        except ValueError:
            return None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return int(dt.timestamp() * 1000)
    return None


_ROW_COLUMNS = {"window", "window_start", "window_end", "metric", "value", "count", "labelled",
                "provisional", "model", "model_version", "variant", "endpoint"}


def _combine(metric: str, rows: list[dict]) -> float | None:
    """One value for a metric over several series (segments, versions) of one window.

    Sums for ``requests``; ratios weighted by their ``count`` (the events
    behind them: exact for accuracy, error rate and label coverage); a
    weighted mean for F1 and the
    maximum for latency quantiles (approximations: the exact values need the
    merged states, which the store has; one segment-free series is exact).
    """
    vals = [(v, r) for r in rows if (v := _num(r.get("value"))) is not None]
    if not vals:
        return None
    if len(vals) == 1:
        return vals[0][0]
    if metric == "requests":
        return sum(v for v, _ in vals)
    if metric.startswith("latency_p"):
        return max(v for v, _ in vals)
    tot = wsum = 0.0
    for v, r in vals:   # count = the value's denominator (requests, labelled requests)
        w = _num(r.get("count"))
        w = _num(r.get("labelled")) if w is None else w
        w = w or 0.0
        tot += w
        wsum += w * v
    return wsum / tot if tot else sum(v for v, _ in vals) / len(vals)


def _fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    if metric == "requests":
        return f"{v:.0f}"
    if metric.startswith("latency"):
        return f"{v:.1f}"
    if metric in ("error_rate", "label_coverage"):
        return f"{100 * v:.1f}%"
    return f"{v:.3f}"


_HEAD = {"requests": "requests", "error_rate": "errors", "latency_p99": "p99 ms",
         "accuracy": "accuracy", "f1": "f1", "label_coverage": "labelled"}


def kpi_table(rows_by_window: dict[str, list[dict]], now_ms: int) -> list[str]:
    """The compact KPI table: one line per (window, variant)."""
    metrics = DISPLAY_METRICS
    lines = ["  " + f"{'window':<7}{'variant':<10}{'start':>9}  "
             + "".join(f"{_HEAD.get(m, m):>10}" for m in metrics)]
    segs_line: list[str] = []
    for win in DISPLAY_WINDOWS:
        rows = rows_by_window.get(win) or []
        by_variant: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_variant[str(r.get("variant", "?"))].append(r)
        for variant in sorted(by_variant):
            vrows = by_variant[variant]
            spans = {(s, _ms(r.get("window_end"))) for r in vrows
                     if (s := _ms(r.get("window_start"))) is not None}
            if not spans:
                continue
            closed = [s for s, e in spans if e is not None and e <= now_ms]
            start = max(closed) if closed else max(s for s, _ in spans)
            at = [r for r in vrows if _ms(r.get("window_start")) == start]
            prov = any(bool(r.get("provisional")) for r in at)
            cells = []
            for m in metrics:
                cells.append(_fmt(m, _combine(m, [r for r in at if r.get("metric") == m])))
            hhmmss = datetime.fromtimestamp(start / 1000, timezone.utc).strftime("%H:%M:%S")
            lines.append("  " + f"{win:<7}{variant[:9]:<10}{hhmmss:>9}{'*' if prov else ' '} "
                         + "".join(f"{c:>10}" for c in cells))
            if win == DISPLAY_WINDOWS[-1]:
                # accuracy per segment value (e.g. region) of the same window
                seg_keys = sorted({k for r in at for k in r if k not in _ROW_COLUMNS
                                   and r.get(k) is not None})
                for key in seg_keys:
                    per: dict[str, list[dict]] = defaultdict(list)
                    for r in at:
                        if r.get("metric") == "accuracy":
                            per[str(r.get(key))].append(r)
                    parts = [f"{val} {_fmt('accuracy', _combine('accuracy', rs))}"
                             for val, rs in sorted(per.items())]
                    if parts:
                        segs_line.append(f"  accuracy by {key} ({win}, {variant}): "
                                         + "  ".join(parts))
    if len(lines) == 1:
        return ["  (no KPI windows yet: they appear once the sidecar has published the "
                "first window)"]
    return lines + segs_line + ["  (* provisional: the window may still change; labelled = "
                                "label coverage)"]


def fetch_rows(base: str, model: str | None, timeout: float) -> tuple[dict[str, list[dict]], str]:
    """The latest ``DISPLAY_WINDOWS`` rows of ``DISPLAY_METRICS`` from ``GET /v1/series``
    (of ``model``), and a problem to show instead ("" if none)."""
    now_ms = int(time.time() * 1000)
    out: dict[str, list[dict]] = {}
    for win in DISPLAY_WINDOWS:
        q = {"metric": ",".join(DISPLAY_METRICS), "resolution": win,
             "start": str(now_ms - 1000 * _LOOKBACK_S.get(win, 120))}
        if model:
            q["model"] = model
        resp = request("GET", f"{base}/v1/series?{urllib.parse.urlencode(q)}",
                       timeout=min(timeout, 3.0))
        if not resp.ok:
            return out, f"KPI series unavailable ({resp.reason()})"
        try:
            data = resp.json()
        except (ValueError, UnicodeDecodeError) as e:
            return out, f"KPI series unreadable ({e})"
        if isinstance(data, dict):
            data = data.get("rows") or data.get("data") or []
        out[win] = [r for r in data if isinstance(r, dict)
                    and r.get("window", win) == win]
    return out, ""


def alert_lines(base: str, timeout: float, elapsed_s: Callable[[], float],
                fired: dict) -> list[str]:
    """Firing / pending alerts and detectors in drift, from ``GET /v1/alerts``.

    Records in ``fired`` (name -> seconds into the run, ``elapsed_s()`` once
    the reply is in) the first time each rule is seen firing or each detector
    in drift.
    """
    resp = request("GET", f"{base}/v1/alerts", timeout=min(timeout, 3.0))
    if not resp.ok:
        return [f"  alerts unavailable ({resp.reason()})"]
    try:
        body = resp.json()
    except (ValueError, UnicodeDecodeError) as e:
        return [f"  alerts unreadable ({e})"]
    el = elapsed_s()
    lines = []
    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for a in body.get("alerts") or []:
        rule, state = a.get("rule", "?"), a.get("state", "?")
        grouped[(state, rule)].append(a)
        if state == "firing" and rule not in fired:
            fired[rule] = round(el, 1)
    for (state, rule), items in sorted(grouped.items()):
        # one line per rule and state: the instances (version/variant/region) and the
        # first one's summary
        where = ", ".join("/".join(str((a.get("series") or {})[k])
                                   for k in ("model_version", "variant", "region")
                                   if k in (a.get("series") or {})) for a in items)
        note = (items[0].get("annotations") or {}).get("summary", "")
        lines.append(f"  ALERT {state:<8}{rule} [{where}] {note}")
    drifting: dict[str, list[str]] = defaultdict(list)
    for d in [*(body.get("detectors") or []), *(body.get("input_drift") or [])]:
        if d.get("drift"):
            labels = d.get("series") or d.get("group") or {}
            drifting[d.get("detector", "?")].append(
                str(labels.get("region") or labels.get("model_version") or "*"))
            if d.get("detector") not in fired:
                fired[d.get("detector")] = round(el, 1)
    for name, where in sorted(drifting.items()):
        lines.append(f"  DRIFT {name} ({', '.join(sorted(set(where)))})")
    return lines or ["  alerts: none pending or firing; no detector in drift"]


def summary_lines(s: Any) -> list[str]:
    """The end-of-run report of a :class:`~app.demo.traffic.TrafficSummary`."""
    el = max(1e-9, s.sending_s)
    how = "stopped" if s.interrupted else "finished"
    reasons = ", ".join(f"{k}: {v}" for k, v in s.error_reasons.most_common(4) if v)
    lines = [
        f"{how} after {s.elapsed_s:.1f} s: sent {s.sent} ({s.sent / el:.1f}/s), ok {s.ok}, "
        f"errors {s.errors}" + (f" ({reasons})" if reasons else "")
        + (f", {s.skipped} slots skipped (server too slow)" if s.skipped else ""),
        f"feedback: posted {s.feedback_posted}, rejected {s.feedback_rejected}, "
        f"failed {s.feedback_failed}, not yet due at stop {s.feedback_dropped}"
        + (f", replies without x-request-id {s.no_request_id}" if s.no_request_id else ""),
    ]
    if s.feedback_post_errors:
        lines.append(f"  {s.feedback_post_errors} feedback posts failed; the last: "
                     f"{s.last_feedback_error}")
    if s.last_rejection:
        lines.append(f"  a rejected feedback row: {s.last_rejection}")
    b, a = s.accuracy("before"), s.accuracy("after")
    acc = [f"before drift {b:.3f} (n={s.correct['before'][1]})" if b is not None else None,
           f"after drift {a:.3f} (n={s.correct['after'][1]})" if a is not None else None]
    acc = [x for x in acc if x]
    if acc:
        lines.append("client-side accuracy of the replies: " + ", ".join(acc))
    if s.alerts_fired:
        lines.append("alerts and detectors that fired (seconds into the run): " + ", ".join(
            f"{k} at {v:g} s" for k, v in sorted(s.alerts_fired.items(), key=lambda kv: kv[1])))
    return lines
