"""Tiny random Qwen2-VL and Qwen2.5-VL models for the adapter tests, built locally.

- `build_tiny_qwen2_vl(family, seed=0) -> (model, processor)`: a seeded, float32,
  eval-mode `Qwen2VLForConditionalGeneration` ("qwen2_vl") or
  `Qwen2_5_VLForConditionalGeneration` ("qwen2_5_vl") and a matching processor.
- Sizes: LLM width 64 (4 layers, 4 heads, 2 KV heads, mRoPE sections 2/3/3); ViT width
  32, 2 blocks; patch 4 px, 2x2 merge, so a merged token covers 8x8 px: a 40x56 image
  has a 5x7 merged grid. Qwen2.5-VL: window attention over 2x2 merged tokens in block 0,
  full attention in block 1, so the window permutation is exercised.
- The tokenizer is byte-level BPE without merges plus Qwen's special tokens
  (<|im_start|>, <|im_end|> as EOS, <|endoftext|> as padding, <|vision_start|>,
  <|vision_end|>, <|image_pad|>, <|video_pad|>) and a small Qwen-style chat template.
- The processor is an image-only subclass of transformers' processor: transformers'
  video processors need torchvision, which this project does not install.
- `make_image(height, width, seed)`: a random RGB image; `prompt_text(n_images, question)`:
  a chat prompt with `n_images` images (each <|vision_start|><|image_pad|><|vision_end|>).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

__all__ = [
    "FAMILIES",
    "PATCH",
    "MERGE",
    "TEXT_WIDTH",
    "CHAT_TEMPLATE",
    "ImageOnlyQwen2VLProcessor",
    "ImageOnlyQwen2_5_VLProcessor",
    "build_tiny_qwen2_vl",
    "build_qwen_tokenizer",
    "make_image",
    "prompt_text",
]

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
PATCH, MERGE = 4, 2
TEXT_WIDTH = 64

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without its video processor (which needs torchvision)."""

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs: Any
    ) -> None:
        # ProcessorMixin takes its sub-processors from this signature: image and tokenizer only.
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without its video processor (which needs torchvision)."""

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Byte tokens, Qwen's special tokens (named as Qwen's tokenizer names them) and a chat template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={symbol: index for index, symbol in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _configs(family: str, tokenizer: PreTrainedTokenizerFast) -> Any:
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    tokens = dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    vision = dict(depth=2, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2)
    if family == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=TEXT_WIDTH, mlp_ratio=2)
        return Qwen2VLConfig(vision_config=vision, text_config=text, **tokens)
    if family == "qwen2_5_vl":
        # window_size in pixels: 16 px = 2x2 merged tokens per attention window.
        vision.update(
            hidden_size=32, intermediate_size=64, out_hidden_size=TEXT_WIDTH, window_size=16, fullatt_block_indexes=[1]
        )
        return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **tokens)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def build_tiny_qwen2_vl(family: str, seed: int = 0) -> tuple[Any, Any]:
    """A seeded tiny random model of `family` (float32, eval mode) and its processor."""
    tokenizer = build_qwen_tokenizer()
    config = _configs(family, tokenizer)
    model_class = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=96 * 96
    )
    processor_class = ImageOnlyQwen2VLProcessor if family == "qwen2_vl" else ImageOnlyQwen2_5_VLProcessor
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    return model, processor


def make_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A random RGB image of `height` x `width` pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def prompt_text(n_images: int = 1, question: str = "What is here?") -> str:
    """A Qwen chat prompt with `n_images` images before the question."""
    images = "<|vision_start|><|image_pad|><|vision_end|>" * n_images
    return f"<|im_start|>user\n{images}{question}<|im_end|>\n<|im_start|>assistant\n"
