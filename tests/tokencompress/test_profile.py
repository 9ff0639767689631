"""The first-round profiler: paper figures, hand formulas for tiny configs, memory, CLI."""

from __future__ import annotations

import json
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, LlamaConfig, PhiConfig, SiglipVisionConfig, SiglipVisionModel

from tokencompress import SAP, EmbQ
from tokencompress.cli import build_parser, main
from tokencompress.hf_compat import cache_argument
from tokencompress.profile import (
    EmbQSpec,
    ProfileResult,
    ProfileSpec,
    build_projector,
    compare_markdown,
    kv_cache_bytes,
    profile_model,
    vision_layers_run,
    weight_bytes,
)
from tokencompress.profile_meter import LiveBytesTracker, measure
from tokencompress.profile_presets import PAPER_TFLOPS, PRESET_GROUPS, PRESETS, phi_2, preset, siglip_so400m_384


@pytest.fixture(scope="module")
def profiled() -> Callable[[str], ProfileResult]:
    """Profile a preset (64 text tokens) once per test module; each costs about a second."""
    results: dict[str, ProfileResult] = {}

    def get(name: str, **options: int) -> ProfileResult:
        key = name + repr(sorted(options.items()))
        if key not in results:
            results[key] = profile_model(preset(name, text_tokens=64, **options))
        return results[key]

    return get


# -- hand formulas (multiply-adds; a Linear's bias is an add, not counted) ---------------
def vit_macs(patches: int, tokens: int, dim: int, inner: int, layers: int, patch_in: int) -> int:
    """Patch embedding + `layers` pre-norm ViT blocks over `tokens` tokens."""
    per_layer = tokens * (4 * dim * dim + 2 * dim * inner) + 2 * tokens * tokens * dim
    return patches * patch_in * dim + layers * per_layer


def phi_macs(tokens: int, dim: int, inner: int, layers: int) -> int:
    """q, k, v, dense + fc1, fc2; attention scores and values over the full square."""
    return layers * (tokens * (4 * dim * dim + 2 * dim * inner) + 2 * tokens * tokens * dim)


def llama_macs(tokens: int, dim: int, inner: int, layers: int, kv_dim: int) -> int:
    """q, o (dim x dim), k, v (dim x kv_dim), gate/up/down; full-square attention."""
    per_token = 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * inner
    return layers * (tokens * per_token + 2 * tokens * tokens * dim)


def embq_macs(n: int, text: int, vision: int, text_dim: int, vision_dim: int, inner: int) -> int:
    text_step = (n + text) * text_dim * inner + n * inner * inner + 2 * text * inner * inner + 2 * n * text * inner
    vision_step = (
        n * inner * inner  # query projection
        + vision * vision_dim * inner + vision * inner * inner  # keys: down, then k_proj
        + vision * vision_dim * vision_dim  # values: v_proj on the raw features
        + n * vision * inner + n * vision * vision_dim  # scores, weighted values
    )
    return text_step + vision_step + n * vision_dim * text_dim


def embq_params(text_dim: int, vision_dim: int, inner: int) -> int:
    linear = lambda i, o: i * o + o  # noqa: E731
    return (
        linear(text_dim, inner) + linear(vision_dim, inner) + 3 * 2 * inner  # downs, 3 LayerNorms
        + 3 * linear(inner, inner)  # text q, k, v
        + 2 * linear(inner, inner) + linear(vision_dim, vision_dim)  # vision q, k, v
        + linear(vision_dim, text_dim)  # up
    )


# -- tiny configs ----------------------------------------------------------------------
def tiny_siglip(layers: int = 3) -> SiglipVisionConfig:  # 16 px / patch 4 -> 4 x 4 = 16 tokens
    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                              num_attention_heads=4, patch_size=4, image_size=16)


def tiny_phi() -> PhiConfig:
    return PhiConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=100, partial_rotary_factor=0.5)


def tiny_llama_gqa() -> LlamaConfig:  # 8 heads of 8, 2 key/value heads
    return LlamaConfig(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=120)


# -- the paper's figures ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["baseline", "flashsloth", "llava-1.5-7b"])
def test_multiply_adds_within_5_percent_of_the_paper(profiled, name: str) -> None:
    tmacs = profiled(name).macs / 1e12
    assert tmacs == pytest.approx(PAPER_TFLOPS[name].tflops, rel=0.05)


@pytest.mark.parametrize(
    "name, visual, queries",
    [("baseline", 729, 0), ("avgpool", 81, 0), ("sap", 81, 0), ("flashsloth", 81, 9),
     ("flashsloth-hd", 405, 9), ("llava-1.5-7b", 576, 0)],
)
def test_token_budget(profiled, name: str, visual: int, queries: int) -> None:
    result = profiled(name)
    assert (result.visual_tokens, result.query_tokens) == (visual, queries)
    assert result.llm_tokens == visual + queries + 64
    assert result.part("LLM prefill").tokens_in == result.llm_tokens


