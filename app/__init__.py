"""Ray Serve side of kpistream: the HTTP face and the model wrappers.

Submodules are imported on use (``from app.monitor import MonitoredModel``);
importing the package itself pulls in nothing heavy.
"""
