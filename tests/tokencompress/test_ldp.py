"""LDP and LDPv2 against plain references written from the maths.

The references below use no conv or pooling op: the depthwise conv is a loop over
output positions and kernel taps, adaptive pooling a loop over output cells with
PyTorch's documented bounds [floor(i*H/H'), ceil((i+1)*H/H')), LayerNorm and the
activations explicit formulas. They run in (B, H, W, C) layout, independent of the
modules' (B, C, H, W) plumbing.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tokencompress import LDP, LDPv2, create_compressor, list_compressors
from tokencompress.ldp import make_divisible

GRIDS = [(27, 27), (24, 24), (7, 5), (1, 1), (2, 9)]
GRID_IDS = [f"{h}x{w}" for h, w in GRIDS]
IN_DIM, OUT_DIM = 12, 16


# -- plain references -------------------------------------------------------------------
def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def hardswish(x: torch.Tensor) -> torch.Tensor:
    return x * hardsigmoid(x)


def hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """LayerNorm over the last axis with the biased variance."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def depthwise_conv3x3(x: torch.Tensor, kernel: torch.Tensor, stride: int) -> torch.Tensor:
    """x (B, H, W, C), kernel (C, 1, 3, 3), zero padding 1: loop over outputs and taps."""
    batch, height, width, channels = x.shape
    out_h, out_w = math.ceil(height / stride), math.ceil(width / stride)
    out = x.new_zeros(batch, out_h, out_w, channels)
    for i in range(out_h):
        for j in range(out_w):
            for di in range(3):
                for dj in range(3):
                    row, col = i * stride + di - 1, j * stride + dj - 1
                    if 0 <= row < height and 0 <= col < width:
                        out[:, i, j] += x[:, row, col] * kernel[:, 0, di, dj]
    return out


def adaptive_avg_pool(x: torch.Tensor, out_grid: tuple[int, int]) -> torch.Tensor:
    """x (B, H, W, C) -> (B, H', W', C), each cell the mean of its input window."""
    batch, height, width, channels = x.shape
    out_h, out_w = out_grid
    out = x.new_zeros(batch, out_h, out_w, channels)
    for i in range(out_h):
        top, bottom = (i * height) // out_h, -(-(i + 1) * height // out_h)
        for j in range(out_w):
            left, right = (j * width) // out_w, -(-(j + 1) * width // out_w)
            out[:, i, j] = x[:, top:bottom, left:right].mean(dim=(1, 2))
    return out


def mlp(x: torch.Tensor, model: LDP | LDPv2) -> torch.Tensor:
    hidden = gelu(x @ model.fc1.weight.T + model.fc1.bias)
    return hidden @ model.fc2.weight.T + model.fc2.bias


