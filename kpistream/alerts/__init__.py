"""Watching the KPIs: alert rules (:mod:`.rules`), drift detectors
(:mod:`.detectors`) and the watcher that runs both over published windows
(:mod:`.watcher`). The rules' public names are re-exported here."""
from kpistream.alerts.rules import *  # noqa: F401,F403
from kpistream.alerts.rules import __all__  # noqa: F401
