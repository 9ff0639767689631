"""The profiler on LLaVA-NeXT (AnyRes views) and Qwen3-VL (its own ViT, merger and DeepStack):
token budgets, multiply-adds against hand formulas and against a real CPU run, the
stand-in text model, spec errors, the presets and the command."""

from __future__ import annotations

import json
from typing import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, Qwen3Config, Qwen3VLTextConfig, Qwen3VLTextModel
from transformers import Qwen3VLVisionConfig, Qwen3VLVisionModel

from tokencompress.cli import main
from tokencompress.hf_compat import cache_argument
from tokencompress.mac_count import count_macs
from tokencompress.profile import ProfileResult, ProfileSpec, profile_model, savings_markdown
from tokencompress.profile_meter import CpuOperandsOnMeta, measure
from tokencompress.profile_presets import PRESET_GROUPS, clip_vit_l14_336, llama_7b, preset, qwen3_vl_vision

from .test_profile import llama_macs, tiny_phi, tiny_siglip, vit_macs


@pytest.fixture(scope="module")
def profiled() -> Callable[..., ProfileResult]:
    """Profile a preset (64 text tokens) once per test module; each costs under a second."""
    results: dict[str, ProfileResult] = {}

    def get(name: str, **options) -> ProfileResult:
        key = name + repr(sorted(options.items()))
        if key not in results:
            results[key] = profile_model(preset(name, text_tokens=64, **options))
        return results[key]

    return get


