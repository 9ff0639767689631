"""The shared window maths (`tokencompress.windows`) against a plain loop over windows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tokencompress.windows import (
    check_window,
    merge_windows,
    partition_windows,
    window_grid,
    window_valid_mask,
)

GRIDS = [(27, 27), (24, 24), (7, 5), (1, 1), (2, 9)]
WINDOWS = [2, 3, 4]


def reference_partition(
    x: torch.Tensor, grid: tuple[int, int], window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop over windows and their slots: zeros and False where a slot falls off the grid."""
    batch, _, channels = x.shape
    height, width = grid
    rows, cols = -(-height // window), -(-width // window)
    windows = torch.zeros(batch, rows * cols, window * window, channels, dtype=x.dtype)
    valid = torch.zeros(rows * cols, window * window, dtype=torch.bool)
    for row in range(rows):
        for col in range(cols):
            for slot_row in range(window):
                for slot_col in range(window):
                    i, j = row * window + slot_row, col * window + slot_col
                    if i < height and j < width:
                        windows[:, row * cols + col, slot_row * window + slot_col] = x[:, i * width + j]
                        valid[row * cols + col, slot_row * window + slot_col] = True
    return windows, valid


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_partition_matches_loop_reference(grid: tuple[int, int], window: int) -> None:
    x = torch.randn(2, grid[0] * grid[1], 3, dtype=torch.float64)
    windows, valid = partition_windows(x, grid, window)
    expected_windows, expected_valid = reference_partition(x, grid, window)
    assert torch.equal(windows, expected_windows)  # pure data movement: exact
    divides = grid[0] % window == 0 and grid[1] % window == 0
    if divides:
        assert valid is None and bool(expected_valid.all())
    else:
        assert torch.equal(valid, expected_valid)
        assert torch.equal(window_valid_mask(grid, window), expected_valid)
    assert int(expected_valid.sum()) == grid[0] * grid[1]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_merge_inverts_partition(grid: tuple[int, int], window: int) -> None:
    x = torch.randn(2, grid[0] * grid[1], 3, dtype=torch.float64)
    assert torch.equal(merge_windows(partition_windows(x, grid, window)[0], grid, window), x)


def test_window_grid_rounds_up() -> None:
    assert window_grid((27, 27), 3) == (9, 9)
    assert window_grid((24, 24), 3) == (8, 8)
    assert window_grid((7, 5), 3) == (3, 2)
    assert window_grid((2, 9), 4) == (1, 3)
    assert window_grid((1, 1), 4) == (1, 1)


def test_edge_windows_hold_fewer_tokens() -> None:
    # 7x5 with window 3: windows of 9, 6 / 9, 6 / 3, 2 real tokens, row-major.
    valid = window_valid_mask((7, 5), 3)
    assert valid.sum(dim=-1).tolist() == [9, 6, 9, 6, 3, 2]
    # The top-left slot of every window is real, so no softmax row is empty.
    assert bool(valid[:, 0].all())


def test_partition_keeps_dtype_and_gradients() -> None:
    x = torch.randn(1, 35, 2, dtype=torch.bfloat16, requires_grad=True)
    windows, _ = partition_windows(x, (7, 5), 3)
    assert windows.dtype == torch.bfloat16
    windows.float().sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # every real token lands in one slot once


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_check_window_rejects_non_positive_ints(bad: object) -> None:
    with pytest.raises(ValueError, match=r"window must be a positive int"):
        check_window(bad)  # type: ignore[arg-type]


@given(
    height=st.integers(1, 11),
    width=st.integers(1, 11),
    window=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_partition_round_trip_property(height: int, width: int, window: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, height * width, 2, dtype=torch.float64, generator=generator)
    windows, valid = partition_windows(x, (height, width), window)
    rows, cols = window_grid((height, width), window)
    assert windows.shape == (2, rows * cols, window * window, 2)
    assert torch.equal(merge_windows(windows, (height, width), window), x)
    if valid is not None:
        assert bool((windows[:, ~valid] == 0).all())  # padded slots are zeros
