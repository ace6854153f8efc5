"""The row counts a CPU GEMM is called with: measured, and then every row keeps its bits whatever shares its call."""

import pytest
import torch

from workers.backends import cpu_rows
from workers.backends.cpu_rows import RowRange, invariant_rows, padded_matmul

SHAPES = [(512, 1536), (512, 512), (1536, 512)]


def test_the_measured_range_gives_every_row_its_own_bits_at_any_count_and_position():
    rows = invariant_rows(SHAPES, torch.float32)
    assert rows.verified, rows.describe()
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(512, 1536, generator=generator)
    pool = torch.randn(400, 512, generator=generator)
    alone = torch.cat([padded_matmul(pool[i : i + 1], weight, None, rows) for i in range(40)])
    for count in (1, 2, 3, 5, 8, 13, 40, 100, 300):
        for offset in (0, 3):
            got = padded_matmul(pool[offset : offset + count], weight, None, rows)
            covered = min(count, 40 - offset)
            assert torch.equal(got[:covered], alone[offset : offset + covered]), (count, offset)


def test_calls_are_padded_up_and_tiled_into_measured_counts(monkeypatch):
    seen = []
    real = cpu_rows.matmul
    monkeypatch.setattr(cpu_rows, "matmul", lambda x, w, b: seen.append(x.shape[0]) or real(x, w, b))
    rows = RowRange((4, 5, 6, 8, 16))
    weight, bias = torch.randn(8, 3), torch.randn(3)
    x = torch.randn(37, 8)
    for count in (1, 4, 7, 37):
        seen.clear()
        got = padded_matmul(x[:count], weight, bias, rows)
        assert got.shape == (count, 3)
        torch.testing.assert_close(got, torch.addmm(bias, x[:count], weight))
        assert set(seen) <= set(rows.counts)
    assert seen == [16, 16, 5]  # 37 rows: two full tiles, then 5


@pytest.mark.parametrize(("rounds_apart", "first", "last"), [
    (lambda count: count >= 33, 2, 32),  # a range ends where a count disagrees with those in it
    (lambda count: count < 8, 8, 256),  # wide enough for prompt tiles beats less padding of decode steps
])
def test_the_probe_keeps_the_counts_that_agree(monkeypatch, rounds_apart, first, last):
    # A fake GEMM whose rows round differently at some counts.
    def fake_mm(x, weight):
        return torch.matmul(x, weight) + 1e-3 * rounds_apart(x.shape[0])

    monkeypatch.setattr(cpu_rows.torch, "mm", fake_mm)
    rows = cpu_rows._probe.__wrapped__(((16, 8),), torch.float32, 1)
    assert rows.verified and (rows.counts[0], rows.counts[-1]) == (first, last)
    assert f"{first}..{last}" in rows.describe()


def test_no_agreeing_counts_is_said_plainly(monkeypatch):
    calls = iter(range(10**6))
    monkeypatch.setattr(cpu_rows.torch, "mm", lambda x, weight: torch.full((x.shape[0], weight.shape[1]),
                                                                           float(next(calls))))
    rows = cpu_rows._probe.__wrapped__(((16, 8),), torch.float32, 1)
    assert not rows.verified and "not batch-invariant" in rows.describe()


@pytest.mark.parametrize("count", [1, 2, 9, 300])
def test_padding_never_changes_what_a_row_is_worth(count):
    rows = invariant_rows(SHAPES, torch.float32)
    weight = torch.randn(512, 512)
    x = torch.randn(count, 512)
    # the same sums, possibly rounded in another order: close, not equal
    torch.testing.assert_close(padded_matmul(x, weight, None, rows), x @ weight, rtol=1e-5, atol=1e-4)
