"""Compressor and EmbQ grafts on tiny random Qwen2-VL and Qwen2.5-VL models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from tokencompress import SAP, AvgPool, EmbQ, PixelShuffle, TokenCompressor
from tokencompress.adapters import (
    Qwen2VLCompressorGraft,
    Qwen2VLEmbQGraft,
    graft_compressor,
    graft_embq,
    load_compressor_graft,
    load_embq_graft,
    load_grafted,
    save_grafted,
)
from tokencompress.adapters._instance_override import InstanceOverride
from tokencompress.adapters._qwen2_vl_compress import CompressedPatchMerger
from tokencompress.adapters._qwen2_vl_embq_hooks import group_images
from tokencompress.adapters._qwen2_vl_prompt import expand_image_placeholders
from tokencompress.adapters.compressor_graft_io import CONFIG_NAME
from tokencompress.adapters.prompt import INSTRUCTION_MAP_KEY, EncodedPrompt, QueryBlock

from .tiny_qwen2_vl import (
    FAMILIES,
    TEXT_WIDTH,
    ImageOnlyQwen2_5_VLProcessor,
    ImageOnlyQwen2VLProcessor,
    build_tiny_qwen2_vl,
    make_image,
    prompt_text,
)

NEW_TOKENS = 5
# Merged grids: 40x56 px -> 5x7, 24x24 px -> 3x3, 32x48 px -> 4x6 (a merged token is 8x8 px).
BIG, SMALL, WIDE = (40, 56), (24, 24), (32, 48)
COMPRESSORS = ("avgpool", "sap", "pixel_shuffle")


# -- helpers ------------------------------------------------------------------------------
def build(family: str, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, Any]:
    model, processor = build_tiny_qwen2_vl(family)
    processor.tokenizer.padding_side = "left"
    return model.to(dtype), processor


def make_compressor(name: str) -> tuple[TokenCompressor, nn.Module | None]:
    """A compressor over 2x2 windows of merged tokens, and the projector it needs (if any)."""
    torch.manual_seed(1)
    if name == "avgpool":
        return AvgPool(2), None
    if name == "sap":
        return SAP(TEXT_WIDTH, window=2), None
    if name == "pixel_shuffle":  # width 4 * 64: back to 64 through a new projector
        return PixelShuffle(2, pad=True), nn.Linear(4 * TEXT_WIDTH, TEXT_WIDTH)
    raise ValueError(name)


def graft(model: nn.Module, processor: Any, name: str) -> Qwen2VLCompressorGraft:
    compressor, projector = make_compressor(name)
    handle = graft_compressor(model, compressor, processor=processor, projector=projector)
    assert isinstance(handle, Qwen2VLCompressorGraft)
    return handle


def images_of(*sizes: tuple[int, int]) -> list:
    return [make_image(height, width, seed) for seed, (height, width) in enumerate(sizes)]


def encode(processor: Any, texts: list[str], images: list) -> dict[str, torch.Tensor]:
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    return dict(inputs)


def with_dtype(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {key: value.to(dtype) if key == "pixel_values" else value for key, value in inputs.items()}


def generate(model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy `generate` with the KV cache: the new tokens and each step's logits (float32)."""
    out = model.generate(
        **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
        return_dict_in_generate=True, output_logits=True, **kwargs,
    )
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, dim=1)


