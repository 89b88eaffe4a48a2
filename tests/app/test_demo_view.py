"""app/demo/view.py: the demo's KPI table, alert lines and end-of-run report (no Ray, no server)."""

from collections import Counter
from types import SimpleNamespace

from app.demo import view


def _row(metric, value, start, variant="primary", **kw):
    return {"window": "1m", "window_start": start, "window_end": start + 60_000, "metric": metric,
            "value": value, "variant": variant, **kw}


def test_kpi_table_combines_segments_and_marks_provisional():
    rows = [_row("requests", 10, 0, region="eu"), _row("requests", 30, 0, region="us"),
            _row("accuracy", 0.5, 0, region="eu", count=10),
            _row("accuracy", 1.0, 0, region="us", count=30, provisional=True)]
    lines = view.kpi_table({"1m": rows}, now_ms=120_000)
    table = "\n".join(lines)
    assert "primary" in table and "40" in table and "0.875" in table
    assert "00:00:00*" in table
    assert "accuracy by region (1m, primary): eu 0.500  us 1.000" in table


def test_kpi_table_empty():
    assert view.kpi_table({}, 0)[0].startswith("  (no KPI windows yet")


def test_summary_lines():
    s = SimpleNamespace(sending_s=2.0, interrupted=False, error_reasons=Counter({"HTTP 500": 2}),
                        elapsed_s=3.0, sent=100, ok=98, errors=2, skipped=0, feedback_posted=90,
                        feedback_rejected=0, feedback_failed=0, feedback_dropped=8,
                        no_request_id=0, feedback_post_errors=0, last_rejection="",
                        correct={"before": [9, 10], "after": [0, 0]},
                        accuracy=lambda ph: {"before": 0.9, "after": None}[ph],
                        alerts_fired={"B": 2.0, "A": 1.5})
    lines = view.summary_lines(s)
    assert lines[0] == "finished after 3.0 s: sent 100 (50.0/s), ok 98, errors 2 (HTTP 500: 2)"
    assert lines[2] == "client-side accuracy of the replies: before drift 0.900 (n=10)"
    assert lines[3].endswith("A at 1.5 s, B at 2 s")


def test_alert_lines_when_the_sidecar_is_down():
    fired = {}
    lines = view.alert_lines("http://127.0.0.1:9", 0.5, lambda: 1.0, fired)
    assert lines[0].startswith("  alerts unavailable") and fired == {}


def test_fetch_rows_when_the_sidecar_is_down():
    rows, problem = view.fetch_rows("http://127.0.0.1:9", "kpistream-demo", 0.5)
    assert rows == {} and problem.startswith("KPI series unavailable")
