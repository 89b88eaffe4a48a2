"""The wire contract: event schema and validation (:mod:`.schema`), columnar
batches and shard routing (:mod:`.batch`), and the HTTP client (:mod:`.client`)."""
