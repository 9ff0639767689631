"""Graft a visual-token compressor onto Qwen2-VL or Qwen2.5-VL, removably.

    graft = graft_compressor(model, AvgPool(2), processor=processor)    # dispatches here
    inputs = processor(images=[photo, chart], text=[prompt], return_tensors="pt")
    model.generate(**inputs)   # each image gives a quarter of its merged tokens
    graft.remove()             # the model and processor are exactly as before

An image of `image_grid_thw` row (t, h, w) patches becomes t * (h/m) * (w/m) merged tokens
(m = spatial_merge_size), row-major; the compressor maps each frame's grid (h/m, w/m) to
its `out_grid` (H', W'). Three things follow that grid, and the graft changes each at
the one place transformers decides it:

- **the tokens**: `visual.merger` is wrapped (`CompressedPatchMerger`, the merger kept as
  `base_layer`; it holds the compressor) and the core's `get_image_features` becomes an
  instance attribute that calls the class's own method (the vision tower runs on the
  original grid) and compresses each image's merged tokens it returns;
- **the placeholders**: the processor's `replace_image_token` (an instance attribute)
  writes t * H' * W' image pads per image instead of t * (h/m) * (w/m), and its
  `_get_num_multimodal_tokens` (what serving engines ask, from image sizes alone)
  reports the same counts;
- **the rotary positions**: the core's `get_rope_index` (an instance attribute) lays out
  each image under its rope grid (t, H' * m, W' * m) instead of (t, h, w), i.e. exactly as
  for an image whose merged grid is (H', W'). Every caller goes through it: the forward
  (`compute_3d_position_ids`) and `generate` (`_prepare_position_ids_for_generation`,
  which also caches `rope_deltas` for the decoding steps, so those follow too).

A selecting compressor (ToMe, DART, VisionZip) keeps each kept token at its original
rotary position (`_kept_positions`); one that needs attention scores (VisionZip) gets
them from the last vision block, computed while `get_image_features` runs
(`_qwen2_vl_scores`) and handed over with the call.

The class and every other instance are untouched; `remove()` deletes the attributes and
unwraps the merger. `graft_merger_compressor` does the work for any family of this layout
(Qwen3-VL: `qwen3_vl`, whose handle also compresses the DeepStack features).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokencompress.base import TokenCompressor

from ._compressor_files import compressor_fields, write_files
from ._compressor_handle import WrappingCompressorGraft
from ._qwen2_vl_compress import CompressedPatchMerger
from ._qwen2_vl_grids import merged_grid_thw, token_counts
from ._kept_positions import kept_positions_scope, record_kept_positions, recorded_kept_positions, rope_index_at_kept
from ._qwen2_vl_parts import merge_size, merged_dim, qwen2_vl_core
from ._qwen2_vl_scores import merged_scores_for_call, scoring_block
from ._selecting import refuse_selection
from ._vision_attention import current_scores
from ._wrap import WrappedSubmodule, match_wrapped

__all__ = ["Qwen2VLCompressorGraft", "graft_qwen2_vl_compressor", "graft_merger_compressor",
           "save_qwen2_vl_compressor_graft", "MERGER_PATH", "RECORD_FORMAT", "RECORD_VERSION"]

#: Where the patch merger is, from the core (`Qwen2VLModel` / `Qwen2_5_VLModel`).
MERGER_PATH = "visual.merger"
#: The record format of a Qwen2-VL compressor graft (`_compressor_files`), and its version.
RECORD_FORMAT = "tokencompress.qwen2_vl_compressor_graft"
RECORD_VERSION = 1
#: A merged grid every shipped compressor accepts (12 is divisible by 2, 3, 4 and 6): the
#: compressor has no fixed grid here (every image has its own), so its settings are
#: checked on this one when written.
_PROBE_GRID = (12, 12)


class _PlaceholderCheck:
    """The prompt's image placeholders must be the compressed count of its images."""

    def __init__(self, core: nn.Module, merger: CompressedPatchMerger, name: str) -> None:
        self.core = core
        self.merger = merger
        self.name = name
        self.enabled = True

    def check(self, input_ids: torch.Tensor | None, image_grid_thw: torch.Tensor | None) -> None:
        if input_ids is None or image_grid_thw is None or torch.compiler.is_compiling():
            return
        found = int((input_ids == self.core.config.image_token_id).sum())
        counts = self.merger.token_counts(image_grid_thw)
        if found == int(counts.sum()):
            return
        uncompressed = int(token_counts(merged_grid_thw(image_grid_thw, self.merger.merge_size)).sum())
        stale = " (the uncompressed count)" if found == uncompressed else ""
        raise ValueError(
            f"the prompt has {found} image placeholder tokens{stale}, but the grafted {self.name} gives "
            f"{counts.tolist()} tokens for its {len(counts)} images ({int(counts.sum())} in all); build "
            "prompts with the processor passed to graft_compressor, which writes the compressed count"
        )

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the core: checks calls that encode their images."""
        if self.enabled and kwargs.get("pixel_values") is not None:
            self.check(kwargs.get("input_ids", args[0] if args else None), kwargs.get("image_grid_thw"))


def _compressing_image_features(
    original: Callable[..., Any], core: nn.Module, compress: Callable[[Any, torch.Tensor], None], scoring: bool
) -> Callable[..., Any]:
    """`get_image_features` whose output `compress(output, image_grid_thw)` compresses in
    place; with `scoring`, both run in the scope of this call's merged-token scores
    (`_qwen2_vl_scores.merged_scores_for_call`), which `compress` reads."""

    def get_image_features(
        pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        # As transformers' can_return_tuple: a tuple only when asked (or configured) for one.
        return_dict = kwargs.pop("return_dict", None)
        return_dict = core.config.return_dict if return_dict is None else return_dict
        scope = merged_scores_for_call(core.visual, image_grid_thw, kwargs) if scoring else nullcontext()
        with scope:
            output = original(pixel_values, image_grid_thw, return_dict=True, **kwargs)
            compress(output, image_grid_thw)
        return output if return_dict else output.to_tuple()

    return get_image_features


def _rope_index_on_compressed_grids(
    original: Callable[..., Any], merger: CompressedPatchMerger, check: _PlaceholderCheck
) -> Callable[..., Any]:
    """`get_rope_index` that lays out each image under its rope grid (t, H' m, W' m)."""
    signature = inspect.signature(original)

    def get_rope_index(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        image_grid_thw = bound.arguments.get("image_grid_thw")
        if image_grid_thw is not None:
            check.check(bound.arguments.get("input_ids"), image_grid_thw)
            bound.arguments["image_grid_thw"] = merger.rope_grid_thw(image_grid_thw)
        return original(*bound.args, **bound.kwargs)

    get_rope_index.__signature__ = signature  # type: ignore[attr-defined]
    return get_rope_index


def _scoped_forward(forward: Callable[..., Any]) -> Callable[..., Any]:
    """The core's `forward`, in a scope where its image encoding records the kept positions."""

    @functools.wraps(forward)
    def scoped_forward(*args: Any, **kwargs: Any) -> Any:
        with kept_positions_scope():
            return forward(*args, **kwargs)

    return scoped_forward


