"""The compressor graft on InternVL: every tile compressed on its pixel-shuffled grid, the
processor's counts per image (tiles x compressed tokens), bad grafts. (Generation,
batches, remove, save/load and gradients: `test_llava_next`, for every projector family.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.adapters.tiny_internvl import IMAGE_TOKEN, TILE, build_tiny_internvl
from tests.adapters.tiny_llava_next import inputs_for, make_image
from tokencompress import SAP, AvgPool, EmbQ, PixelShuffle
from tokencompress.adapters import graft_compressor, graft_embq
from tokencompress.adapters.internvl import shuffled_sizes

WIDTH = 4 * 32  # the tower's width 32, pixel-shuffled by 0.5
# One tile, 2x1 / 1x3 / 2x2 tiles (each with a thumbnail), tiny.
SIZES = [(112, 112), (200, 100), (60, 170), (224, 224), (10, 10)]
COMPRESSORS = {"avgpool2": lambda: AvgPool(2), "sap3": lambda: SAP(WIDTH, window=3)}


def _reference_tiles(model: nn.Module, compressor: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Each tile through the tower, CLS dropped, pixel-shuffled, compressed, projected."""
    core = model.model
    hidden = core.vision_tower(pixel_values).last_hidden_state[:, 1:]
    side = TILE // 7
    shuffled = core.pixel_shuffle(hidden.reshape(-1, side, side, hidden.shape[-1]), scale_factor=0.5)
    return core.multi_modal_projector.base_layer(compressor(shuffled.flatten(1, 2), (side // 2, side // 2)))


def test_the_shuffled_grid_and_widths() -> None:
    model, _ = build_tiny_internvl()
    assert shuffled_sizes(model.config) == ((8, 8), WIDTH, 64)
    model.config.downsample_ratio = 0.3
    with pytest.raises(ValueError, match="downsample_ratio 0.3 must be 1/k"):
        shuffled_sizes(model.config)


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_every_tile_is_compressed_and_the_counts_follow(name: str) -> None:
    model, processor = build_tiny_internvl()
    # What the processor serves beyond the image tokens: transformers 5.23 counts <img> and </img>.
    extra = [served - 64 * processor.image_processor.get_number_of_image_patches(*size, {})
             for size, served in zip(SIZES, processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens)]
    assert set(extra) <= {0, 2}
    compressor = COMPRESSORS[name]()
    graft = graft_compressor(model, compressor, processor=processor)
    per_tile = compressor.num_out_tokens((8, 8))
    images = [make_image(*size, seed=index) for index, size in enumerate(SIZES)]
    batch = inputs_for(processor, images, [f"{IMAGE_TOKEN} q"] * len(images))
    tiles = [processor.image_processor.get_number_of_image_patches(*size, {}) for size in SIZES]
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"]).pooler_output
        expected = _reference_tiles(model, compressor, batch["pixel_values"])
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    placeholders = (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    served = processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens
    assert placeholders == [count * per_tile for count in tiles]
    assert served == [count * per_tile + more for count, more in zip(tiles, extra)]
    assert sum(tiles) == features.shape[0] and tiles == [1, 3, 4, 5, 1]
    assert model.config.image_seq_length == processor.image_seq_length == per_tile
    graft.remove()
    assert model.config.image_seq_length == processor.image_seq_length == 64


def test_bad_grafts_are_refused_with_the_reason() -> None:
    model, processor = build_tiny_internvl()
    with pytest.raises(ValueError, match=f"maps the projector's input width {WIDTH} to {4 * WIDTH}"):
        graft_compressor(model, PixelShuffle(2), processor=processor)
    graft_compressor(build_tiny_internvl()[0], AvgPool(2), processor=processor)
    with pytest.raises(ValueError, match="image_seq_length is 16, not the 64 tokens"):
        graft_compressor(model, AvgPool(2), processor=processor)
    assert type(model.model.multi_modal_projector).__name__ == "InternVLMultiModalProjector"  # nothing half-grafted
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="vision_feature_select_strategy 'default'"):
        graft_compressor(model, AvgPool(2))
    # EmbQ reads the pixel-shuffled tile features: its vision width must be the projector's input width
    with pytest.raises(ValueError, match=f"embq.vision_dim is 32, but this model needs {WIDTH}"):
        graft_embq(model, EmbQ(64, 32, inner_dim=16, num_heads=2), layer=1, tokenizer=processor.tokenizer)
