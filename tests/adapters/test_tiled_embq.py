"""EmbQ on the tiled families, LLaVA-NeXT, LLaVA-OneVision and InternVL: it reads every
uncompressed view (tile) of each sample's images; cached generation, left-padded batches,
remove, save/load (alone and with a compressor graft), gradients, and what it refuses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from tests.adapters.conftest import TINY
from tests.adapters.test_qwen2_vl import NEW_TOKENS, generate, greedy_without_cache, spied_embq_vision
from tests.adapters.tiny_internvl import build_tiny_internvl
from tests.adapters.tiny_llava_next import build_tiny_llava_next, inputs_for, make_image
from tests.adapters.tiny_llava_onevision import build_tiny_llava_onevision
from tokencompress import SAP, AvgPool, EmbQ
from tokencompress.adapters import graft_compressor, graft_embq, load_embq_graft, load_grafted, pad_prompts
from tokencompress.adapters import save_grafted
from tokencompress.adapters._llava_next_embq_hooks import views_per_image
from tokencompress.adapters.internvl_embq import InternVLEmbQGraft
from tokencompress.adapters.llava_next_embq import AnyresEmbQGraft

#: A portrait picture, a small one, a landscape one: each gets other tiles.
TALL, SMALL, WIDE = (100, 30), (10, 10), (40, 90)

TWO_IMAGES = [{"role": "user", "content": "<image>\n<image>\nAre they the same?"}]
TWO_TURNS = [
    {"role": "user", "content": "<image>\nWhat is it?"},
    {"role": "assistant", "content": "A box."},
    {"role": "user", "content": "How big is it?"},
]


@dataclass(frozen=True)
class Tiled:
    """A tiled family: its tiny model, EmbQ's vision width, its EmbQ handle."""

    build: Callable[[], tuple[nn.Module, Any]]
    vision_dim: int
    handle: type


FAMILIES = {
    "llava_next": Tiled(build_tiny_llava_next, TINY["vision_hidden"], AnyresEmbQGraft),
    "llava_onevision": Tiled(build_tiny_llava_onevision, TINY["vision_hidden"], AnyresEmbQGraft),
    "internvl": Tiled(build_tiny_internvl, 4 * TINY["vision_hidden"], InternVLEmbQGraft),
}


