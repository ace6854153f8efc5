"""Bounds that both ends of the protocol hold to (a worker refuses what exceeds them)."""

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # draft distributions of a long window at a large vocabulary fit well inside
MAX_TRACE_SPANS = 400_000  # spans a process keeps per trace: a TraceSpans of this many stays inside MAX_MESSAGE_BYTES
MAX_BRANCHES = 64  # outcomes drafted ahead in one SpeculateRequest (or continued by one VerifyNext)
MAX_TENSOR_DIMS = 3  # distributions are [rows, vocab] or [branches, count, vocab]
MAX_TENSOR_DIM = MAX_MESSAGE_BYTES // 4  # no dimension longer than the float32s one message could hold
MAX_ARRAY_LEN = 1_000_000  # the longest list: a trace's spans (MAX_TRACE_SPANS), a prompt's tokens
MAX_MAP_LEN = 64  # maps are a message's fields, a tensor's two keys: a few dozen at most
# ZeroMQ's high-water marks, per peer. Requests past the mark wait in the sender (a DEALER blocks); a reply
# past it would be dropped (a ROUTER never blocks), so that mark is beyond any coordinator's requests in flight
MAX_QUEUED_REQUESTS = 64
MAX_QUEUED_REPLIES = 10_000
