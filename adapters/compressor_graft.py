"""Graft a visual-token compressor onto a Hugging Face LLaVA model, removably.

    handle = graft_compressor(model, SAP(1152), processor=processor)
    ...                      # train, generate: every image now gives 81 tokens, not 729
    handle.remove()          # the model and processor are exactly as before

In transformers 5.x, `LlavaModel.get_image_features` runs the vision tower, selects the
feature layer(s), drops CLS under the "default" strategy, and hands the selected features
(num_images, H*W, C) to `multi_modal_projector`. The graft wraps that one submodule (the
original kept as `base_layer`), so the compressor sees exactly the selected features,
one image per batch row, and everything downstream (placeholder check, masked scatter,
the language model, generation with a KV cache) is transformers' own code.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import LlavaModel, LlavaProcessor

from tokencompress.base import Grid, TokenCompressor, as_grid

from ._compressor_files import compressor_fields, write_files
from ._image_tokens import processor_image_token_count, set_processor_image_token_count
from ._instance_override import InstanceOverride
from ._llava_parts import llava_core, projector_path, projector_widths, vision_grid
from ._vision_attention import current_scores, encoder_layer_scorer, feature_layer_index, scores_for_call
from ._wrap import WrappedSubmodule, match_wrapped, refuse_other_wrappers

__all__ = ["CompressedProjector", "CompressorGraft", "Placement", "RECORD_FORMAT", "RECORD_VERSION",
           "graft_llava_compressor", "save_compressor_graft", "projector_graft_record",
           "check_projector_graft_record", "resolve_placement"]

#: The record format of a LLaVA compressor graft (`_compressor_files`), and its version.
RECORD_FORMAT = "tokencompress.compressor_graft"
RECORD_VERSION = 1

Placement = Literal["auto", "before_projector", "replace_projector"]
_PLACEMENTS = ("auto", "before_projector", "replace_projector")


class CompressedProjector(nn.Module):
    """Stands in for LLaVA's `multi_modal_projector`: compress, then project.

    `placement="before_projector"`: `head(compressor(x))`, where `head` is the new
    `projector` if one was given, else the original projector (`base_layer`).
    `placement="replace_projector"`: `compressor(x)`; the compressor maps to the text width.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        compressor: TokenCompressor,
        grid: Grid,
        placement: Literal["before_projector", "replace_projector"],
        text_dim: int,
        projector: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.compressor = compressor
        self.projector = projector
        self.grid = as_grid(grid)
        self.placement = placement
        self.text_dim = text_dim

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        height, width = self.grid
        if image_features.dim() != 3 or image_features.shape[1] != height * width:
            raise ValueError(
                f"the projector received vision features of shape {tuple(image_features.shape)}, "
                f"but the compressor expects (num_images, {height * width}, C) on the vision "
                f"grid {height}x{width}; a vision tower with a CLS token needs "
                "vision_feature_select_strategy='default', which drops it"
            )
        if self.compressor.needs_attention_scores:
            scores = current_scores()
            if scores is None:
                raise RuntimeError(
                    f"{type(self.compressor).__name__} needs the attention each vision token receives, which "
                    "the graft computes inside get_image_features; call the model (or get_image_features), "
                    "not the projector alone"
                )
            out = self.compressor(image_features, self.grid, attention_scores=scores)
        else:
            out = self.compressor(image_features, self.grid)
        tokens = out[0] if isinstance(out, tuple) else out
        if self.placement == "before_projector":
            tokens = (self.projector if self.projector is not None else self.base_layer)(tokens)
        if tokens.shape[-1] != self.text_dim:
            raise ValueError(
                f"the grafted projector gives tokens of width {tokens.shape[-1]}, but the "
                f"language model's width is {self.text_dim}"
            )
        return tokens

    def extra_repr(self) -> str:
        return f"grid={self.grid}, placement={self.placement!r}"


def resolve_placement(
    placement: str, compressed_dim: int, vision_dim: int, text_dim: int, new_projector: bool
) -> Literal["before_projector", "replace_projector"]:
    """Where a compressor of output width `compressed_dim` goes around a projector of
    `vision_dim` -> `text_dim` (see `graft_llava_compressor`'s `placement`); a ValueError
    that names the widths when it fits nowhere."""
    if placement not in _PLACEMENTS:
        raise ValueError(f"placement must be one of {_PLACEMENTS}, got {placement!r}")
    widths = (
        f"the compressor maps the projector's input width {vision_dim} to {compressed_dim}; "
        f"the language model's width is {text_dim}"
    )
    if placement == "replace_projector":
        if new_projector:
            raise ValueError("placement='replace_projector' takes no projector=: the compressor is the projector")
        if compressed_dim != text_dim:
            raise ValueError(f"placement='replace_projector' needs an output width of {text_dim}: {widths}")
        return "replace_projector"
    if new_projector or compressed_dim == vision_dim:
        return "before_projector"
    if placement == "auto" and compressed_dim == text_dim:
        return "replace_projector"
    raise ValueError(
        f"{widths}, so the model's projector (which takes width {vision_dim}) cannot follow "
        f"it. Pass projector=<a module mapping {compressed_dim} -> {text_dim}> to use a new "
        f"projector after the compressor, or use a compressor that keeps width {vision_dim} "
        f"or outputs width {text_dim} (which then replaces the projector)"
    )


