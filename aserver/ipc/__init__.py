"""Inter-process transport: shared-memory rings with pipe wakeups."""
