"""Selecting compressors (ToMe, DART) on Qwen2-VL and Qwen2.5-VL: each kept token keeps
the 3-D rotary position it had in the uncompressed image, in a forward, in generate's
prefill and in every decoding step; cached generation equals recomputation; a
left-padded batch equals each prompt alone; remove() and save/load round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.adapters.test_qwen2_vl import (
    BIG,
    NEW_TOKENS,
    SMALL,
    WIDE,
    build,
    encode,
    generate,
    greedy_without_cache,
    images_of,
    logits_of,
    recorded_positions,
    rope_index,
    with_dtype,
)
from tests.adapters.tiny_qwen2_vl import FAMILIES, MERGE, prompt_text
from tokencompress import DART, TokenCompressor, ToMe, VisionZip
from tokencompress.adapters import graft_compressor, load_compressor_graft
from tokencompress.adapters._qwen2_vl_grids import merged_grid_thw

BUDGET = 6  # of 35 (BIG), 9 (SMALL) and 24 (WIDE) merged tokens
SELECTORS = {"tome": lambda: ToMe(BUDGET), "dart": lambda: DART(BUDGET, num_pivots=2)}
TEXTS = [prompt_text(2, "Same?"), prompt_text(1, "And this one, please?")]
SIZES = (BIG, SMALL, WIDE)


def _kept_by_hand(model: nn.Module, compressor: TokenCompressor, inputs: dict) -> list[torch.Tensor]:
    """Each image's kept positions: the ungrafted tower's merged tokens, selected here."""
    with torch.no_grad():
        merged = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        grids = merged_grid_thw(inputs["image_grid_thw"], MERGE)
        return [compressor(tokens[None], (int(h), int(w)), return_positions=True)[1][0]
                for tokens, (_, h, w) in zip(merged, grids)]


def _kept_columns(inputs: dict, kept: list[torch.Tensor], image_token: int) -> list[torch.Tensor]:
    """Per row of the uncompressed prompt `inputs`, the columns that the compressed prompt
    keeps: every text token (padding included), and each image's kept tokens."""
    sizes = merged_grid_thw(inputs["image_grid_thw"], MERGE)[:, 1:].prod(dim=1).tolist()
    images = iter(zip(kept, sizes))
    rows = []
    for ids in inputs["input_ids"]:
        keep = ids != image_token
        slots = (ids == image_token).nonzero().flatten()
        start = 0
        while start < len(slots):
            positions, size = next(images)
            keep[slots[start + positions]] = True
            start += size
        rows.append(keep.nonzero().flatten())
    return rows


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("name", list(SELECTORS))
def test_kept_tokens_keep_their_original_rotary_positions(family: str, name: str) -> None:
    model, processor = build(family)
    images = images_of(*SIZES)
    plain = encode(processor, TEXTS, images)
    with torch.no_grad(), recorded_positions(model) as plain_seen:
        plain_positions, plain_deltas = rope_index(model, plain)
        generate(model, with_dtype(plain, torch.float64))
    kept = _kept_by_hand(model, SELECTORS[name](), with_dtype(plain, torch.float64))

    graft_compressor(model, SELECTORS[name](), processor=processor)
    grafted = encode(processor, TEXTS, images)
    image_token = model.config.image_token_id
    assert (grafted["input_ids"] == image_token).sum(dim=1).tolist() == [2 * BUDGET, BUDGET]
    columns = _kept_columns(plain, kept, image_token)
    with torch.no_grad(), recorded_positions(model) as grafted_seen:
        # generate()'s path: get_rope_index with the images, before they are encoded.
        positions, deltas = model.model.get_rope_index(
            grafted["input_ids"], grafted["mm_token_type_ids"], image_grid_thw=grafted["image_grid_thw"],
            attention_mask=grafted["attention_mask"], pixel_values=grafted["pixel_values"].double(),
        )
        model(**with_dtype(grafted, torch.float64))  # a forward: its own encoding says what was kept
        generate(model, with_dtype(grafted, torch.float64))
    # Every real token at the uncompressed prompt's position of the same token.
    for row, cols in enumerate(columns):
        real = grafted["attention_mask"][row].bool()
        length = int(real.sum())
        assert torch.equal(positions[:, row, real], plain_positions[:, row, cols[-length:]]), f"row {row}"
    # Decoding adds the delta to text positions: the uncompressed prompt's next positions.
    removed = plain["attention_mask"].sum(1) - grafted["attention_mask"].sum(1)
    assert torch.equal(deltas.flatten(), plain_deltas.flatten() + removed)
    # What the language model got: the forward and generate's prefill at the kept positions ...
    forward, prefill, *steps = grafted_seen
    for seen in (forward, prefill):
        assert torch.equal(seen[-3:], positions)  # generate also passes the text positions first
    # ... and each decoding step at the uncompressed prompt's step positions.
    assert len(steps) == NEW_TOKENS - 1
    for got, want in zip(steps, plain_seen[1:]):
        assert torch.equal(got[-3:], want[-3:])