def greedy_without_cache(
    model: nn.Module, inputs: dict[str, torch.Tensor], banned: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding that runs the whole sequence (images included) at every step."""
    inputs = dict(inputs)
    start = inputs["input_ids"].shape[1]
    grown = [key for key in ("input_ids", "attention_mask", "mm_token_type_ids", INSTRUCTION_MAP_KEY) if key in inputs]
    all_logits = []
    for _ in range(NEW_TOKENS):
        logits = model(**inputs, use_cache=False).logits[:, -1]
        all_logits.append(logits)
        next_token = logits.index_fill(1, torch.tensor(banned), float("-inf")).argmax(dim=-1, keepdim=True)
        extra = {"input_ids": next_token, "attention_mask": torch.ones_like(next_token)}
        for key in grown:
            inputs[key] = torch.cat([inputs[key], extra.get(key, torch.zeros_like(next_token))], dim=1)
    return inputs["input_ids"][:, start:], torch.stack(all_logits, dim=1)


def logits_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@contextmanager
def recorded_positions(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The position ids the language model gets at each call within the block."""
    seen: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(kwargs["position_ids"].clone())

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def rope_index(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
    )


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


# -- placeholders and positions -----------------------------------------------------------
@pytest.mark.parametrize("name", COMPRESSORS)
def test_each_image_gets_the_placeholders_and_tokens_of_its_out_grid(family: str, name: str) -> None:
    model, processor = build(family)
    handle = graft(model, processor, name)
    inputs = encode(processor, [prompt_text(3)], images_of(BIG, SMALL, WIDE))
    grids = inputs["image_grid_thw"]
    expected = [3 * 4, 2 * 2, 2 * 3]  # 2x2 windows, edges kept: 5x7 -> 3x4, 3x3 -> 2x2, 4x6 -> 2x3
    assert handle.num_image_tokens(grids) == expected
    assert handle.compressed_grid_thw(grids).tolist() == [[1, 3, 4], [1, 2, 2], [1, 2, 3]]
    assert handle.rope_grid_thw(grids).tolist() == [[1, 6, 8], [1, 4, 4], [1, 4, 6]]
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == sum(expected)
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], grids).pooler_output
    assert [tuple(f.shape) for f in features] == [(count, TEXT_WIDTH) for count in expected]


