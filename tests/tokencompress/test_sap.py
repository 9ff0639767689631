"""`SAP` against a plain loop over windows, plus gradients, properties and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tokencompress import SAP, AvgPool, Compose, PixelShuffle, create_compressor

GRIDS = [(27, 27), (24, 24), (7, 5), (1, 1), (2, 9)]
WINDOWS = [2, 3, 4]
DIM = 8
grid_ids = lambda grid: f"{grid[0]}x{grid[1]}"  # noqa: E731

# bf16 (unit roundoff u = 2**-8) against a float64 run of the same bf16 weights and inputs
# (|x| <= 1). Rounding the hidden layer and the score (fp32 accumulation) costs each score
# u * (|score| + sum_j |w_j h_j|) <= 5u for these weights; a softmax weight then moves by
# at most twice the largest score error relative to itself, so the pooled token by
# <= 10u * max|x|; casting the weights to bf16 and rounding the output add 2u. Total 12u
# ~= 0.047, a worst case (observed: ~1.2u). A softmax over the wrong tokens (padding, a
# wrong window) errs by O(0.1) and fails.
BF16_ATOL = 12 * 2**-8


def make_sap(dim: int = DIM, window: int = 3, seed: int = 0, dtype: torch.dtype = torch.float64) -> SAP:
    """An eval-mode SAP whose scores spread enough to make the weights far from uniform."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sap = SAP(dim, window=window)
        with torch.no_grad():
            sap.score[3].weight.mul_(3.0)
    return sap.to(dtype).eval()