def test_keeping_every_token_is_the_ungrafted_model(family: str) -> None:
    model, processor = build(family)
    texts = [prompt_text(1, "Hm?"), prompt_text(2, "Which one is brighter, the first or the second?")]
    images = images_of(SMALL, SMALL, SMALL)  # 3x3 merged tokens each: ToMe(9) keeps them all
    inputs = with_dtype(encode(processor, texts, images), torch.float64)
    expected = logits_of(model, inputs)
    expected_tokens, _ = generate(model, inputs)
    handle = graft_compressor(model, ToMe(9), processor=processor)
    torch.testing.assert_close(logits_of(model, inputs), expected, rtol=0, atol=1e-12)
    assert torch.equal(generate(model, inputs)[0], expected_tokens)
    handle.remove()


@pytest.mark.parametrize("name", list(SELECTORS))
def test_generation_batches_remove_and_save_load(family: str, name: str, tmp_path: Path) -> None:
    model, processor = build(family)
    before = logits_of(model, with_dtype(encode(processor, TEXTS[:1], images_of(BIG, WIDE)), torch.float64))
    handle = graft_compressor(model, SELECTORS[name](), processor=processor)
    prompts = [
        (prompt_text(2, "Are these the same?"), images_of(BIG, SMALL)),
        (prompt_text(1, "Colour?"), images_of(WIDE)),
    ]
    batch = with_dtype(encode(processor, [text for text, _ in prompts], [i for _, imgs in prompts for i in imgs]),
                       torch.float64)
    with torch.no_grad():
        tokens, logits = generate(model, batch)
        recomputed, recomputed_logits = greedy_without_cache(model, batch, [processor.tokenizer.eos_token_id])
        assert torch.equal(tokens, recomputed)
        torch.testing.assert_close(logits, recomputed_logits.float(), atol=1e-6, rtol=1e-6)
        for row, (text, images) in enumerate(prompts):
            alone_tokens, alone_logits = generate(model, with_dtype(encode(processor, [text], images), torch.float64))
            assert torch.equal(alone_tokens, tokens[row:row + 1]), f"prompt {row}"
            torch.testing.assert_close(alone_logits, logits[row:row + 1], atol=1e-6, rtol=1e-6)
    expected = logits_of(model, batch)
    handle.save_pretrained(tmp_path)
    handle.remove()
    assert "forward" not in vars(model.model) and "get_rope_index" not in vars(model.model)
    assert torch.equal(logits_of(model, with_dtype(encode(processor, TEXTS[:1], images_of(BIG, WIDE)),
                                                    torch.float64)), before)
    loaded = load_compressor_graft(model, tmp_path, processor=processor)
    assert torch.equal(logits_of(model, batch), expected)
    loaded.remove()


def test_qwen2_vl_has_no_vision_scores_and_qwen3_vl_refuses_selections() -> None:
    from tests.adapters.tiny_qwen3_vl import build_tiny_qwen3_vl

    model, processor = build("qwen2_vl")
    with pytest.raises(ValueError, match="compressor=VisionZip needs the attention .* the Qwen2-VL graft"):
        graft_compressor(model, VisionZip(dominant=3, contextual=1), processor=processor)
    qwen3, qwen3_processor = build_tiny_qwen3_vl()
    with pytest.raises(ValueError, match="compressor=ToMe selects tokens .* but Qwen3-VL adds DeepStack"):
        graft_compressor(qwen3, ToMe(4), processor=qwen3_processor)
    for core in (model.model, qwen3.model):
        assert not {"forward", "get_rope_index", "get_image_features"} & set(vars(core))
