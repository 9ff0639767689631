"""tokencompress: visual-token compressors for multimodal LLMs.

    from tokencompress import SAP, EmbQ, AvgPool, PixelShuffle, LDP, LDPv2, Compose
    from tokencompress import ToMe, DART, VisionZip    # training-free, to a token budget

Every compressor is a `TokenCompressor` (an `nn.Module`) that maps visual tokens
(B, H*W, C) on a grid (H, W) to (B, H'*W', C') and answers `out_grid`, `out_dim` and
`num_out_tokens` without running. `EmbQ` is FlashSloth's embedded query module.
Selecting compressors (`SelectingCompressor`: `ToMe`, `DART`, `VisionZip`) keep or merge
tokens down to a fixed budget, in input order, and can return the kept positions.
"""

from .base import Grid, TokenCompressor
from .registry import create_compressor, list_compressors, register_compressor
from .compose import Compose
from .sap import SAP
from .avgpool import AvgPool
from .pixel_shuffle import PixelShuffle
from .ldp import LDP, LDPv2
from .embq import EmbQ
from .selection import SelectingCompressor
from .tome import ToMe
from .dart import DART
from .visionzip import VisionZip

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
    "SelectingCompressor",
    "ToMe",
    "DART",
    "VisionZip",
    "create_compressor",
    "list_compressors",
    "register_compressor",
]
