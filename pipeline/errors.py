"""Errors of the coordinator side, below every module that raises them."""


class WorkerFailed(RuntimeError):
    """A worker died, hung, sent something unreadable, or answered with an error the run cannot recover from."""