@pytest.mark.parametrize("name", ["avgpool", "pixel_shuffle"])
def test_serving_token_counts_from_image_sizes_follow_the_graft(family: str, name: str) -> None:
    """`_get_num_multimodal_tokens` (vLLM sizes placeholders with it, from sizes alone)
    must report what the processor writes for the real images, grafted or not."""
    model, processor = build(family)
    images = images_of(BIG, SMALL, WIDE, (100, 30))
    # PIL sizes are (width, height); the processor's image sizes are (height, width).
    image_sizes = [(image.height, image.width) for image in images]

    def placeholders_per_image() -> list[int]:
        inputs = encode(processor, [prompt_text(1)] * len(images), [[image] for image in images])
        return (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()

    before = processor._get_num_multimodal_tokens(image_sizes=image_sizes).num_image_tokens
    assert before == placeholders_per_image()
    handle = graft(model, processor, name)
    grafted = processor._get_num_multimodal_tokens(image_sizes=image_sizes).num_image_tokens
    assert grafted == placeholders_per_image()
    assert all(after < original for after, original in zip(grafted, before))
    handle.remove()
    assert "_get_num_multimodal_tokens" not in vars(processor)
    assert processor._get_num_multimodal_tokens(image_sizes=image_sizes).num_image_tokens == before


@pytest.mark.parametrize("name", ["avgpool", "pixel_shuffle"])
def test_rotary_positions_are_those_of_images_whose_grid_is_the_out_grid(family: str, name: str) -> None:
    model, processor = build(family)
    handle = graft(model, processor, name)
    texts = [prompt_text(2, "Same?"), prompt_text(1, "And this one, please?")]
    grafted = encode(processor, texts, images_of(BIG, SMALL, WIDE))
    with torch.no_grad(), recorded_positions(model) as grafted_positions:
        grafted_index = rope_index(model, grafted)
        model(**with_dtype(grafted, torch.float64))
        generate(model, with_dtype(grafted, torch.float64))
    handle.remove()

    # The same prompts, uncompressed, with images of the out grids: 3x4, 2x2 and 2x3 merged tokens.
    plain = encode(processor, texts, images_of((24, 32), (16, 16), (16, 24)))
    assert plain["image_grid_thw"].tolist() == handle.rope_grid_thw(grafted["image_grid_thw"]).tolist()
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        assert torch.equal(plain[key], grafted[key]), key
    with torch.no_grad(), recorded_positions(model) as plain_positions:
        plain_index = rope_index(model, plain)
        model(**with_dtype(plain, torch.float64))
        generate(model, with_dtype(plain, torch.float64))
    # transformers' own get_rope_index, on both: positions and the deltas the decoding steps use.
    assert torch.equal(grafted_index[0], plain_index[0]) and torch.equal(grafted_index[1], plain_index[1])
    # What the language model actually got: forward, generate's prefill and its decoding steps.
    assert len(grafted_positions) == len(plain_positions) == 1 + NEW_TOKENS
    for step, (got, expected) in enumerate(zip(grafted_positions, plain_positions)):
        assert torch.equal(got, expected), f"call {step}"
    # And the image tokens' positions really are 2-D: rows and columns of the out grid.
    first = (grafted["input_ids"][0] == model.config.image_token_id).nonzero()[0, 0]
    rows, columns = grafted_index[0][1, 0, first:first + 12], grafted_index[0][2, 0, first:first + 12]
    assert (rows - rows[0]).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert (columns - columns[0]).tolist() == [0, 1, 2, 3] * 3


def test_a_prompt_with_the_uncompressed_count_is_a_clear_error(family: str) -> None:
    model, processor = build(family)
    stale = encode(processor, [prompt_text(1)], images_of(BIG))
    graft(model, processor, "avgpool")
    with pytest.raises(ValueError, match=r"35 image placeholder tokens \(the uncompressed count\)"):
        model(**stale)
    with pytest.raises(ValueError, match="the uncompressed count"):
        model.generate(**stale, max_new_tokens=1)


# -- compression --------------------------------------------------------------------------
def test_each_image_is_compressed_on_its_own_grid_with_equal_grids_batched(family: str) -> None:
    model, processor = build(family)
    handle = graft(model, processor, "sap")
    inputs = encode(processor, [prompt_text(3)], images_of(BIG, SMALL, BIG))
    calls: list[tuple[int, tuple[int, int]]] = []
    spy = handle.compressor.register_forward_pre_hook(
        lambda module, args: calls.append((args[0].shape[0], args[1]))
    )
    with torch.no_grad():
        compressed = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        with handle.lifted():
            merged = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        spy.remove()
        # One compressor call per distinct grid; the two 5x7 images go together.
        assert sorted(calls) == [(1, (3, 3)), (2, (5, 7))]
        for image, grid in zip(range(3), [(5, 7), (3, 3), (5, 7)]):
            alone = handle.compressor(merged[image].unsqueeze(0), grid)[0]
            torch.testing.assert_close(compressed[image], alone)


def test_a_training_step_reaches_the_compressor_and_the_projector(family: str) -> None:
    model, processor = build(family, torch.float32)
    model.train()
    handle = graft(model, processor, "pixel_shuffle")
    assert handle.projector.training  # follows the model's mode
    inputs = encode(processor, [prompt_text(2)], images_of(BIG, SMALL))
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert handle.projector.weight.grad is not None and bool(handle.projector.weight.grad.abs().sum() > 0)
    assert model.model.visual.merger.base_layer.mlp[0].weight.grad is not None


def test_pixel_shuffle_without_a_projector_is_an_error_naming_the_widths() -> None:
    model, processor = build("qwen2_vl")
    with pytest.raises(ValueError, match=r"width 64 to 256.*projector=.*nn\.Linear\(256, 64\)"):
        graft_compressor(model, PixelShuffle(2, pad=True), processor=processor)
    assert not isinstance(model.model.visual.merger, CompressedPatchMerger)
    assert "get_rope_index" not in vars(model.model) and "replace_image_token" not in vars(processor)


def test_graft_refuses_a_second_compressor_and_other_placements() -> None:
    model, processor = build("qwen2_5_vl")
    with pytest.raises(ValueError, match="placement="):
        graft_compressor(model, AvgPool(2), placement="replace_projector")
    handle = graft(model, processor, "avgpool")
    with pytest.raises(ValueError, match="already has a grafted compressor"):
        graft_compressor(model, AvgPool(2))
    handle.remove()
    with pytest.raises(RuntimeError, match="already removed"):
        handle.remove()


# -- generation ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", COMPRESSORS)
def test_cached_generation_equals_recomputation_without_cache(family: str, name: str) -> None:
    model, processor = build(family)
    graft(model, processor, name)
    inputs = with_dtype(encode(processor, [prompt_text(2)], images_of(BIG, SMALL)), torch.float64)
    with torch.no_grad():
        tokens, logits = generate(model, inputs)
        expected_tokens, expected_logits = greedy_without_cache(model, inputs, [processor.tokenizer.eos_token_id])
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits.float(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["avgpool", "sap"])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(family: str, name: str) -> None:
    model, processor = build(family)
    graft(model, processor, name)
    prompts = [
        (prompt_text(2, "Are these the same?"), images_of(BIG, SMALL)),
        (prompt_text(1, "Colour?"), images_of(WIDE)),
        (prompt_text(1, "What is in the picture, in detail?"), images_of(SMALL)),
    ]
    batch = encode(processor, [text for text, _ in prompts], [image for _, images in prompts for image in images])
    assert len({int(n) for n in batch["attention_mask"].sum(1)}) == 3  # three lengths: real padding
    with torch.no_grad():
        tokens, logits = generate(model, with_dtype(batch, torch.float64))
        for row, (text, images) in enumerate(prompts):
            alone_tokens, alone_logits = generate(model, with_dtype(encode(processor, [text], images), torch.float64))
            assert torch.equal(alone_tokens, tokens[row:row + 1]), f"prompt {row}"
            torch.testing.assert_close(alone_logits, logits[row:row + 1], atol=1e-6, rtol=1e-6)


# -- remove, save, load -------------------------------------------------------------------
@pytest.mark.parametrize("name", COMPRESSORS)
def test_remove_gives_back_bit_identical_logits_and_processor(family: str, name: str) -> None:
    model, processor = build(family, torch.float32)
    merger = model.model.visual.merger
    texts, images = [prompt_text(2)], images_of(BIG, SMALL)
    before_inputs = encode(processor, texts, images)
    before = logits_of(model, before_inputs)
    handle = graft(model, processor, name)
    grafted_inputs = encode(processor, texts, images)
    assert grafted_inputs["input_ids"].shape[1] < before_inputs["input_ids"].shape[1]
    with torch.no_grad():
        model.generate(**grafted_inputs, max_new_tokens=2)  # leaves rope_deltas of the grafted prompt
    handle.remove()
    after_inputs = encode(processor, texts, images)
    for key in before_inputs:
        assert torch.equal(after_inputs[key], before_inputs[key]), key
    assert torch.equal(logits_of(model, after_inputs), before)
    assert model.model.visual.merger is merger
    assert not {"get_image_features", "get_rope_index"} & set(vars(model.model))
    assert "replace_image_token" not in vars(processor)


@pytest.mark.parametrize("name", ["sap", "pixel_shuffle"])
def test_save_and_load_round_trip_gives_identical_logits(family: str, name: str, tmp_path: Path) -> None:
    model, processor = build(family, torch.float32)
    handle = graft(model, processor, name)
    trained = [*handle.compressor.parameters(), *(handle.projector.parameters() if handle.projector else [])]
    with torch.no_grad():  # weights that differ from a fresh compressor's
        for parameter in trained:
            parameter.add_(0.01 * torch.randn_like(parameter))
    inputs = encode(processor, [prompt_text(2)], images_of(BIG, SMALL))
    expected = logits_of(model, inputs)
    handle.save_pretrained(tmp_path, save_base_model=True)
    assert torch.equal(logits_of(model, inputs), expected)  # grafted again after saving it lifted
    record = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert record["format"] == "tokencompress.qwen2_vl_compressor_graft" and record["dim"] == TEXT_WIDTH

    model_class = type(model)
    processor_class = ImageOnlyQwen2VLProcessor if family == "qwen2_vl" else ImageOnlyQwen2_5_VLProcessor
    reloaded = model_class.from_pretrained(tmp_path, dtype=torch.float32).eval()
    reloaded_processor = processor_class.from_pretrained(tmp_path, backend="pil")
    assert "replace_image_token" not in vars(reloaded_processor)  # saved ungrafted
    _, projector = make_compressor(name)
    loaded = load_compressor_graft(reloaded, tmp_path, processor=reloaded_processor, projector=projector)
    assert isinstance(loaded, Qwen2VLCompressorGraft)
    reloaded_inputs = encode(reloaded_processor, [prompt_text(2)], images_of(BIG, SMALL))
    assert torch.equal(reloaded_inputs["input_ids"], inputs["input_ids"])
    assert torch.equal(logits_of(reloaded, reloaded_inputs), expected)


# -- EmbQ ---------------------------------------------------------------------------------
TWO_IMAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}
]
TWO_TURNS = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
    {"role": "assistant", "content": "A box."},
    {"role": "user", "content": "How big is it?"},
]