def window_ids(grid: tuple[int, int], window: int) -> torch.Tensor:
    """Each token's window index (row-major over windows), by plain arithmetic."""
    height, width = grid
    cols = -(-width // window)
    ids = [(i // window) * cols + j // window for i in range(height) for j in range(width)]
    return torch.tensor(ids)


def reference_sap(sap: SAP, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop over windows as the release does: score, softmax and sum the tokens that exist."""
    window, (height, width) = sap.window, grid
    tokens = x.unflatten(1, grid)
    weights = torch.zeros(x.shape[0], height, width, dtype=x.dtype)
    pooled = []
    for top in range(0, height, window):
        for left in range(0, width, window):
            region = tokens[:, top : top + window, left : left + window]  # clipped at the edges
            rows, cols = region.shape[1:3]
            region = region.flatten(1, 2)
            alpha = sap.score(region).softmax(dim=1)  # (B, tokens in window, 1)
            pooled.append((alpha * region).sum(dim=1))
            weights[:, top : top + rows, left : left + cols] = alpha.reshape(-1, rows, cols)
    return torch.stack(pooled, dim=1), weights.flatten(1)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("grid", GRIDS, ids=grid_ids)
def test_matches_loop_reference_float64(grid: tuple[int, int], window: int) -> None:
    sap = make_sap(window=window)
    x = torch.randn(2, grid[0] * grid[1], DIM, dtype=torch.float64)
    tokens, weights = sap(x, grid=grid, return_weights=True)
    expected_tokens, expected_weights = reference_sap(sap, x, grid)
    torch.testing.assert_close(tokens, expected_tokens, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sap(x, grid=grid), tokens, rtol=0, atol=0)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("grid", GRIDS, ids=grid_ids)
def test_bfloat16_close_to_float64_reference(grid: tuple[int, int], window: int) -> None:
    sap = make_sap(window=window, dtype=torch.bfloat16)
    x = (torch.rand(2, grid[0] * grid[1], DIM, dtype=torch.float64) * 2 - 1).to(torch.bfloat16)
    tokens, weights = sap(x, grid=grid, return_weights=True)
    assert tokens.dtype == weights.dtype == torch.bfloat16
    # Same bf16 weights and inputs in float64: only SAP's own bf16 arithmetic is judged.
    expected_tokens, expected_weights = reference_sap(copy.deepcopy(sap).double(), x.double(), grid)
    torch.testing.assert_close(tokens.double(), expected_tokens, rtol=0, atol=BF16_ATOL)
    torch.testing.assert_close(weights.double(), expected_weights, rtol=0, atol=BF16_ATOL)


def test_bfloat16_softmax_is_taken_in_float32() -> None:
    sap = make_sap(window=3, dtype=torch.bfloat16)
    x = torch.randn(2, 49, DIM, dtype=torch.bfloat16)
    _, weights = sap(x, grid=(7, 7), return_weights=True)
    scores = sap.score(x).squeeze(-1).float()  # the same bf16 scores SAP computes
    ids = window_ids((7, 7), 3)
    expected = torch.empty(2, 49)
    for window_index in range(int(ids.max()) + 1):
        members = ids == window_index
        expected[:, members] = scores[:, members].softmax(dim=-1)
    assert torch.equal(weights, expected.to(torch.bfloat16))  # float32 softmax, one rounding


def test_weights_are_far_from_uniform() -> None:
    # Guards the tests above: with near-uniform weights SAP would be hard to tell from AvgPool.
    sap = make_sap(window=3)
    with torch.no_grad():
        _, weights = sap(torch.randn(2, 81, DIM, dtype=torch.float64), grid=(9, 9), return_weights=True)
    assert float(weights.max()) > 0.3 and float(weights.min()) < 0.05


@pytest.mark.parametrize("grid", [(9, 9), (7, 5), (2, 9)], ids=grid_ids)
def test_returned_weights_sum_to_one_and_rebuild_tokens(grid: tuple[int, int]) -> None:
    sap = make_sap(window=3)
    x = torch.randn(3, grid[0] * grid[1], DIM, dtype=torch.float64)
    tokens, weights = sap(x, grid=grid, return_weights=True)
    ids = window_ids(grid, 3)
    num_windows = sap.num_out_tokens(grid)
    assert weights.shape == (3, grid[0] * grid[1])
    assert bool((weights > 0).all())
    sums = torch.zeros(3, num_windows, dtype=torch.float64).index_add_(1, ids, weights)
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-12)
    rebuilt = torch.zeros(3, num_windows, DIM, dtype=torch.float64)
    rebuilt.index_add_(1, ids, weights[..., None] * x)
    torch.testing.assert_close(tokens, rebuilt, rtol=1e-12, atol=1e-12)


def test_single_token_windows_get_weight_one() -> None:
    # 5x5 with window 2: the bottom-right window holds token (4, 4) alone, so its softmax
    # is over that one token (padding would dilute it); a 1x1 grid is one such window.
    sap = make_sap(window=2)
    x = torch.randn(2, 25, DIM, dtype=torch.float64)
    tokens, weights = sap(x, grid=(5, 5), return_weights=True)
    assert torch.equal(weights[:, 24], torch.ones(2, dtype=torch.float64))
    assert torch.equal(tokens[:, -1], x[:, 24])
    tokens, weights = sap(x[:, :1], grid=(1, 1), return_weights=True)
    assert torch.equal(weights, torch.ones(2, 1, dtype=torch.float64))
    assert torch.equal(tokens, x[:, :1])


def test_paper_size_and_checkpoint_layout() -> None:
    sap = SAP(1152)
    assert sum(p.numel() for p in sap.parameters()) == 1_329_409  # the paper's "1.33M"
    assert [type(layer).__name__ for layer in sap.score] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert sap.score[2].p == 0.1
    assert sap.out_grid((27, 27)) == (9, 9) and sap.num_out_tokens((27, 27)) == 81
    assert sap.out_dim(1152) == 1152
    assert SAP(16, hidden_dim=4).score[0].out_features == 4
    # The release names the MLP `mlp`; its keys load after renaming the prefix.
    small = SAP(6)
    release_state = {key.replace("score.", "mlp."): value for key, value in small.state_dict().items()}
    assert sorted(release_state) == ["mlp.0.bias", "mlp.0.weight", "mlp.3.bias", "mlp.3.weight"]
    loaded = SAP(6)
    loaded.load_state_dict({key.replace("mlp.", "score.", 1): val for key, val in release_state.items()})
    assert all(torch.equal(a, b) for a, b in zip(small.parameters(), loaded.parameters()))


def test_registry_and_for_dim() -> None:
    sap = create_compressor("sap", dim=12, window=2)
    assert isinstance(sap, SAP) and sap.window == 2 and sap.in_dim == 12
    default = SAP.for_dim(12)
    assert default.window == 3 and default.score[0].out_features == 12


def test_dropout_acts_in_training_only() -> None:
    x = torch.randn(2, 36, DIM, dtype=torch.float64)
    sap = make_sap(window=3)
    sap.score[2].p = 0.5
    eval_out = sap(x)
    assert not torch.allclose(sap.train()(x), eval_out)
    sap.score[2].p = 0.0
    torch.testing.assert_close(sap(x), eval_out, rtol=0, atol=0)


@pytest.mark.parametrize("grid", [(4, 4), (5, 3)], ids=grid_ids)
def test_gradcheck_float64_inputs_and_parameters(grid: tuple[int, int]) -> None:
    sap = make_sap(dim=3, window=2)
    names = [name for name, _ in sap.named_parameters()]
    params = [param.detach().clone().requires_grad_() for param in sap.parameters()]
    x = torch.randn(2, grid[0] * grid[1], 3, dtype=torch.float64, requires_grad=True)

    def run(tokens: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = dict(zip(names, values))
        return torch.func.functional_call(sap, state, (tokens,), {"grid": grid, "return_weights": True})

    assert torch.autograd.gradcheck(run, (x, *params))


@st.composite
def grids_and_windows(draw: st.DrawFn) -> tuple[int, int, int, int]:
    height, width = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    return height, width, draw(st.integers(1, 4)), draw(st.integers(0, 2**16))


@given(grids_and_windows())
def test_invariant_to_permuting_tokens_within_a_window(case: tuple[int, int, int, int]) -> None:
    height, width, window, seed = case
    generator = torch.Generator().manual_seed(seed)
    sap = make_sap(window=window, seed=seed)
    x = torch.randn(2, height * width, DIM, dtype=torch.float64, generator=generator)
    ids = window_ids((height, width), window)
    permutation = torch.arange(height * width)
    for window_index in range(int(ids.max()) + 1):
        members = torch.nonzero(ids == window_index).flatten()
        permutation[members] = members[torch.randperm(len(members), generator=generator)]
    tokens, weights = sap(x, grid=(height, width), return_weights=True)
    shuffled_tokens, shuffled_weights = sap(x[:, permutation], grid=(height, width), return_weights=True)
    torch.testing.assert_close(shuffled_tokens, tokens, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shuffled_weights, weights[:, permutation], rtol=1e-12, atol=1e-12)


@given(grids_and_windows())
def test_zero_score_mlp_equals_avgpool(case: tuple[int, int, int, int]) -> None:
    height, width, window, seed = case
    generator = torch.Generator().manual_seed(seed)
    sap = make_sap(window=window, seed=seed)
    with torch.no_grad():
        sap.score[3].weight.zero_()  # every score is the bias: uniform over each window's real tokens
    x = torch.randn(2, height * width, DIM, dtype=torch.float64, generator=generator)
    expected = AvgPool(window)(x, grid=(height, width))
    torch.testing.assert_close(sap(x, grid=(height, width)), expected, rtol=1e-12, atol=1e-12)


@given(grids_and_windows(), st.integers(1, 4))
def test_each_sample_is_independent(case: tuple[int, int, int, int], batch: int) -> None:
    height, width, window, seed = case
    generator = torch.Generator().manual_seed(seed)
    sap = make_sap(window=window, seed=seed)
    x = torch.randn(batch, height * width, DIM, dtype=torch.float64, generator=generator)
    together, together_weights = sap(x, grid=(height, width), return_weights=True)
    for index in range(batch):
        alone, alone_weights = sap(x[index : index + 1], grid=(height, width), return_weights=True)
        torch.testing.assert_close(together[index : index + 1], alone, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            together_weights[index : index + 1], alone_weights, rtol=1e-12, atol=1e-12
        )


def test_compose_passes_return_weights_to_sap() -> None:
    sap = make_sap(dim=4 * DIM, window=2)
    chain = Compose(PixelShuffle(2, pad=True), sap)
    x = torch.randn(2, 49, DIM, dtype=torch.float64)
    tokens, weights = chain(x, grid=(7, 7), return_weights=True)
    assert chain.out_grid((7, 7)) == (2, 2) and tokens.shape == (2, 4, 4 * DIM)
    folded = PixelShuffle(2, pad=True)(x, grid=(7, 7))
    expected_tokens, expected_weights = reference_sap(sap, folded, (4, 4))
    torch.testing.assert_close(tokens, expected_tokens, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-12, atol=1e-12)


def test_bad_input_names_argument_and_expectation() -> None:
    sap = SAP(DIM).eval()
    with pytest.raises(ValueError, match=r"x must have rank 3 \(B, N, C\), got shape \(36, 8\)"):
        sap(torch.randn(36, DIM))
    with pytest.raises(ValueError, match=r"x has width C=9, expected C=8"):
        sap(torch.randn(1, 36, DIM + 1))
    mismatch = r"grid=\(5, 6\) holds 30 tokens but x has N=36 tokens; expected H \* W"
    with pytest.raises(ValueError, match=mismatch):
        sap(torch.randn(1, 36, DIM), grid=(5, 6))
    with pytest.raises(ValueError, match=r"N=35 tokens, which is not a perfect square; pass grid="):
        sap(torch.randn(1, 35, DIM))
    with pytest.raises(ValueError, match=r"dtype torch.bfloat16 .* expected x.dtype == torch.float32"):
        sap(torch.randn(1, 36, DIM, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"x has an empty batch \(B=0\); expected at least one"):
        sap(torch.randn(0, 36, DIM))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 0}, r"dim must be a positive int, got 0"),
        ({"dim": 8, "window": 0}, r"window must be a positive int, got 0"),
        ({"dim": 8, "hidden_dim": 0}, r"hidden_dim must be a positive int or None, got 0"),
        ({"dim": 8, "dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SAP(**kwargs)
