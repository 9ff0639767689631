"""The attention scores that the LLaVA compressor graft computes for a compressor that
needs them (VisionZip): equal to the scoring layer run with eager attention and
`output_attentions=True`, and to a plain float64 reference; handed over per call; the
tower's attention stays SDPA."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.adapters.conftest import TINY, build_tiny_llava, make_inputs
from tokencompress.adapters import graft_compressor
from tokencompress.base import Grid, TokenCompressor

GRID_TOKENS = (TINY["image_size"] // TINY["patch_size"]) ** 2


class ScoreProbe(TokenCompressor):
    """A test double: keeps every token and records the scores it was handed."""

    needs_attention_scores = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    @classmethod
    def for_dim(cls, dim: int) -> "ScoreProbe":
        return cls()

    def get_config(self) -> dict[str, Any]:
        return {}

    def out_grid(self, grid: Grid) -> Grid:
        return grid

    def out_dim(self, dim: int) -> int:
        return dim

    def compress(self, x: torch.Tensor, grid: Grid, attention_scores: torch.Tensor | None = None) -> torch.Tensor:
        assert attention_scores is not None
        self.seen.append(attention_scores)
        return x


def _encoder_layers(tower: torch.nn.Module) -> torch.nn.ModuleList:
    encoder = tower.encoder if hasattr(tower, "encoder") else tower.vision_model.encoder
    return encoder.layers


def _plain_reference(model: torch.nn.Module, pixel_values: torch.Tensor, has_cls: bool) -> torch.Tensor:
    """Loop over samples and heads: softmax(q k^T / sqrt(d)) of the scoring layer, by hand."""
    core = model.model
    layer_index = core.config.vision_feature_layer % (TINY["vision_layers"] + 1) - 1
    hidden = core.vision_tower(pixel_values, output_hidden_states=True).hidden_states[layer_index]
    layer = _encoder_layers(core.vision_tower)[layer_index]
    attention = layer.self_attn
    rows = []
    for sample in layer.layer_norm1(hidden):
        heads = []
        for head in range(attention.num_heads):
            cols = slice(head * attention.head_dim, (head + 1) * attention.head_dim)
            queries = attention.q_proj(sample)[:, cols]
            keys = attention.k_proj(sample)[:, cols]
            weights = torch.softmax(queries @ keys.T / attention.head_dim**0.5, dim=-1)
            heads.append(weights[0, 1:] if has_cls else weights.mean(dim=0))
        rows.append(torch.stack(heads).mean(dim=0))
    return torch.stack(rows)


def _eager_reference(model: torch.nn.Module, pixel_values: torch.Tensor, has_cls: bool) -> torch.Tensor:
    """The same layer's weights as transformers' eager attention returns them."""
    tower = model.model.vision_tower
    layer_index = model.config.vision_feature_layer % (TINY["vision_layers"] + 1) - 1
    tower.set_attn_implementation("eager")
    try:
        attentions = tower(pixel_values, output_attentions=True).attentions[layer_index]  # (B, heads, L, L)
    finally:
        tower.set_attn_implementation("sdpa")
    return attentions[:, :, 0, 1:].mean(dim=1) if has_cls else attentions.mean(dim=(1, 2))


@pytest.mark.parametrize("vision, feature_layer", [("clip", -2), ("siglip", -1), ("siglip", 2)])
def test_scores_equal_eager_attention_and_a_plain_reference(vision: str, feature_layer: int) -> None:
    model, processor = build_tiny_llava("qwen2", vision, vision_feature_layer=feature_layer)
    model = model.double()
    assert model.model.vision_tower.config._attn_implementation == "sdpa"
    inputs = make_inputs(processor, n_images=2, seed=3)
    pixel_values = inputs["pixel_values"].double()
    has_cls = vision == "clip"
    probe = ScoreProbe()
    graft = graft_compressor(model, probe, processor=processor)
    with torch.no_grad():
        logits = model(**{**inputs, "pixel_values": pixel_values}).logits
        plain = _plain_reference(model, pixel_values, has_cls)
        eager = _eager_reference(model, pixel_values, has_cls)
    (scores,) = probe.seen
    assert scores.shape == (2, GRID_TOKENS) and scores.dtype == torch.float64
    torch.testing.assert_close(scores, plain, rtol=0, atol=1e-12)
    # Eager attention takes its softmax in float32, even for float64 inputs: that rounding
    # is the only difference.
    torch.testing.assert_close(scores, eager, rtol=0, atol=1e-7)
    if not has_cls:  # every query's row sums to one, so the mean received sums to one
        torch.testing.assert_close(scores.sum(dim=-1), torch.ones(2, dtype=torch.float64))
    # A probe that keeps every token leaves the model's output as it was, and the tower on SDPA.
    graft.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(**{**inputs, "pixel_values": pixel_values}).logits, logits, rtol=0, atol=0)
    assert model.model.vision_tower.config._attn_implementation == "sdpa"


def test_scores_travel_with_each_call_and_the_override_is_removed() -> None:
    model, processor = build_tiny_llava("llama", "siglip")
    probe = ScoreProbe()
    graft = graft_compressor(model, probe, processor=processor)
    assert "get_image_features" in vars(model.model)
    first, second = make_inputs(processor, seed=1), make_inputs(processor, seed=2)
    with torch.no_grad():
        model(**first)
        model(**second)
        model(**first)
    assert len(probe.seen) == 3
    assert not torch.equal(probe.seen[0], probe.seen[1])
    torch.testing.assert_close(probe.seen[0], probe.seen[2], rtol=0, atol=0)
    # Not by the call: the projector alone has no scores to give.
    features = torch.randn(1, GRID_TOKENS, TINY["vision_hidden"])
    with pytest.raises(RuntimeError, match="needs the attention each vision token receives"):
        model.model.multi_modal_projector(features)
    graft.remove()
    assert "get_image_features" not in vars(model.model)
    assert not any(layer._forward_pre_hooks for layer in _encoder_layers(model.model.vision_tower))


def test_a_graft_that_cannot_score_is_refused_before_anything_changes() -> None:
    model, processor = build_tiny_llava("qwen2", "siglip", vision_feature_layer=[-2, -1])
    with pytest.raises(ValueError, match=r"one vision feature layer, got vision_feature_layer=\[-2, -1\]"):
        graft_compressor(model, ScoreProbe(), processor=processor)
    model, processor = build_tiny_llava("qwen2", "siglip", vision_feature_layer=0)
    with pytest.raises(ValueError, match="selects the embeddings"):
        graft_compressor(model, ScoreProbe(), processor=processor)
    assert "get_image_features" not in vars(model.model)
    assert type(model.model.multi_modal_projector).__name__ == "LlavaMultiModalProjector"
