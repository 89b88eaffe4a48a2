"""The demo: a scikit-learn model registered in MLflow (:mod:`.model`), a traffic
driver with its terminal view (:mod:`.traffic`), and ``python -m app.demo``."""