def _rope_index_at_kept_positions(
    original: Callable[..., Any], core: nn.Module, check: _PlaceholderCheck
) -> Callable[..., Any]:
    """`get_rope_index` that gives each token a selecting compressor kept the position it
    had in the uncompressed image (`_kept_positions`)."""
    signature = inspect.signature(original)

    def get_rope_index(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        image_grid_thw = bound.arguments.get("image_grid_thw")
        if image_grid_thw is None:
            return original(*bound.args, **bound.kwargs)
        check.check(bound.arguments.get("input_ids"), image_grid_thw)
        arguments = {name: value for name, value in bound.arguments.items() if name != "kwargs"}
        arguments.update(bound.arguments.get("kwargs", {}))
        kept = recorded_kept_positions()  # a forward: its images were encoded already
        if kept is None:
            # generate() lays out positions before it encodes the images: encode them here.
            pixel_values = arguments.get("pixel_values")
            if pixel_values is None:
                raise ValueError(
                    "the grafted compressor selects image tokens by their content, so their rotary positions "
                    "need the images: call get_rope_index with pixel_values= (or run the model's forward)"
                )
            kept = core.get_image_features(pixel_values, image_grid_thw, return_dict=True).kept_positions
        merged = merged_grid_thw(image_grid_thw, merge_size(core))
        return rope_index_at_kept(original, arguments, merged, kept)

    get_rope_index.__signature__ = signature  # type: ignore[attr-defined]
    return get_rope_index


def _compressed_placeholders(processor: Any, merger: CompressedPatchMerger) -> Callable[..., str]:
    """The processor's `replace_image_token`, writing the compressed count per image."""

    def replace_image_token(image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        grid = torch.as_tensor(image_inputs["image_grid_thw"][image_idx]).reshape(1, 3)
        return processor.image_token * int(merger.token_counts(grid)[0])

    return replace_image_token


def _smart_resize_of(image_processor: Any) -> Callable[..., tuple[int, int]]:
    """The `smart_resize` of the module that defines the image processor's class (or a base
    class's): transformers keeps one per backend module, so the one in use is found there."""
    for cls in type(image_processor).__mro__:
        function = getattr(sys.modules.get(cls.__module__), "smart_resize", None)
        if callable(function):
            return function
    raise TypeError(
        f"cannot find the resize rule (`smart_resize`) of image processor {type(image_processor).__name__}; "
        "expected a Qwen2-VL image processor or a subclass"
    )


def _resized_patch_grid(image_processor: Any, height: int, width: int, images_kwargs: dict) -> tuple[int, int]:
    """(rows, cols) of patches of an image of `height` x `width` after the image processor's
    resize: the grid behind its `get_number_of_image_patches`, with the same options."""
    smart_resize = _smart_resize_of(image_processor)
    patch = images_kwargs.get("patch_size", image_processor.patch_size)
    merge = images_kwargs.get("merge_size", image_processor.merge_size)
    min_pixels = images_kwargs.get("min_pixels", image_processor.size["shortest_edge"])
    max_pixels = images_kwargs.get("max_pixels", image_processor.size["longest_edge"])
    rows, cols = smart_resize(height, width, patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
    return rows // patch, cols // patch


def _compressed_multimodal_token_counts(
    method: Callable[..., Any], processor: Any, merger: CompressedPatchMerger
) -> Callable[..., Any]:
    """The processor's `_get_num_multimodal_tokens` (how serving engines such as vLLM size
    the placeholders from image sizes alone), with each image's compressed count."""

    def get_num_multimodal_tokens(image_sizes: Any = None, video_sizes: Any = None, **kwargs: Any) -> Any:
        data = method(image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
        if image_sizes is None:
            return data
        images_kwargs = processor._merge_kwargs(**kwargs).get("images_kwargs", {})
        image_processor = processor.image_processor
        grids = torch.tensor(
            [(1, *_resized_patch_grid(image_processor, int(h), int(w), images_kwargs)) for h, w in image_sizes]
        )
        data.num_image_tokens = merger.token_counts(grids).tolist()
        return data

    return get_num_multimodal_tokens


class Qwen2VLCompressorGraft(WrappingCompressorGraft):
    """What `graft_compressor` changed on a Qwen2-VL / Qwen2.5-VL model, and how to undo,
    lift or save it.

    Attributes:
        model: the grafted model.
        processor: the processor whose placeholder count follows the graft, if given.
        module: the `CompressedPatchMerger` in place of `visual.merger`.
    """

    #: For messages: the family, and the processor classes it takes.
    family_name = "Qwen2-VL"
    processor_names = "Qwen2VLProcessor or Qwen2_5_VLProcessor"
    #: The format name of its saved record (`_compressor_files`).
    record_format = RECORD_FORMAT
    #: Why the family cannot take a selecting compressor (`_selecting`), or None if it can.
    refuses_selection: str | None = None
    #: Whether the graft computes attention scores for a compressor that needs them (VisionZip).
    computes_scores = True

    def __init__(self, model: nn.Module, core: nn.Module, processor: Any | None) -> None:
        super().__init__(model, processor)
        self._core = core
        self._check: _PlaceholderCheck | None = None
        self._hook: RemovableHandle | None = None

    # -- what is grafted --------------------------------------------------------------------
    @property
    def module(self) -> CompressedPatchMerger:
        return self._wrapped.wrapper  # type: ignore[union-attr,return-value]

    @property
    def merge_size(self) -> int:
        return self.module.merge_size

    def compressed_grid_thw(self, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """(t, H', W') per image: the grid of its compressed tokens."""
        return self.module.compressed_grid_thw(image_grid_thw)

    def rope_grid_thw(self, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """The `image_grid_thw` rows the grafted `get_rope_index` lays out positions with."""
        return self.module.rope_grid_thw(image_grid_thw)

    def num_image_tokens(self, image_grid_thw: torch.Tensor) -> list[int]:
        """Image tokens (and placeholders) per image now; the ungrafted count is t * h * w / m**2."""
        return self.module.token_counts(image_grid_thw).tolist()

    def _compress_image_outputs(self, output: Any, image_grid_thw: torch.Tensor) -> None:
        """Compress, in place, what the core's `get_image_features` returned: each image's
        merged tokens; a selecting compressor's kept positions go with the output
        (`kept_positions`) and to this forward's rotary layout (`_kept_positions`). A
        compressor that needs attention scores gets this call's (`current_scores`)."""
        scores = None
        if self.module.compressor.needs_attention_scores and (merged := current_scores()) is not None:
            grids = merged_grid_thw(image_grid_thw, self.merge_size)
            per_image = merged.split(token_counts(grids).tolist())
            scores = [image.reshape(int(frames), -1) for image, frames in zip(per_image, grids[:, 0])]
        output.pooler_output, kept = self.module.compress_images_keeping(output.pooler_output, image_grid_thw, scores)
        if kept is not None:
            output.kept_positions = kept
            record_kept_positions(kept)

    # -- install, undo, lift, save ------------------------------------------------------------
    def _install(self) -> None:
        """The placeholder check and the instance attributes (the merger is wrapped already)."""
        merger, core, processor = self.module, self._core, self.processor
        check = self._check = _PlaceholderCheck(core, merger, type(merger.compressor).__name__)
        self._hook = core.register_forward_pre_hook(check, with_kwargs=True)
        compress = self._compress_image_outputs
        scoring = merger.compressor.needs_attention_scores
        self._override(core, "get_image_features",
                       lambda method: _compressing_image_features(method, core, compress, scoring))
        if merger.compressor.selects_tokens:
            # Each kept token at its original place; this forward's encoding says which were kept.
            self._override(core, "forward", _scoped_forward)
            self._override(core, "get_rope_index", lambda method: _rope_index_at_kept_positions(method, core, check))
        else:
            self._override(core, "get_rope_index",
                           lambda method: _rope_index_on_compressed_grids(method, merger, check))
        if processor is not None:
            self._override(processor, "replace_image_token", lambda _: _compressed_placeholders(processor, merger))
            if hasattr(processor, "_get_num_multimodal_tokens"):
                self._override(processor, "_get_num_multimodal_tokens",
                               lambda method: _compressed_multimodal_token_counts(method, processor, merger))

    def _suspend(self) -> None:
        self._check.enabled = False  # type: ignore[union-attr]

    def _resume(self) -> None:
        self._check.enabled = True  # type: ignore[union-attr]

    def _undo_more(self) -> None:
        if self._hook is not None:
            self._hook.remove()

    def _save(self, folder: str | Path) -> None:
        save_qwen2_vl_compressor_graft(self, folder)

    def __repr__(self) -> str:
        name = type(self).__name__
        if self._wrapped is None:
            return f"{name}(not installed)"
        return (
            f"{name}({type(self.compressor).__name__}, merge_size={self.merge_size}, "
            f"new projector={self.projector is not None}, active={self.active})"
        )


_MergerGraft = TypeVar("_MergerGraft", bound=Qwen2VLCompressorGraft)


def _check_processor(processor: Any, core: nn.Module, merge: int, expected: str) -> None:
    for name in ("replace_image_token", "image_token", "image_processor"):
        if not hasattr(processor, name):
            raise TypeError(
                f"processor must be a {expected} (or have its `{name}`), got {type(processor).__name__}"
            )
    processor_merge = getattr(processor.image_processor, "merge_size", None)
    if processor_merge != merge:
        raise ValueError(
            f"the processor's image processor merges {processor_merge} patches per side, the model {merge}"
        )
    token_id = getattr(processor, "image_token_id", core.config.image_token_id)
    if token_id != core.config.image_token_id:
        raise ValueError(f"the processor's image token id is {token_id}, the model's {core.config.image_token_id}")
    # One image of 2x2 merged tokens: a processor that does not write 4 placeholders for it
    # already follows some other graft, whose count this one would silently replace.
    probe = torch.tensor([[1, 2 * merge, 2 * merge]])
    written = processor.replace_image_token({"image_grid_thw": probe}, image_idx=0).count(processor.image_token)
    if written != 4:
        raise ValueError(
            f"the processor writes {written} placeholders for an image of 2x2 merged tokens, not 4: it "
            "already follows another compressor graft; remove() that graft first"
        )


def graft_qwen2_vl_compressor(
    model: nn.Module,
    compressor: TokenCompressor,
    *,
    processor: Any | None = None,
    projector: nn.Module | None = None,
    placement: str = "auto",
) -> Qwen2VLCompressorGraft:
    """Run `compressor` on each image's merged tokens of a Qwen2-VL / Qwen2.5-VL model.

    `graft_compressor` calls this for those models; see the module docstring for what
    changes.

    Args:
        model: `Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`,
            or their `Qwen2VLModel` / `Qwen2_5_VLModel`.
        compressor: any `TokenCompressor`; it runs on each frame's merged grid
            (h/m, w/m), which differs from image to image, at the merger's width (the
            LLM's width). Moved to the merger's device and dtype; takes its train/eval mode.
        processor: the model's processor; its placeholders per image become the
            compressed count (restored by `remove()`).
        projector: required for a compressor that changes the width (PixelShuffle(2):
            4 * width): a module mapping its output width back to the merger's width,
            e.g. `nn.Linear(4 * width, width)`. The merged tokens already are the LLM's
            input, so there is no projector after them to reuse.
        placement: only "auto": the merger is part of the vision tower, and the
            compressor always runs on its output.

    Returns:
        a `Qwen2VLCompressorGraft`: `remove()` undoes everything; `save_pretrained(folder)`
        saves it; `load_compressor_graft` loads it.
    """
    return graft_merger_compressor(
        Qwen2VLCompressorGraft, qwen2_vl_core(model, "graft_compressor"), model, compressor,
        processor=processor, projector=projector, placement=placement,
    )


def graft_merger_compressor(
    graft_class: type[_MergerGraft],
    core: nn.Module,
    model: nn.Module,
    compressor: TokenCompressor,
    *,
    processor: Any | None,
    projector: nn.Module | None,
    placement: str,
) -> _MergerGraft:
    """`graft_qwen2_vl_compressor` onto `model` whose core is `core`, with the handle
    `graft_class`: the checks, the wrapped merger and `graft_class._install()`'s overrides.

    A family whose core has Qwen2-VL's layout (`visual.merger`, `image_grid_thw`, mRoPE
    from `get_rope_index`) and whose processor has `replace_image_token` uses it.
    """
    if isinstance(core.get_submodule(MERGER_PATH), CompressedPatchMerger):
        raise ValueError("this model already has a grafted compressor; remove() that graft first")
    if not isinstance(compressor, TokenCompressor):
        raise TypeError(f"compressor must be a TokenCompressor, got {type(compressor).__name__}")
    if placement != "auto":
        raise ValueError(
            f"placement={placement!r}: on {graft_class.family_name} the patch merger is part of the vision "
            "tower, so the compressor always runs on the merged tokens; use placement='auto' (and projector= "
            "for a compressor that changes the width)"
        )
    refuse_selection(compressor, graft_class.family_name, selection=graft_class.refuses_selection,
                     scores=graft_class.computes_scores)
    if compressor.needs_attention_scores:
        scoring_block(core.visual)  # a ValueError, before anything changes, where no block can be scored
    merge, dim = merge_size(core), merged_dim(core)
    try:
        compressor.check_dim(dim)
        compressed_dim = compressor.out_dim(dim)
    except ValueError as error:
        name = type(compressor).__name__
        raise ValueError(f"{name} cannot take merged tokens of width {dim}: {error}") from error
    if compressed_dim != dim and projector is None:
        raise ValueError(
            f"{type(compressor).__name__} maps the merged tokens' width {dim} to {compressed_dim}, but the "
            f"language model takes width {dim}; pass projector=<a module mapping {compressed_dim} -> {dim}> "
            f"(e.g. nn.Linear({compressed_dim}, {dim})), or use a compressor that keeps the width"
        )
    if processor is not None:
        _check_processor(processor, core, merge, graft_class.processor_names)

    base_merger = core.get_submodule(MERGER_PATH)
    match_wrapped(compressor, base_merger)
    match_wrapped(projector, base_merger)
    graft = graft_class(model, core, processor)
    try:
        graft._wrapped = WrappedSubmodule.install(
            core, MERGER_PATH, lambda merger: CompressedPatchMerger(merger, compressor, merge, dim, projector)
        )
        graft._install()
    except Exception:
        graft._undo()  # all or nothing: no half-grafted model
        raise
    return graft


def save_qwen2_vl_compressor_graft(graft: Qwen2VLCompressorGraft, folder: str | Path) -> None:
    """Write `graft`'s settings and weights to `folder` (created if needed)."""
    dim = graft.module.dim
    record = {
        "format": graft.record_format,
        "format_version": RECORD_VERSION,
        "model_type": graft._core.config.model_type,
        **compressor_fields(graft.compressor, _PROBE_GRID, dim),
        "new_projector": graft.projector is not None,
        "merge_size": graft.merge_size,
        "dim": dim,
    }
    write_files(graft, folder, record)
