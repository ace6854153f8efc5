"""Which KV slot of a runner holds which sequence."""

from __future__ import annotations

import torch

from workers.model.runner_base import RunnerBase


class SequenceSlots:
    """Maps coordinator sequence ids to runner slots, allocating on first use, plus a seeded RNG each."""

    def __init__(self, runner: RunnerBase, role_salt: int) -> None:
        self.runner = runner
        self._slots: dict[int, int] = {}
        self._generators: dict[int, torch.Generator] = {}
        self._salt = role_salt

    def slot(self, seq_id: int) -> int:
        if seq_id not in self._slots:
            self._slots[seq_id] = self.runner.allocate_slot()
        return self._slots[seq_id]

    def generator(self, seq_id: int, seed: int) -> torch.Generator:
        if seq_id not in self._generators:
            # distinct streams per sequence and per role, reproducible from the user's seed
            self._generators[seq_id] = torch.Generator().manual_seed(hash((seed, seq_id, self._salt)) & (2**63 - 1))
        return self._generators[seq_id]

    def prepare(self, seq_id: int, start: int) -> int:
        """The sequence's slot, rolled back to `start` cached positions (which must exist)."""
        slot = self.slot(seq_id)
        cached = self.runner.lengths[slot]
        if start > cached:
            raise ValueError(f"sequence {seq_id}: asked to continue at position {start} but only {cached} are cached")
        self.runner.truncate(slot, start)
        return slot

    def release(self, seq_id: int) -> None:
        slot = self._slots.pop(seq_id, None)
        self._generators.pop(seq_id, None)
        if slot is not None:
            self.runner.free_slot(slot)

    @property
    def held(self) -> list[int]:
        """The sequence ids that hold a slot."""
        return list(self._slots)

    @property
    def active(self) -> int:
        return len(self._slots)
