"""The host-facing sampler: generation, editing, batching over devices."""
