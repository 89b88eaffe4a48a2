"""kpistream: live KPIs, alerts, drift and canary decisions for ML models.

This package is the Ray-free core, importable anywhere (it never imports Ray,
MLflow or prometheus-client):

- :mod:`kpistream.wire`     the event contract, columnar batches, the HTTP client
- :mod:`kpistream.engine`   validate → watermark → dedup → join → panes → collect
- :mod:`kpistream.windows`  panes merged into windows and tidy rows
- :mod:`kpistream.store`    the time-series store with roll-ups and retention
- :mod:`kpistream.alerts`   alert rules, drift detectors and the watcher
- :mod:`kpistream.decide`   sequential tests and the canary policy
- :mod:`kpistream.spec`     every YAML file (metrics, alerts, canary); errors name the key path
- :mod:`kpistream.replay`, :mod:`kpistream.cli`, :mod:`kpistream.synthetic`
"""
