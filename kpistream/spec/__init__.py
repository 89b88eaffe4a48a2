"""Configuration specs read from YAML; errors name the key path (:mod:`.metrics`)."""