def graft_queries(model: nn.Module, processor: Any) -> Qwen2VLEmbQGraft:
    torch.manual_seed(0)
    embq = EmbQ(TEXT_WIDTH, TEXT_WIDTH, inner_dim=16, num_heads=2)
    handle = graft_embq(model, embq, layer=2, num_queries=3, tokenizer=processor.tokenizer)
    assert isinstance(handle, Qwen2VLEmbQGraft)
    with torch.no_grad():  # weights that make a visible difference
        handle.query_vectors.normal_(std=0.5)
        handle.embq.up.weight.mul_(4.0)
    return handle


def embq_batch(handle: Qwen2VLEmbQGraft, processor: Any, conversations: list, sizes: list[list]) -> dict:
    """The padded batch of `conversations` (images of `sizes` each) with their pixels."""
    images = [images_of(*image_sizes) for image_sizes in sizes]
    pixels = [processor.image_processor(group, return_tensors="pt") if group else None for group in images]
    prompts = [
        handle.build_prompt(messages, processor=processor, image_grid_thw=None if p is None else p["image_grid_thw"])
        for messages, p in zip(conversations, pixels)
    ]
    batch = handle.batch(prompts)
    given = [p for p in pixels if p is not None]
    batch["pixel_values"] = torch.cat([p["pixel_values"] for p in given]).to(torch.float64)
    batch["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in given])
    return batch


@contextmanager
def spied_embq_vision(handle: Qwen2VLEmbQGraft) -> Iterator[list[torch.Tensor]]:
    """The packed vision tokens EmbQ reads, at each call that runs it."""
    seen: list[torch.Tensor] = []
    forward_packed = handle.embq.forward_packed

    def spy(queries, text, vision, *args, **kwargs):
        seen.append(vision.detach().clone())
        return forward_packed(queries, text, vision, *args, **kwargs)

    handle.embq.forward_packed = spy
    try:
        yield seen
    finally:
        del handle.embq.forward_packed


@pytest.mark.parametrize("with_compressor", [False, True], ids=["embq", "embq+avgpool"])
def test_embq_cached_generation_equals_recomputation_and_reads_uncompressed_tokens(
    family: str, with_compressor: bool
) -> None:
    model, processor = build(family)
    handle = graft_queries(model, processor)
    if with_compressor:
        graft(model, processor, "avgpool")
    batch = embq_batch(handle, processor, [TWO_IMAGES], [[BIG, SMALL]])
    banned = list(handle.token_ids) + [processor.tokenizer.eos_token_id]
    with torch.no_grad(), spied_embq_vision(handle) as seen:
        tokens, logits = generate(model, batch)
        expected_tokens, expected_logits = greedy_without_cache(model, batch, banned)
        merged = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits.float(), atol=1e-6, rtol=1e-6)
    # generate's prefill (pre-encoded images) and every full recomputation (pixel_values in
    # the call) read both images' merged tokens, uncompressed: 35 + 9.
    assert len(seen) == 1 + NEW_TOKENS
    for vision in seen:
        assert vision.shape == (35 + 9, TEXT_WIDTH)
        torch.testing.assert_close(vision, merged)
    # EmbQ matters: without its update the first step's logits differ.
    layer = model.model.language_model.layers[1]
    layer.add_update = lambda hidden_states, call: hidden_states
    try:
        with torch.no_grad():
            _, without = generate(model, batch)
    finally:
        del layer.add_update
    assert (without[:, 0] - logits[:, 0]).abs().max() > 1e-4


