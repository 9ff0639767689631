"""Compressor and EmbQ grafts on a tiny random Qwen3-VL: Qwen2-VL's checks, plus DeepStack.

The helpers (encoding, greedy decoding with and without the cache, the compressors and
their grafting, EmbQ batches) are `test_qwen2_vl`'s: the two families share them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

from tokencompress import AvgPool, PixelShuffle
from tokencompress.adapters import graft_compressor, load_compressor_graft, load_embq_graft
from tokencompress.adapters import load_grafted, save_grafted
from tokencompress.adapters._qwen2_vl_compress import CompressedPatchMerger
from tokencompress.adapters.compressor_graft_io import CONFIG_NAME
from tokencompress.adapters.qwen3_vl import Qwen3VLCompressorGraft, Qwen3VLEmbQGraft, graft_qwen3_vl_compressor

from .test_qwen2_vl import (
    BIG,
    NEW_TOKENS,
    SMALL,
    TWO_IMAGES,
    TWO_TURNS,
    WIDE,
    embq_batch,
    encode,
    generate,
    graft,
    graft_queries,
    greedy_without_cache,
    images_of,
    logits_of,
    make_compressor,
    recorded_positions,
    rope_index,
    spied_embq_vision,
    with_dtype,
)
from .tiny_qwen2_vl import TEXT_WIDTH, prompt_text
from .tiny_qwen3_vl import DEEPSTACK_LEVELS, ImageOnlyQwen3VLProcessor, build_tiny_qwen3_vl

#: Merged grids 5x7, 3x3 and 4x6 become, under 2x2 windows (edges kept), 3x4, 2x2 and 2x3.
COMPRESSED = {BIG: 12, SMALL: 4, WIDE: 6}


def build(dtype: torch.dtype = torch.float64) -> tuple[Qwen3VLForConditionalGeneration, ImageOnlyQwen3VLProcessor]:
    """The tiny Qwen3-VL in `dtype` (float64: exact comparisons), its processor padding on the left."""
    model, processor = build_tiny_qwen3_vl()
    processor.tokenizer.padding_side = "left"
    return model.to(dtype), processor


def grafted(name: str, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, Any, Qwen3VLCompressorGraft]:
    """The tiny model and processor with `test_qwen2_vl`'s compressor `name` grafted."""
    model, processor = build(dtype)
    handle = graft(model, processor, name)
    assert isinstance(handle, Qwen3VLCompressorGraft)
    return model, processor, handle


def pixels64(processor: Any, texts: list[str], images: list) -> dict[str, torch.Tensor]:
    """The processor's batch, pixels in float64."""
    return with_dtype(encode(processor, texts, images), torch.float64)


def check_decoding(model: nn.Module, batch: dict, banned: list[int], alone: Sequence[dict] = ()) -> None:
    """Greedy `generate` with the cache must give what recomputing everything at each step
    gives, and each row of `batch` what its prompt alone (`alone[row]`) gives."""
    with torch.no_grad():
        tokens, logits = generate(model, batch)
        recomputed = greedy_without_cache(model, batch, banned)
        singles = [generate(model, inputs) for inputs in alone]
    assert torch.equal(tokens, recomputed[0])
    torch.testing.assert_close(logits, recomputed[1].float(), atol=1e-6, rtol=1e-6)
    for row, (alone_tokens, alone_logits) in enumerate(singles):
        assert torch.equal(alone_tokens, tokens[row:row + 1]), f"prompt {row}"
        torch.testing.assert_close(alone_logits, logits[row:row + 1], atol=1e-6, rtol=1e-6)


def embq_batch32(queries: Qwen3VLEmbQGraft, processor: Any, conversations: list, sizes: list) -> dict:
    """`test_qwen2_vl.embq_batch`, pixels in float32."""
    return with_dtype(embq_batch(queries, processor, conversations, sizes), torch.float32)


