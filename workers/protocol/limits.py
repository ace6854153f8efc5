"""Bounds that both ends of the protocol hold to (a worker refuses what exceeds them)."""

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # draft distributions of a long window at a large vocabulary fit well inside
MAX_TRACE_SPANS = 400_000  # spans a process keeps per trace: a TraceSpans of this many stays inside MAX_MESSAGE_BYTES
MAX_BRANCHES = 64  # outcomes drafted ahead in one SpeculateRequest (or continued by one VerifyNext)
MAX_TENSOR_DIMS = 3  # distributions are [rows, vocab] or [branches, count, vocab]