def test_flashsloth_hd_embq_reads_every_tiles_raw_tokens(profiled) -> None:
    result = profiled("flashsloth-hd")
    assert result.part("vision encoder").tokens_out == 5 * 729
    assert result.part("compressor").tokens_out == 405
    assert result.part("EmbQ").tokens_in == 9 + 64 + 5 * 729


def test_llava_encoder_runs_cls_but_llm_sees_patches(profiled) -> None:
    vision = profiled("llava-1.5-7b").part("vision encoder")
    assert (vision.tokens_in, vision.tokens_out) == (577, 576)


# -- parameters -------------------------------------------------------------------------
def test_flashsloth_parameters_per_part(profiled) -> None:
    result = profiled("flashsloth")
    assert result.part("compressor").params == 1152 * 1152 + 1152 + 1152 + 1 == 1_329_409
    assert result.part("EmbQ").params == embq_params(2560, 1152, 576) == 8_084_416
    assert result.part("projector").params == (1152 * 2560 + 2560) + (2560 * 2560 + 2560)
    phi2_layer = 2 * 2560 + 4 * (2560 * 2560 + 2560) + (2560 * 10240 + 10240) + (10240 * 2560 + 2560)
    assert result.part("LLM prefill").params == 51200 * 2560 + 32 * phi2_layer + 2 * 2560
    assert result.part("LM head").params == 2560 * 51200 + 51200
    phi2 = result.part("LLM prefill").params + result.part("LM head").params
    assert phi2 == 2_779_683_840  # phi-2's published 2.78B
    assert result.params == pytest.approx(3.2e9, rel=0.01)  # the paper's "3.2B"


def test_vision_parameters_leave_out_what_does_not_run(profiled) -> None:
    with torch.device("meta"):
        full = SiglipVisionModel(siglip_so400m_384())
    unused = [full.encoder.layers[-1], full.post_layernorm, full.head]
    unused_params = sum(p.numel() for module in unused for p in module.parameters())
    total = sum(p.numel() for p in full.parameters())
    assert total == pytest.approx(0.43e9, rel=0.01)  # so400m's vision tower
    siglip_layer = 2 * 2 * 1152 + 4 * (1152 * 1152 + 1152) + 2 * 1152 * 4304 + 4304 + 1152
    embeddings = 3 * 14 * 14 * 1152 + 1152 + 729 * 1152
    assert profiled("flashsloth").part("vision encoder").params == total - unused_params == embeddings + 26 * siglip_layer


def test_avgpool_has_no_parameters_and_no_multiply_adds(profiled) -> None:
    compressor = profiled("avgpool").part("compressor")
    assert (compressor.params, compressor.macs, compressor.tokens_out) == (0, 0, 81)


# -- multiply-adds of tiny configs against hand formulas ----------------------------------
def test_tiny_siglip_phi_with_sap_and_embq_match_hand_formulas() -> None:
    with torch.device("meta"):
        sap, embq = SAP(32, window=2), EmbQ(text_dim=48, vision_dim=32, inner_dim=16, num_heads=4)
    spec = ProfileSpec(tiny_siglip(), tiny_phi(), text_tokens=5, compressor=sap,
                       embq=EmbQSpec(embq, num_queries=3, layer=1))
    result = profile_model(spec)
    llm_tokens = 4 + 3 + 5  # 2 x 2 pooled + 3 queries + 5 text
    expected = {
        "vision encoder": vit_macs(16, 16, 32, 64, layers=2, patch_in=3 * 4 * 4),  # penultimate of 3
        "compressor": 16 * 32 * 32 + 16 * 32 + 16 * 32,  # score MLP, then the weighted sums
        "projector": 4 * (32 * 48 + 48 * 48),
        "EmbQ": embq_macs(3, 5, 16, text_dim=48, vision_dim=32, inner=16),
        "LLM prefill": phi_macs(llm_tokens, 48, 96, layers=2),
        "LM head": 48 * 100,
    }
    assert {part.name: part.macs for part in result.parts} == expected
    assert result.macs == sum(expected.values())


def test_tiny_clip_llama_gqa_match_hand_formulas() -> None:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              patch_size=4, image_size=16, projection_dim=16)
    spec = ProfileSpec(vision, tiny_llama_gqa(), text_tokens=7, projector="linear", lm_head_positions="all")
    result = profile_model(spec)
    llm_tokens = 16 + 7
    assert [part.macs for part in result.parts] == [
        vit_macs(16, 17, 32, 64, layers=1, patch_in=3 * 4 * 4),  # CLS runs through the encoder
        16 * 32 * 64,
        llama_macs(llm_tokens, 64, 80, layers=2, kv_dim=2 * 8),
        llm_tokens * 64 * 120,  # every position
    ]


