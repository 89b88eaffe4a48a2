"""configs/metrics.yaml → frozen specs; every bad key or value is a clear error naming it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kpistream.spec.metrics import EngineConfig, config_from_dict, load_config, parse_duration
from kpistream.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_loads_and_is_frozen():
    cfg = load_config(ROOT / "configs/metrics.yaml")
    assert [w.name for w in cfg.windows] == ["10s", "1m"]
    assert cfg.pane_ms == 10_000 and cfg.label_delay_ms == 60_000 and cfg.segments == ("region",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lateness_ms = 1  # type: ignore[misc]
    assert load_config(None) == EngineConfig()


@pytest.mark.parametrize("text,ms", [("500ms", 500), ("10s", 10_000), ("5m", 300_000),
                                     ("1h", 3_600_000), ("2d", 172_800_000), (250, 250)])
def test_durations(text, ms):
    assert parse_duration(text, "x") == ms


def test_pane_is_the_gcd_of_windows():
    cfg = config_from_dict({"windows": [{"type": "tumbling", "size": "15s"},
                                        {"type": "sliding", "size": "1m", "step": "20s"}]})
    assert cfg.pane_ms == 5_000
    assert [w.name for w in cfg.windows] == ["15s", "1m"]


@pytest.mark.parametrize("raw,path,words", [
    ({"windws": []}, "windws", "unknown key"),
    ({"time": {"lateness": "5 sec"}}, "time.lateness", "duration"),
    ({"time": {"lateness": -1}}, "time.lateness", "negative"),
    ({"time": {"latenes": "5s"}}, "time.latenes", "unknown key"),
    ({"windows": [{"type": "hopping", "size": "1m"}]}, "windows[0].type", "tumbling, sliding or count"),
    ({"windows": [{"type": "sliding", "size": "1m"}]}, "windows[0].step", "missing"),
    ({"windows": [{"type": "sliding", "size": "1m", "step": "7s"}]}, "windows[0].step", "divide"),
    ({"windows": [{"type": "tumbling", "size": "1m", "step": "10s"}]}, "windows[0].step", "no step"),
    ({"windows": [{"type": "tumbling"}]}, "windows[0].size", "missing"),
    ({"windows": [{"type": "count", "size": 0}]}, "windows[0].size", "must be in"),
    ({"windows": [{"name": "a", "type": "tumbling", "size": "1m"},
                  {"name": "a", "type": "tumbling", "size": "2m"}]}, "windows", "duplicate"),
    ({"windows": []}, "windows", "non-empty"),
    ({"series": {"segments": ["model"]}}, "series.segments", "clashes"),
    ({"series": {"max_series": "many"}}, "series.max_series", "integer"),
    ({"join": {"max_pending": 3}}, "join.max_pending", "must be in"),
    ({"metrics": {"families": ["traffic", "vibes"]}}, "metrics.families[1]", "unknown family"),
    ({"metrics": {"ranking": {"k": 0}}}, "metrics.ranking.k", "must be in"),
    ({"metrics": {"latency": {"relative_accuracy": 0.5}}}, "metrics.latency.relative_accuracy", "[0.0001, 0.2]"),
    ({"metrics": {"classification": {"positive_label": 1.5}}}, "metrics.classification.positive_label", "label"),
    ({"version": 2}, "version", "unsupported"),
    ([1, 2], "<root>", "mapping"),
])
def test_bad_config_names_the_key_and_the_reason(raw, path, words):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert e.value.path == path and words in e.value.reason, str(e.value)


def test_positive_label_is_canonical():
    assert config_from_dict({"metrics": {"classification": {"positive_label": True}}}).positive_label == "true"
    assert config_from_dict({"metrics": {"classification": {"positive_label": 1}}}).positive_label == "1"


def test_yaml_errors(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("windows: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