@pytest.fixture(params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def build(family: str) -> tuple[nn.Module, Any]:
    model, processor = FAMILIES[family].build()
    processor.tokenizer.padding_side = "left"
    return model, processor


def graft_queries(model: nn.Module, processor: Any, family: str) -> Any:
    torch.manual_seed(0)
    embq = EmbQ(TINY["text_hidden"], FAMILIES[family].vision_dim, inner_dim=16, num_heads=2)
    handle = graft_embq(model, embq, layer=2, num_queries=3, tokenizer=processor.tokenizer)
    assert type(handle) is FAMILIES[family].handle
    with torch.no_grad():  # weights that make a visible difference
        handle.query_vectors.normal_(std=0.5)
        handle.embq.up.weight.mul_(4.0)
    return handle


def embq_batch(handle: Any, processor: Any, conversations: list, sizes: list[list]) -> dict:
    """The padded batch of `conversations` (images of `sizes` each) with their pixels, encoded
    in one call (OneVision: one group of images per prompt)."""
    groups = [[make_image(*size, seed=index) for index, size in enumerate(image_sizes)] for image_sizes in sizes]
    images = [image for group in groups for image in group]
    internvl = isinstance(handle, InternVLEmbQGraft)
    onevision = "batch_num_images" in processor.image_processor.model_input_names
    pixels = processor.image_processor(groups if onevision else images, return_tensors="pt")
    first, prompts = 0, []
    for messages, group in zip(conversations, groups):
        chosen = slice(first, first + len(group))
        sizing = {"num_patches": pixels["num_patches"][chosen]} if internvl else {"image_sizes": pixels["image_sizes"][chosen]}
        prompts.append(handle.build_prompt(messages, processor=processor, **sizing))
        first += len(group)
    model_pixels = {key: value for key, value in pixels.items() if key != "num_patches"}
    return {**pad_prompts(prompts, pad_token_id=processor.tokenizer.pad_token_id), **model_pixels,
            **({"num_patches": pixels["num_patches"]} if internvl else {})}


def model_inputs(batch: dict) -> dict:
    """The batch without what only the reference reads."""
    return {key: value for key, value in batch.items() if key != "num_patches"}


def raw_views(model: nn.Module, batch: dict) -> list[torch.Tensor]:
    """Each image's uncompressed features over all the views (tiles) the model encodes for it,
    as its projector receives them."""
    core = model.model
    if "num_patches" in batch:  # InternVL: tiles through the tower, CLS dropped, pixel-shuffled
        hidden = core.vision_tower(batch["pixel_values"]).last_hidden_state[:, 1:]
        side = int(hidden.shape[1] ** 0.5)
        tiles = core.pixel_shuffle(hidden.reshape(-1, side, side, hidden.shape[-1]), scale_factor=0.5).flatten(1, 2)
        return [image.flatten(0, 1) for image in torch.split(tiles, batch["num_patches"].tolist())]
    counts = views_per_image(core.config, batch["image_sizes"].tolist(), batch.get("batch_num_images"))
    images = []
    for pixels, count in zip(batch["pixel_values"], counts):
        hidden = core.vision_tower(pixels[:count], output_hidden_states=True).hidden_states[-2]
        if core.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        images.append(hidden.flatten(0, 1))
    return images


@pytest.mark.parametrize("with_compressor", [False, True], ids=["embq", "embq+avgpool"])
def test_cached_generation_equals_recomputation_and_reads_every_uncompressed_view(
    family: str, with_compressor: bool
) -> None:
    model, processor = build(family)
    handle = graft_queries(model, processor, family)
    if with_compressor:
        graft_compressor(model, AvgPool(2), processor=processor)
    batch = embq_batch(handle, processor, [TWO_IMAGES, TWO_TURNS], [[TALL, SMALL], [WIDE]])
    banned = list(handle.token_ids) + [processor.tokenizer.eos_token_id]
    with torch.no_grad(), spied_embq_vision(handle) as seen:
        tokens, logits = generate(model, model_inputs(batch))
        expected_tokens, expected_logits = greedy_without_cache(model, model_inputs(batch), banned)
        images = raw_views(model, batch)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    # The prefill (pre-encoded images) and every recomputation read, per row, all views of
    # the row's images, uncompressed: row 0 its two images, row 1 its one.
    assert len(seen) == 1 + NEW_TOKENS
    for vision in seen:
        torch.testing.assert_close(vision, torch.cat(images), rtol=0, atol=0)
    views = {"llava_next": [3, 3, 3], "llava_onevision": [1, 1, 3],  # OneVision: base views of two images
             "internvl": [4, 1, 3]}[family]  # InternVL: 3 tiles + a thumbnail, 1 tile, 2 + a thumbnail
    assert [image.shape[0] for image in images] == [64 * count for count in views]
    # EmbQ matters: without its update the first step's logits differ.
    layer = model.model.language_model.layers[1]
    layer.add_update = lambda hidden_states, call: hidden_states
    try:
        with torch.no_grad():
            _, without = generate(model, model_inputs(batch))
    finally:
        del layer.add_update
    assert (without[:, 0] - logits[:, 0]).abs().max() > 1e-4


def test_left_padded_batch_equals_one_by_one(family: str) -> None:
    model, processor = build(family)
    handle = graft_queries(model, processor, family)
    graft_compressor(model, AvgPool(2), processor=processor)
    conversations, sizes = [TWO_TURNS, TWO_IMAGES], [[WIDE], [TALL, SMALL]]
    batch = embq_batch(handle, processor, conversations, sizes)
    with torch.no_grad():
        tokens, logits = generate(model, model_inputs(batch))
        for row, (conversation, image_sizes) in enumerate(zip(conversations, sizes)):
            alone = embq_batch(handle, processor, [conversation], [image_sizes])
            alone_tokens, alone_logits = generate(model, model_inputs(alone))
            assert torch.equal(alone_tokens, tokens[row:row + 1]), f"prompt {row}"
            torch.testing.assert_close(alone_logits, logits[row:row + 1], atol=1e-5, rtol=1e-5)


def test_remove_and_save_load_round_trip(family: str, tmp_path: Path) -> None:
    model, processor = build(family)
    plain = inputs_for(processor, [make_image(*WIDE)], [f"{processor.image_token} What is it?"])
    with torch.no_grad():
        before = model(**plain).logits
    handle = graft_queries(model, processor, family)
    batch = embq_batch(handle, processor, [TWO_TURNS], [[WIDE]])
    with torch.no_grad():
        expected = model(**model_inputs(batch)).logits
    handle.save_pretrained(tmp_path, save_base_model=True)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**plain).logits, before)
    assert "get_image_features" not in vars(model.model)

    reloaded = type(model).from_pretrained(tmp_path).eval()
    loaded = load_embq_graft(reloaded, tmp_path, tokenizer=AutoTokenizer.from_pretrained(tmp_path))
    assert type(loaded) is FAMILIES[family].handle and loaded.token_ids == handle.token_ids
    with torch.no_grad():
        assert torch.equal(reloaded(**model_inputs(batch)).logits, expected)


