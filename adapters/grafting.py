"""The grafts' entry points: each finds the model's family in the table and hands over.

    graft = graft_compressor(model, SAP(1152), processor=processor)
    queries = graft_embq(model, EmbQ(2560, 1152), layer=8, tokenizer=processor.tokenizer)
    ...
    queries.remove(); graft.remove()      # the model and processor exactly as before

Which models are supported, and what each family's graft changes: `families.FAMILIES`
and the family modules (`compressor_graft` and `embq` for LLaVA, `qwen2_vl` and
`qwen2_vl_embq` for Qwen2-VL / Qwen2.5-VL, `llava_next` for LLaVA-NeXT).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from tokencompress.base import TokenCompressor

from .families import embq_family_of, family_of

__all__ = ["graft_compressor", "graft_embq", "load_compressor_graft"]


def graft_compressor(
    model: nn.Module,
    compressor: TokenCompressor,
    *,
    processor: Any | None = None,
    placement: str = "auto",
    projector: nn.Module | None = None,
) -> Any:
    """Run `compressor` on each image's visual tokens, before they reach the language model.

    Args:
        model: a model of a supported family (`families.FAMILIES`), with or without its LM
            head: LLaVA (`LlavaForConditionalGeneration`, `LlavaModel`), Qwen2-VL and
            Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, ... and their cores).
        compressor: any `TokenCompressor`. It runs on each image's grid (LLaVA: the vision
            grid, image_size // patch_size per side; Qwen2-VL: each frame's merged grid),
            moved to the wrapped module's device and dtype, in its train/eval mode.
        processor: the model's processor; its placeholders per image become the compressed
            count (restored by `remove()`).
        placement: LLaVA: "auto" (default) keeps the projector after a compressor that keeps
            the width and replaces it by one whose output width is the text width;
            "before_projector" / "replace_projector" force it. Qwen2-VL: only "auto".
        projector: a new module after the compressor, for a compressor that changes the
            width (PixelShuffle: 4C); without it such a compressor is a ValueError naming
            the widths.

    Returns:
        the family's graft handle (`CompressorGraft`, `Qwen2VLCompressorGraft`):
        `remove()` undoes everything, `lifted()` undoes it for a block,
        `save_pretrained(folder)` saves it.

    Raises:
        TypeError: for a model of no supported family (the message lists them) or a
            compressor that is no `TokenCompressor`.
        ValueError: for a compressor that does not fit the model (widths, grids), a
            second compressor graft, a processor that does not match the model.
    """
    family = family_of(model, "graft_compressor")
    return family.graft_compressor(model, compressor, processor=processor, placement=placement, projector=projector)


def graft_embq(
    model: nn.Module,
    embq: nn.Module,
    *,
    layer: int,
    tokenizer: Any,
    num_queries: int = 9,
    query_tokens: Sequence[str] | None = None,
    dot_token: str = ".",
    dot_token_id: int | None = None,
) -> Any:
    """Add `num_queries` query tokens and run `embq` on them before decoder layer `layer`.

    Args:
        model: a model of a supported family (`families.FAMILIES`).
        embq: a `tokencompress.EmbQ` (text_dim = the LLM's width, vision_dim = the width of
            the vision features EmbQ reads: LLaVA's selected features before the projector,
            Qwen2-VL's merged tokens); moved to the embedding's device and dtype.
        layer: 1-based, as the paper counts: layer=8 applies EmbQ to the input of the 8th
            decoder layer (`layers[7]`), the hidden states after 7 layers; 1..num_layers.
        tokenizer: gets the query tokens (special tokens) if it lacks them; use the
            processor's tokenizer, so that both agree on them.
        num_queries: query tokens per block (FlashSloth: 9).
        query_tokens: their strings; default "<query_0>", "<query_1>", ...
        dot_token, dot_token_id: the token whose embedding the query vectors add to.

    Returns:
        the family's `EmbQGraft`: `remove()` undoes it, `save_pretrained(folder)` saves it,
        `build_prompt(...)` writes prompts with the query blocks.
    """
    family = embq_family_of(model, "graft_embq")
    return family.graft_embq(
        model, embq, layer=layer, tokenizer=tokenizer, num_queries=num_queries,
        query_tokens=query_tokens, dot_token=dot_token, dot_token_id=dot_token_id,
    )


def load_compressor_graft(
    model: nn.Module,
    folder: str | Path,
    *,
    processor: Any | None = None,
    compressor: TokenCompressor | None = None,
    projector: nn.Module | None = None,
) -> Any:
    """Graft the compressor saved in `folder` onto `model` (and `processor`), with its weights.

    The compressor is rebuilt from the saved settings, unless `compressor` is given (needed
    when it was saved without settings, e.g. an unregistered class). A graft saved with a
    new projector needs `projector=`, a module of the same architecture; its weights are
    loaded from the folder. The folder must hold a graft of the model's family.
    """
    family = family_of(model, "load_compressor_graft")
    return family.load_compressor(model, folder, processor=processor, compressor=compressor, projector=projector)