# -- hand formulas (multiply-adds; biases and norms are not counted) -----------------------
def qwen3_vl_vision_macs(patches: int, dim: int, inner: int, layers: int, patch_in: int, out_dim: int,
                         deepstack: int, merge: int = 2) -> int:
    """Patch embedding + ViT blocks (fused qkv) + the merger and each DeepStack merger:
    Linear(m^2 D, m^2 D) -> Linear(m^2 D, out) on every merged token."""
    wide = dim * merge**2
    mergers = (1 + deepstack) * (patches // merge**2) * (wide * wide + wide * out_dim)
    return vit_macs(patches, patches, dim, inner, layers, patch_in) + mergers


def qwen3_macs(tokens: int, dim: int, inner: int, layers: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """q, o (dim x heads * head_dim), k, v (dim x kv_heads * head_dim), gate/up/down, and
    attention over the full square (every query head)."""
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    per_token = 2 * dim * q_dim + 2 * dim * kv_dim + 3 * dim * inner
    return layers * (tokens * per_token + 2 * tokens * tokens * q_dim)


def tiny_qwen3_vl_vision() -> Qwen3VLVisionConfig:  # patch 4, merge 2: sides in multiples of 8 px
    return Qwen3VLVisionConfig(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                               temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16,
                               deepstack_visual_indexes=[0, 2], out_hidden_size=48)


# -- Qwen3-VL's vision tower ----------------------------------------------------------------
def test_tiny_qwen3_vl_tower_matches_hand_formula_and_a_cpu_run() -> None:
    config = tiny_qwen3_vl_vision()
    result = profile_model(ProfileSpec(config, tiny_phi(), text_tokens=5, image_size=(16, 24), projector="identity"))
    vision = result.part("vision encoder")
    # 16 x 24 px: 4 x 6 patches, 2 x 3 = 6 merged tokens of the LLM's width 48
    expected = qwen3_vl_vision_macs(24, 32, 64, layers=3, patch_in=3 * 2 * 4 * 4, out_dim=48, deepstack=2)
    assert (vision.tokens_in, vision.tokens_out, vision.macs) == (24, 6, expected)
    # The same tower with real weights on the CPU, real pixels: the same count, the same shapes.
    torch.manual_seed(0)
    tower = Qwen3VLVisionModel(config).eval()
    out, macs = count_macs(tower, torch.randn(24, 96), torch.tensor([[1, 4, 6]]))
    assert macs == expected
    assert out.pooler_output.shape == (6, 48) and [f.shape for f in out.deepstack_features] == [(6, 48)] * 2
    assert vision.params == sum(p.numel() for p in tower.parameters())


def test_two_qwen3_vl_images_run_as_two_attention_blocks() -> None:
    config = tiny_qwen3_vl_vision()
    one = profile_model(ProfileSpec(config, tiny_phi(), text_tokens=5, image_size=(16, 16), projector="identity"))
    two = profile_model(ProfileSpec(config, tiny_phi(), text_tokens=5, image_size=(16, 16), num_images=2,
                                    projector="identity"))
    # attention is per image (cu_seqlens), so two images cost exactly twice one
    assert two.part("vision encoder").macs == 2 * one.part("vision encoder").macs
    assert (one.visual_tokens, two.visual_tokens) == (4, 8)


@pytest.mark.parametrize("model, out_dim", [("qwen3-vl-2b", 2048), ("qwen3-vl-4b", 2560)])
def test_full_size_qwen3_vl_tower_matches_hand_formula(profiled, model: str, out_dim: int) -> None:
    vision = profiled(model).part("vision encoder")
    # 512 x 512 px: 32 x 32 = 1024 patches of 3 x 2 x 16 x 16 values, 256 merged tokens
    assert vision.macs == qwen3_vl_vision_macs(1024, 1024, 4096, layers=24, patch_in=1536, out_dim=out_dim,
                                               deepstack=3)
    block = 2 * 2 * 1024 + (1024 * 3072 + 3072) + (1024 * 1024 + 1024) + (1024 * 4096 + 4096) + (4096 * 1024 + 1024)
    merger = (4096 * 4096 + 4096) + (4096 * out_dim + out_dim)
    embeddings = (1536 * 1024 + 1024) + 2304 * 1024  # patch embedding, learned position table
    assert vision.params == embeddings + 24 * block + (2 * 1024 + merger) + 3 * (2 * 4096 + merger)


@pytest.mark.parametrize(
    "name, visual",
    [("qwen3-vl-2b", 256), ("qwen3-vl-2b/avgpool2", 64), ("qwen3-vl-2b/sap", 64), ("qwen3-vl-2b/pixelshuffle", 64),
     ("qwen3-vl-4b", 256), ("qwen3-vl-4b/pixelshuffle", 64)],
)
def test_qwen3_vl_token_budget(profiled, name: str, visual: int) -> None:
    result = profiled(name)
    assert (result.visual_tokens, result.llm_tokens) == (visual, visual + 64)
    assert result.part("LLM prefill").tokens_in == visual + 64


def test_qwen3_vl_compressors_also_run_on_the_deepstack_levels(profiled) -> None:
    sap, shuffle = profiled("qwen3-vl-2b/sap"), profiled("qwen3-vl-2b/pixelshuffle")
    # SAP(2048, window 2) on 4 levels x 256 merged tokens: score MLP + two weighted sums
    assert sap.part("compressor").tokens_in == 4 * 256
    assert sap.part("compressor").macs == 4 * 256 * (2048 * 2048 + 2 * 2048)
    assert sap.part("projector").macs == 0  # the merger already projects
    # PixelShuffle(2): 4 levels x 64 tokens of 8192, a new mlp2x_gelu back to 2048
    assert shuffle.part("projector").macs == 4 * 64 * (8192 * 2048 + 2048 * 2048)
    assert shuffle.part("projector").params == (8192 * 2048 + 2048) + (2048 * 2048 + 2048)


@pytest.mark.parametrize("model, dim, inner, layers, heads", [("qwen3-vl-2b", 2048, 6144, 28, 16),
                                                             ("qwen3-vl-4b", 2560, 9728, 36, 32)])
def test_qwen3_vl_llm_matches_hand_formula(profiled, model, dim, inner, layers, heads) -> None:
    result = profiled(model)
    assert result.part("LLM prefill").macs == qwen3_macs(320, dim, inner, layers, heads, kv_heads=8, head_dim=128)
    head = result.part("LM head")
    assert (head.macs, head.params) == (dim * 151936, 0)  # the last position; tied to the embedding table
    assert result.kv_cache_bytes == 2 * layers * 8 * 128 * 320 * 2


def test_qwen3_vl_1024_px_image_gives_four_times_the_tokens(profiled) -> None:
    big = profiled("qwen3-vl-2b/avgpool2", image_size=(1024, 1024))
    assert big.name == "qwen3-vl-2b/avgpool2@1024x1024"
    assert (big.part("vision encoder").tokens_in, big.visual_tokens) == (64 * 64, 256)


def test_the_qwen3_stand_in_costs_what_qwen3_vl_text_costs() -> None:
    """Qwen3-VL's text model (mRoPE) and a Qwen3 of the same sizes: same multiply-adds, parameters, peak."""
    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=100, tie_word_embeddings=True)
    vl = Qwen3VLTextConfig(**sizes, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                      "mrope_section": [8, 4, 4], "mrope_interleaved": True})
    qwen3 = Qwen3Config(**sizes)
    costs = []
    for config, build in ((vl, Qwen3VLTextModel), (qwen3, lambda c: AutoModelForCausalLM.from_config(c).base_model)):
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = build(config).to(torch.bfloat16).eval()
        embeds = torch.empty(1, 37, 64, device="meta", dtype=torch.bfloat16)
        _, cost = measure(model, inputs_embeds=embeds, use_cache=True, **cache_argument(DynamicCache(config=config)))
        costs.append((cost, sum(p.numel() for p in model.parameters())))
    assert costs[0] == costs[1]
    assert costs[0][0].macs == qwen3_macs(37, 64, 96, 2, heads=4, kv_heads=2, head_dim=32)


