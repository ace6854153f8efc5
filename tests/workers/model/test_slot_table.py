"""The slot table both runners keep: allocation, reuse and O(1) rollback, refused with messages that say why."""

import pytest

from workers.errors import CacheCapacityError
from workers.model.slot_table import SlotTable


def test_slots_are_handed_out_lowest_first_until_none_is_left():
    table = SlotTable(2)
    assert [table.allocate(), table.allocate()] == [0, 1] and table.free_count == 0
    with pytest.raises(CacheCapacityError, match="all 2 KV slots are in use; start the worker with more slots"):
        table.allocate()


def test_a_freed_slot_is_reused_with_length_zero():
    table = SlotTable(2)
    slot = table.allocate()
    table.set_length(slot, 17)
    table.free(slot)
    assert table.lengths[slot] == 0 and table.free_count == 2
    table.free(slot)  # twice: still one free slot, not two
    assert table.free_count == 2
    assert table.allocate() == slot and table.lengths[slot] == 0


def test_truncate_moves_the_length_back_but_never_forward():
    table = SlotTable(1)
    table.set_length(0, 10)
    table.truncate(0, 4)
    assert table.lengths[0] == 4
    with pytest.raises(CacheCapacityError, match="cannot truncate slot 0 to 5: it holds 4 positions"):
        table.truncate(0, 5)
    with pytest.raises(CacheCapacityError, match="cannot truncate slot 0 to -1"):
        table.truncate(0, -1)
    assert table.lengths[0] == 4


@pytest.mark.parametrize("slot", [-1, 3])
def test_a_slot_that_does_not_exist_is_refused(slot):
    table = SlotTable(3)
    for call in (table.free, table.check, lambda s: table.truncate(s, 0)):
        with pytest.raises(CacheCapacityError, match=f"slot {slot} does not exist \\(this runner has 3\\)"):
            call(slot)
