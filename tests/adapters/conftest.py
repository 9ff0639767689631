"""Tiny random LLaVA models for the adapter tests, built locally (no downloads).

What this offers:

- `build_tiny_llava(text_model, vision_model, **overrides) -> (model, processor)`: a
  seeded, float32, eval-mode `LlavaForConditionalGeneration` with a matching
  `LlavaProcessor`. `text_model` is one of `TEXT_MODELS` ("phi", "qwen2", "llama"),
  `vision_model` one of `VISION_MODELS` ("siglip", "clip"). Overrides go to the configs:
  `text_<field>=...` to the text config, `vision_<field>=...` to the vision config, any
  other keyword to `LlavaConfig` (e.g. `vision_feature_layer=-1`), and `seed=...`.
- Sizes (`TINY`): text hidden 64, 4 decoder layers (so an EmbQ layer index like 2 is
  meaningful), 4 heads; vision hidden 32, 2 layers, 56 px images, patch 7 -> an 8x8 grid
  (64 vision tokens per image). Text and vision widths differ on purpose, so a test can
  tell which side of the projector a tensor lives on.
- The tokenizer is byte-level BPE without merges (every byte is a token, so any text
  encodes), plus `<pad>`, `<s>`, `</s>` and the image token `<image>` as special tokens.
- SigLIP has no CLS token: `vision_feature_select_strategy="full"`. CLIP keeps its CLS
  token in the tower and LLaVA's `"default"` strategy drops it (processor:
  `num_additional_image_tokens=1`), as in llava-1.5.
- `tiny_llava`: a fixture parametrized over the 6 (text, vision) pairs, returning a
  `TinyLlava` (model, processor, names). `tiny_llava_factory`: the builder as a fixture.
- `make_images(n, size=56, seed=0)`: random RGB PIL images. `make_prompt(n_images)`:
  a chat-like prompt with `n_images` image tokens. `make_inputs(processor, ...)`.
- `save_and_reload(model, processor, folder) -> (model, processor)`: `save_pretrained`
  (safetensors) then `from_pretrained` of both, reloaded in float32 eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PhiConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

__all__ = [
    "TEXT_MODELS",
    "VISION_MODELS",
    "MODEL_PAIRS",
    "TINY",
    "IMAGE_TOKEN",
    "TinyLlava",
    "build_tiny_tokenizer",
    "build_tiny_llava",
    "make_images",
    "make_prompt",
    "make_inputs",
    "save_and_reload",
]

TEXT_MODELS = ("phi", "qwen2", "llama")
VISION_MODELS = ("siglip", "clip")
MODEL_PAIRS = [(text, vision) for text in TEXT_MODELS for vision in VISION_MODELS]
IMAGE_TOKEN = "<image>"

TINY = {
    "text_hidden": 64,
    "text_intermediate": 128,
    "text_layers": 4,
    "text_heads": 4,
    "vision_hidden": 32,
    "vision_intermediate": 64,
    "vision_layers": 2,
    "vision_heads": 2,
    "image_size": 56,
    "patch_size": 7,  # 56 / 7 = an 8x8 grid
}

_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens, no merges) with special and image tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **_SPECIAL_TOKENS,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    return tokenizer


def _text_config(name: str, tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> Any:
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=TINY["text_hidden"],
        intermediate_size=TINY["text_intermediate"],
        num_hidden_layers=TINY["text_layers"],
        num_attention_heads=TINY["text_heads"],
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if name == "phi":
        config_class, extra = PhiConfig, {"partial_rotary_factor": 0.5}
    elif name == "qwen2":
        config_class, extra = Qwen2Config, {"num_key_value_heads": 2}
    elif name == "llama":
        config_class, extra = LlamaConfig, {"num_key_value_heads": 2}
    else:
        raise ValueError(f"unknown text_model={name!r}; expected one of {TEXT_MODELS}")
    return config_class(**{**common, **extra, **overrides})


def _vision_config(name: str, **overrides: Any) -> Any:
    common = dict(
        hidden_size=TINY["vision_hidden"],
        intermediate_size=TINY["vision_intermediate"],
        num_hidden_layers=TINY["vision_layers"],
        num_attention_heads=TINY["vision_heads"],
        image_size=TINY["image_size"],
        patch_size=TINY["patch_size"],
    )
    if name == "siglip":
        return SiglipVisionConfig(**{**common, **overrides})
    if name == "clip":
        return CLIPVisionConfig(**{**common, "projection_dim": TINY["vision_hidden"], **overrides})
    raise ValueError(f"unknown vision_model={name!r}; expected one of {VISION_MODELS}")


def _image_processor(name: str, image_size: int) -> Any:
    # The PIL backends: torchvision is not a dependency of this project. Where it is
    # installed anyway (lmms-eval brings it), `from_pretrained` would pick its backend, whose
    # resize differs in the last bits: reloads in the tests ask for backend="pil".
    if name == "siglip":
        return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def build_tiny_llava(
    text_model: str, vision_model: str, **overrides: Any
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A seeded tiny random LLaVA (float32, eval mode) and its processor; see module doc."""
    seed = overrides.pop("seed", 0)
    text_overrides = {k[5:]: overrides.pop(k) for k in list(overrides) if k.startswith("text_")}
    vision_overrides = {k[7:]: overrides.pop(k) for k in list(overrides) if k.startswith("vision_")}
    # `vision_feature_*` are LlavaConfig fields, not vision-config fields: give them back.
    for key in [k for k in vision_overrides if k.startswith("feature_")]:
        overrides["vision_" + key] = vision_overrides.pop(key)

    tokenizer = build_tiny_tokenizer()
    text_config = _text_config(text_model, tokenizer, **text_overrides)
    vision_config = _vision_config(vision_model, **vision_overrides)
    has_cls = vision_model == "clip"
    strategy = overrides.pop("vision_feature_select_strategy", "default" if has_cls else "full")
    grid_side = vision_config.image_size // vision_config.patch_size
    num_tokens = grid_side * grid_side + (1 if has_cls and strategy == "full" else 0)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=num_tokens,
        vision_feature_select_strategy=strategy,
        **overrides,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).float().eval()
    processor = LlavaProcessor(
        image_processor=_image_processor(vision_model, vision_config.image_size),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1 if has_cls else 0,
    )
    return model, processor


