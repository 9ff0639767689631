"""tokencompress: visual-token compressors for multimodal LLMs.

    from tokencompress import SAP, EmbQ, AvgPool, PixelShuffle, LDP, LDPv2, Compose

Every compressor is a `TokenCompressor` (an `nn.Module`) that maps visual tokens
(B, H*W, C) on a grid (H, W) to (B, H'*W', C') and answers `out_grid`, `out_dim` and
`num_out_tokens` without running. `EmbQ` is FlashSloth's embedded query module.
"""

from .base import Grid, TokenCompressor
from .registry import create_compressor, list_compressors, register_compressor
from .compose import Compose
from .sap import SAP
from .avgpool import AvgPool
from .pixel_shuffle import PixelShuffle
from .ldp import LDP, LDPv2
from .embq import EmbQ

__version__ = "0.1.0"

__all__ = [
    "Grid",
    "TokenCompressor",
    "Compose",
    "SAP",
    "AvgPool",
    "PixelShuffle",
    "LDP",
    "LDPv2",
    "EmbQ",
    "create_compressor",
    "list_compressors",
    "register_compressor",
]