# -- LLaVA-NeXT -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, per_view, visual", [("llava-next-7b", 576, 2928), ("llava-next-7b/avgpool2", 144, 744),
                               ("llava-next-7b/sap", 144, 744), ("llava-next-7b/pixelshuffle", 144, 744)],
)
def test_llava_next_views_layout_and_multiply_adds(profiled, name: str, per_view: int, visual: int) -> None:
    result = profiled(name)
    vision, layout = result.part("vision encoder"), result.part("AnyRes layout")
    # 672 x 672: base view + 2 x 2 tiles, each through 23 of CLIP's 24 layers on 577 tokens
    assert (vision.tokens_in, vision.tokens_out) == (5 * 577, 5 * 576)
    assert vision.macs == 5 * vit_macs(576, 577, 1024, 4096, layers=23, patch_in=3 * 14 * 14)
    assert (layout.tokens_in, layout.tokens_out, layout.params, layout.macs) == (5 * per_view, visual, 4096, 0)
    projector_in = 4 * 1024 if name.endswith("pixelshuffle") else 1024  # a new projector after PixelShuffle
    assert result.part("projector").macs == 5 * per_view * (projector_in * 4096 + 4096 * 4096)
    assert result.visual_tokens == visual
    assert result.part("LLM prefill").macs == llama_macs(visual + 64, 4096, 11008, layers=32, kv_dim=4096)


def test_llava_next_image_size_sets_the_views(profiled) -> None:
    tall = profiled("llava-next-7b/sap", image_size=(1008, 336))
    # 3 x 1 tiles + base: 4 views; 12 x 12 base + 36 x 12 picture + 36 newlines
    assert tall.name == "llava-next-7b/sap@1008x336"
    assert tall.part("vision encoder").tokens_out == 4 * 576
    assert tall.visual_tokens == 144 + 36 * 12 + 36


