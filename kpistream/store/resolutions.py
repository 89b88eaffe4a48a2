"""The store's resolutions: the levels it keeps (the engine's pane, then coarser buckets),
each with a step and a retention, and the checks that make roll-ups exact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kpistream.errors import ConfigError
from kpistream.spec.metrics import EngineConfig, format_duration, parse_duration

__all__ = ["DAY_MS", "Resolution", "check_resolutions", "default_resolutions"]

DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Resolution:
    """One level of the store: buckets of ``step_ms``, kept ``retention_ms`` (None = forever)."""

    name: str
    step_ms: int
    retention_ms: int | None = None

    @classmethod
    def of(cls, step: str | int, retention: str | int | None = None,
           name: str | None = None) -> "Resolution":
        """``Resolution.of("1m", "7d")``: durations as in the config (``10s``, ``5m``, ms)."""
        s = parse_duration(step, "step")
        r = None if retention is None else parse_duration(retention, "retention")
        return cls(name or format_duration(s), s, r)


def default_resolutions(config: EngineConfig) -> tuple[Resolution, ...]:
    """The pane (1 day), ``1m`` (7 days), ``1h`` (90 days).

    A default level whose step is not a coarser multiple of the previous one
    (a pane of 7 s, say) is left out.
    """
    base = config.pane_ms
    out = [Resolution(format_duration(base), base, DAY_MS)]
    for name, step, keep in (("1m", 60_000, 7 * DAY_MS), ("1h", 3_600_000, 90 * DAY_MS)):
        if step > out[-1].step_ms and step % out[-1].step_ms == 0:
            out.append(Resolution(name, step, keep))
    return tuple(out)


def check_resolutions(res: Sequence[Resolution], config: EngineConfig) -> tuple[Resolution, ...]:
    """The resolutions as a tuple, or a ConfigError naming the first that cannot work.

    The first must be the engine's pane; each next one a larger multiple of
    the one before; and each finer one kept long enough (one coarser bucket
    plus the label delay) for roll-ups to see all of it.
    """
    res = tuple(res)
    if not res:
        raise ConfigError("resolutions", "at least one resolution (the pane) is needed")
    names = [r.name for r in res]
    for i, r in enumerate(res):
        if not isinstance(r, Resolution):
            raise ConfigError(f"resolutions[{i}]", f"expected a Resolution, got {r!r}")
        if not isinstance(r.name, str) or not r.name:
            raise ConfigError(f"resolutions[{i}].name", "must be a non-empty string")
        if names.count(r.name) > 1:
            raise ConfigError(f"resolutions[{i}].name", f"duplicate resolution name {r.name!r}")
        if isinstance(r.step_ms, bool) or not isinstance(r.step_ms, int) or r.step_ms <= 0:
            raise ConfigError(f"resolutions[{i}].step_ms", f"must be a positive integer, got {r.step_ms!r}")
        if r.retention_ms is not None and (isinstance(r.retention_ms, bool)
                                           or not isinstance(r.retention_ms, int)
                                           or r.retention_ms <= 0):
            raise ConfigError(f"resolutions[{i}].retention_ms",
                              f"must be a positive integer or None, got {r.retention_ms!r}")
    if res[0].step_ms != config.pane_ms:
        raise ConfigError("resolutions[0].step_ms",
                          f"the base resolution must be the engine's pane ({config.pane_ms} ms), "
                          f"got {res[0].step_ms} ms")
    for i in range(1, len(res)):
        fine, coarse = res[i - 1], res[i]
        if coarse.step_ms <= fine.step_ms or coarse.step_ms % fine.step_ms:
            raise ConfigError(f"resolutions[{i}].step_ms",
                              f"must be a larger multiple of resolutions[{i - 1}].step_ms "
                              f"({fine.step_ms} ms), got {coarse.step_ms} ms")
        need = coarse.step_ms + config.label_delay_ms
        if fine.retention_ms is not None and fine.retention_ms < need:
            raise ConfigError(f"resolutions[{i - 1}].retention_ms",
                              f"must keep at least one {coarse.name} bucket plus the label delay "
                              f"({need} ms) so roll-ups see every pane, got {fine.retention_ms} ms")
    return res
