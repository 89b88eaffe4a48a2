"""Ray actors of kpistream: plain classes here, made remote in :mod:`actors.remote`."""
