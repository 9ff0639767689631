"""A tiny random InternVL and its processor, built in code (no download).

InternVL's vision tower at 112 px, patch 7 (a 16x16 grid with a CLS token), pixel-shuffled
by 0.5 to 8x8 tokens of width 4 * 32 = 128 per tile; the tiny Qwen2 LLM of `conftest`;
dynamic tiling into 1 to 4 tiles of 112 px (plus a thumbnail when there are several), PIL
image processing; InternVL's image tokens (<img>, <IMG_CONTEXT>, </img>) in the tokenizer.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration
from transformers import InternVLProcessor, InternVLVisionConfig, PreTrainedTokenizerFast

from .conftest import TINY, _text_config

__all__ = ["IMAGE_TOKEN", "TILE", "ImageOnlyInternVLProcessor", "build_tiny_internvl"]

IMAGE_TOKEN = "<IMG_CONTEXT>"
TILE = 112


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """`InternVLProcessor` without its video processor (which needs torchvision)."""

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, image_seq_length: int = 256,
        chat_template: str | None = None, **kwargs: Any,
    ) -> None:
        # ProcessorMixin takes its sub-processors from this signature (image and tokenizer
        # only) and saves the settings it names.
        super().__init__(image_processor, tokenizer, image_seq_length=image_seq_length, chat_template=chat_template,
                         **kwargs)


def _tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={symbol: index for index, symbol in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": IMAGE_TOKEN, "video_token": "<video>"},
    )


def build_tiny_internvl(seed: int = 0) -> tuple[InternVLForConditionalGeneration, ImageOnlyInternVLProcessor]:
    """A seeded tiny random InternVL (float32, eval mode) and its processor."""
    tokenizer = _tokenizer()
    vision = InternVLVisionConfig(
        hidden_size=TINY["vision_hidden"], intermediate_size=TINY["vision_intermediate"],
        num_hidden_layers=TINY["vision_layers"], num_attention_heads=TINY["vision_heads"],
        image_size=[TILE, TILE], patch_size=[TINY["patch_size"]] * 2,
    )
    tokens_per_tile = (TILE // TINY["patch_size"] // 2) ** 2
    config = InternVLConfig(
        vision_config=vision, text_config=_text_config("qwen2", tokenizer),
        image_token_id=tokenizer.context_image_token_id, image_seq_length=tokens_per_tile, vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).float().eval()
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    return model, ImageOnlyInternVLProcessor(image_processor, tokenizer, image_seq_length=tokens_per_tile)
