"""Windows over the engine's panes: merged partials, tumbling / sliding / count
windows, and the tidy rows every consumer reads (:mod:`.aggregate`)."""