def test_both_grafts_save_and_load_together_and_train(family: str, tmp_path: Path) -> None:
    model, processor = build(family)
    compressor_graft = graft_compressor(model, SAP(FAMILIES[family].vision_dim, window=2), processor=processor)
    embq_graft = graft_queries(model, processor, family)
    batch = embq_batch(embq_graft, processor, [TWO_IMAGES, TWO_TURNS], [[TALL, SMALL], [WIDE]])
    with torch.no_grad():
        expected = model(**model_inputs(batch)).logits
    save_grafted(model, tmp_path, compressor_graft, embq_graft)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    loaded = load_grafted(reloaded, tmp_path, processor=type(processor).from_pretrained(tmp_path))
    assert [type(handle) for handle in loaded] == [type(compressor_graft), FAMILIES[family].handle]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**model_inputs(batch)).logits, expected, rtol=0, atol=0)

    model.train()
    model(**model_inputs(batch), labels=batch["input_ids"]).loss.backward()
    for parameter in [*compressor_graft.compressor.parameters(), *embq_graft.parameters()]:
        assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0)


def test_bad_input_is_refused_with_the_reason(family: str) -> None:
    model, processor = build(family)
    with pytest.raises(ValueError, match=f"vision_dim is 64, but this model needs {FAMILIES[family].vision_dim}"):
        graft_embq(model, EmbQ(TINY["text_hidden"], 64, inner_dim=16, num_heads=2), layer=2,
                   tokenizer=processor.tokenizer)
    handle = graft_queries(model, processor, family)
    batch = embq_batch(handle, processor, [TWO_TURNS], [[TALL]])
    one_image = {"num_patches": [3]} if family == "internvl" else {"image_sizes": [WIDE]}
    with pytest.raises(TypeError, match="takes no max_length="):
        handle.build_prompt(TWO_TURNS, processor=processor, max_length=8, **one_image)
    with pytest.raises(ValueError, match="2 image placeholders for 2 images, but 1 image sizes"):
        handle.build_prompt(TWO_IMAGES, processor=processor, **one_image)
    # A prompt written for other image sizes than its pixels' does not fit them.
    other = embq_batch(handle, processor, [TWO_TURNS], [[WIDE]])
    assert other["input_ids"].shape != batch["input_ids"].shape
    with pytest.raises(ValueError, match="do not match|cannot tell which image"):
        model(**{**model_inputs(batch), "input_ids": other["input_ids"], "attention_mask": other["attention_mask"],
                 "embq_instruction_map": other["embq_instruction_map"]})
    if family == "llava_onevision":
        frames = torch.randn(1, 2, 3, 56, 56)
        with pytest.raises(ValueError, match="videos are not supported"):
            model(**batch, pixel_values_videos=frames)


# -- the pieces -------------------------------------------------------------------------------
def test_images_are_given_to_the_rows_whose_placeholders_they_fill() -> None:
    from tokencompress.adapters._embq_call import images_per_row_by_length, pack_images_of_rows

    # Row 0: images 0 and 1 (3 + 2 placeholders), row 1: none, row 2: image 2 (4).
    placeholders, lengths = torch.tensor([5, 0, 4]), torch.tensor([3, 2, 4])
    per_row = images_per_row_by_length(placeholders, lengths)
    assert per_row.tolist() == [2, 0, 1]
    images = [torch.full((count, 2), float(index)) for index, count in enumerate([6, 1, 2])]
    vision, cu = pack_images_of_rows(per_row, images, 3, 2, torch.float64)
    assert cu.tolist() == [0, 7, 7, 9] and vision[:, 0].tolist() == [0.0] * 6 + [1.0] + [2.0] * 2
    # generate() with two sequences per prompt: rows repeated, the images stored once.
    repeated = images_per_row_by_length(placeholders.repeat_interleave(2), torch.tensor([3, 2, 3, 2, 4, 4]))
    assert repeated.tolist() == [2, 2, 0, 0, 1, 1]
    vision, cu = pack_images_of_rows(repeated, images, 6, 2, torch.float64)
    assert cu.tolist() == [0, 7, 14, 14, 14, 16, 18]
    with pytest.raises(ValueError, match=r"rows hold \[4, 0, 5\] image placeholders, the call's images fill"):
        images_per_row_by_length(torch.tensor([4, 0, 5]), lengths)  # row 0 ends inside image 1
    with pytest.raises(ValueError, match="images fill"):
        images_per_row_by_length(torch.tensor([5, 0, 5]), lengths)  # one placeholder too many
    assert images_per_row_by_length(torch.tensor([0, 0]), torch.zeros(0, dtype=torch.long)).tolist() == [0, 0]
