"""SlotTable: which of a runner's KV slots are in use, and how many positions each holds."""

from __future__ import annotations

from workers.errors import CacheCapacityError


class SlotTable:
    """The lengths of `n_slots` KV slots and which slots are free.

    A slot's length is the number of positions whose keys and values are valid. Everything here is
    O(1) and touches no cache memory: rolling a slot back only moves its length.
    """

    def __init__(self, n_slots: int) -> None:
        self.n_slots = n_slots
        self.lengths = [0] * n_slots
        self._free = list(range(n_slots - 1, -1, -1))  # a stack: the lowest slot goes first
        self._in_use = [False] * n_slots

    def allocate(self) -> int:
        if not self._free:
            raise CacheCapacityError(f"all {self.n_slots} KV slots are in use; start the worker with more slots")
        slot = self._free.pop()
        self._in_use[slot] = True
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Gives `slot` back with length 0; freeing a free slot does nothing."""
        self.check(slot)
        if self._in_use[slot]:
            self._in_use[slot] = False
            self.lengths[slot] = 0
            self._free.append(slot)

    @property
    def free_count(self) -> int:
        return len(self._free)

    def truncate(self, slot: int, length: int) -> None:
        """Rolls `slot` back to its first `length` positions."""
        self.check(slot)
        if not 0 <= length <= self.lengths[slot]:
            raise CacheCapacityError(f"cannot truncate slot {slot} to {length}: it holds {self.lengths[slot]} positions")
        self.lengths[slot] = length

    def set_length(self, slot: int, length: int) -> None:
        """`slot` now holds `length` positions: a forward wrote up to there (from at most its old length)."""
        self.lengths[slot] = length

    def check(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise CacheCapacityError(f"slot {slot} does not exist (this runner has {self.n_slots})")