def ldp_reference(model: LDP, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    z = mlp(x, model).unflatten(1, grid)  # (B, H, W, C)
    # MobileVLM v1: a stride-1 block (with residual), then a stride-2 block (without).
    for block, stride in zip(model.blocks, (1, 2), strict=True):
        y = hardswish(layer_norm(depthwise_conv3x3(z, block.depthwise.weight, stride), block.depthwise_norm))
        se = block.squeeze_excitation
        scale = torch.relu(y.mean(dim=(1, 2)) @ se.reduce.weight[:, :, 0, 0].T + se.reduce.bias)
        scale = hardsigmoid(scale @ se.expand.weight[:, :, 0, 0].T + se.expand.bias)
        y = y * scale[:, None, None, :]
        y = layer_norm(y @ block.project.weight[:, :, 0, 0].T, block.project_norm)
        z = z + y if stride == 1 else y
    return z.flatten(1, 2)


def ldpv2_reference(model: LDPv2, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    z = adaptive_avg_pool(mlp(x, model).unflatten(1, grid), model.pooled_grid)
    z = z + depthwise_conv3x3(z, model.position_conv.weight, stride=1) + model.position_conv.bias
    return z.flatten(1, 2)


# -- helpers ----------------------------------------------------------------------------
def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every parameter, so LayerNorm affines and zero biases are exercised."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model


def build(kind: str, dtype: torch.dtype = torch.float64) -> LDP | LDPv2:
    model = LDP(IN_DIM, OUT_DIM) if kind == "ldp" else LDPv2(IN_DIM, OUT_DIM, out_grid=(4, 3))
    return randomized(model).to(dtype)


REFERENCES = {"ldp": ldp_reference, "ldpv2": ldpv2_reference}


# -- equality with the references -------------------------------------------------------
@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
@pytest.mark.parametrize("kind", ["ldp", "ldpv2"])
def test_matches_plain_reference_in_float64(kind: str, grid: tuple[int, int]) -> None:
    model = build(kind)
    x = torch.randn(2, grid[0] * grid[1], IN_DIM, dtype=torch.float64)
    out = model(x, grid=grid)
    expected = REFERENCES[kind](model, x, grid)
    assert out.shape == expected.shape == (2, model.num_out_tokens(grid), OUT_DIM)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grid", [(27, 27), (12, 12), (7, 5), (1, 1)], ids=str)
def test_ldpv2_default_grid_matches_reference(grid: tuple[int, int]) -> None:
    # Covers both orders of fc2 and pooling (fewer and more output tokens than input).
    model = randomized(LDPv2(IN_DIM, OUT_DIM)).double()
    x = torch.randn(1, grid[0] * grid[1], IN_DIM, dtype=torch.float64)
    torch.testing.assert_close(model(x, grid=grid), ldpv2_reference(model, x, grid), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["ldp", "ldpv2"])
def test_bfloat16_is_close_to_float64(kind: str) -> None:
    """bf16 keeps 8 significant bits: unit roundoff u = 2**-8 ~ 3.9e-3 per rounding.

    CPU kernels accumulate bf16 matmuls and reductions in fp32 and round once per op,
    so each op adds about u of relative error. The float64 reference gets the same
    bf16-rounded inputs and weights, so only arithmetic error is measured. LDP chains
    ~16 rounded ops (2 linears and GELU, then per block conv, LN, hardswish, SE gate,
    1x1 conv, LN, residual), LDPv2 ~7; independent roundings add up like sqrt(ops) * u,
    so the bound is 4u (~0.016) relative L2 error. Measured: ~1.8u (LDP), ~0.8u (LDPv2).
    """
    model16 = build(kind, torch.bfloat16)
    model64 = copy.deepcopy(model16).double()  # the same bf16-representable weights
    grid = (27, 27)
    x16 = torch.randn(4, 729, IN_DIM).to(torch.bfloat16)
    expected = model64(x16.double(), grid=grid)
    out = model16(x16, grid=grid)
    assert out.dtype == torch.bfloat16
    relative_error = (out.double() - expected).norm() / expected.norm()
    assert relative_error < 4 * 2.0**-8, f"relative L2 error {relative_error:.3e}"


# -- gradients --------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(7, 5), (1, 1)], ids=str)
@pytest.mark.parametrize("kind", ["ldp", "ldpv2"])
def test_gradients_reach_input_and_every_parameter(kind: str, grid: tuple[int, int]) -> None:
    model = build(kind)
    x = torch.randn(2, grid[0] * grid[1], IN_DIM, dtype=torch.float64, requires_grad=True)
    out = model(x, grid=grid)
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["ldp", "ldpv2"])
def test_gradcheck(kind: str) -> None:
    model = LDP(3, 8) if kind == "ldp" else LDPv2(3, 8, out_grid=(2, 2))
    model = randomized(model).double()
    x = torch.randn(1, 12, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: model(t, grid=(3, 4)), (x,), eps=1e-6, atol=1e-7)


# -- sizes answered without running -----------------------------------------------------
@pytest.mark.parametrize(
    ("grid", "expected"),
    [((27, 27), (14, 14)), ((24, 24), (12, 12)), ((7, 5), (4, 3)), ((1, 1), (1, 1)), ((2, 9), (1, 5))],
)
def test_ldp_out_grid_is_ceil_half(grid: tuple[int, int], expected: tuple[int, int]) -> None:
    with torch.device("meta"):  # no storage: the sizes come from the arithmetic alone
        model = LDP(1152, 2560)
    assert model.out_grid(grid) == expected
    assert model.num_out_tokens(grid) == expected[0] * expected[1]
    assert model.out_dim(1152) == 2560


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_ldpv2_out_grid_ignores_input_grid(grid: tuple[int, int]) -> None:
    with torch.device("meta"):
        assert LDPv2(1152, 2560).out_grid(grid) == (12, 12)
        assert LDPv2(1152, 2560, out_grid=(3, 5)).num_out_tokens(grid) == 15


# -- parameters -------------------------------------------------------------------------
def ldp_parameter_count(c_in: int, c_out: int) -> int:
    """By hand: MLP, then per block depthwise 3x3 (no bias), 2 LayerNorms,
    squeeze-excitation (two biased 1x1 convs through s channels), projection 1x1."""
    squeeze = make_divisible(c_out // 4)
    mlp = c_in * c_out + c_out + c_out * c_out + c_out
    block = 9 * c_out + 2 * (2 * c_out) + (c_out * squeeze + squeeze) + (squeeze * c_out + c_out) + c_out * c_out
    return mlp + 2 * block


@pytest.mark.parametrize(("c_in", "c_out"), [(1152, 2560), (1024, 2048), (12, 16), (7, 20)])
def test_parameter_counts(c_in: int, c_out: int) -> None:
    with torch.device("meta"):
        ldp, ldpv2 = LDP(c_in, c_out), LDPv2(c_in, c_out)
    assert sum(p.numel() for p in ldp.parameters()) == ldp_parameter_count(c_in, c_out)
    mlp = c_in * c_out + c_out + c_out * c_out + c_out
    assert sum(p.numel() for p in ldpv2.parameters()) == mlp + 9 * c_out + c_out


def test_paper_sizes_parameter_counts() -> None:
    # 2560 -> squeeze 640: 9.51M (MLP) + 2 x 9.87M (blocks) = 29.24M; LDPv2 = MLP + 25.6k.
    with torch.device("meta"):
        assert sum(p.numel() for p in LDP(1152, 2560).parameters()) == 29_241_600
        assert sum(p.numel() for p in LDPv2(1152, 2560).parameters()) == 9_533_440


@pytest.mark.parametrize(("value", "expected"), [(640, 640), (4, 8), (5, 8), (12, 16), (11, 16), (35, 32), (1, 8)])
def test_make_divisible(value: int, expected: int) -> None:
    assert make_divisible(value) == expected


# -- construction, registry, errors -----------------------------------------------------
def test_registry_and_for_dim() -> None:
    assert {"ldp", "ldpv2"} <= set(list_compressors())
    assert isinstance(create_compressor("ldp", in_dim=8, out_dim=16), LDP)
    ldpv2 = create_compressor("ldpv2", in_dim=8, out_dim=16, out_grid=(2, 2))
    assert isinstance(ldpv2, LDPv2) and ldpv2.out_grid((9, 9)) == (2, 2)
    for cls in (LDP, LDPv2):
        model = cls.for_dim(24)
        assert model.in_dim == 24 and model.out_dim(24) == 24
    assert LDPv2.for_dim(24).out_grid((27, 27)) == (12, 12)


@pytest.mark.parametrize("cls", [LDP, LDPv2])
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_dim": 0, "out_dim": 8}, r"in_dim must be a positive int, got 0"),
        ({"in_dim": 8, "out_dim": 2.5}, r"out_dim must be a positive int, got 2.5"),
        ({"in_dim": True, "out_dim": 8}, r"in_dim must be a positive int, got True"),
    ],
)
def test_bad_constructor_arguments(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("out_grid", [(0, 3), (12,), 12, (2.0, 2)])
def test_ldpv2_bad_out_grid(out_grid: object) -> None:
    with pytest.raises(ValueError, match=r"out_grid must be a pair of positive ints \(H, W\), got"):
        LDPv2(8, 8, out_grid=out_grid)


@pytest.mark.parametrize("kind", ["ldp", "ldpv2"])
def test_bad_inputs_name_argument_and_expected_value(kind: str) -> None:
    model = build(kind, torch.float32)
    with pytest.raises(ValueError, match=rf"x has width C=13, expected C={IN_DIM}"):
        model(torch.randn(1, 36, 13))
    with pytest.raises(ValueError, match=r"N=35 tokens, which is not a perfect square; pass grid"):
        model(torch.randn(1, 35, IN_DIM))
    with pytest.raises(ValueError, match=r"grid=\(5, 7\) holds 35 tokens but x has N=36"):
        model(torch.randn(1, 36, IN_DIM), grid=(5, 7))
    with pytest.raises(ValueError, match=r"x has dtype torch.float64 .* expected x.dtype == torch.float32"):
        model(torch.randn(1, 36, IN_DIM, dtype=torch.float64))
    with pytest.raises(TypeError, match="return_weights"):
        model(torch.randn(1, 36, IN_DIM), return_weights=True)
