"""Selecting compressors (ToMe, DART, VisionZip) on Qwen2-VL and Qwen2.5-VL: each kept
token keeps the 3-D rotary position it had in the uncompressed image, in a forward, in
generate's prefill and in every decoding step; cached generation equals recomputation; a
left-padded batch equals each prompt alone; remove() and save/load round-trip. VisionZip's
scores (the attention each merged token receives in the last vision block) equal a plain
reference."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.vision_utils import get_vision_window_index

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
from tests.adapters.test_vision_scores import ScoreProbe
from tests.adapters.tiny_qwen2_vl import FAMILIES, MERGE, prompt_text
from tokencompress import DART, TokenCompressor, ToMe, VisionZip
from tokencompress.adapters import graft_compressor, load_compressor_graft
from tokencompress.adapters._qwen2_vl_grids import merged_grid_thw

BUDGET = 6  # of 35 (BIG), 9 (SMALL) and 24 (WIDE) merged tokens
SELECTORS = {
    "tome": lambda: ToMe(BUDGET),
    "dart": lambda: DART(BUDGET, num_pivots=2),
    "visionzip": lambda: VisionZip(dominant=4, contextual=2),
}
TEXTS = [prompt_text(2, "Same?"), prompt_text(1, "And this one, please?")]
SIZES = (BIG, SMALL, WIDE)


@contextmanager
def last_block_input(model: nn.Module) -> Iterator[list[tuple]]:
    """What the last vision block gets in each run: (hidden_states, cu_seqlens, (cos, sin))."""
    seen: list[tuple] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args[0], kwargs["cu_seqlens"], kwargs["position_embeddings"]))

    handle = model.model.visual.blocks[-1].register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def reference_scores(model: nn.Module, block_input: tuple, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Each image's (t, h/m * w/m) scores, by hand: per attention segment (an image's frame,
    or a window) and per head, softmax(q k^T / sqrt(d)) of the last block, averaged over
    heads and queries; summed per merged token; put back in row-major order."""
    visual = model.model.visual
    block = visual.blocks[-1]
    rotate = sys.modules[type(block.attn).__module__].apply_rotary_pos_emb_vision
    hidden, cu_seqlens, (cos, sin) = block_input
    width, heads = hidden.shape[-1], block.attn.num_heads
    head_dim = width // heads
    qkv = block.attn.qkv(block.norm1(hidden))
    patches = torch.zeros(hidden.shape[0], dtype=torch.float64)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        for head in range(heads):
            queries = qkv[start:end, head * head_dim:(head + 1) * head_dim]
            keys = qkv[start:end, width + head * head_dim:width + (head + 1) * head_dim]
            queries, keys = rotate(queries[:, None], keys[:, None], cos[start:end], sin[start:end])
            weights = torch.softmax(queries[:, 0] @ keys[:, 0].T / head_dim**0.5, dim=-1)
            patches[start:end] += weights.mean(dim=0) / heads
    merged = patches.reshape(-1, MERGE**2).sum(dim=-1)
    if hasattr(visual, "window_size"):  # Qwen2.5-VL: merged tokens in window order
        window_index, _ = get_vision_window_index(image_grid_thw, MERGE, visual.window_size, visual.patch_size)
        merged = merged[torch.argsort(window_index)]
    grids = merged_grid_thw(image_grid_thw, MERGE)
    return [scores.reshape(int(t), -1) for scores, t in zip(merged.split(grids.prod(dim=1).tolist()), grids[:, 0])]


def _kept_by_hand(model: nn.Module, compressor: TokenCompressor, inputs: dict) -> list[torch.Tensor]:
    """Each image's kept positions: the ungrafted tower's merged tokens (and, for
    VisionZip, the reference scores), selected here."""
    with torch.no_grad(), last_block_input(model) as seen:
        merged = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        grids = merged_grid_thw(inputs["image_grid_thw"], MERGE)
        scores = reference_scores(model, seen[0], inputs["image_grid_thw"])
        extra = [{"attention_scores": image} if compressor.needs_attention_scores else {} for image in scores]
        return [compressor(tokens[None], (int(h), int(w)), return_positions=True, **more)[1][0]
                for tokens, (_, h, w), more in zip(merged, grids, extra)]


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


