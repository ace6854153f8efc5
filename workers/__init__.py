"""Worker side of specpipe: model runners, device backends and the worker processes."""
