"""`AvgPool` against a plain loop over windows, plus gradients, properties and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from tokencompress import AvgPool, create_compressor

GRIDS = [(27, 27), (24, 24), (7, 5), (1, 1), (2, 9)]
WINDOWS = [2, 3, 4]
grid_ids = lambda grid: f"{grid[0]}x{grid[1]}"  # noqa: E731

# bf16 keeps 8 significant bits (unit roundoff u = 2**-8). The window sum is accumulated
# in float32 and rounded once, then divided and rounded again: at most 2u of the largest
# |input| (|x| <= 1 here), so 2**-7. (Observed: 2**-9, the final rounding.) A wrong window
# or divisor errs by O(0.1) and fails.
BF16_ATOL = 2**-7


def reference_avgpool(x: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """Loop over windows; average the tokens that exist in each."""
    height, width = grid
    tokens = x.unflatten(1, (height, width))
    pooled = []
    for top in range(0, height, window):
        for left in range(0, width, window):
            region = tokens[:, top : top + window, left : left + window]  # clipped at the edges
            pooled.append(region.flatten(1, 2).mean(dim=1))
    return torch.stack(pooled, dim=1)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("grid", GRIDS, ids=grid_ids)
def test_matches_loop_reference_float64(grid: tuple[int, int], window: int) -> None:
    x = torch.randn(2, grid[0] * grid[1], 5, dtype=torch.float64)
    out = AvgPool(window)(x, grid=grid)
    torch.testing.assert_close(out, reference_avgpool(x, grid, window), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("grid", GRIDS, ids=grid_ids)
def test_matches_ceil_mode_avg_pool2d(grid: tuple[int, int], window: int) -> None:
    # An independent statement of the edge rule: avg_pool2d with ceil_mode and no padding
    # divides each clipped window by the number of elements it covers.
    x = torch.randn(2, grid[0] * grid[1], 5, dtype=torch.float64)
    image = x.unflatten(1, grid).permute(0, 3, 1, 2)
    expected = F.avg_pool2d(image, window, stride=window, ceil_mode=True).flatten(2).transpose(1, 2)
    torch.testing.assert_close(AvgPool(window)(x, grid=grid), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("grid", GRIDS, ids=grid_ids)
def test_bfloat16_close_to_float64_reference(grid: tuple[int, int], window: int) -> None:
    x = torch.rand(2, grid[0] * grid[1], 5, dtype=torch.float64) * 2 - 1
    x_bf16 = x.to(torch.bfloat16)
    out = AvgPool(window)(x_bf16, grid=grid)
    assert out.dtype == torch.bfloat16
    # Reference on the same (bf16-rounded) inputs, so only AvgPool's own arithmetic is judged.
    expected = reference_avgpool(x_bf16.double(), grid, window)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=BF16_ATOL)


def test_edge_windows_average_fewer_tokens_by_hand() -> None:
    # 3x4 grid with window 2 -> a 2x2 grid of windows holding 4, 4, 2, 2 tokens.
    x = torch.arange(12, dtype=torch.float64).reshape(1, 12, 1)
    out = AvgPool(2)(x, grid=(3, 4)).flatten().tolist()
    assert out == [(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4, (8 + 9) / 2, (10 + 11) / 2]


def test_paper_size_shapes() -> None:
    pool = create_compressor("avgpool")
    assert isinstance(pool, AvgPool) and pool.window == 3
    assert pool.out_grid((27, 27)) == (9, 9) and pool.num_out_tokens((27, 27)) == 81
    assert pool.out_grid((7, 5)) == (3, 2)
    assert pool.out_dim(1152) == 1152
    assert AvgPool.for_dim(1152).window == 3
    assert list(pool.parameters()) == []


@pytest.mark.parametrize("grid", [(6, 6), (7, 5)], ids=grid_ids)
def test_gradcheck_float64(grid: tuple[int, int]) -> None:
    x = torch.randn(2, grid[0] * grid[1], 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda tokens: AvgPool(3)(tokens, grid=grid), (x,))


@given(
    batch=st.integers(1, 4),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    window=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_each_sample_is_independent(batch: int, height: int, width: int, window: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, height * width, 3, dtype=torch.float64, generator=generator)
    pool = AvgPool(window)
    together = pool(x, grid=(height, width))
    for index in range(batch):
        alone = pool(x[index : index + 1], grid=(height, width))
        torch.testing.assert_close(together[index : index + 1], alone, rtol=1e-12, atol=1e-12)


@given(
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    window=st.integers(1, 5),
    value=st.floats(-8, 8),
)
def test_constant_grid_stays_constant(height: int, width: int, window: int, value: float) -> None:
    # Edge windows divide by their own token count, so padding never dilutes the mean.
    x = torch.full((1, height * width, 2), value, dtype=torch.float64)
    out = AvgPool(window)(x, grid=(height, width))
    torch.testing.assert_close(out, torch.full_like(out, value), rtol=1e-12, atol=1e-12)


def test_bad_input_names_argument_and_expectation() -> None:
    pool = AvgPool(3)
    with pytest.raises(ValueError, match=r"x must have rank 3 \(B, N, C\), got shape \(36, 4\)"):
        pool(torch.randn(36, 4))
    with pytest.raises(ValueError, match=r"x has an empty batch \(B=0\); expected at least one"):
        pool(torch.randn(0, 36, 4))
    with pytest.raises(ValueError, match=r"N=35 tokens, which is not a perfect square; pass grid="):
        pool(torch.randn(1, 35, 4))
    mismatch = r"grid=\(5, 6\) holds 30 tokens but x has N=36 tokens; expected H \* W"
    with pytest.raises(ValueError, match=mismatch):
        pool(torch.randn(1, 36, 4), grid=(5, 6))
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor"):
        pool(torch.ones(1, 36, 4, dtype=torch.long))


@pytest.mark.parametrize("bad", [0, -2, 1.5, None])
def test_bad_window_is_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match=r"window must be a positive int"):
        AvgPool(bad)  # type: ignore[arg-type]
