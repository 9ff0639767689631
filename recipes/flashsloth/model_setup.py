"""From a recipe config's ``model`` section to a ready-to-train `FlashSloth`.

The glue between `config.ModelConfig` (what a YAML file says) and `model.build_flashsloth`
(what the builder takes):

- `flashsloth_config`: preset + overrides -> `FlashSlothConfig`. ``embq_layer`` is
  passed through unchanged: both count decoder layers from 1, as `graft_embq` does.
- `load_tokenizer`: a Hugging Face tokenizer; or, with ``tokenizer: null``, the tiny BPE
  tokenizer: the run's own if it was saved (a resumed run), else the previous stage's
  (``init_from``), else one trained on the run's training texts.
- `build_model`: builds the model with the pretrained parts the config names, copies
  ``init_components`` from a previous stage's checkpoint, and sets ``trainable``.
- `rebuild_model`: the same architecture around given weights, no downloads (to export
  a training checkpoint as a model folder).
- `canonical_names`: state-dict name -> canonical name. Checkpoints store canonical
  names, which do not depend on which grafts a stage has (stage 1 has no EmbQ, so its
  embedding is not wrapped), so stage 2 reads stage 1's tensors by name.

The tiny preset has no pretrained weights: its LLM and vision encoder are random, frozen
at stage 1 like phi-2 and SigLIP. Its stage 2 therefore takes them from stage 1's
checkpoint (``init_components`` in ``tiny_stage2.yaml``), as the paper's stage 2 starts
from the same phi-2 and SigLIP; the two stages share the tokenizer (saved with each run
in ``<output_dir>/tokenizer``) and the LLM's vocabulary size (`TINY_SPARE_ROWS`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from .checkpoint import load_checkpoint, resolve_checkpoint
from .config import ModelConfig, RecipeConfig
from .data import conversation_texts, load_llava_json
from .model import FlashSloth, FlashSlothConfig, build_flashsloth

__all__ = [
    "TINY_SPARE_ROWS",
    "TOKENIZER_DIR",
    "build_model",
    "canonical_names",
    "flashsloth_config",
    "load_tokenizer",
    "rebuild_model",
]

logger = logging.getLogger(__name__)

#: Where a run saves its tokenizer, inside ``checkpoint.output_dir``.
TOKENIZER_DIR = "tokenizer"
#: Embedding rows a random tiny LLM has beyond its tokenizer (rounded up to 64): room for
#: the query tokens that stage 2 adds, so both stages build the same LLM shapes (phi-2
#: likewise pads its 50,295 tokens to 51,200 rows).
TINY_SPARE_ROWS = 64


def _round_up(value: int, multiple: int = 64) -> int:
    return -(-value // multiple) * multiple


def flashsloth_config(
    model: ModelConfig, *, vocab_size: int | None = None, num_tokens: int | None = None
) -> FlashSlothConfig:
    """The builder's sizes for a recipe's ``model`` section.

    ``vocab_size`` fixes the LLM's embedding rows (when rebuilding a trained model).
    Otherwise a preset without a vocabulary size (tiny) gets ``num_tokens`` (the
    tokenizer's length) plus `TINY_SPARE_ROWS`, rounded up to 64, whatever the stage.
    """
    if model.preset == "flashsloth":
        base = FlashSlothConfig.paper()
        base = dataclasses.replace(base, vision={**base.vision, "image_size": model.image_size})
    elif model.preset == "tiny":
        base = FlashSlothConfig.tiny(image_size=model.image_size)
    else:  # the config's Literal type already refuses this; kept for direct callers
        raise ValueError(f"unknown model preset {model.preset!r}")
    text = dict(base.text)
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    elif text.get("vocab_size") is None and num_tokens is not None:
        text["vocab_size"] = _round_up(num_tokens + TINY_SPARE_ROWS)
    return dataclasses.replace(
        base,
        text=text,
        hd=model.hd,
        compressor=model.compressor,
        sap_window=model.sap_window,
        sap_dropout=model.sap_dropout,
        num_queries=model.num_queries,
        embq_layer=model.embq_layer,  # 1-based on both sides
        embq_inner_dim=model.embq_inner_dim,
        embq_num_heads=model.embq_num_heads,
    )


def _run_dir(checkpoint_path: Path) -> Path:
    """The run folder (``checkpoint.output_dir``) a checkpoint directory belongs to."""
    return checkpoint_path.parent


def load_tokenizer(config: RecipeConfig) -> Any:
    """The run's tokenizer (see the module docstring for the order of sources)."""
    if config.model.tokenizer is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(config.model.tokenizer)
    from transformers import AutoTokenizer

    own = Path(config.checkpoint.output_dir) / TOKENIZER_DIR
    if own.is_dir():
        return AutoTokenizer.from_pretrained(own)
    if config.model.init_from is not None:
        previous = _run_dir(resolve_checkpoint(config.model.init_from)) / TOKENIZER_DIR
        if not previous.is_dir():
            raise FileNotFoundError(
                f"model.tokenizer is null, so the tokenizer comes from the previous stage, but "
                f"{previous} does not exist"
            )
        return AutoTokenizer.from_pretrained(previous)
    from .tokenizer import build_tiny_tokenizer

    # Deterministic for the same texts; byte-level, so any other text still encodes.
    return build_tiny_tokenizer(conversation_texts(load_llava_json(config.data.train_json)))


def canonical_names(model: FlashSloth) -> dict[str, str]:
    """``model.state_dict()`` name -> canonical name (`FlashSloth.canonical_state_dict`)."""
    canonical_of = {id(t): name for name, t in model.canonical_state_dict(keep_vars=True).items()}
    return {name: canonical_of[id(t)] for name, t in model.state_dict(keep_vars=True).items()}


def _init_components(model: FlashSloth, config: ModelConfig) -> Path | None:
    """Copy ``init_components`` from ``init_from`` (a run folder: its latest checkpoint)."""
    if not config.init_components:
        return None
    path = resolve_checkpoint(config.init_from)
    state = load_checkpoint(path).model_state
    # Strict per component: every tensor of a named component must come from the file,
    # so a stage-2 SAP can never silently stay at its random init (the release's defect).
    model.load_components(state, config.init_components)
    logger.info("initialised %s from %s", ", ".join(config.init_components), path)
    return path


def build_model(config: RecipeConfig, tokenizer: Any, *, device: str | torch.device = "cpu") -> FlashSloth:
    """The model a recipe config describes, with its trainable parts set, in fp32.

    Seeds torch with ``training.seed`` first, so every rank of a distributed run (and a
    resumed run) builds the same random parts.
    """
    torch.manual_seed(config.training.seed)
    model = build_flashsloth(
        flashsloth_config(config.model, num_tokens=len(tokenizer)),
        tokenizer,
        device=device,
        dtype=torch.float32,  # master weights; autocast computes in bf16 on GPU
        vision_weights=config.model.vision_encoder,
        llm_weights=config.model.llm,
    )
    _init_components(model, config.model)
    model.set_trainable(config.model.trainable)
    return model


def rebuild_model(
    config: RecipeConfig, tokenizer: Any, state: Mapping[str, torch.Tensor], *, vocab_size: int
) -> FlashSloth:
    """A CPU model of ``config``'s architecture holding ``state`` (canonical or module names).

    Nothing is downloaded or randomly initialised: every tensor comes from ``state``.
    ``tokenizer`` must be the trained model's (it already holds the query tokens).
    """
    model = build_flashsloth(
        flashsloth_config(config.model, vocab_size=vocab_size),
        tokenizer,
        device="cpu",
        dtype=torch.float32,
        initialize=False,
    )
    model.load_components(state)  # all components, strictly
    return model.eval()
