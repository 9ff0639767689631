"""`PixelShuffle` against a loop over positions and InternVL's view/permute order."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tokencompress import PixelShuffle, create_compressor
from tokencompress.pixel_shuffle import pixel_shuffle_tokens, pixel_unshuffle_tokens

GRIDS = [(27, 27), (24, 24), (7, 5), (1, 1), (2, 9)]
RATIOS = [2, 3, 4]
grid_ids = lambda grid: f"{grid[0]}x{grid[1]}"  # noqa: E731


def reference_pixel_shuffle(x: torch.Tensor, grid: tuple[int, int], ratio: int) -> torch.Tensor:
    """Loop over output positions: channel block (a * r + b) of token (i, j) is input token
    (i * r + a, j * r + b), or zeros where that falls off the grid (bottom/right padding)."""
    batch, _, channels = x.shape
    height, width = grid
    rows, cols = -(-height // ratio), -(-width // ratio)
    out = torch.zeros(batch, rows * cols, ratio * ratio * channels, dtype=x.dtype)
    for i in range(rows):
        for j in range(cols):
            for a in range(ratio):
                for b in range(ratio):
                    source_row, source_col = i * ratio + a, j * ratio + b
                    if source_row < height and source_col < width:
                        block = (a * ratio + b) * channels
                        source = x[:, source_row * width + source_col]
                        out[:, i * cols + j, block : block + channels] = source
    return out


def internvl_order(x: torch.Tensor, side: int) -> torch.Tensor:
    """InternVL-Chat's steps for scale_factor 1/2, ps_version 'v2', on a square grid:
    (n, h, w, c) -> fold column pairs into channels -> swap axes -> fold row pairs -> swap back."""
    n, c = x.shape[0], x.shape[-1]
    grid = x.reshape(n, side, side, c)
    folded_cols = grid.reshape(n, side, side // 2, 2 * c).transpose(1, 2)
    folded_rows = folded_cols.reshape(n, side // 2, side // 2, 4 * c).transpose(1, 2)
    return folded_rows.reshape(n, (side // 2) ** 2, 4 * c)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("grid", GRIDS, ids=grid_ids)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_matches_loop_reference(grid: tuple[int, int], ratio: int, dtype: torch.dtype) -> None:
    x = torch.randn(2, grid[0] * grid[1], 3, dtype=torch.float64).to(dtype)
    out = PixelShuffle(ratio, pad=True)(x, grid=grid)
    assert out.dtype == dtype
    # Pure data movement (and zero padding): no arithmetic, so exact in every dtype,
    # bf16 included; comparing against the float64 reference of the same values is exact.
    assert torch.equal(out.double(), reference_pixel_shuffle(x.double(), grid, ratio))


@pytest.mark.parametrize("side", [2, 4, 24])
def test_matches_internvl_element_order(side: int) -> None:
    x = torch.randn(2, side * side, 5, dtype=torch.float64)
    assert torch.equal(PixelShuffle(2)(x), internvl_order(x, side))


def test_element_order_by_hand() -> None:
    # Tokens 0..7 on a 2x4 grid, one channel: rows [0 1 2 3] / [4 5 6 7].
    x = torch.arange(8, dtype=torch.float32).reshape(1, 8, 1)
    out = PixelShuffle(2)(x, grid=(2, 4))
    assert out.tolist() == [[[0, 1, 4, 5], [2, 3, 6, 7]]]
    # Two channels: each token's channels stay together, blocks in (row, column) offset order.
    x2 = torch.stack([x, 10 * x], dim=-1).reshape(1, 8, 2)
    assert PixelShuffle(2)(x2, grid=(2, 4))[0, 0].tolist() == [0, 0, 1, 10, 4, 40, 5, 50]


def test_odd_grid_without_pad_is_rejected() -> None:
    shuffle = PixelShuffle(2)
    message = r"grid=\(7, 5\) is not divisible by ratio=2; expected H and W to be multiples of 2"
    with pytest.raises(ValueError, match=message):
        shuffle.out_grid((7, 5))
    with pytest.raises(ValueError, match=message):
        shuffle(torch.randn(1, 35, 4), grid=(7, 5))
    with pytest.raises(ValueError, match=r"grid=\(27, 27\) is not divisible by ratio=2"):
        shuffle(torch.randn(1, 729, 4))


def test_pad_zero_fills_bottom_right() -> None:
    shuffle = PixelShuffle(2, pad=True)
    assert shuffle.out_grid((7, 5)) == (4, 3) and shuffle.out_grid((27, 27)) == (14, 14)
    x = torch.ones(1, 35, 1)
    out = shuffle(x, grid=(7, 5)).reshape(4, 3, 4)
    # The last output row lost its bottom input row (offsets a=1), the last column its right one (b=1).
    assert out[3, 0].tolist() == [1, 1, 0, 0]
    assert out[0, 2].tolist() == [1, 0, 1, 0]
    assert out[3, 2].tolist() == [1, 0, 0, 0]
    assert int(out.sum()) == 35


def test_shapes_registry_and_for_dim() -> None:
    shuffle = create_compressor("pixel_shuffle")
    assert isinstance(shuffle, PixelShuffle) and shuffle.ratio == 2 and not shuffle.pad
    assert shuffle.out_grid((24, 24)) == (12, 12) and shuffle.out_dim(1152) == 4608
    assert shuffle.num_out_tokens((24, 24)) == 144
    assert PixelShuffle(3).out_dim(10) == 90
    default = PixelShuffle.for_dim(1152)
    assert default.pad and default.out_grid((27, 27)) == (14, 14)
    assert list(shuffle.parameters()) == []


@given(
    height=st.integers(1, 10),
    width=st.integers(1, 10),
    ratio=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_inverse_undoes_forward(height: int, width: int, ratio: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, height * width, 3, dtype=torch.float64, generator=generator)
    shuffle = PixelShuffle(ratio, pad=True)
    folded = shuffle(x, grid=(height, width))
    assert torch.equal(shuffle.inverse(folded, (height, width)), x)


@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 6),
    ratio=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_functional_pair_are_mutual_inverses(rows: int, cols: int, ratio: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    fine_grid = (rows * ratio, cols * ratio)
    x = torch.randn(2, fine_grid[0] * fine_grid[1], 3, dtype=torch.float64, generator=generator)
    folded = pixel_shuffle_tokens(x, fine_grid, ratio)
    assert torch.equal(pixel_unshuffle_tokens(folded, (rows, cols), ratio), x)
    unfolded = pixel_unshuffle_tokens(folded, (rows, cols), ratio)
    assert torch.equal(pixel_shuffle_tokens(unfolded, fine_grid, ratio), folded)


@given(
    batch=st.integers(1, 4),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    ratio=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_each_sample_is_independent(batch: int, height: int, width: int, ratio: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, height * width, 2, dtype=torch.float64, generator=generator)
    shuffle = PixelShuffle(ratio, pad=True)
    together = shuffle(x, grid=(height, width))
    for index in range(batch):
        alone = shuffle(x[index : index + 1], grid=(height, width))
        assert torch.equal(together[index : index + 1], alone)


def test_bad_input_names_argument_and_expectation() -> None:
    shuffle = PixelShuffle(2)
    with pytest.raises(ValueError, match=r"x must have rank 3 \(B, N, C\), got shape \(36, 4\)"):
        shuffle(torch.randn(36, 4))
    with pytest.raises(ValueError, match=r"x has an empty batch \(B=0\); expected at least one"):
        shuffle(torch.randn(0, 36, 4))
    with pytest.raises(ValueError, match=r"N=35 tokens, which is not a perfect square; pass grid="):
        shuffle(torch.randn(1, 35, 4))
    mismatch = r"grid=\(4, 8\) holds 32 tokens but x has N=36 tokens; expected H \* W"
    with pytest.raises(ValueError, match=mismatch):
        shuffle(torch.randn(1, 36, 4), grid=(4, 8))
    with pytest.raises(ValueError, match=r"ratio must be a positive int, got 0"):
        PixelShuffle(0)
    message = r"x has shape \(1, 8, 16\); expected \(B, 9, C'\) with C' a multiple of ratio\*\*2=4"
    with pytest.raises(ValueError, match=message):
        shuffle.inverse(torch.randn(1, 8, 16), (6, 6))
    with pytest.raises(ValueError, match=r"multiple of ratio\*\*2=4"):
        shuffle.inverse(torch.randn(1, 9, 6), (6, 6))
