"""Selecting compressors (ToMe, DART, VisionZip) grafted onto whole models, training-free
(Qwen2-VL: `test_qwen2_vl_selection`): on LLaVA the image embeddings equal the compressor run by hand on the selected vision
features (VisionZip with scores computed by hand), cached generation equals recomputation,
a left-padded batch equals each prompt alone, save/load and remove() round-trip; the
families whose grafts cannot take them refuse with the reason."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from tests.adapters.conftest import TINY, build_tiny_llava, make_images, make_inputs, make_prompt
from tests.adapters.tiny_internvl import build_tiny_internvl
from tests.adapters.tiny_llava_next import build_tiny_llava_next
from tests.adapters.tiny_llava_onevision import build_tiny_llava_onevision
from tests.adapters.test_vision_scores import _plain_reference
from tokencompress import DART, AvgPool, TokenCompressor, ToMe, VisionZip
from tokencompress.adapters import graft_compressor, load_compressor_graft

GRID = (TINY["image_size"] // TINY["patch_size"],) * 2  # (8, 8): 64 tokens per image
BUDGET = 9
SELECTORS: dict[str, Callable[[], TokenCompressor]] = {
    "tome": lambda: ToMe(BUDGET),
    "dart": lambda: DART(BUDGET),
    "visionzip": lambda: VisionZip(dominant=6, contextual=3),
}


def _llava(vision: str = "clip") -> tuple[LlavaForConditionalGeneration, object]:
    return build_tiny_llava("qwen2", vision)


def _logits(model: nn.Module, inputs: object) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _image_embeds(model: LlavaForConditionalGeneration, inputs: object) -> torch.Tensor:
    """The image rows of the `inputs_embeds` that reach the language model."""
    captured: list[torch.Tensor] = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["inputs_embeds"]), with_kwargs=True
    )
    try:
        _logits(model, inputs)
    finally:
        hook.remove()
    return captured[0][inputs["input_ids"] == model.config.image_token_id]


@pytest.mark.parametrize("vision", ["clip", "siglip"])
@pytest.mark.parametrize("name", list(SELECTORS))
def test_image_embeddings_are_the_projected_selection(name: str, vision: str) -> None:
    model, processor = _llava(vision)
    compressor = SELECTORS[name]()
    graft = graft_compressor(model, compressor, processor=processor)
    inputs = make_inputs(processor, n_images=2, seed=4)
    assert graft.num_image_tokens == BUDGET
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 2 * BUDGET
    with torch.no_grad():
        core = model.model
        hidden = core.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        features = hidden[model.config.vision_feature_layer]
        features = features[:, 1:] if vision == "clip" else features
        kwargs = {}
        if compressor.needs_attention_scores:
            kwargs["attention_scores"] = _plain_reference(model, inputs["pixel_values"], vision == "clip")
        expected = core.multi_modal_projector.base_layer(compressor(features, GRID, **kwargs))
    torch.testing.assert_close(_image_embeds(model, inputs), expected.reshape(-1, expected.shape[-1]))


@pytest.mark.parametrize("name", list(SELECTORS))
def test_generation_batches_save_load_and_remove(name: str, tmp_path: Path) -> None:
    model, processor = _llava()
    before = _logits(model, make_inputs(processor))
    graft = graft_compressor(model, SELECTORS[name](), processor=processor)
    # Greedy generation with the cache equals recomputation without it.
    inputs = make_inputs(processor, n_images=2)
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(**inputs, **settings), model.generate(**inputs, **settings, use_cache=False))
    # A left-padded batch of prompts of different lengths equals each prompt alone.
    prompts = [make_prompt(1), make_prompt(1, "And this one, in a much longer question than the first?")]
    images = make_images(2, seed=7)
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    batched = model.generate(**batch, **settings)
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        alone = processor(images=[image], text=[prompt], return_tensors="pt")
        generated = model.generate(**alone, **settings)[0, alone["input_ids"].shape[1]:]
        assert torch.equal(batched[row, batch["input_ids"].shape[1]:], generated)
    # Save and load give the same logits; remove() gives back the model as it was.
    expected = _logits(model, inputs)
    graft.save_pretrained(tmp_path)
    graft.remove()
    assert torch.equal(_logits(model, make_inputs(processor)), before)
    loaded = load_compressor_graft(model, tmp_path, processor=processor)
    assert isinstance(loaded.compressor, type(graft.compressor))
    assert loaded.compressor.get_config() == graft.compressor.get_config()
    assert torch.equal(_logits(model, make_inputs(processor, n_images=2)), expected)
    loaded.remove()


def test_selection_of_every_token_is_the_ungrafted_model() -> None:
    model, processor = _llava("siglip")
    inputs = make_inputs(processor, n_images=2)
    expected = _logits(model, inputs)
    for compressor in (ToMe(GRID[0] * GRID[1]), DART(GRID[0] * GRID[1])):
        graft = graft_compressor(model, compressor, processor=processor)
        torch.testing.assert_close(_logits(model, inputs), expected, rtol=0, atol=0)
        graft.remove()


def test_families_that_cannot_take_a_selection_refuse_it() -> None:
    model, processor = build_tiny_llava_next()
    with pytest.raises(ValueError, match="compressor=ToMe selects tokens without keeping a grid, but LLaVA-NeXT"):
        graft_compressor(model, ToMe(4), processor=processor)
    onevision, onevision_processor = build_tiny_llava_onevision()
    with pytest.raises(ValueError, match="compressor=DART selects tokens .* but LLaVA-OneVision lays each tile"):
        graft_compressor(onevision, DART(4), processor=onevision_processor)
    internvl, internvl_processor = build_tiny_internvl()
    with pytest.raises(ValueError, match="compressor=VisionZip needs the attention .* the InternVL graft does not"):
        graft_compressor(internvl, VisionZip(dominant=3, contextual=1), processor=internvl_processor)
    # InternVL only counts tokens per tile and gives them 1-D positions: a selection fits.
    graft = graft_compressor(internvl, ToMe(4), processor=internvl_processor)
    assert internvl.config.image_seq_length == 4
    graft.remove()
    # Nothing half-grafted by the refusals.
    for core in (model.model, onevision.model, internvl.model):
        assert "get_image_features" not in vars(core)
    graft_compressor(model, AvgPool(2), processor=processor).remove()
