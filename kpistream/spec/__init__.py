"""Every YAML file read into checked specs; errors name the key path.

:mod:`.common` (the pydantic base, key paths, durations, value checks), :mod:`.metrics`
(``metrics.yaml``), :mod:`.alerts` (``alerts.yaml``), :mod:`.canary` (``canary.yaml``).
"""
