"""The compressor contract, checked for every registered compressor.

Parametrized over `list_compressors()`: a compressor registered tomorrow is tested here
the day it lands, through its `for_dim` constructor.
"""

from __future__ import annotations

import json

import pytest
import torch

from tokencompress import TokenCompressor, list_compressors
from tokencompress.registry import compressor_from_config, compressor_to_config, get_compressor_class

GRIDS = [(27, 27), (24, 24), (7, 5), (1, 1), (2, 9)]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
WIDTH = 16


def build(name: str, dtype: torch.dtype = torch.float32) -> TokenCompressor:
    torch.manual_seed(0)
    return get_compressor_class(name).for_dim(WIDTH).to(dtype).eval()


def run(compressor: TokenCompressor, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """`compressor(x, grid=grid)`, with attention scores for compressors that need them."""
    if not compressor.needs_attention_scores:
        return compressor(x, grid=grid)
    # Scores that are a function of each sample's own tokens: a sample run alone gets the
    # scores it gets in its batch, and they follow x onto any device and dtype.
    scores = x.detach().square().mean(dim=-1).softmax(dim=-1)
    return compressor(x, grid=grid, attention_scores=scores)


def supports(compressor: TokenCompressor, grid: tuple[int, int]) -> bool:
    try:
        compressor.out_grid(grid)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("name", list_compressors())
def test_registered_class_is_a_compressor(name: str) -> None:
    cls = get_compressor_class(name)
    assert issubclass(cls, TokenCompressor)
    assert cls.registry_name == name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("name", list_compressors())
def test_output_follows_contract(name: str, grid: tuple[int, int], dtype: torch.dtype) -> None:
    compressor = build(name, dtype)
    x = torch.randn(2, grid[0] * grid[1], WIDTH, dtype=dtype)
    if not supports(compressor, grid):
        # A compressor may reject a grid, but then forward rejects it the same way.
        with pytest.raises(ValueError, match="grid"):
            run(compressor, x, grid)
        return
    out = run(compressor, x, grid)
    height, width = compressor.out_grid(grid)
    assert out.shape == (2, height * width, compressor.out_dim(WIDTH))
    assert compressor.num_out_tokens(grid) == height * width == out.shape[1]
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("name", list_compressors())
def test_gradients_reach_inputs_and_parameters(name: str, grid: tuple[int, int]) -> None:
    compressor = build(name, torch.float64)
    if not supports(compressor, grid):
        pytest.skip(f"{name} rejects grid {grid} by contract")
    x = torch.randn(2, grid[0] * grid[1], WIDTH, dtype=torch.float64, requires_grad=True)
    out = run(compressor, x, grid)
    # A random projection of the output, so no gradient vanishes by symmetry.
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    params = [p for p in compressor.parameters() if p.requires_grad]
    for param in params:
        assert param.grad is not None and torch.isfinite(param.grad).all()
    # On tiny grids a window may hold a single token: its softmax weight is exactly 1 and
    # a score network legitimately gets no gradient. Large grids must move the parameters.
    if params and min(grid) >= 6:
        assert sum(float(p.grad.abs().sum()) for p in params) > 0


@pytest.mark.parametrize("name", list_compressors())
def test_sample_independence(name: str) -> None:
    """Each sample's output depends on that sample only (no batch statistics)."""
    compressor = build(name, torch.float64)
    grid = (6, 6)
    x = torch.randn(3, 36, WIDTH, dtype=torch.float64)
    together = run(compressor, x, grid)
    for index in range(3):
        alone = run(compressor, x[index : index + 1], grid)
        torch.testing.assert_close(together[index : index + 1], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list_compressors())
def test_square_grid_is_inferred(name: str) -> None:
    compressor = build(name, torch.float64)
    x = torch.randn(1, 36, WIDTH, dtype=torch.float64)
    torch.testing.assert_close(run(compressor, x), run(compressor, x, (6, 6)), rtol=0, atol=0)


@pytest.mark.parametrize("name", list_compressors())
def test_bad_input_is_rejected_with_named_argument(name: str) -> None:
    compressor = build(name)
    with pytest.raises(ValueError, match=r"rank 3"):
        compressor(torch.randn(36, WIDTH))
    with pytest.raises(ValueError, match=r"empty batch"):
        compressor(torch.randn(0, 36, WIDTH))
    with pytest.raises(ValueError, match=r"not a perfect square"):
        compressor(torch.randn(1, 35, WIDTH))
    with pytest.raises(ValueError, match=r"grid=\(5, 5\) holds 25 tokens but x has N=36"):
        compressor(torch.randn(1, 36, WIDTH), grid=(5, 5))
    with pytest.raises(ValueError, match=r"grid must be a pair of positive ints"):
        compressor(torch.randn(1, 36, WIDTH), grid=(6, 0))
    if compressor.in_dim is not None:
        with pytest.raises(ValueError, match=rf"width C={WIDTH + 1}, expected C={WIDTH}"):
            compressor(torch.randn(1, 36, WIDTH + 1))
    if any(p.is_floating_point() for p in compressor.parameters()):
        with pytest.raises(ValueError, match=r"dtype torch.float64 .* expected x.dtype == torch.float32"):
            compressor(torch.randn(1, 36, WIDTH, dtype=torch.float64))


@pytest.mark.parametrize("name", list_compressors())
def test_config_round_trip_rebuilds_the_same_compressor(name: str) -> None:
    compressor = build(name)
    config = compressor_to_config(compressor)
    assert config["name"] == name
    rebuilt = compressor_from_config(json.loads(json.dumps(config))).eval()
    assert type(rebuilt) is type(compressor)
    assert compressor_to_config(rebuilt) == config
    # Same settings: same parameter shapes, and the same maths once weights are copied.
    rebuilt.load_state_dict(compressor.state_dict())
    x = torch.randn(2, 36, WIDTH)
    torch.testing.assert_close(run(rebuilt, x, (6, 6)), run(compressor, x, (6, 6)), rtol=0, atol=0)


def test_unregistered_subclass_has_no_config() -> None:
    class Shadow(get_compressor_class("avgpool")):
        pass

    with pytest.raises(ValueError, match="Shadow: its class is not registered"):
        compressor_to_config(Shadow())


@pytest.mark.parametrize("name", list_compressors())
def test_runs_on_the_meta_device(name: str) -> None:
    """Profilers build full-size models on `meta` and count FLOPs without memory."""
    with torch.device("meta"):
        compressor = get_compressor_class(name).for_dim(WIDTH)
        out = run(compressor, torch.empty(2, 36, WIDTH), (6, 6))
    assert out.device.type == "meta"
    assert out.shape == (2, compressor.num_out_tokens((6, 6)), compressor.out_dim(WIDTH))