def test_embq_left_padded_batch_equals_one_by_one(family: str) -> None:
    model, processor = build(family)
    handle = graft_queries(model, processor)
    conversations, sizes = [TWO_IMAGES, TWO_TURNS], [[BIG, SMALL], [WIDE]]
    batch = embq_batch(handle, processor, conversations, sizes)
    with torch.no_grad():
        tokens, logits = generate(model, batch)
        for row, (conversation, image_sizes) in enumerate(zip(conversations, sizes)):
            alone_tokens, alone_logits = generate(model, embq_batch(handle, processor, [conversation], [image_sizes]))
            assert torch.equal(alone_tokens, tokens[row:row + 1]), f"prompt {row}"
            torch.testing.assert_close(alone_logits, logits[row:row + 1], atol=1e-6, rtol=1e-6)
        # Beams repeat each prompt after the images are encoded once: each still reads its own.
        together = model.generate(**batch, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
        for row, (conversation, image_sizes) in enumerate(zip(conversations, sizes)):
            alone = embq_batch(handle, processor, [conversation], [image_sizes])
            expected = model.generate(**alone, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
            width = batch["input_ids"].shape[1]
            assert torch.equal(together[2 * row:2 * row + 2, width:], expected[:, alone["input_ids"].shape[1]:])


def test_embq_remove_and_save_load_round_trip(family: str, tmp_path: Path) -> None:
    model, processor = build(family, torch.float32)
    plain_inputs = encode(processor, [prompt_text(1)], images_of(BIG))
    before = logits_of(model, plain_inputs)
    handle = graft_queries(model, processor)
    batch = embq_batch(handle, processor, [TWO_TURNS], [[BIG]])
    batch["pixel_values"] = batch["pixel_values"].float()
    expected = logits_of(model, batch)
    handle.save_pretrained(tmp_path, save_base_model=True)
    handle.remove()
    assert torch.equal(logits_of(model, plain_inputs), before)

    reloaded = type(model).from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    loaded = load_embq_graft(reloaded, tmp_path, tokenizer=tokenizer)
    assert isinstance(loaded, Qwen2VLEmbQGraft) and loaded.token_ids == handle.token_ids
    assert torch.equal(logits_of(reloaded, batch), expected)


def test_embq_refuses_videos_and_checks_its_widths() -> None:
    model, processor = build("qwen2_vl")
    with pytest.raises(ValueError, match="vision_dim is 32, but this model needs 64"):
        graft_embq(model, EmbQ(TEXT_WIDTH, 32, inner_dim=16, num_heads=2), layer=2, tokenizer=processor.tokenizer)
    handle = graft_queries(model, processor)
    batch = embq_batch(handle, processor, [TWO_IMAGES], [[BIG, SMALL]])
    with pytest.raises(ValueError, match="videos are not supported"):
        model(**batch, pixel_values_videos=batch["pixel_values"], video_grid_thw=batch["image_grid_thw"])


# -- the pieces ---------------------------------------------------------------------------
def test_expand_image_placeholders_moves_blocks_and_instructions() -> None:
    image, query = 9, 7
    prompt = EncodedPrompt(
        input_ids=[1, image, 2, image, 3, 4, query, query, 5],
        labels=[-100] * 8 + [5],
        blocks=(QueryBlock(range(6, 8), (4, 5)),),
        num_images=2,
    )
    expanded = expand_image_placeholders(prompt, image, [3, 2])
    assert expanded.input_ids == [1, image, image, image, 2, image, image, 3, 4, query, query, 5]
    assert expanded.labels == [-100] * 11 + [5]
    assert expanded.blocks == (QueryBlock(range(9, 11), (7, 8)),)
    with pytest.raises(ValueError, match="2 image placeholders for 2 images, but 1 image sizes"):
        expand_image_placeholders(prompt, image, [3])


def test_group_images_gives_each_row_its_own_runs_of_placeholders() -> None:
    image = 5
    input_ids = torch.tensor([[0, image, image, 1, image, 1], [0, 0, 1, image, image, image]])
    images = [torch.full((n, 2), float(i)) for i, n in enumerate([2, 1, 3])]
    vision, cu = group_images(input_ids, image, images, 3, 2, torch.float32)
    assert cu.tolist() == [0, 3, 6]
    assert vision[:, 0].tolist() == [0, 0, 1, 2, 2, 2]
    # Beams: rows repeated twice after encoding, the images once.
    repeated = input_ids.repeat_interleave(2, dim=0)
    vision, cu = group_images(repeated, image, images, 6, 2, torch.float32)
    assert cu.tolist() == [0, 3, 6, 9, 12]
    assert vision[:, 0].tolist() == [0, 0, 1] * 2 + [2, 2, 2] * 2
    with pytest.raises(ValueError, match="runs of image placeholders"):
        group_images(input_ids, image, images, 4, 2, torch.float32)


def test_instance_overrides_stack_and_come_off_last_made_first() -> None:
    class Greeter:
        def greet(self) -> str:
            return "class"

    greeter = Greeter()
    first = InstanceOverride.install(greeter, "greet", lambda method: lambda: method() + "+first")
    second = InstanceOverride.install(greeter, "greet", lambda method: lambda: method() + "+second")
    assert greeter.greet() == "class+first+second"
    with pytest.raises(RuntimeError, match="overridden again after this graft"):
        first.remove()
    second.remove()
    first.remove()
    assert "greet" not in vars(greeter) and greeter.greet() == "class"
    assert Greeter().greet() == "class"  # the class itself was never touched


def test_both_grafts_save_and_load_together(family: str, tmp_path: Path) -> None:
    model, processor = build(family, torch.float32)
    compressor_graft = graft(model, processor, "sap")
    embq_graft = graft_queries(model, processor)
    batch = embq_batch(embq_graft, processor, [TWO_TURNS], [[BIG]])
    batch["pixel_values"] = batch["pixel_values"].float()
    expected = logits_of(model, batch)
    save_grafted(model, tmp_path, compressor_graft, embq_graft)

    reloaded = type(model).from_pretrained(tmp_path, dtype=torch.float32).eval()
    processor_class = ImageOnlyQwen2VLProcessor if family == "qwen2_vl" else ImageOnlyQwen2_5_VLProcessor
    loaded = load_grafted(reloaded, tmp_path, processor=processor_class.from_pretrained(tmp_path, backend="pil"))
    assert [type(handle) for handle in loaded] == [Qwen2VLCompressorGraft, Qwen2VLEmbQGraft]
    assert torch.equal(logits_of(reloaded, batch), expected)
