"""`specpipe serve`: the pipeline behind an OpenAI-compatible HTTP API; `specpipe bench-serve`: load against one."""
