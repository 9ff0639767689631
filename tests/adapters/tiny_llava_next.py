"""A tiny random LLaVA-NeXT and its processor, built in code (no download).

CLIP-shaped vision tower with a CLS token (56 px, patch 7: an 8x8 grid per tile, the
"default" strategy drops CLS), the tiny Qwen2 LLM of `conftest`, AnyRes tiles of 56 px
on the grid pinpoints below (1x2, 2x1, 2x2, 3x1 tiles), PIL image processing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil
from transformers import LlavaNextProcessor

from .conftest import IMAGE_TOKEN, TINY, _text_config, _vision_config, build_tiny_tokenizer

__all__ = ["PINPOINTS", "TILE", "build_tiny_llava_next", "make_image", "inputs_for"]

TILE = TINY["image_size"]
PINPOINTS = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE], [3 * TILE, TILE]]


def build_tiny_llava_next(
    seed: int = 0, strategy: str = "default"
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A seeded tiny random LLaVA-NeXT (float32, eval mode) and its processor."""
    tokenizer = build_tiny_tokenizer()
    config = LlavaNextConfig(
        vision_config=_vision_config("clip"),
        text_config=_text_config("qwen2", tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).float().eval()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=TINY["patch_size"],
        vision_feature_select_strategy=strategy,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return model, processor


def make_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A random RGB image of `height` x `width` pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def inputs_for(processor: Any, images: list[Image.Image], texts: list[str]) -> dict[str, torch.Tensor]:
    """The processor's batch, left-padded (as for generation)."""
    processor.tokenizer.padding_side = "left"
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
