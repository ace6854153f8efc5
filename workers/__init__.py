"""Worker side of specpipe: model runners, device backends and the worker processes."""

import os

# MKL picks its fp32 GEMM code path by the data's memory alignment, so one row of a matrix product could
# round differently depending on where it sits in the batch. Strict conditional numerical reproducibility
# makes every row's result its own alone (tests/workers/model/test_batched_forward.py), which lossless
# batching needs. MKL reads it at its first call, after torch's import; a user's own setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
