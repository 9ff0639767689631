"""MobileVLM's lightweight downsample projectors: `LDP` (v1) and `LDPv2` (v2).

Both map vision features to the LLM's width and cut the token count (v1 halves each
side of the grid, v2 pools to a fixed grid), so they replace the projector rather than
sit before it. The layer structure follows MobileVLM's
`mobilevlm/model/vision_projector.py` (which builds v1 from torchvision's MobileNetV3
`InvertedResidual`, `SqueezeExcitation` and timm's `LayerNormAct2d`); it is written
here from the maths, with no torchvision or timm dependency.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Grid, TokenCompressor, as_grid
from .registry import register_compressor

__all__ = ["LDP", "LDPv2", "InvertedResidual", "SqueezeExcitation", "ChannelLayerNorm", "make_divisible"]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round `value` to the nearest multiple of `divisor` (at least `divisor`), never
    more than 10% below `value`: the channel rounding of MobileNet v2/v3."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _check_positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _tokens_to_map(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W) as a view (no copy). Its memory is channels-last, so
    `ChannelLayerNorm`'s permute back to (B, H, W, C) is contiguous again."""
    return x.transpose(1, 2).unflatten(2, grid)


def _map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), row-major over the grid."""
    return x.flatten(2).transpose(1, 2)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map, at every position (timm's
    `LayerNormAct2d` without its activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SqueezeExcitation(nn.Module):
    """Channel gate: x * hardsigmoid(W2 relu(W1 mean_hw(x) + b1) + b2).

    W1, W2 are 1x1 convs (biased), as in torchvision's `SqueezeExcitation` with
    `scale_activation=Hardsigmoid`, the MobileNetV3 setting.
    """

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze_channels, kernel_size=1)
        self.expand = nn.Conv2d(squeeze_channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean(dim=(2, 3), keepdim=True)
        scale = self.expand(F.relu(self.reduce(scale)))
        return x * F.hardsigmoid(scale)


class InvertedResidual(nn.Module):
    """MobileNetV3 inverted residual block with expand ratio 1 (so no expansion conv):

        y = LN(P(SE(hardswish(LN(DW_stride(x))))));  out = x + y if stride == 1 else y

    DW is a biasless depthwise 3x3 conv (padding 1), P a biasless 1x1 conv, LN a
    LayerNorm over channels, SE the squeeze-excitation gate with
    `make_divisible(channels // 4)` squeeze channels.
    """

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        self.stride = stride
        self.depthwise = nn.Conv2d(
            channels, channels, kernel_size=3, stride=stride, padding=1, groups=channels, bias=False
        )
        self.depthwise_norm = ChannelLayerNorm(channels)
        self.squeeze_excitation = SqueezeExcitation(channels, make_divisible(channels // 4))
        # No bias: the LayerNorm right after would cancel it.
        self.project = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.project_norm = ChannelLayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.hardswish(self.depthwise_norm(self.depthwise(x)))
        y = self.project_norm(self.project(self.squeeze_excitation(y)))
        return x + y if self.stride == 1 else y


@register_compressor("ldp")
class LDP(TokenCompressor):
    """MobileVLM v1's Lightweight Downsample Projector: (H, W, C_in) -> (ceil(H/2), ceil(W/2), C_out).

        z = W2 gelu(W1 x + b1) + b2  (per token, C_in -> C_out)
        out = IR_stride2(IR_stride1(z))  on the (C_out, H, W) map (see `InvertedResidual`)

    Args:
        in_dim: width of the vision features (1152 for SigLIP so400m).
        out_dim: width of the LLM's embeddings (2560 for phi-2).

    MobileVLM rounds the block width to a multiple of 8 (torchvision's
    `adjust_channels`), so its checkpoints only exist for such `out_dim`; this class
    uses `out_dim` as given, which is the same network whenever `out_dim % 8 == 0`.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = _check_positive_int(in_dim, "in_dim")
        self.embed_dim = _check_positive_int(out_dim, "out_dim")
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.blocks = nn.Sequential(InvertedResidual(out_dim, stride=1), InvertedResidual(out_dim, stride=2))

    @classmethod
    def for_dim(cls, dim: int) -> "LDP":
        return cls(dim, dim)

    def get_config(self) -> dict[str, Any]:
        return {"in_dim": self.in_dim, "out_dim": self.embed_dim}

    def out_grid(self, grid: Grid) -> Grid:
        height, width = as_grid(grid)
        # A 3x3 conv with stride 2 and padding 1: floor((n + 2 - 3) / 2) + 1 = ceil(n / 2).
        return (height + 1) // 2, (width + 1) // 2

    def out_dim(self, dim: int) -> int:
        return self.embed_dim

    def compress(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        z = self.fc2(F.gelu(self.fc1(x)))
        return _map_to_tokens(self.blocks(_tokens_to_map(z, grid)))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.embed_dim}"


@register_compressor("ldpv2")
class LDPv2(TokenCompressor):
    """MobileVLM v2's LDPNetV2: (H, W, C_in) -> (out_grid, C_out), whatever (H, W) is.

        z = pool(W2 gelu(W1 x + b1) + b2)  (pool: adaptive average pooling to out_grid)
        out = z + DW(z) + b  (DW: depthwise 3x3 conv, padding 1, the positional conv)

    Args:
        in_dim: width of the vision features.
        out_dim: width of the LLM's embeddings.
        out_grid: the output grid (H', W'); MobileVLM v2 uses (12, 12) = 144 tokens.
    """

    def __init__(self, in_dim: int, out_dim: int, out_grid: Grid = (12, 12)) -> None:
        super().__init__()
        self.in_dim = _check_positive_int(in_dim, "in_dim")
        self.embed_dim = _check_positive_int(out_dim, "out_dim")
        self.pooled_grid = as_grid(out_grid, "out_grid")
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.position_conv = nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, groups=out_dim, bias=True)

    @classmethod
    def for_dim(cls, dim: int) -> "LDPv2":
        return cls(dim, dim)

    def get_config(self) -> dict[str, Any]:
        return {"in_dim": self.in_dim, "out_dim": self.embed_dim, "out_grid": list(self.pooled_grid)}

    def out_grid(self, grid: Grid) -> Grid:
        as_grid(grid)
        return self.pooled_grid

    def out_dim(self, dim: int) -> int:
        return self.embed_dim

    def compress(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        hidden = F.gelu(self.fc1(x))
        # MobileVLM pools after fc2. Every pooled cell is an average whose weights sum
        # to 1, so pooling commutes with the affine fc2 (bias included): run fc2 on
        # whichever side has fewer tokens. Same numbers; for 27x27 -> 12x12, fc2 does
        # 5x fewer multiply-adds.
        if self.num_out_tokens(grid) < grid[0] * grid[1]:
            pooled = F.adaptive_avg_pool2d(_tokens_to_map(hidden, grid), self.pooled_grid)
            z = self.fc2(_map_to_tokens(pooled))
        else:
            z = _map_to_tokens(F.adaptive_avg_pool2d(_tokens_to_map(self.fc2(hidden), grid), self.pooled_grid))
        z_map = _tokens_to_map(z, self.pooled_grid)
        return _map_to_tokens(z_map + self.position_conv(z_map))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.embed_dim}, out_grid={self.pooled_grid}"