def make_images(n: int, size: int = TINY["image_size"], seed: int = 0) -> list[Image.Image]:
    """`n` random RGB images of `size` x `size` pixels."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mode="RGB")
        for _ in range(n)
    ]


def make_prompt(n_images: int = 1, question: str = "What is here?") -> str:
    """A chat-like prompt with `n_images` image tokens before the question."""
    return f"USER: {IMAGE_TOKEN * n_images}\n{question} ASSISTANT:"


def make_inputs(
    processor: LlavaProcessor, n_images: int = 1, prompts: list[str] | None = None, seed: int = 0
) -> Any:
    """Processor output (`return_tensors="pt"`) for one prompt (or `prompts`) and images."""
    prompts = prompts if prompts is not None else [make_prompt(n_images)]
    total = sum(prompt.count(IMAGE_TOKEN) for prompt in prompts)
    return processor(
        images=make_images(total, seed=seed), text=prompts, return_tensors="pt", padding=True
    )


def save_and_reload(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, folder: str | Path
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Save both with `save_pretrained` (safetensors) and load them back from `folder`."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    reloaded = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return reloaded, LlavaProcessor.from_pretrained(folder, backend="pil")


@dataclass
class TinyLlava:
    """A tiny model, its processor and the names it was built from."""

    model: LlavaForConditionalGeneration
    processor: LlavaProcessor
    text_model: str
    vision_model: str

    @property
    def id(self) -> str:
        return f"{self.text_model}-{self.vision_model}"


@pytest.fixture(params=MODEL_PAIRS, ids=[f"{t}-{v}" for t, v in MODEL_PAIRS])
def tiny_llava(request: pytest.FixtureRequest) -> TinyLlava:
    """Each of the 6 (text, vision) tiny LLaVA models, freshly built."""
    text_model, vision_model = request.param
    model, processor = build_tiny_llava(text_model, vision_model)
    return TinyLlava(model, processor, text_model, vision_model)


@pytest.fixture
def tiny_llava_factory() -> Any:
    """`build_tiny_llava` as a fixture, for tests that need overrides."""
    return build_tiny_llava