# -- placeholders and positions -----------------------------------------------------------
@pytest.mark.parametrize("name", ["avgpool", "pixel_shuffle"])
def test_placeholders_features_and_serving_counts_agree_for_every_image_size(name: str) -> None:
    model, processor, handle = grafted(name)
    sizes = [BIG, SMALL, WIDE, (100, 30)]
    images = images_of(*sizes)
    inputs = encode(processor, [prompt_text(1)] * len(images), [[image] for image in images])
    written = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    grids = inputs["image_grid_thw"]
    assert written == handle.num_image_tokens(grids) == handle.compressed_grid_thw(grids).prod(-1).tolist()
    assert written[:3] == [COMPRESSED[size] for size in sizes[:3]]
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"].double(), grids)
    assert [len(tokens) for tokens in features.pooler_output] == written
    for level in features.deepstack_features:  # every DeepStack level: one feature per image token
        assert [tuple(tokens.shape) for tokens in level] == [(count, TEXT_WIDTH) for count in written]
    serving = processor._get_num_multimodal_tokens(image_sizes=[(image.height, image.width) for image in images])
    assert serving.num_image_tokens == written


def test_rotary_positions_are_those_of_images_whose_grid_is_the_out_grid() -> None:
    model, processor, handle = grafted("avgpool")
    texts = [prompt_text(2, "Same?"), prompt_text(1, "And this one, please?")]
    compressed = pixels64(processor, texts, images_of(BIG, SMALL, WIDE))
    with torch.no_grad(), recorded_positions(model) as compressed_seen:
        compressed_index = rope_index(model, compressed)
        generate(model, compressed)
    handle.remove()
    # Uncompressed, with images whose merged grids are the out grids (a merged token is 8 px).
    plain = pixels64(processor, texts, images_of((24, 32), (16, 16), (16, 24)))
    assert plain["image_grid_thw"].tolist() == handle.rope_grid_thw(compressed["image_grid_thw"]).tolist()
    assert all(torch.equal(plain[key], compressed[key]) for key in ("input_ids", "attention_mask", "mm_token_type_ids"))
    with torch.no_grad(), recorded_positions(model) as plain_seen:
        plain_index = rope_index(model, plain)
        generate(model, plain)
    assert all(torch.equal(got, expected) for got, expected in zip(compressed_index, plain_index))  # ids, deltas
    assert len(compressed_seen) == len(plain_seen) == NEW_TOKENS  # the prefill, then every decoding step
    for step, (got, expected) in enumerate(zip(compressed_seen, plain_seen)):
        assert torch.equal(got, expected), f"call {step}"


def test_a_prompt_with_the_uncompressed_count_is_a_clear_error() -> None:
    model, processor = build()
    stale = pixels64(processor, [prompt_text(1)], images_of(BIG))
    graft(model, processor, "avgpool")
    with pytest.raises(ValueError, match=r"35 image placeholder tokens \(the uncompressed count\)"):
        model(**stale)


# -- DeepStack ----------------------------------------------------------------------------
def _compressed_alone(handle: Qwen3VLCompressorGraft, per_image: Any, grids: torch.Tensor) -> list[torch.Tensor]:
    """Each image's merged tokens through the compressor (and projector) on its own, by hand."""
    out = []
    for tokens, (_, height, width) in zip(per_image, grids.tolist()):
        result = handle.compressor(tokens.unsqueeze(0), (height // 2, width // 2))
        result = result[0] if isinstance(result, tuple) else result
        out.append((handle.projector(result) if handle.projector is not None else result)[0])
    return out


def _text_model_logits(model: nn.Module, handle: Qwen3VLCompressorGraft, inputs: dict, image_tokens: list,
                       deepstack: list[list[torch.Tensor]] | None) -> torch.Tensor:
    """The reference: these image tokens and DeepStack features through the plain text model,
    at the positions of images whose merged grids are the out grids."""
    core, input_ids = model.model, inputs["input_ids"]
    image_mask = input_ids == model.config.image_token_id
    embeds = core.get_input_embeddings()(input_ids)
    embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), torch.cat(image_tokens))
    with handle.lifted():  # transformers' own get_rope_index
        positions, _ = core.get_rope_index(
            input_ids, inputs["mm_token_type_ids"], image_grid_thw=handle.rope_grid_thw(inputs["image_grid_thw"]),
            attention_mask=inputs["attention_mask"],
        )
    hidden = core.language_model(
        inputs_embeds=embeds, attention_mask=inputs["attention_mask"], position_ids=positions,
        visual_pos_masks=image_mask,
        deepstack_visual_embeds=None if deepstack is None else [torch.cat(level) for level in deepstack],
    ).last_hidden_state
    return model.lm_head(hidden)


