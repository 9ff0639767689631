"""Selecting compressors (`ToMe`, `DART`, `VisionZip`) against plain loop references.

Each reference loops over samples and over tokens and states the maths as the docstrings
do; ties are constructed from one-hot tokens scaled by powers of two, whose cosines and
norms are exact in every dtype, so the tie rules are tested rather than rounding.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tokencompress import (
    DART,
    AvgPool,
    Compose,
    SelectingCompressor,
    TokenCompressor,
    ToMe,
    VisionZip,
    create_compressor,
)
from tokencompress.selection import pairwise_cosine, top_indices

grid_ids = lambda grid: f"{grid[0]}x{grid[1]}"  # noqa: E731

ODD_GRIDS = [(7, 5), (9, 9), (27, 27)]
BUDGETS = [36, 18, 9, 1]
WIDTH = 8
EPS = 1e-12  # F.normalize's floor on the norm

# bf16 keeps 8 significant bits (u = 2**-8). Decisions and means are taken in float32 and
# rounded to bf16 once, so with |x| <= 1 a merged value errs by at most u/2 of its
# magnitude plus float32 noise: 2**-8 bounds it. A wrong merge errs by O(0.1).
BF16_ATOL = 2**-8


# -- references: one sample at a time, one token at a time ------------------------------
def cosines_to(token: torch.Tensor, others: torch.Tensor) -> list[float]:
    """cos(token, o) for each row o of `others`, with a zero norm floored at EPS."""
    norms = others.norm(dim=-1).clamp_min(EPS)
    return ((others @ token) / (norms * token.norm().clamp_min(EPS))).tolist()


def first_max(values: list[float]) -> int:
    """Index of the first maximum (Python's max keeps the first of equal keys)."""
    return max(range(len(values)), key=values.__getitem__)


def reference_tome(tokens: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """ToMe rounds on one sample (N, C): size-weighted means, B's position on a merge."""
    current = [(tokens[index], 1, index) for index in range(len(tokens))]  # (mean, size, position)
    while len(current) > num_tokens:
        set_a, set_b = current[0::2], current[1::2]
        num_merges = min(len(current) - num_tokens, len(set_a))
        b_means = torch.stack([mean for mean, _, _ in set_b])
        best = []  # (similarity, matched B index) per A token
        for mean, _, _ in set_a:
            similarities = cosines_to(mean, b_means)
            match = first_max(similarities)
            best.append((similarities[match], match))
        ranked = sorted(range(len(set_a)), key=lambda index: -best[index][0])  # stable
        merged = ranked[:num_merges]
        new_b = []
        for b_index, (mean, size, position) in enumerate(set_b):
            total, count = mean * size, size
            for a_index in merged:
                if best[a_index][1] == b_index:
                    total = total + set_a[a_index][0] * set_a[a_index][1]
                    count += set_a[a_index][1]
            new_b.append((total / count, count, position))
        kept_a = [token for index, token in enumerate(set_a) if index not in merged]
        current = sorted(kept_a + new_b, key=lambda token: token[2])
    return torch.stack([mean for mean, _, _ in current]), [position for _, _, position in current]


def reference_dart(tokens: torch.Tensor, num_tokens: int, num_pivots: int) -> list[int]:
    """Positions DART keeps from one sample (N, C)."""
    norms = [float(token.norm()) for token in tokens]
    pivots = sorted(range(len(tokens)), key=lambda index: -norms[index])[:num_pivots]
    pivot_tokens = tokens[pivots]
    duplication = {
        index: max(cosines_to(tokens[index], pivot_tokens))
        for index in range(len(tokens))
        if index not in pivots
    }
    least_duplicated = sorted(duplication, key=duplication.__getitem__)  # stable, by index
    return sorted(pivots + least_duplicated[: num_tokens - num_pivots])


def reference_visionzip(
    tokens: torch.Tensor, scores: list[float], dominant: int, contextual: int
) -> tuple[torch.Tensor, list[int]]:
    """VisionZip on one sample: dominant tokens as they are, contextual means at targets."""
    ranked = sorted(range(len(tokens)), key=lambda index: -scores[index])  # stable
    dominant_positions = ranked[:dominant]
    outputs = {position: tokens[position] for position in dominant_positions}
    remaining = [index for index in range(len(tokens)) if index not in dominant_positions]
    if contextual:
        step = len(remaining) // contextual
        targets = [remaining[rank * step] for rank in range(contextual)]
        groups: dict[int, list[int]] = {target: [target] for target in targets}
        for index in remaining:
            if index not in groups:
                groups[targets[first_max(cosines_to(tokens[index], tokens[targets]))]].append(index)
        for target, group in groups.items():
            outputs[target] = sum(tokens[member] for member in group) / len(group)
    positions = sorted(outputs)
    return torch.stack([outputs[position] for position in positions]), positions


def visionzip_split(budget: int) -> tuple[int, int]:
    """A dominant/contextual split of `budget`, roughly the paper's 54 + 10."""
    contextual = budget // 6
    return budget - contextual, contextual


def run_references(
    compressor: SelectingCompressor, x: torch.Tensor, scores: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop reference of `compressor` on every sample of x, in float64."""
    tokens, positions = [], []
    for sample in range(x.shape[0]):
        sample_x = x[sample].double()
        if isinstance(compressor, ToMe):
            sample_tokens, sample_positions = reference_tome(sample_x, compressor.num_tokens)
        elif isinstance(compressor, DART):
            sample_positions = reference_dart(sample_x, compressor.num_tokens, compressor.num_pivots)
            sample_tokens = sample_x[sample_positions]
        else:
            assert isinstance(compressor, VisionZip) and scores is not None
            sample_tokens, sample_positions = reference_visionzip(
                sample_x, scores[sample].tolist(), compressor.dominant, compressor.contextual
            )
        tokens.append(sample_tokens)
        positions.append(sample_positions)
    return torch.stack(tokens), torch.tensor(positions)


def build(kind: str, budget: int) -> SelectingCompressor:
    if kind == "tome":
        return ToMe(budget)
    if kind == "dart":
        return DART(budget, num_pivots=min(3, budget))
    return VisionZip(*visionzip_split(budget))


def compress(
    compressor: SelectingCompressor, x: torch.Tensor, grid: tuple[int, int], scores: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if compressor.needs_attention_scores:
        return compressor(x, grid=grid, return_positions=True, attention_scores=scores)
    return compressor(x, grid=grid, return_positions=True)


KINDS = ["tome", "dart", "visionzip"]
# Every budget that fits each grid (a budget beyond the grid: the bad-input tests).
GRID_BUDGETS = [(grid, budget) for grid in ODD_GRIDS for budget in BUDGETS if budget <= grid[0] * grid[1]]


def grid_budget_ids(value: object) -> str:
    return grid_ids(value) if isinstance(value, tuple) else str(value)


# -- against the references -------------------------------------------------------------
@pytest.mark.parametrize("grid, budget", GRID_BUDGETS, ids=grid_budget_ids)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_loop_reference_float64(kind: str, grid: tuple[int, int], budget: int) -> None:
    num_tokens = grid[0] * grid[1]
    x = torch.randn(2, num_tokens, WIDTH, dtype=torch.float64)
    scores = torch.rand(2, num_tokens, dtype=torch.float64)
    compressor = build(kind, budget)
    tokens, positions = compress(compressor, x, grid, scores)
    expected_tokens, expected_positions = run_references(compressor, x, scores)
    assert positions.dtype == torch.int64
    assert torch.equal(positions, expected_positions)
    torch.testing.assert_close(tokens, expected_tokens, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grid, budget", GRID_BUDGETS, ids=grid_budget_ids)
@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_close_to_float64_reference(kind: str, grid: tuple[int, int], budget: int) -> None:
    num_tokens = grid[0] * grid[1]
    x = (torch.rand(2, num_tokens, WIDTH, dtype=torch.float64) * 2 - 1).to(torch.bfloat16)
    # bf16 scores tie often: the reference sees the same rounded scores, so the tie rule
    # must hold for the indices to agree.
    scores = torch.rand(2, num_tokens).to(torch.bfloat16)
    compressor = build(kind, budget)
    tokens, positions = compress(compressor, x, grid, scores)
    assert tokens.dtype == torch.bfloat16
    # Reference on the same (bf16-rounded) inputs, so only the compressor's arithmetic is
    # judged; its decisions are taken in float32, so it picks the same tokens.
    expected_tokens, expected_positions = run_references(compressor, x.double(), scores.double())
    assert torch.equal(positions, expected_positions)
    torch.testing.assert_close(tokens.double(), expected_tokens, rtol=0, atol=BF16_ATOL)


@given(
    kind=st.sampled_from(KINDS),
    batch=st.integers(1, 3),
    height=st.integers(1, 7),
    width=st.integers(1, 7),
    budget_fraction=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_matches_loop_reference_on_random_sizes(
    kind: str, batch: int, height: int, width: int, budget_fraction: float, seed: int
) -> None:
    num_tokens = height * width
    budget = max(1, round(budget_fraction * num_tokens))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, num_tokens, 3, dtype=torch.float64, generator=generator)
    scores = torch.rand(batch, num_tokens, dtype=torch.float64, generator=generator)
    compressor = build(kind, budget)
    tokens, positions = compress(compressor, x, (height, width), scores)
    expected_tokens, expected_positions = run_references(compressor, x, scores)
    assert torch.equal(positions, expected_positions)
    torch.testing.assert_close(tokens, expected_tokens, rtol=1e-12, atol=1e-12)


# -- budgets and positions -----------------------------------------------------------------
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("grid", ODD_GRIDS, ids=grid_ids)
@pytest.mark.parametrize("kind", KINDS)
def test_budget_is_exact_on_odd_grids(kind: str, grid: tuple[int, int], budget: int) -> None:
    compressor = build(kind, budget)
    num_tokens = grid[0] * grid[1]
    if budget > num_tokens:
        with pytest.raises(ValueError, match=rf"num_tokens={budget} exceeds the {num_tokens} tokens"):
            compressor.out_grid(grid)
        return
    assert compressor.out_grid(grid) == (1, budget)
    assert compressor.num_out_tokens(grid) == budget
    x = torch.randn(3, num_tokens, WIDTH)
    tokens, positions = compress(compressor, x, grid, torch.rand(3, num_tokens))
    assert tokens.shape == (3, budget, WIDTH) and positions.shape == (3, budget)


@given(
    kind=st.sampled_from(KINDS),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    budget_fraction=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_positions_ascend_and_point_at_their_tokens(
    kind: str, height: int, width: int, budget_fraction: float, seed: int
) -> None:
    num_tokens = height * width
    budget = max(1, round(budget_fraction * num_tokens))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, num_tokens, 4, dtype=torch.float64, generator=generator)
    scores = torch.rand(2, num_tokens, dtype=torch.float64, generator=generator)
    compressor = build(kind, budget)
    tokens, positions = compress(compressor, x, (height, width), scores)
    assert positions.dtype == torch.int64 and positions.shape == (2, budget)
    assert (positions.diff(dim=1) > 0).all() and positions.min() >= 0 and positions.max() < num_tokens
    kept = x.gather(1, positions.unsqueeze(-1).expand(-1, -1, 4))
    if kind == "dart":
        assert torch.equal(tokens, kept)  # a pure selection
    if kind == "visionzip":
        # The dominant tokens come through untouched, at their own positions.
        dominant = top_indices(scores, compressor.dominant)
        is_dominant = (positions.unsqueeze(-1) == dominant.unsqueeze(1)).any(dim=-1)
        assert torch.equal(tokens[is_dominant], kept[is_dominant])
    if budget == num_tokens:
        assert torch.equal(positions, torch.arange(num_tokens).expand(2, -1))
        torch.testing.assert_close(tokens, x, rtol=0, atol=0)


@given(height=st.integers(1, 9), width=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_tome_to_one_token_is_the_mean(height: int, width: int, seed: int) -> None:
    # Proportional sizes: however the rounds group the tokens, one survivor is the mean.
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, height * width, 3, dtype=torch.float64, generator=generator)
    tokens = ToMe(1)(x, grid=(height, width))
    torch.testing.assert_close(tokens, x.mean(dim=1, keepdim=True), rtol=1e-12, atol=1e-12)


def test_return_positions_does_not_change_the_tokens() -> None:
    x = torch.randn(2, 36, WIDTH)
    scores = torch.rand(2, 36)
    for compressor in [ToMe(9), DART(9), VisionZip(7, 2)]:
        extra = {"attention_scores": scores} if compressor.needs_attention_scores else {}
        tokens, _ = compressor(x, return_positions=True, **extra)
        assert torch.equal(compressor(x, **extra), tokens)


# -- ties: the lower index first --------------------------------------------------------------
def one_hot(*pairs: tuple[int, float], width: int = 4) -> torch.Tensor:
    """Tokens (1, N, width): token i is scale_i times the basis vector e_{axis_i}."""
    tokens = torch.zeros(1, len(pairs), width, dtype=torch.float64)
    for index, (axis, scale) in enumerate(pairs):
        tokens[0, index, axis] = scale
    return tokens


def test_tome_ties_go_to_the_lower_slot() -> None:
    # Slots 0..3 point along e0, slots 4, 5 along e1: every cosine is exactly 0 or 1.
    x = one_hot((0, 1.0), (0, 2.0), (0, 4.0), (0, 8.0), (1, 1.0), (1, 2.0))
    # A = slots 0, 2, 4; B = slots 1, 3, 5. Slots 0 and 2 match slots 1 and 3 equally and
    # take slot 1 (the lower B slot); all three A tokens have similarity 1, so the lower
    # A slots merge first.
    tokens, positions = ToMe(5)(x, grid=(1, 6), return_positions=True)
    assert positions.tolist() == [[1, 2, 3, 4, 5]]
    assert tokens[0, :, :2].tolist() == [[1.5, 0], [4, 0], [8, 0], [0, 1], [0, 2]]
    tokens, positions = ToMe(4)(x, grid=(1, 6), return_positions=True)
    assert positions.tolist() == [[1, 3, 4, 5]]
    torch.testing.assert_close(tokens[0, 0], torch.tensor([7 / 3, 0, 0, 0], dtype=torch.float64))
    assert torch.equal(tokens, reference_tome(x[0], 4)[0].unsqueeze(0))


def test_dart_ties_go_to_the_lower_index() -> None:
    # Equal norms: the pivot is token 0. Tokens 1, 2, 4, 5 are all orthogonal to it
    # (duplication 0) and token 3 duplicates it (1): the lowest indices fill the budget.
    x = one_hot((0, 1.0), (1, 1.0), (2, 1.0), (0, 1.0), (1, 1.0), (3, 1.0))
    _, positions = DART(3, num_pivots=1)(x, grid=(1, 6), return_positions=True)
    assert positions.tolist() == [[0, 1, 2]]
    _, positions = DART(5, num_pivots=1)(x, grid=(1, 6), return_positions=True)
    assert positions.tolist() == [[0, 1, 2, 4, 5]]
    assert positions[0].tolist() == reference_dart(x[0], 5, 1)


def test_visionzip_ties_go_to_the_lower_index_and_target() -> None:
    # Equal scores: tokens 0 and 1 are dominant. Remaining [2, 3, 4, 5], step 4 // 2 = 2:
    # targets 2 and 4. Token 3 (e2) is orthogonal to both and joins target 2, the lower;
    # token 5 (2 e1) joins target 4 (e1).
    x = one_hot((3, 1.0), (3, 2.0), (0, 1.0), (2, 1.0), (1, 1.0), (1, 2.0))
    scores = torch.ones(1, 6)
    tokens, positions = VisionZip(2, 2)(x, grid=(1, 6), return_positions=True, attention_scores=scores)
    assert positions.tolist() == [[0, 1, 2, 4]]
    assert tokens[0].tolist() == [[0, 0, 0, 1], [0, 0, 0, 2], [0.5, 0, 0.5, 0], [0, 1.5, 0, 0]]


def test_visionzip_targets_are_evenly_spaced_among_the_remaining() -> None:
    # Dominant {0, 5}; remaining [1, 2, 3, 4, 6, 7, 8, 9]; step 8 // 3 = 2: ranks 0, 2, 4.
    scores = torch.zeros(1, 10)
    scores[0, [0, 5]] = 1.0
    x = torch.randn(1, 10, 3, dtype=torch.float64)
    _, positions = VisionZip(2, 3)(x, grid=(2, 5), return_positions=True, attention_scores=scores)
    assert positions.tolist() == [[0, 1, 3, 5, 6]]


def test_top_indices_breaks_ties_by_lower_index() -> None:
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert top_indices(scores, 2).tolist() == [[1, 2]]
    assert top_indices(scores, 2, largest=False).tolist() == [[0, 3]]


def test_decisions_ignore_autocast() -> None:
    # Autocast would take the similarity matmul in bf16; decisions stay in float32.
    queries, keys = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    expected = pairwise_cosine(queries, keys)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = pairwise_cosine(queries, keys)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, expected, rtol=0, atol=0)


# -- the contract's extension ---------------------------------------------------------------------
def test_flags_sizes_and_configs() -> None:
    assert TokenCompressor.selects_tokens is False and TokenCompressor.needs_attention_scores is False
    assert AvgPool.selects_tokens is False
    for compressor in [ToMe(9), DART(9), VisionZip(7, 2)]:
        assert isinstance(compressor, SelectingCompressor) and compressor.selects_tokens
        assert compressor.needs_attention_scores is isinstance(compressor, VisionZip)
        assert compressor.num_tokens == 9
        assert compressor.out_grid((27, 27)) == (1, 9) and compressor.num_out_tokens((3, 3)) == 9
        assert compressor.out_dim(1152) == 1152
        assert list(compressor.parameters()) == []
        rebuilt = type(compressor).from_config(compressor.get_config())
        assert rebuilt.get_config() == compressor.get_config()
    assert DART(9).num_pivots == 4 and DART(2).get_config() == {"num_tokens": 2, "num_pivots": 2}
    assert create_compressor("visionzip", dominant=54, contextual=10).num_tokens == 64
    assert create_compressor("tome", num_tokens=64).num_out_tokens((27, 27)) == 64


@pytest.mark.parametrize("grid", [(6, 6), (7, 5)], ids=grid_ids)
def test_gradcheck_float64(grid: tuple[int, int]) -> None:
    # Selections are piecewise constant; away from ties the merged values are smooth.
    x = torch.randn(2, grid[0] * grid[1], 3, dtype=torch.float64, requires_grad=True)
    scores = torch.rand(2, grid[0] * grid[1], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda tokens: ToMe(5)(tokens, grid=grid), (x,))
    assert torch.autograd.gradcheck(lambda tokens: DART(5)(tokens, grid=grid), (x,))
    visionzip = VisionZip(3, 2)
    assert torch.autograd.gradcheck(
        lambda tokens: visionzip(tokens, grid=grid, attention_scores=scores), (x,)
    )


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_budget_beyond_the_grid_names_it(kind: str) -> None:
    compressor = build(kind, 36)
    message = r"num_tokens=36 exceeds the 35 tokens of grid=\(7, 5\) \(H\*W=35\); expected num_tokens <= H\*W"
    with pytest.raises(ValueError, match=message):
        compressor.out_grid((7, 5))
    with pytest.raises(ValueError, match=message):
        compress(compressor, torch.randn(1, 35, 4), (7, 5), torch.rand(1, 35))


BAD_BUDGETS = [0, -3, 2.0, 1.5, True, "4", None]


@pytest.mark.parametrize("bad", BAD_BUDGETS, ids=repr)
def test_bad_budget_names_argument_and_value(bad: object) -> None:
    message = rf"num_tokens must be a positive int, got {re.escape(repr(bad))}"
    with pytest.raises(ValueError, match=message):
        ToMe(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        DART(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"dominant must be a positive int, got {re.escape(repr(bad))}"):
        VisionZip(bad, 2)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, 2.0, True, None], ids=repr)
def test_bad_contextual_names_argument_and_value(bad: object) -> None:
    with pytest.raises(ValueError, match=rf"contextual must be an int >= 0, got {re.escape(repr(bad))}"):
        VisionZip(4, bad)  # type: ignore[arg-type]
    assert VisionZip(4, 0).num_tokens == 4  # no contextual tokens is a valid choice


@pytest.mark.parametrize("bad", [0, -1, 9, 2.0, True], ids=repr)
def test_num_pivots_out_of_range_names_argument_and_value(bad: object) -> None:
    message = rf"num_pivots must be an int in 1..num_tokens=8, got {re.escape(repr(bad))}"
    with pytest.raises(ValueError, match=message):
        DART(8, num_pivots=bad)  # type: ignore[arg-type]
    assert DART(8, num_pivots=8).num_pivots == 8


def test_attention_scores_are_checked() -> None:
    x = torch.randn(2, 36, 4)
    visionzip = VisionZip(4, 2)
    with pytest.raises(ValueError, match=r"VisionZip needs attention_scores: .* the graft provides"):
        visionzip(x)
    expected = re.escape("attention_scores must have shape (B, N) = (2, 36) to match x, got shape")
    for shape in [(2, 37), (1, 36), (2, 36, 1), (36,)]:
        with pytest.raises(ValueError, match=rf"{expected} {re.escape(str(shape))}"):
            visionzip(x, attention_scores=torch.rand(shape))
    not_float = r"attention_scores must be a floating-point tensor, got dtype torch.int64"
    with pytest.raises(ValueError, match=not_float):
        visionzip(x, attention_scores=torch.ones(2, 36, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_scores is on meta but x is on cpu; expected one device"):
        visionzip(x, attention_scores=torch.empty(2, 36, device="meta"))
    with pytest.raises(TypeError, match=r"attention_scores must be a torch.Tensor"):
        visionzip(x, attention_scores=[[1.0] * 36] * 2)
    # Compressors that do not use scores refuse them rather than ignore them silently.
    for compressor in [ToMe(4), DART(4)]:
        name = type(compressor).__name__
        with pytest.raises(ValueError, match=rf"{name} does not use attention_scores"):
            compressor(x, attention_scores=torch.rand(2, 36))


@pytest.mark.parametrize("stage", [ToMe(4), DART(4), VisionZip(2, 1)], ids=lambda stage: type(stage).__name__)
def test_compose_refuses_a_selecting_stage(stage: TokenCompressor) -> None:
    with pytest.raises(ValueError, match=f"Compose argument 1 is {type(stage).__name__}, a selecting compressor"):
        Compose(AvgPool(2), stage)