def test_tiny_qwen2_with_tied_lm_head() -> None:
    from transformers import Qwen2Config

    llm = Qwen2Config(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=120, tie_word_embeddings=True)
    result = profile_model(ProfileSpec(tiny_siglip(), llm, text_tokens=4))
    llm_part, head = result.part("LLM prefill"), result.part("LM head")
    assert llm_part.macs == llama_macs(16 + 4, 64, 80, layers=2, kv_dim=2 * 8)  # q/k/v biases are adds
    assert (head.params, head.weight_bytes, head.macs) == (0, 0, 64 * 120)  # shares the embedding table
    assert "tied" in head.note
    assert llm_part.kv_cache_bytes == 2 * 2 * 2 * 8 * 20 * 2


def test_embq_multiply_adds_at_full_size(profiled) -> None:
    assert profiled("flashsloth").part("EmbQ").macs == embq_macs(9, 64, 729, 2560, 1152, 576)
    assert profiled("flashsloth-hd").part("EmbQ").macs == embq_macs(9, 64, 5 * 729, 2560, 1152, 576)


def test_queries_cost_llm_tokens_plus_embq(profiled) -> None:
    """Table 3's query ablation: 9 queries are 9 more LLM tokens, plus EmbQ."""
    sap, nine = profiled("sap"), profiled("flashsloth")
    assert profiled("flashsloth", num_queries=0).macs == sap.macs
    extra_llm = phi_macs(154, 2560, 10240, 32) - phi_macs(145, 2560, 10240, 32)
    assert nine.macs - sap.macs == extra_llm + nine.part("EmbQ").macs
    assert nine.macs - sap.macs < 0.03e12  # the paper's Table 3 says 0.24 T (0.48 -> 0.72)


# -- memory -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_bytes_are_params_times_element_size(dtype: torch.dtype) -> None:
    result = profile_model(ProfileSpec(tiny_siglip(), tiny_phi(), text_tokens=3, dtype=dtype))
    for part in result.parts:
        assert part.weight_bytes == weight_bytes(part.params, dtype) == part.params * dtype.itemsize
    assert result.weight_bytes == result.params * dtype.itemsize


def test_kv_cache_matches_hand_formula_at_full_size(profiled) -> None:
    result = profiled("flashsloth")
    assert result.kv_cache_bytes == 2 * 32 * 32 * 80 * 154 * 2  # layers, heads, head dim, tokens, bf16
    assert result.kv_cache_bytes == result.part("LLM prefill").kv_cache_bytes
    llava = profiled("llava-1.5-7b")
    assert llava.kv_cache_bytes == 2 * 32 * 32 * 128 * 640 * 2


def test_kv_cache_formula_equals_what_the_hf_cache_holds() -> None:
    from transformers import AutoModelForCausalLM, DynamicCache

    config = tiny_llama_gqa()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    cache = DynamicCache(config=config)
    embeds = torch.empty(1, 11, 64, device="meta", dtype=torch.bfloat16)
    with torch.no_grad():
        model.base_model(inputs_embeds=embeds, use_cache=True, **cache_argument(cache))
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == kv_cache_bytes(config, 11, torch.bfloat16) == 2 * 2 * 2 * 8 * 11 * 2


def test_peak_activations_of_a_projector_match_hand_formula() -> None:
    projector = build_projector("mlp2x_gelu", 32, 48)
    x = torch.empty(1, 10, 32, device="meta", dtype=torch.bfloat16)
    _, cost = measure(projector.to(device="meta", dtype=torch.bfloat16), x)
    # The input, then fc1's output and GELU's output alive together (fc2's output replaces fc1's).
    assert cost.peak_bytes == 2 * (10 * 32 + 2 * 10 * 48)
    assert cost.macs == 10 * (32 * 48 + 48 * 48)


def test_attention_on_meta_is_measured_as_a_fused_kernel() -> None:
    heads, length, dim = 4, 256, 16
    q, k, v = (torch.empty(1, heads, length, dim, device="meta", dtype=torch.bfloat16) for _ in range(3))
    _, cost = measure(F.scaled_dot_product_attention, q, k, v, is_causal=True)
    # q, k, v and the output in bf16, plus the kernel's float32 log-sum-exp; no L x L scores.
    assert cost.peak_bytes == 4 * heads * length * dim * 2 + heads * length * 4
    assert cost.macs == 2 * heads * length * length * dim


def test_memory_estimate_is_weights_plus_kv_plus_peak_activations(profiled) -> None:
    result = profiled("baseline")
    assert result.memory_bytes == result.weight_bytes + result.kv_cache_bytes + result.peak_activation_bytes
    assert result.peak_activation_bytes == max(part.peak_activation_bytes for part in result.parts)
    assert 0 < result.peak_activation_bytes < result.kv_cache_bytes  # bf16, fused attention, batch 1