@pytest.mark.parametrize("name", ["sap", "pixel_shuffle"])
def test_each_deepstack_level_is_compressed_as_the_image_tokens_are(name: str) -> None:
    """Feature k of every level must be added to compressed token k: the graft's logits are
    those of the uncompressed tower's outputs, each compressed by hand with the same
    compressor (and projector), through the text model; misaligned features differ."""
    model, processor, handle = grafted(name)
    trained = [*handle.compressor.parameters(), *(handle.projector.parameters() if handle.projector else [])]
    with torch.no_grad():  # weights that differ from a fresh compressor's
        for parameter in trained:
            parameter.add_(0.05 * torch.randn_like(parameter))
    inputs = pixels64(processor, [prompt_text(2), prompt_text(1, "Colour of the sky?")], images_of(BIG, SMALL, WIDE))
    grids = inputs["image_grid_thw"]
    with torch.no_grad():
        logits = model(**inputs).logits
        with handle.lifted():  # the uncompressed tower: merged tokens and DeepStack levels, per image
            tower = model.model.get_image_features(inputs["pixel_values"], grids)
        assert len(tower.deepstack_features) == len(DEEPSTACK_LEVELS)
        image_tokens = _compressed_alone(handle, tower.pooler_output, grids)
        levels = [_compressed_alone(handle, level, grids) for level in tower.deepstack_features]
        torch.testing.assert_close(_text_model_logits(model, handle, inputs, image_tokens, levels), logits,
                                   rtol=0, atol=1e-12)
        # What a misaligned graft would give: the right features in another order, or none.
        flipped = [[tokens.flip(0) for tokens in level] for level in levels]
        main_order = [image_tokens for _ in levels]  # level features replaced by the main tokens
        for wrong in (flipped, main_order, None):
            reference = _text_model_logits(model, handle, inputs, image_tokens, wrong)
            assert (reference - logits).abs().max() > 1e-4


# -- the graft's behaviour ------------------------------------------------------------------
def test_cached_generation_equals_recomputation_and_the_batch_equals_each_prompt_alone() -> None:
    model, processor, _ = grafted("sap")
    prompts = [
        (prompt_text(2, "Are these the same?"), images_of(BIG, SMALL)),
        (prompt_text(1, "Colour?"), images_of(WIDE)),
        (prompt_text(1, "What is in the picture, in detail?"), images_of(SMALL)),
    ]
    batch = pixels64(processor, [text for text, _ in prompts], [image for _, images in prompts for image in images])
    assert len({int(n) for n in batch["attention_mask"].sum(1)}) == 3  # three lengths: real left padding
    check_decoding(model, batch, [processor.tokenizer.eos_token_id],
                   [pixels64(processor, [text], images) for text, images in prompts])


def test_remove_gives_back_bit_identical_logits_and_processor() -> None:
    model, processor = build(torch.float32)
    merger = model.model.visual.merger
    texts, images = [prompt_text(2)], images_of(BIG, SMALL)
    before_inputs = encode(processor, texts, images)
    before = logits_of(model, before_inputs)
    handle = graft(model, processor, "sap")
    compressed = encode(processor, texts, images)
    assert compressed["input_ids"].shape[1] == before_inputs["input_ids"].shape[1] - (35 + 9) + (12 + 4)
    with torch.no_grad():
        model.generate(**compressed, max_new_tokens=2)  # leaves rope_deltas of the compressed prompt
    handle.remove()
    after_inputs = encode(processor, texts, images)
    assert all(torch.equal(after_inputs[key], before_inputs[key]) for key in before_inputs)
    assert torch.equal(logits_of(model, after_inputs), before)
    assert model.model.visual.merger is merger
    assert not {"get_image_features", "get_video_features", "get_rope_index"} & set(vars(model.model))
    assert not {"replace_image_token", "_get_num_multimodal_tokens"} & set(vars(processor))


