"""Which models are LLaVA, and the parts and sizes the grafts need.

In transformers 5.x, `LlavaForConditionalGeneration` holds the multimodal core as
`model`; the core (`LlavaModel`) holds the `vision_tower`, the `multi_modal_projector`
and the `language_model`. `get_image_features` selects the feature layer(s), drops CLS
under the "default" strategy, and hands (num_images, H*W, C) to the projector.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaModel

from tokencompress.base import Grid

__all__ = ["LLAVA_CLASSES", "PROJECTOR_PATH", "llava_core", "projector_path", "vision_grid", "projector_widths"]

LLAVA_CLASSES: tuple[type[nn.Module], ...] = (LlavaForConditionalGeneration, LlavaModel)
#: Where the projector is, from the core (`LlavaModel`).
PROJECTOR_PATH = "multi_modal_projector"


def llava_core(model: nn.Module, caller: str = "this graft") -> LlavaModel:
    """The `LlavaModel` inside `model` (or `model` itself)."""
    if isinstance(model, LlavaForConditionalGeneration):
        return model.model
    if isinstance(model, LlavaModel):
        return model
    raise TypeError(
        f"{caller} supports transformers' LlavaForConditionalGeneration and LlavaModel "
        f"(model_type 'llava'), got {type(model).__name__}"
    )


def projector_path(model: nn.Module) -> str:
    """The path of the projector from `model` (with or without the LM head)."""
    return f"model.{PROJECTOR_PATH}" if isinstance(model, LlavaForConditionalGeneration) else PROJECTOR_PATH


def vision_grid(config: Any) -> Grid:
    """The vision tower's patch grid (image_size // patch_size per side)."""
    vision = config.vision_config
    image_size, patch_size = vision.image_size, vision.patch_size
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise ValueError(
            "graft_compressor needs an int vision_config.image_size and patch_size, got "
            f"image_size={image_size!r}, patch_size={patch_size!r}"
        )
    return image_size // patch_size, image_size // patch_size


def projector_widths(config: Any) -> tuple[int, int]:
    """(input, output) widths of LLaVA's projector, as `LlavaMultiModalProjector` sizes them."""
    layers = config.vision_feature_layer
    num_layers = 1 if isinstance(layers, int) else len(layers)
    return config.vision_config.hidden_size * num_layers, config.text_config.hidden_size