# -- spec errors --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({}, ValueError, "needs image_size"),
        ({"image_size": (500, 512)}, ValueError, "multiple of patch_size \\* spatial_merge_size = 32"),
        ({"image_size": (512, 512), "vision_feature_layer": -2}, ValueError, "vision_feature_layer=-2"),
        ({"image_size": (512, 512), "grid_pinpoints": ((512, 1024),)}, ValueError, "grid_pinpoints"),
    ],
)
def test_qwen3_vl_spec_errors(changes, error, message) -> None:
    with pytest.raises(error, match=message):
        ProfileSpec(qwen3_vl_vision(48), tiny_phi(), **changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"image_size": (672, 672)}, "image_size is for AnyRes"),
        ({"grid_pinpoints": ((336, 672),)}, "needs the image's image_size"),
        ({"grid_pinpoints": ((336, 672),), "image_size": (336, 672), "num_images": 2}, "num_images=2"),
        ({"grid_pinpoints": ((336, 600),), "image_size": (336, 672)}, "not multiples of tile_pixels=336"),
    ],
)
def test_anyres_spec_errors(changes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProfileSpec(clip_vit_l14_336(), llama_7b(), **changes)


def test_fixed_size_towers_keep_their_feature_layer_default() -> None:
    spec = ProfileSpec(tiny_siglip(layers=3), tiny_phi())
    assert (spec.vision_feature_layer, spec.feature_layer, spec.views) == (None, -2, 1)


# -- CPU tensors meeting meta ones ----------------------------------------------------------------
def test_cpu_operands_meeting_meta_ones_move_to_meta() -> None:
    meta, cpu = torch.empty(3, 4, device="meta"), torch.arange(4.0)
    with pytest.raises(RuntimeError, match="meta"):
        meta * cpu
    with CpuOperandsOnMeta():
        mixed = meta * cpu
        alone = cpu * 2  # only CPU operands: computed on the CPU, with values
    assert mixed.device.type == "meta" and mixed.shape == (3, 4)
    assert torch.equal(alone, torch.tensor([0.0, 2.0, 4.0, 6.0]))


# -- the savings table and the command --------------------------------------------------------------
def test_savings_table_compares_each_model_with_its_own_uncompressed_run(profiled) -> None:
    names = ["qwen3-vl-2b/sap", "llava-next-7b", "qwen3-vl-2b", "llava-next-7b/avgpool2", "qwen3-vl-4b/sap"]
    results = [profiled(name) for name in names]
    rows = {row.split(" | ")[0].lstrip("| "): row.split(" | ") for row in savings_markdown(results).splitlines()[2:]}
    ratio = lambda a, b: f"{profiled(a).macs / profiled(b).macs:.2f}x"  # noqa: E731
    assert rows["qwen3-vl-2b/sap"][6] == ratio("qwen3-vl-2b", "qwen3-vl-2b/sap")
    assert rows["llava-next-7b/avgpool2"][6] == ratio("llava-next-7b", "llava-next-7b/avgpool2")
    assert rows["llava-next-7b"][6] == rows["qwen3-vl-2b"][6] == "1.00x"
    assert rows["qwen3-vl-4b/sap"][6] == ""  # its uncompressed run is not in the list
    vision = profiled("qwen3-vl-2b/sap").part("vision encoder").macs
    assert rows["qwen3-vl-2b/sap"][3] == f"{vision / 1e12:.3f}"


def test_cli_expands_groups_sizes_images_and_prints_savings(tmp_path, capsys) -> None:
    out = tmp_path / "qwen.json"
    argv = ["profile", "--preset", "qwen3-vl-2b", "qwen3-vl-2b/avgpool2", "--image-size", "1024", "1024",
            "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| qwen3-vl-2b/avgpool2@1024x1024 |" in printed and "| MACs ratio |" in printed
    results = json.loads(out.read_text())["results"]
    assert [r["name"] for r in results] == ["qwen3-vl-2b@1024x1024", "qwen3-vl-2b/avgpool2@1024x1024"]
    assert main(["profile", "--preset", "flashsloth", "--image-size", "512", "512"]) == 2
    assert "does not take" in capsys.readouterr().err


def test_groups_hold_every_family_preset() -> None:
    assert PRESET_GROUPS["all"] == ("baseline", "avgpool", "sap", "flashsloth", "flashsloth-hd", "llava-1.5-7b")
    assert PRESET_GROUPS["llava-next"] == ("llava-next-7b", "llava-next-7b/avgpool2", "llava-next-7b/sap",
                                           "llava-next-7b/pixelshuffle")
    assert len(PRESET_GROUPS["qwen3-vl"]) == 8 and PRESET_GROUPS["qwen3-vl"][4] == "qwen3-vl-4b"


def test_family_builders_name_what_they_do_not_know() -> None:
    from tokencompress.profile_presets import llava_next_7b, qwen3_vl

    with pytest.raises(ValueError, match="unknown variant 'ldp'"):
        llava_next_7b("ldp")
    with pytest.raises(ValueError, match="unknown Qwen3-VL model 'qwen3-vl-8b'"):
        qwen3_vl("qwen3-vl-8b")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        preset("qwen3-vl-2b", image_size=(500, 500))