def test_a_training_step_reaches_the_compressor_the_projector_and_embq() -> None:
    model, processor = build(torch.float32)
    model.train()
    handle = graft(model, processor, "sap")
    queries = graft_queries(model, processor)
    batch = embq_batch32(queries, processor, [TWO_IMAGES], [[BIG, SMALL]])
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for name, parameter in [("sap", handle.compressor.score[0].weight), ("embq", queries.embq.up.weight),
                            ("query_vectors", queries.query_vectors),
                            ("deepstack merger", model.model.visual.deepstack_merger_list[0].linear_fc2.weight)]:
        assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name


# -- saving and loading ---------------------------------------------------------------------
def test_save_and_load_round_trips_give_identical_logits(tmp_path: Path) -> None:
    model, processor, handle = grafted("pixel_shuffle", torch.float32)
    with torch.no_grad():  # weights that differ from a fresh projector's
        handle.projector.weight.add_(0.01 * torch.randn_like(handle.projector.weight))
    inputs = encode(processor, [prompt_text(2)], images_of(BIG, SMALL))
    expected = logits_of(model, inputs)
    handle.save_pretrained(tmp_path / "one", save_base_model=True)
    assert torch.equal(logits_of(model, inputs), expected)  # grafted again after saving it lifted
    record = json.loads((tmp_path / "one" / CONFIG_NAME).read_text())
    assert record["format"] == "tokencompress.qwen3_vl_compressor_graft" and record["model_type"] == "qwen3_vl"
    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "one", dtype=torch.float32).eval()
    reloaded_processor = ImageOnlyQwen3VLProcessor.from_pretrained(tmp_path / "one", backend="pil")
    loaded = load_compressor_graft(reloaded, tmp_path / "one", processor=reloaded_processor,
                                   projector=make_compressor("pixel_shuffle")[1])
    assert isinstance(loaded, Qwen3VLCompressorGraft)
    assert torch.equal(logits_of(reloaded, encode(reloaded_processor, [prompt_text(2)], images_of(BIG, SMALL))),
                       expected)

    # Both grafts, together; then EmbQ alone.
    queries = graft_queries(model, processor)
    batch = embq_batch32(queries, processor, [TWO_TURNS], [[BIG]])
    both = logits_of(model, batch)
    save_grafted(model, tmp_path / "both", handle, queries)
    handle.remove()
    uncompressed = embq_batch32(queries, processor, [TWO_TURNS], [[BIG]])
    queries_alone = logits_of(model, uncompressed)
    queries.save_pretrained(tmp_path / "embq", save_base_model=True)

    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "both", dtype=torch.float32).eval()
    grafts = load_grafted(reloaded, tmp_path / "both", processor=ImageOnlyQwen3VLProcessor.from_pretrained(
        tmp_path / "both", backend="pil"), projector=make_compressor("pixel_shuffle")[1])
    assert [type(one) for one in grafts] == [Qwen3VLCompressorGraft, Qwen3VLEmbQGraft]
    assert torch.equal(logits_of(reloaded, batch), both)
    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "embq", dtype=torch.float32).eval()
    loaded = load_embq_graft(reloaded, tmp_path / "embq", tokenizer=AutoTokenizer.from_pretrained(tmp_path / "embq"))
    assert isinstance(loaded, Qwen3VLEmbQGraft) and loaded.token_ids == queries.token_ids
    assert torch.equal(logits_of(reloaded, uncompressed), queries_alone)


# -- EmbQ ---------------------------------------------------------------------------------
@pytest.mark.parametrize("with_compressor", [False, True], ids=["embq", "embq+sap"])
def test_embq_decodes_with_the_cache_and_in_batches_and_reads_uncompressed_tokens(with_compressor: bool) -> None:
    model, processor = build()
    queries = graft_queries(model, processor)
    assert isinstance(queries, Qwen3VLEmbQGraft)
    if with_compressor:
        graft(model, processor, "sap")
    conversations, sizes = [TWO_IMAGES, TWO_TURNS], [[BIG, SMALL], [WIDE]]
    batch = embq_batch(queries, processor, conversations, sizes)
    alone = [embq_batch(queries, processor, [messages], [images]) for messages, images in zip(conversations, sizes)]
    with spied_embq_vision(queries) as seen:
        check_decoding(model, batch, [*queries.token_ids, processor.tokenizer.eos_token_id], alone)
    with torch.no_grad():  # the tower's merged tokens of both rows' images, uncompressed: 35 + 9, then 24
        merged = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
    # generate's prefill, each full recomputation, then each prompt's prefill alone.
    assert len(seen) == 1 + NEW_TOKENS + len(alone)
    for vision in seen[:1 + NEW_TOKENS]:
        torch.testing.assert_close(vision, merged)


