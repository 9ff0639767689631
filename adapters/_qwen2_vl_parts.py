"""Which models are Qwen2-VL or Qwen2.5-VL, and the parts and sizes the grafts need.

Both families share the layout the grafts rely on (transformers 5.x): the model with the
LM head holds the multimodal core as `model`; the core holds the vision tower `visual`
(patch embedding, ViT, 2x2 patch merger) and the `language_model`; images are described
by `image_grid_thw` rows (t, h, w) in patches, and the tower outputs one merged token per
`spatial_merge_size` x `spatial_merge_size` patches, row-major over (t, h/m, w/m).
"""

from __future__ import annotations


from torch import nn
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
)

__all__ = ["QWEN2_VL_CORES", "QWEN2_VL_CLASSES", "qwen2_vl_core", "merge_size", "merged_dim", "text_dim"]

#: The multimodal cores (the models without an LM head) of the supported families.
QWEN2_VL_CORES: tuple[type[nn.Module], ...] = (Qwen2VLModel, Qwen2_5_VLModel)
_WITH_LM_HEAD: tuple[type[nn.Module], ...] = (
    Qwen2VLForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
)


#: Every class the grafts take: the cores and the models with the LM head.
QWEN2_VL_CLASSES: tuple[type[nn.Module], ...] = QWEN2_VL_CORES + _WITH_LM_HEAD


def qwen2_vl_core(model: nn.Module, caller: str = "this graft") -> nn.Module:
    """The `Qwen2VLModel` / `Qwen2_5_VLModel` inside `model` (or `model` itself)."""
    if isinstance(model, _WITH_LM_HEAD):
        return model.model
    if isinstance(model, QWEN2_VL_CORES):
        return model
    raise TypeError(
        f"{caller} supports transformers' Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration "
        f"and their Qwen2VLModel / Qwen2_5_VLModel, got {type(model).__name__}"
    )


def merge_size(core: nn.Module) -> int:
    """Patches per side of one merged token (Qwen2-VL: 2)."""
    return int(core.config.vision_config.spatial_merge_size)


def merged_dim(core: nn.Module) -> int:
    """Width of the merged visual tokens, the patch merger's output (= the LLM's width).

    Qwen2-VL calls it `vision_config.hidden_size`; Qwen2.5-VL, whose `hidden_size` is
    the ViT's width, calls it `vision_config.out_hidden_size`.
    """
    vision = core.config.vision_config
    return int(getattr(vision, "out_hidden_size", None) or vision.hidden_size)


def text_dim(core: nn.Module) -> int:
    """The language model's hidden size."""
    return int(core.config.text_config.hidden_size)
