"""Windows over the engine's panes (:mod:`.aggregate`), the KPI catalogue
(:mod:`.catalogue`), and the Ray-free publish step the publisher runs
(:mod:`.publish`, with :mod:`.paired_summary` and :mod:`.exposition`)."""
