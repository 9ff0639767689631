"""A tiny random LLaVA-OneVision and its processor, built in code (no download).

SigLIP-shaped vision tower without a CLS token (56 px, patch 7: an 8x8 grid per view,
the "full" strategy, as OneVision's checkpoints use), the tiny Qwen2 LLM of `conftest`,
the AnyRes tiles of `tiny_llava_next`, and the cap "anyres_max_2": pictures of more than
about two tiles' worth of tokens (2x2 and 3x1 tiles) are resized down, so the cap is
exercised. PIL image processing; no video processor (transformers' needs torchvision).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

from .conftest import IMAGE_TOKEN, TINY, _text_config, _vision_config, build_tiny_tokenizer
from .tiny_llava_next import PINPOINTS, TILE

__all__ = ["ASPECT_RATIO", "VIDEO_TOKEN", "ImageOnlyLlavaOnevisionProcessor", "build_tiny_llava_onevision"]

ASPECT_RATIO = "anyres_max_2"
VIDEO_TOKEN = "<video>"


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` without its video processor (which needs torchvision)."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        video_token: str = VIDEO_TOKEN,
        vision_aspect_ratio: str = "anyres_max_9",
        **kwargs: Any,
    ) -> None:
        # ProcessorMixin takes its sub-processors from this signature (image and tokenizer
        # only) and saves the settings it names, so all of them are named here.
        super().__init__(
            image_processor, tokenizer, num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
            image_token=image_token, video_token=video_token, vision_aspect_ratio=vision_aspect_ratio, **kwargs,
        )


def build_tiny_llava_onevision(
    seed: int = 0, vision_aspect_ratio: str = ASPECT_RATIO
) -> tuple[LlavaOnevisionForConditionalGeneration, ImageOnlyLlavaOnevisionProcessor]:
    """A seeded tiny random LLaVA-OneVision (float32, eval mode) and its processor."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([VIDEO_TOKEN], special_tokens=True)
    config = LlavaOnevisionConfig(
        vision_config=_vision_config("siglip"),
        text_config=_text_config("qwen2", tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-2,
        vision_aspect_ratio=vision_aspect_ratio,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).float().eval()
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
    )
    processor = ImageOnlyLlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(TILE // TINY["patch_size"]) ** 2,
        vision_feature_select_strategy="full",
        image_token=IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
        vision_aspect_ratio=vision_aspect_ratio,
    )
    return model, processor