# -- videos and bad input -------------------------------------------------------------------
def _video_inputs(processor: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """A prompt with an image, then a one-frame video: the frame is a picture's patches (the
    image processor's) and its placeholders are put in by hand (the video processor needs
    torchvision, and the processor refuses video placeholders without one)."""
    picture = processor.image_processor(images_of(WIDE), return_tensors="pt")
    frame_tokens = int(picture["image_grid_thw"].prod()) // 4
    config = model.config
    inputs = encode(processor, [prompt_text(1, "Both?")], images_of(BIG))
    after_image = int((inputs["input_ids"][0] == config.image_token_id).nonzero().max()) + 2  # past <|vision_end|>
    video = torch.tensor([[config.vision_start_token_id, *[config.video_token_id] * frame_tokens,
                           config.vision_end_token_id]])
    added = {"input_ids": video, "attention_mask": torch.ones_like(video),
             "mm_token_type_ids": (video == config.video_token_id).long() * 2}
    for key, value in added.items():
        before, after = inputs[key][:, :after_image], inputs[key][:, after_image:]
        inputs[key] = torch.cat([before, value.to(before.dtype), after], dim=1)
    return inputs | {"pixel_values_videos": picture["pixel_values"], "video_grid_thw": picture["image_grid_thw"]}


def test_videos_pass_through_uncompressed_and_embq_refuses_them() -> None:
    model, processor = build(torch.float32)
    inputs = _video_inputs(processor, model)
    video = (inputs["pixel_values_videos"], inputs["video_grid_thw"])
    with torch.no_grad():
        plain = model.model.get_video_features(*video)
        handle = graft(model, processor, "avgpool")
        compressed = _video_inputs(processor, model)  # the image's placeholders are compressed now
        assert int((compressed["input_ids"] == model.config.image_token_id).sum()) == COMPRESSED[BIG]
        features = model.model.get_video_features(*video)
        assert len(features.pooler_output) == 1 and torch.equal(features.pooler_output[0], plain.pooler_output[0])
        for level, plain_level in zip(features.deepstack_features, plain.deepstack_features):
            assert torch.equal(level[0], plain_level[0])
        assert logits_of(model, compressed).isfinite().all()
        handle.remove()
    queries = graft_queries(model, processor)
    prompt = embq_batch(queries, processor, [TWO_IMAGES], [[BIG, SMALL]])
    with pytest.raises(ValueError, match=r"videos are not supported \(pixel_values_videos\)"):
        model(**prompt | {"pixel_values_videos": video[0], "video_grid_thw": video[1]})


def test_bad_input_is_a_clear_error() -> None:
    model, processor = build()
    with pytest.raises(ValueError, match=r"width 64 to 256.*projector=.*nn\.Linear\(256, 64\)"):
        graft_compressor(model, PixelShuffle(2, pad=True), processor=processor)
    with pytest.raises(ValueError, match="placement='replace_projector': on Qwen3-VL"):
        graft_compressor(model, AvgPool(2), placement="replace_projector")
    with pytest.raises(TypeError, match="processor must be a Qwen3VLProcessor"):
        graft_compressor(model, AvgPool(2), processor=processor.tokenizer)
    assert not isinstance(model.model.visual.merger, CompressedPatchMerger)
    assert not {"get_rope_index", "get_video_features"} & set(vars(model.model))
    handle = graft(model, processor, "avgpool")
    with pytest.raises(ValueError, match="already has a grafted compressor"):
        graft_compressor(model, AvgPool(2))
    assert handle.active and model.model.visual.merger is handle.module  # the first graft is untouched
    with pytest.raises(TypeError, match="Qwen3VLForConditionalGeneration and Qwen3VLModel .* got Qwen3VLTextModel"):
        graft_qwen3_vl_compressor(model.model.language_model, AvgPool(2))
