"""The paper's configurations as `ProfileSpec`s, and the paper's own figures to compare with.

    preset("flashsloth", text_tokens=64)            # SAP 81 + 9 EmbQ queries = 90 tokens
    preset("flashsloth", num_queries=6)             # Table 3's query ablation, named "flashsloth/q=6"
    [preset(name) for name in PRESETS]

Sizes are the released checkpoints' (see `/work/shared/spec/flashsloth-reference.md`);
compressors and EmbQ are built on the `meta` device, so a preset costs no memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import CLIPVisionConfig, LlamaConfig, PhiConfig, SiglipVisionConfig

from .avgpool import AvgPool
from .embq import EmbQ
from .profile import EmbQSpec, ProfileSpec
from .sap import SAP

__all__ = ["PRESETS", "PAPER_TFLOPS", "PaperFigure", "preset", "siglip_so400m_384", "clip_vit_l14_336", "phi_2", "llama_7b"]


# -- backbones -------------------------------------------------------------------------
def siglip_so400m_384() -> SiglipVisionConfig:
    """SigLIP so400m, patch 14 at 384 px: 27 x 27 = 729 tokens of width 1152."""
    return SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        patch_size=14, image_size=384,
    )


def clip_vit_l14_336() -> CLIPVisionConfig:
    """CLIP ViT-L/14 at 336 px (LLaVA-1.5): 24 x 24 = 576 patch tokens + CLS, width 1024."""
    return CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        patch_size=14, image_size=336, projection_dim=768,
    )


def phi_2() -> PhiConfig:
    """phi-2 (2.7B): FlashSloth's LLM."""
    return PhiConfig(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
        vocab_size=51200, partial_rotary_factor=0.4,
    )


def llama_7b() -> LlamaConfig:
    """A 7B Llama (Vicuna-7B, LLaVA-1.5-7B's LLM)."""
    return LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000,
    )


# -- FlashSloth family (SigLIP so400m penultimate layer + phi-2) --------------------------
def _embq(num_queries: int) -> EmbQSpec | None:
    if num_queries == 0:
        return None  # Table 3's "0 queries" row is SAP alone
    with torch.device("meta"):
        module = EmbQ(text_dim=2560, vision_dim=1152)
    return EmbQSpec(module, num_queries=num_queries, layer=8)


def _sap() -> SAP:
    with torch.device("meta"):
        return SAP(1152, window=3)


def baseline(text_tokens: int = 64) -> ProfileSpec:
    """SigLIP + phi-2 without compression: 729 visual tokens."""
    return ProfileSpec(siglip_so400m_384(), phi_2(), text_tokens=text_tokens, name="baseline")


def avgpool(text_tokens: int = 64) -> ProfileSpec:
    """3 x 3 average pooling: 81 visual tokens (Table 3, "Avg.Pool")."""
    return ProfileSpec(siglip_so400m_384(), phi_2(), text_tokens=text_tokens, compressor=AvgPool(3), name="avgpool")


def sap(text_tokens: int = 64) -> ProfileSpec:
    """SAP, window 3: 81 visual tokens, no EmbQ (Table 3, "Att.Pool", and "0 queries")."""
    return ProfileSpec(siglip_so400m_384(), phi_2(), text_tokens=text_tokens, compressor=_sap(), name="sap")


def flashsloth(text_tokens: int = 64, num_queries: int = 9) -> ProfileSpec:
    """SAP 81 + EmbQ with `num_queries` queries at the 8th layer (paper: 9, 90 tokens)."""
    return ProfileSpec(
        siglip_so400m_384(), phi_2(), text_tokens=text_tokens, compressor=_sap(), embq=_embq(num_queries),
        name="flashsloth" if num_queries == 9 else f"flashsloth/q={num_queries}",
    )


def flashsloth_hd(text_tokens: int = 64, num_queries: int = 9) -> ProfileSpec:
    """5 tiles of 384 px (thumbnail + 4) x 81 = 405 visual tokens + 9 queries; EmbQ reads 5 x 729."""
    return ProfileSpec(
        siglip_so400m_384(), phi_2(), text_tokens=text_tokens, num_images=5, compressor=_sap(),
        embq=_embq(num_queries),
        name="flashsloth-hd" if num_queries == 9 else f"flashsloth-hd/q={num_queries}",
    )


def llava_1_5_7b(text_tokens: int = 64) -> ProfileSpec:
    """CLIP ViT-L/14-336 penultimate layer, CLS dropped: 576 tokens, mlp2x_gelu, Llama 7B."""
    return ProfileSpec(clip_vit_l14_336(), llama_7b(), text_tokens=text_tokens, name="llava-1.5-7b")


PRESETS: dict[str, Callable[..., ProfileSpec]] = {
    "baseline": baseline,
    "avgpool": avgpool,
    "sap": sap,
    "flashsloth": flashsloth,
    "flashsloth-hd": flashsloth_hd,
    "llava-1.5-7b": llava_1_5_7b,
}


def preset(name: str, text_tokens: int = 64, **options: int) -> ProfileSpec:
    """The `ProfileSpec` of preset `name`; `options` such as `num_queries` go to its builder."""
    try:
        build = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {list(PRESETS)}") from None
    try:
        return build(text_tokens=text_tokens, **options)
    except TypeError as error:
        raise ValueError(f"preset {name!r} does not take {sorted(options)}: {error}") from None


# -- the paper's figures -----------------------------------------------------------------
@dataclass(frozen=True)
class PaperFigure:
    """A first-round "TFLOPs" figure of the paper (in fact multiply-adds) and where it is."""

    tflops: float
    source: str


PAPER_TFLOPS: dict[str, PaperFigure] = {
    "baseline": PaperFigure(2.40, "Table 3; Table 1, IMP-3B (same backbone), every task"),
    "avgpool": PaperFigure(0.40, "Table 3, Avg.Pool (81)"),
    "sap": PaperFigure(0.48, "Table 3, Att.Pool (81)"),
    "flashsloth": PaperFigure(0.72, "Table 3; Table 1, MME (0.64-0.80 by task)"),
    "flashsloth/q=0": PaperFigure(0.48, "Table 3, 0 queries"),
    "flashsloth/q=6": PaperFigure(0.64, "Table 3, 6 queries"),
    "flashsloth/q=12": PaperFigure(0.80, "Table 3, 12 queries"),
    "flashsloth/q=15": PaperFigure(0.88, "Table 3, 15 queries"),
    "flashsloth-hd": PaperFigure(2.72, "Table 1, MME (1.98-2.83 by task)"),
    "llava-1.5-7b": PaperFigure(4.43, "Table 1, MME (4.40-4.77 by task)"),
}