class CompressorGraft:
    """What `graft_compressor` changed, and how to undo, lift or save it.

    Attributes:
        model: the grafted model.
        compressor, projector: the grafted compressor and the new projector (or None).
        placement: "before_projector" or "replace_projector".
        grid: the vision grid (H, W) the compressor runs on.
        num_image_tokens: image tokens per image now; `original_num_image_tokens` before.
        processor: the processor whose placeholder count follows the graft, if given.
    """

    def __init__(
        self,
        model: nn.Module,
        config: Any,
        wrapped: WrappedSubmodule,
        processor: LlavaProcessor | None,
        hook: RemovableHandle,
        check: _PlaceholderCheck | None = None,
        scoring: InstanceOverride | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self._config = config
        self._wrapped = wrapped
        self._hook = hook
        self._check = check  # the hook's function, switched off while lifted
        self._scoring = scoring  # get_image_features that scores the vision tokens, if the compressor needs it
        self.module: CompressedProjector = wrapped.wrapper  # type: ignore[assignment]
        # What the graft changes, as it was: restored by remove().
        self._original_image_seq_length = config.image_seq_length
        self._original_num_additional_image_tokens = (
            processor.num_additional_image_tokens if processor is not None else None
        )

    # -- what is grafted --------------------------------------------------------------
    @property
    def compressor(self) -> TokenCompressor:
        return self.module.compressor

    @property
    def projector(self) -> nn.Module | None:
        return self.module.projector

    @property
    def placement(self) -> str:
        return self.module.placement

    @property
    def grid(self) -> Grid:
        return self.module.grid

    @property
    def num_image_tokens(self) -> int:
        return self.compressor.num_out_tokens(self.grid)

    @property
    def original_num_image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def active(self) -> bool:
        return self._wrapped.active

    # -- undo -------------------------------------------------------------------------
    def remove(self) -> None:
        """Put back the original projector, the config's and the processor's token count."""
        if self._scoring is not None:
            self._scoring.check_removable()  # before anything changes
        self._wrapped.remove()  # raises if already removed, before anything else changes
        self._hook.remove()
        if self._scoring is not None:
            self._scoring.remove()
        self._restore_counts()

    def _restore_counts(self) -> None:
        self._config.image_seq_length = self._original_image_seq_length
        if self.processor is not None:
            self.processor.num_additional_image_tokens = self._original_num_additional_image_tokens

    def _apply_counts(self) -> None:
        self._config.image_seq_length = self.num_image_tokens
        if self.processor is not None:
            image_size = self._config.vision_config.image_size
            set_processor_image_token_count(
                self.processor, (image_size, image_size), self.num_image_tokens
            )

    @contextmanager
    def lifted(self) -> Iterator[None]:
        """Within the block the model and processor are ungrafted: the original projector
        in place, the config's and the processor's image token counts as before, the
        placeholder check idle; e.g. to save them with their own `save_pretrained`."""
        if not self.active:
            raise RuntimeError("this compressor graft was removed")
        with self._wrapped.lifted():  # raises, before anything changes, under a later wrapper
            self._restore_counts()
            if self._check is not None:
                self._check.enabled = False
            try:
                yield
            finally:
                if self._check is not None:
                    self._check.enabled = True
                self._apply_counts()

    # -- save -------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, *, save_base_model: bool = False) -> None:
        """Write the graft (settings JSON + safetensors weights) to `folder`.

        With `save_base_model=True`, also the ungrafted model and processor (their own
        `save_pretrained`), so that `from_pretrained` + `load_compressor_graft` on
        `folder` gives this grafted model back. A grafted model's own `save_pretrained`
        would write the wrapper's parameter names, which a plain LLaVA does not load; for
        the same reason this refuses (RuntimeError) while another graft is in the model:
        save a model with several grafts with `save_grafted(model, folder, *grafts)`.
        """
        if not save_base_model:
            save_compressor_graft(self, folder)
            return
        if not self.active:
            raise RuntimeError("this graft was removed; save the model with its own save_pretrained")
        with self.lifted():
            refuse_other_wrappers(self.model)  # before any file is written
            save_compressor_graft(self, folder)
            self.model.save_pretrained(folder)
            if self.processor is not None:
                self.processor.save_pretrained(folder)

    def __repr__(self) -> str:
        return (
            f"CompressorGraft({type(self.compressor).__name__}, placement={self.placement!r}, "
            f"grid={self.grid}, image tokens {self.original_num_image_tokens} -> "
            f"{self.num_image_tokens}, active={self.active})"
        )


class _PlaceholderCheck:
    """A forward pre-hook on `LlavaModel`: the prompt's placeholders match the compressed images."""

    def __init__(self, llava: LlavaModel, num_image_tokens: int, original: int, name: str) -> None:
        self.llava = llava
        self.num_image_tokens = num_image_tokens
        self.original = original
        self.name = name
        self.enabled = True

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.enabled:
            return
        num_image_tokens = self.num_image_tokens
        input_ids = kwargs.get("input_ids", args[0] if len(args) > 0 else None)
        pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        if kwargs.get("image_sizes") is not None:
            # get_image_features would split the compressed features by the uncompressed sizes.
            raise ValueError("a grafted compressor does not support image_sizes (per-image sizes)")
        # `generate` encodes the images first (get_image_features, through the graft) and
        # passes them as mm_encoder_outputs["image"].pooler_output: one tensor per image.
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if input_ids is None or torch.compiler.is_compiling():
            return  # inputs_embeds: transformers' own check still runs
        if pixel_values is not None:
            num_images, expected = pixel_values.shape[0], pixel_values.shape[0] * num_image_tokens
        elif encoded is not None and encoded.pooler_output is not None:
            num_images = len(encoded.pooler_output)
            expected = sum(features.shape[0] for features in encoded.pooler_output)
        else:
            return  # decoding steps: no images
        found = int((input_ids == self.llava.config.image_token_id).sum())
        if found != expected:
            stale = " (the ungrafted count)" if found == num_images * self.original else ""
            raise ValueError(
                f"the prompt has {found} image placeholder tokens{stale} but the grafted "
                f"{self.name} gives {num_image_tokens} tokens per image x {num_images} images = "
                f"{expected}; build prompts with the processor passed to graft_compressor, "
                f"which writes {num_image_tokens} placeholders per image"
            )


def graft_llava_compressor(
    model: nn.Module,
    compressor: TokenCompressor,
    *,
    processor: LlavaProcessor | None = None,
    placement: Placement = "auto",
    projector: nn.Module | None = None,
) -> CompressorGraft:
    """`graft_compressor` for LLaVA: run `compressor` on each image's selected vision
    features, before the projector.

    Args:
        model: a transformers LLaVA model (`LlavaForConditionalGeneration` or `LlavaModel`).
        compressor: any `TokenCompressor`; it runs on the vision grid
            (image_size // patch_size per side) of each image. It is moved to the
            projector's device and dtype, and takes its train/eval mode.
        processor: the model's `LlavaProcessor`; its placeholder count per image becomes
            `compressor.num_out_tokens(grid)` (restored by `remove()`).
        placement: "auto" (default) keeps the projector after a compressor that keeps the
            width, and replaces it by a compressor whose output width is the text width
            (e.g. `LDP(vision_dim, text_dim)`); "before_projector" or
            "replace_projector" force it (needed when the two widths are equal).
        projector: a new projector, used after the compressor instead of the model's own,
            for a compressor that changes the width (PixelShuffle: 4C). Without it such a
            compressor is a ValueError naming the widths.

    Returns:
        a `CompressorGraft`: `remove()` undoes everything; `save_pretrained(folder)` saves it.
    """
    llava, path = llava_core(model, "graft_compressor"), projector_path(model)
    if isinstance(model.get_submodule(path), CompressedProjector):
        raise ValueError("this model already has a grafted compressor; remove() that graft first")
    if not isinstance(compressor, TokenCompressor):
        raise TypeError(f"compressor must be a TokenCompressor, got {type(compressor).__name__}")
    config = llava.config
    grid = vision_grid(config)
    vision_dim, text_dim = projector_widths(config)
    try:
        compressor.check_dim(vision_dim)
        compressed_dim = compressor.out_dim(vision_dim)
        num_image_tokens = compressor.num_out_tokens(grid)
    except ValueError as error:
        raise ValueError(
            f"{type(compressor).__name__} cannot take this model's vision features "
            f"(grid {grid[0]}x{grid[1]}, width {vision_dim}): {error}"
        ) from error
    resolved = resolve_placement(placement, compressed_dim, vision_dim, text_dim, projector is not None)
    if compressor.needs_attention_scores:
        _scoring_layer(llava)  # a ValueError, before anything changes, where no layer can be scored

    if processor is not None:
        image_size = (config.vision_config.image_size,) * 2
        current = processor_image_token_count(processor, image_size)
        if current != grid[0] * grid[1]:
            raise ValueError(
                f"the processor writes {current} image placeholders per image, but the vision "
                f"grid {grid[0]}x{grid[1]} has {grid[0] * grid[1]} tokens; the compressor needs "
                "exactly the grid's tokens (with a CLS token, use "
                "vision_feature_select_strategy='default' in both the config and the processor)"
            )

    base_projector = model.get_submodule(path)
    match_wrapped(compressor, base_projector)
    match_wrapped(projector, base_projector)
    wrapped = WrappedSubmodule.install(
        model,
        path,
        lambda original: CompressedProjector(original, compressor, grid, resolved, text_dim, projector),
    )
    check = _PlaceholderCheck(llava, num_image_tokens, grid[0] * grid[1], type(compressor).__name__)
    hook = llava.register_forward_pre_hook(check, with_kwargs=True)
    scoring = _install_scoring(llava) if compressor.needs_attention_scores else None
    graft = CompressorGraft(model, config, wrapped, processor, hook, check, scoring)
    try:
        graft._apply_counts()
    except Exception:
        graft.remove()  # all or nothing: no half-grafted model
        raise
    return graft


def _scoring_layer(llava: LlavaModel) -> tuple[nn.Module, bool]:
    """The vision encoder layer whose output is the selected features, and whether the
    tower has a CLS token (LLaVA's "default" strategy drops it from the features)."""
    config = llava.config
    tower = llava.vision_tower
    # The encoder is the tower's own in some transformers releases, its `vision_model`'s in others.
    encoder = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
    layers = getattr(encoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(
        hasattr(layer, "self_attn") and hasattr(layer, "layer_norm1") for layer in layers
    ):
        raise ValueError(
            f"a compressor that needs attention scores (VisionZip) needs a CLIP- or SigLIP-style vision "
            f"tower (encoder.layers[i].self_attn and layer_norm1), got {type(tower).__name__}"
        )
    index = feature_layer_index(config.vision_feature_layer, len(layers))
    return layers[index], config.vision_feature_select_strategy == "default"


def _install_scoring(llava: LlavaModel) -> InstanceOverride:
    """`llava.get_image_features`, scoring the vision tokens in the layer that gives the
    features while it runs: the scores reach the grafted projector with the call."""
    layer, has_cls = _scoring_layer(llava)
    score = encoder_layer_scorer(has_cls=has_cls)

    def make(get_image_features: Any) -> Any:
        # `wraps`: generate() reads the method's signature to pick the image inputs it encodes first.
        @functools.wraps(get_image_features)
        def scoring_get_image_features(*args: Any, **kwargs: Any) -> Any:
            with scores_for_call(layer, score):
                return get_image_features(*args, **kwargs)

        return scoring_get_image_features

    return InstanceOverride.install(llava, "get_image_features", make)


def projector_graft_record(
    graft: Any, config: Any, record_format: str, version: int, widths: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The record of a graft around a LLaVA-style projector (LLaVA, LLaVA-NeXT, InternVL):
    the compressor's settings, how it was placed, and the sizes a loader checks.
    `widths`: the projector's (input, output) widths, if not LLaVA's (`projector_widths`)."""
    vision_dim, text_dim = widths if widths is not None else projector_widths(config)
    return {
        "format": record_format,
        "format_version": version,
        **compressor_fields(graft.compressor, graft.grid, vision_dim),
        "placement": graft.placement,
        "new_projector": graft.projector is not None,
        "grid": list(graft.grid),
        "vision_dim": vision_dim,
        "text_dim": text_dim,
    }


def check_projector_graft_record(
    record: dict[str, Any], folder: Path, config: Any, grid: Grid | None = None,
    widths: tuple[int, int] | None = None,
) -> None:
    """A ValueError unless `record` was made for a model of `config`'s grid and widths
    (or of `grid` and `widths`, where the family's are not LLaVA's)."""
    here = (
        tuple(grid) if grid is not None else vision_grid(config),
        *(widths if widths is not None else projector_widths(config)),
    )
    saved = (tuple(record["grid"]), record["vision_dim"], record["text_dim"])
    if saved != here:
        raise ValueError(
            f"the graft in {folder} was made for vision grid {saved[0]}, vision width {saved[1]} "
            f"and text width {saved[2]}; this model has {here[0]}, {here[1]} and {here[2]}"
        )


def save_compressor_graft(graft: CompressorGraft, folder: str | Path) -> None:
    """Write `graft`'s settings and weights to `folder` (created if needed)."""
    record = projector_graft_record(graft, graft._config, RECORD_FORMAT, RECORD_VERSION)
    record["num_image_tokens"] = graft.num_image_tokens
    write_files(graft, folder, record)
