"""The wire contract: event schema and validation (:mod:`.schema`) and its fast path for
monitored replicas (:mod:`.normalize`), columnar batches and shard routing (:mod:`.batch`),
the emitter that buffers and flushes to a transport (:mod:`.emitter`), and the HTTP
client and transport (:mod:`.client`)."""
