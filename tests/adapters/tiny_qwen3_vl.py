"""A tiny random Qwen3-VL for the adapter tests, built locally.

- `build_tiny_qwen3_vl(seed=0) -> (model, processor)`: a seeded, float32, eval-mode
  `Qwen3VLForConditionalGeneration` and a matching processor.
- Sizes: LLM width 64 (4 layers, 4 heads of 16, 2 KV heads, interleaved mRoPE sections
  4/2/2); ViT width 32, 2 blocks, both DeepStack levels (`deepstack_visual_indexes`
  [0, 1]: their features are added after decoder layers 0 and 1); patch 4 px, 2x2 merge,
  so a merged token covers 8x8 px, as in `tiny_qwen2_vl` (a 40x56 image: 5x7 merged).
- The tokenizer, chat template and images are `tiny_qwen2_vl`'s (Qwen's special tokens
  are the same); the processor is an image-only subclass of `Qwen3VLProcessor`:
  transformers' video processors need torchvision, which this project does not install.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .tiny_qwen2_vl import CHAT_TEMPLATE, MERGE, PATCH, TEXT_WIDTH, build_qwen_tokenizer

__all__ = ["DEEPSTACK_LEVELS", "ImageOnlyQwen3VLProcessor", "build_tiny_qwen3_vl"]

#: The ViT blocks whose merged features DeepStack adds (to the LLM's first two layers).
DEEPSTACK_LEVELS = [0, 1]


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` without its video processor (which needs torchvision)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        # ProcessorMixin takes its sub-processors from this signature: image and tokenizer only.
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


def _config(tokenizer: Any) -> Qwen3VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE,
        temporal_patch_size=2, out_hidden_size=TEXT_WIDTH, num_position_embeddings=64,
        deepstack_visual_indexes=DEEPSTACK_LEVELS,
    )
    text = dict(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True,
                         "rope_theta": 10000.0},
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen3VLConfig(
        vision_config=vision, text_config=text,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )


def build_tiny_qwen3_vl(seed: int = 0) -> tuple[Qwen3VLForConditionalGeneration, ImageOnlyQwen3VLProcessor]:
    """A seeded tiny random Qwen3-VL (float32, eval mode) and its processor."""
    tokenizer = build_qwen_tokenizer()
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(_config(tokenizer)).float().eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=96 * 96
    )
    processor = ImageOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          chat_template=CHAT_TEMPLATE)
    return model, processor