@pytest.mark.parametrize("family, last_block", [
    ("qwen2_vl", "full"), ("qwen2_5_vl", "full"), ("qwen2_5_vl", "window"),
])
def test_scores_are_the_attention_each_merged_token_receives_in_the_last_block(family: str, last_block: str) -> None:
    model, processor = build(family)
    visual = model.model.visual
    if last_block == "window":  # Qwen2.5-VL: the last block attends within windows
        visual.fullatt_block_indexes = [0]
    attention = visual.config._attn_implementation
    images = images_of(BIG, SMALL, WIDE, BIG)  # BIG twice: one call on both, stacked
    inputs = with_dtype(encode(processor, [prompt_text(4, "Which?")], images), torch.float64)
    expected = logits_of(model, inputs)
    probe = ScoreProbe()
    graft = graft_compressor(model, probe, processor=processor)
    with torch.no_grad(), last_block_input(model) as seen:
        logits = model(**inputs).logits
    (block_input,) = seen
    reference = reference_scores(model, block_input, inputs["image_grid_thw"])
    # One call per distinct grid, each frame one row: BIG's two images, then SMALL, then WIDE.
    grouped = [torch.cat([reference[0], reference[3]]), reference[1], reference[2]]
    assert [tuple(scores.shape) for scores in probe.seen] == [(2, 35), (1, 9), (1, 24)]
    for scores, want in zip(probe.seen, grouped):
        assert scores.dtype == torch.float64
        torch.testing.assert_close(scores, want, rtol=0, atol=1e-12)
    # The mean attention received over a segment's queries sums to one per segment: per
    # frame under full attention, and per window in a window block.
    cu_seqlens = block_input[1]
    patches = merged_grid_thw(inputs["image_grid_thw"], 1).prod(dim=1).cumsum(0)
    segments = torch.bucketize(cu_seqlens[1:], patches.to(cu_seqlens.dtype), right=False).bincount()
    if last_block == "full":
        assert segments.tolist() == [1, 1, 1, 1]
    else:
        assert segments.tolist() == [12, 4, 6, 12]  # windows of 2x2 merged tokens: ceil(h/2) * ceil(w/2)
    for scores, count in zip(reference, segments.tolist()):
        torch.testing.assert_close(scores.sum(), torch.tensor(float(count), dtype=torch.float64))
    # A probe that keeps every token changes nothing; the hooks last one call; the tower stays on its attention.
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert not any(block._forward_pre_hooks for block in visual.blocks)
    assert visual.config._attn_implementation == attention
    merged = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    with pytest.raises(RuntimeError, match="needs the attention each vision token receives"):
        graft.module.compress_images(merged, inputs["image_grid_thw"])  # not by the call: no scores
    graft.remove()
    assert "get_image_features" not in vars(model.model)


def test_qwen2_vl_takes_visionzip_and_qwen3_vl_refuses_selections() -> None:
    from tests.adapters.tiny_qwen3_vl import build_tiny_qwen3_vl

    model, processor = build("qwen2_vl")
    graft_compressor(model, VisionZip(dominant=3, contextual=1), processor=processor).remove()
    qwen3, qwen3_processor = build_tiny_qwen3_vl()
    for compressor in (ToMe(4), VisionZip(dominant=3, contextual=1)):
        name = type(compressor).__name__
        with pytest.raises(ValueError, match=f"compressor={name} selects tokens .* but Qwen3-VL adds DeepStack"):
            graft_compressor(qwen3, compressor, processor=qwen3_processor)
    with pytest.raises(ValueError, match="compressor=ScoreProbe needs the attention .* the Qwen3-VL graft"):
        graft_compressor(qwen3, ScoreProbe(), processor=qwen3_processor)
    for core in (model.model, qwen3.model):
        assert not {"forward", "get_rope_index", "get_image_features"} & set(vars(core))