# -- spec handling ----------------------------------------------------------------------
@pytest.mark.parametrize("layer, run", [(-2, 26), (-1, 27), (0, 0), (5, 5), (-28, 0)])
def test_vision_layers_run(layer: int, run: int) -> None:
    assert vision_layers_run(27, layer) == run


@pytest.mark.parametrize("layer", [4, -5])
def test_vision_feature_layer_out_of_range(layer: int) -> None:
    with pytest.raises(ValueError, match="vision_feature_layer"):
        ProfileSpec(tiny_siglip(layers=3), tiny_phi(), vision_feature_layer=layer)


def test_spec_rejects_unknown_vision_configs_and_bad_counts() -> None:
    with pytest.raises(TypeError, match="vision_config"):
        ProfileSpec(tiny_phi(), tiny_phi())
    with pytest.raises(ValueError, match="text_tokens"):
        ProfileSpec(tiny_siglip(), tiny_phi(), text_tokens=-1)
    with pytest.raises(ValueError, match="num_images"):
        ProfileSpec(tiny_siglip(), tiny_phi(), num_images=0)
    with pytest.raises(ValueError, match="unknown projector"):
        build_projector("mlp2x_relu", 8, 8)


def test_profiling_leaves_a_real_module_untouched() -> None:
    sap = SAP(32, window=2).train()
    before = {name: p.clone() for name, p in sap.named_parameters()}
    profile_model(ProfileSpec(tiny_siglip(), tiny_phi(), text_tokens=3, compressor=sap))
    assert sap.training and all(m.training for m in sap.modules())
    for name, p in sap.named_parameters():
        assert p.device.type == "cpu" and torch.equal(p, before[name])


def test_preset_options() -> None:
    assert preset("flashsloth", num_queries=6).name == "flashsloth/q=6"
    assert preset("flashsloth", num_queries=0).embq is None
    with pytest.raises(ValueError, match="does not take"):
        preset("baseline", num_queries=6)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpt-4v")
    assert phi_2().rope_parameters["partial_rotary_factor"] == 0.4  # transformers 5 keeps it there


# -- rendering and the command ----------------------------------------------------------
def test_markdown_and_json(profiled) -> None:
    result = profiled("flashsloth")
    table = result.to_markdown()
    for name in ("vision encoder", "compressor", "projector", "EmbQ", "LLM prefill", "LM head", "**total**"):
        assert f"| {name} |" in table
    data = json.loads(result.to_json())
    assert data["totals"]["macs"] == result.macs and data["totals"]["tokens"] == 90
    assert [part["name"] for part in data["parts"]] == [part.name for part in result.parts]
    comparison = compare_markdown([result, profiled("baseline")], {"baseline": 2.40})
    assert comparison.count("\n") == 3
    assert "| 2.40 |" in comparison.splitlines()[-1] and "%" in comparison.splitlines()[-1]


def test_cli_profile_prints_a_table_and_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "flashsloth.json"
    assert main(["profile", "--preset", "flashsloth", "--text-tokens", "64", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| EmbQ |" in printed and "paper: 0.72 T, Table 3" in printed
    payload = json.loads(out.read_text())
    assert payload["command"].startswith("tokencompress profile --preset flashsloth")
    (result,) = payload["results"]
    assert result["totals"]["tokens"] == 90 and result["paper"]["tflops"] == 0.72


def test_cli_compares_several_presets(capsys) -> None:
    assert main(["profile", "--preset", "sap", "flashsloth", "--num-queries", "0", "15"]) == 2  # sap takes no queries
    assert "does not take" in capsys.readouterr().err
    assert main(["profile", "--preset", "flashsloth", "--num-queries", "0", "6", "--lm-head", "all"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| flashsloth")]
    assert [row.split(" | ")[0] for row in rows] == ["| flashsloth/q=0", "| flashsloth/q=6"]


def test_cli_help_lists_every_preset(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["profile", "--help"])
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in [*PRESETS, *PRESET_GROUPS])


def test_live_bytes_count_new_dense_storages_once_and_skip_sparse_results() -> None:
    """Views share their storage's bytes; sparse results (no single storage) are skipped, not an error."""
    weight = torch.ones(4, 4)  # made before the mode: never counted
    with LiveBytesTracker() as tracker:
        made = weight * 2  # 64 bytes
        view = made[:2]  # a view of the same storage: no new bytes
        sparse = torch.eye(3).to_sparse()  # eye: 36 dense bytes, freed; the sparse result skipped
        again = weight.t()  # a view of a storage made before the mode
        assert tracker.live == 64  # the temporary eye was released when collected
    assert tracker.peak == 64 + 36
    assert sparse.is_sparse and view.shape == (2, 4) and again.shape == (4, 4)
