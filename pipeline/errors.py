"""Errors of the coordinator side, below every module that raises them."""


class WorkerFailed(RuntimeError):
    """A worker died, hung, sent something unreadable, or answered with an error the run cannot recover from."""


class Stalled(RuntimeError):
    """Sequences remain, but no worker has anything to do for them and the scheduler has nothing to send: a
    bug in the scheduler. The message names the sequences, their phases and the last replies taken."""

    def __init__(self, message: str, seq_ids: list[int]) -> None:
        super().__init__(message)
        self.seq_ids = seq_ids
