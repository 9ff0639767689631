"""The compressor graft on the 6 tiny LLaVA models (Phi/Qwen2/Llama x SigLIP/CLIP)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from tokencompress import LDP, SAP, AvgPool, Compose, LDPv2, PixelShuffle, TokenCompressor
from tokencompress.adapters import (
    CompressedProjector,
    CompressorGraft,
    graft_compressor,
    load_compressor_graft,
)
from tokencompress.adapters.compressor_graft_io import CONFIG_NAME, WEIGHTS_NAME

from .conftest import (
    TINY,
    TinyLlava,
    build_tiny_llava,
    make_images,
    make_inputs,
    make_prompt,
)

VISION_DIM, TEXT_DIM = TINY["vision_hidden"], TINY["text_hidden"]
GRID = (TINY["image_size"] // TINY["patch_size"],) * 2  # (8, 8)


# -- the compressors under test ---------------------------------------------------------
def _mlp_projector(in_dim: int) -> nn.Module:
    """A LLaVA-style mlp2x_gelu projector for a compressor that widens the tokens."""
    return nn.Sequential(nn.Linear(in_dim, TEXT_DIM), nn.GELU(), nn.Linear(TEXT_DIM, TEXT_DIM))


# name -> (compressor builder, new projector builder or None, expected placement)
CASES: dict[str, tuple[Callable[[], TokenCompressor], Callable[[], nn.Module] | None, str]] = {
    "avgpool": (lambda: AvgPool(3), None, "before_projector"),
    "sap": (lambda: SAP(VISION_DIM, window=2), None, "before_projector"),
    "pixel_shuffle+sap": (
        lambda: Compose(PixelShuffle(2), SAP(4 * VISION_DIM, window=2)),
        lambda: _mlp_projector(4 * VISION_DIM),
        "before_projector",
    ),
    "ldp": (lambda: LDP(VISION_DIM, TEXT_DIM), None, "replace_projector"),
    "ldpv2": (lambda: LDPv2(VISION_DIM, TEXT_DIM, out_grid=(3, 3)), None, "replace_projector"),
}


class MeanPool(TokenCompressor):
    """An unregistered compressor: mean of each 2x2 block, plus a learnt bias."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))

    @classmethod
    def for_dim(cls, dim: int) -> "MeanPool":
        return cls(dim)

    def out_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return grid[0] // 2, grid[1] // 2

    def get_config(self) -> dict[str, int]:
        return {"dim": self.bias.shape[0]}

    def out_dim(self, dim: int) -> int:
        return dim

    def compress(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch, _, dim = x.shape
        blocks = x.reshape(batch, grid[0] // 2, 2, grid[1] // 2, 2, dim).mean(dim=(2, 4))
        return blocks.reshape(batch, -1, dim) + self.bias


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest) -> str:
    return request.param


def _graft(tiny: TinyLlava, name: str) -> CompressorGraft:
    make_compressor, make_projector, _ = CASES[name]
    projector = make_projector() if make_projector is not None else None
    return graft_compressor(tiny.model, make_compressor(), processor=tiny.processor, projector=projector)


def _image_token_counts(inputs: Any, model: LlavaForConditionalGeneration) -> list[int]:
    return (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()


def _logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _selected_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision features LLaVA hands its projector, computed here step by step."""
    config = model.config
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    selected = hidden[config.vision_feature_layer]
    if config.vision_feature_select_strategy == "default":
        selected = selected[:, 1:]  # CLIP's CLS token
    return selected


def _embeds_reaching_lm(model: LlavaForConditionalGeneration, inputs: Any) -> torch.Tensor:
    """The `inputs_embeds` that the language model receives in a forward of `inputs`."""
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(kwargs["inputs_embeds"].detach().clone())

    hook = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        _logits(model, inputs)
    finally:
        hook.remove()
    return captured[0]


# -- the processor's and the config's image token count ----------------------------------
def test_placeholders_follow_num_out_tokens(tiny_llava: TinyLlava, case: str) -> None:
    graft = _graft(tiny_llava, case)
    expected = graft.compressor.num_out_tokens(GRID)
    assert graft.num_image_tokens == expected
    assert graft.original_num_image_tokens == GRID[0] * GRID[1]
    assert tiny_llava.model.config.image_seq_length == expected
    inputs = make_inputs(tiny_llava.processor, n_images=2)
    assert _image_token_counts(inputs, tiny_llava.model) == [2 * expected]


def test_placement_is_chosen_by_width(tiny_llava: TinyLlava, case: str) -> None:
    graft = _graft(tiny_llava, case)
    assert graft.placement == CASES[case][2]
    assert isinstance(tiny_llava.model.model.multi_modal_projector, CompressedProjector)
    assert tiny_llava.model.model.multi_modal_projector is graft.module


# -- the values that reach the language model --------------------------------------------
def test_image_embeddings_are_projector_of_compressed_features(tiny_llava: TinyLlava, case: str) -> None:
    model = tiny_llava.model
    original_projector = model.model.multi_modal_projector
    graft = _graft(tiny_llava, case)
    inputs = make_inputs(tiny_llava.processor, n_images=2)

    with torch.no_grad():
        compressed = graft.compressor(_selected_features(model, inputs["pixel_values"]), GRID)
        if graft.placement == "before_projector":
            head = graft.projector if graft.projector is not None else original_projector
            compressed = head(compressed)
    expected = compressed.reshape(-1, TEXT_DIM)  # images in order, each image's tokens in order

    embeds = _embeds_reaching_lm(model, inputs)
    at_placeholders = embeds[inputs["input_ids"] == model.config.image_token_id]
    torch.testing.assert_close(at_placeholders, expected, rtol=1e-6, atol=1e-6)
    # The text positions carry the plain word embeddings.
    text = inputs["input_ids"] != model.config.image_token_id
    word_embeddings = model.get_input_embeddings()(inputs["input_ids"])
    torch.testing.assert_close(embeds[text], word_embeddings[text].detach(), rtol=0, atol=0)


def test_loss_gradients_reach_the_compressor(tiny_llava: TinyLlava, case: str) -> None:
    model = tiny_llava.model
    graft = _graft(tiny_llava, case)
    inputs = make_inputs(tiny_llava.processor, n_images=1)
    out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trainable = list(graft.compressor.parameters()) + list((graft.projector or nn.Module()).parameters())
    for parameter in trainable:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
    if trainable:
        assert any(parameter.grad.abs().sum() > 0 for parameter in trainable)
    # The gradient flows through the compressor into the vision tower (AvgPool has no weights).
    patch_embedding = model.model.vision_tower.get_input_embeddings().weight
    assert patch_embedding.grad is not None and patch_embedding.grad.abs().sum() > 0


# -- generation ------------------------------------------------------------------------
@pytest.mark.slow
def test_greedy_generate_with_cache_equals_without(tiny_llava: TinyLlava, case: str) -> None:
    _graft(tiny_llava, case)
    inputs = make_inputs(tiny_llava.processor, n_images=2)
    settings = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    with_cache = tiny_llava.model.generate(**inputs, **settings, use_cache=True)
    without_cache = tiny_llava.model.generate(**inputs, **settings, use_cache=False)
    assert with_cache.shape[1] == inputs["input_ids"].shape[1] + 6
    assert torch.equal(with_cache, without_cache)


# -- several images, several prompts ---------------------------------------------------
def test_batch_of_prompts_with_different_image_counts(tiny_llava: TinyLlava) -> None:
    model, processor = tiny_llava.model, tiny_llava.processor
    graft = _graft(tiny_llava, "sap")
    prompts = [make_prompt(2), make_prompt(1, "And this one, in a longer question?")]
    images = make_images(3)
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert _image_token_counts(batch, model) == [2 * graft.num_image_tokens, graft.num_image_tokens]
    batched = _logits(model, batch)
    # Each prompt alone gives the same logits on its own (unpadded) positions.
    for row, (prompt, row_images) in enumerate(zip(prompts, [images[:2], images[2:]])):
        alone = processor(images=row_images, text=[prompt], return_tensors="pt")
        length = alone["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][row, :length], alone["input_ids"][0])
        torch.testing.assert_close(batched[row, :length], _logits(model, alone)[0], rtol=1e-5, atol=1e-5)


# -- remove() ---------------------------------------------------------------------------
def test_remove_restores_model_processor_and_config(tiny_llava: TinyLlava, case: str) -> None:
    model, processor = tiny_llava.model, tiny_llava.processor
    inputs = make_inputs(processor, n_images=2)
    before = _logits(model, inputs)
    projector = model.model.multi_modal_projector
    state_keys = list(model.state_dict())
    settings = (processor.num_additional_image_tokens, model.config.image_seq_length)

    graft = _graft(tiny_llava, case)
    assert not torch.equal(_logits(model, make_inputs(processor, n_images=2))[:, -1], before[:, -1])
    graft.remove()

    assert not graft.active
    assert model.model.multi_modal_projector is projector
    assert list(model.state_dict()) == state_keys
    assert (processor.num_additional_image_tokens, model.config.image_seq_length) == settings
    again = make_inputs(processor, n_images=2)
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    assert torch.equal(_logits(model, again), before)  # bit-identical
    with pytest.raises(RuntimeError, match="already removed"):
        graft.remove()


def test_graft_again_after_remove(tiny_llava: TinyLlava) -> None:
    first = _graft(tiny_llava, "sap")
    first.remove()
    second = _graft(tiny_llava, "avgpool")
    assert _image_token_counts(make_inputs(tiny_llava.processor), tiny_llava.model) == [9]
    second.remove()
    assert _image_token_counts(make_inputs(tiny_llava.processor), tiny_llava.model) == [64]


# -- saving and loading ------------------------------------------------------------------
def _saved_graft_kwargs(case: str) -> dict[str, Any]:
    make_projector = CASES[case][1]
    return {"projector": make_projector()} if make_projector is not None else {}


def test_save_and_load_round_trip(tiny_llava: TinyLlava, case: str, tmp_path: Path) -> None:
    model, processor = tiny_llava.model, tiny_llava.processor
    graft = _graft(tiny_llava, case)
    with torch.no_grad():  # move the compressor away from its initial weights
        for parameter in graft.compressor.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    inputs = make_inputs(processor, n_images=2)
    expected = _logits(model, inputs)

    graft.save_pretrained(tmp_path, save_base_model=True)
    assert model.model.multi_modal_projector is graft.module  # saving left the graft in place
    assert model.config.image_seq_length == graft.num_image_tokens
    record = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert record["placement"] == graft.placement and record["num_image_tokens"] == graft.num_image_tokens
    assert (tmp_path / WEIGHTS_NAME).is_file() and (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))

    # The folder's model and processor are the plain, ungrafted ones ...
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    reloaded_processor = LlavaProcessor.from_pretrained(tmp_path, backend="pil")
    assert reloaded.config.image_seq_length == GRID[0] * GRID[1]
    assert _image_token_counts(make_inputs(reloaded_processor), reloaded) == [64]
    # ... and the graft file puts the compressor back on them.
    loaded = load_compressor_graft(reloaded, tmp_path, processor=reloaded_processor, **_saved_graft_kwargs(case))
    reloaded_inputs = make_inputs(reloaded_processor, n_images=2)
    assert torch.equal(reloaded_inputs["input_ids"], inputs["input_ids"])
    assert torch.equal(_logits(reloaded, reloaded_inputs), expected)
    loaded.remove()
    graft.remove()
    assert torch.equal(_logits(reloaded, make_inputs(reloaded_processor)), _logits(model, make_inputs(processor)))


def test_graft_only_save_loads_onto_the_same_base(tmp_path: Path) -> None:
    model, processor = build_tiny_llava("qwen2", "siglip")
    graft = graft_compressor(model, SAP(VISION_DIM, window=2), processor=processor)
    expected = _logits(model, make_inputs(processor))
    graft.save_pretrained(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])

    base, base_processor = build_tiny_llava("qwen2", "siglip")  # same seed: the same base weights
    load_compressor_graft(base, tmp_path, processor=base_processor)
    assert torch.equal(_logits(base, make_inputs(base_processor)), expected)


def test_unregistered_compressor_saves_weights_and_needs_compressor_to_load(tmp_path: Path) -> None:
    model, processor = build_tiny_llava("llama", "clip")
    graft = graft_compressor(model, MeanPool(VISION_DIM), processor=processor)
    with torch.no_grad():
        graft.compressor.bias.fill_(0.5)
    with pytest.warns(UserWarning, match="weights only.*not registered"):
        graft.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["compressor"] is None

    base, base_processor = build_tiny_llava("llama", "clip")
    with pytest.raises(ValueError, match="pass compressor="):
        load_compressor_graft(base, tmp_path, processor=base_processor)
    loaded = load_compressor_graft(base, tmp_path, processor=base_processor, compressor=MeanPool(VISION_DIM))
    assert torch.equal(loaded.compressor.bias, torch.full((VISION_DIM,), 0.5))


def test_load_refuses_a_mismatched_model_or_missing_projector(tmp_path: Path) -> None:
    model, processor = build_tiny_llava("phi", "siglip")
    make_compressor, make_projector, _ = CASES["pixel_shuffle+sap"]
    graft_compressor(model, make_compressor(), processor=processor, projector=make_projector()).save_pretrained(tmp_path)

    other, _ = build_tiny_llava("phi", "siglip", vision_image_size=42)  # a 6x6 grid
    with pytest.raises(ValueError, match=r"grid \(8, 8\).*\(6, 6\)"):
        load_compressor_graft(other, tmp_path)
    same, _ = build_tiny_llava("phi", "siglip")
    with pytest.raises(ValueError, match="pass projector="):
        load_compressor_graft(same, tmp_path)
    wrong_projector = _mlp_projector(2 * VISION_DIM)
    with pytest.raises(RuntimeError):
        load_compressor_graft(same, tmp_path, projector=wrong_projector)
    # A failed load leaves the model as it was.
    assert not isinstance(same.model.multi_modal_projector, CompressedProjector)
    assert same.config.image_seq_length == 64


def test_load_reads_no_pickle_and_checks_the_format(tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format": "something else"}))
    model, _ = build_tiny_llava("qwen2", "clip")
    with pytest.raises(ValueError, match="not a compressor graft config"):
        load_compressor_graft(model, tmp_path)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_compressor_graft(model, tmp_path / "missing")


# -- clear errors ------------------------------------------------------------------------
def test_stale_placeholder_count_raises_naming_both_counts(tiny_llava: TinyLlava) -> None:
    model, processor = tiny_llava.model, tiny_llava.processor
    stale = make_inputs(processor, n_images=2)  # built before the graft: 64 per image
    _graft(tiny_llava, "sap")  # 16 per image
    with pytest.raises(ValueError, match=r"128 image placeholder tokens \(the ungrafted count\).*16 tokens per image x 2 images = 32"):
        model(**stale)
    with pytest.raises(ValueError, match="128 image placeholder"):
        model.generate(**stale, max_new_tokens=2)


def test_width_changing_compressor_needs_a_projector(tiny_llava: TinyLlava) -> None:
    compressor = Compose(PixelShuffle(2), SAP(4 * VISION_DIM, window=2))
    message = rf"width {VISION_DIM} to {4 * VISION_DIM}.*width is {TEXT_DIM}.*projector="
    with pytest.raises(ValueError, match=message):
        graft_compressor(tiny_llava.model, compressor, processor=tiny_llava.processor)
    # Nothing changed.
    assert not isinstance(tiny_llava.model.model.multi_modal_projector, CompressedProjector)
    assert _image_token_counts(make_inputs(tiny_llava.processor), tiny_llava.model) == [64]


def test_placement_can_be_forced_when_widths_are_equal() -> None:
    # Text width == vision width: LDP(32, 32) keeps the width, so "auto" keeps the projector.
    model, processor = build_tiny_llava("llama", "siglip", text_hidden_size=VISION_DIM)
    assert graft_compressor(model, LDP(VISION_DIM, VISION_DIM)).placement == "before_projector"
    model, processor = build_tiny_llava("llama", "siglip", text_hidden_size=VISION_DIM)
    graft = graft_compressor(model, LDP(VISION_DIM, VISION_DIM), processor=processor, placement="replace_projector")
    inputs = make_inputs(processor)
    with torch.no_grad():
        expected = graft.compressor(_selected_features(model, inputs["pixel_values"]), GRID)
    embeds = _embeds_reaching_lm(model, inputs)[inputs["input_ids"] == model.config.image_token_id]
    torch.testing.assert_close(embeds, expected.reshape(-1, VISION_DIM), rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_clear_errors(tiny_llava: TinyLlava) -> None:
    model, processor = tiny_llava.model, tiny_llava.processor
    with pytest.raises(ValueError, match="needs an output width of 64"):
        graft_compressor(model, SAP(VISION_DIM), placement="replace_projector")
    with pytest.raises(ValueError, match="placement must be one of"):
        graft_compressor(model, SAP(VISION_DIM), placement="after")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot take this model's vision features"):
        graft_compressor(model, SAP(2 * VISION_DIM))
    with pytest.raises(TypeError, match="TokenCompressor"):
        graft_compressor(model, nn.Identity())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        graft_compressor(model.model.language_model, SAP(VISION_DIM))  # type: ignore[arg-type]
    graft_compressor(model, SAP(VISION_DIM), processor=processor)
    with pytest.raises(ValueError, match="already has a grafted compressor"):
        graft_compressor(model, SAP(VISION_DIM))


def test_cls_token_kept_by_full_strategy_is_refused() -> None:
    model, processor = build_tiny_llava("phi", "clip", vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="writes 65 image placeholders.*grid 8x8 has 64"):
        graft_compressor(model, SAP(VISION_DIM), processor=processor)
    graft_compressor(model, SAP(VISION_DIM))  # without a processor, the forward says it
    with pytest.raises(ValueError, match=r"\(num_images, 64, C\).*vision_feature_select_strategy='default'"):
        with torch.no_grad():
            model.model.get_image_features(pixel_values=torch.zeros(1, 3, 56, 56))


def test_graft_works_on_llava_model_and_follows_train_mode() -> None:
    model, processor = build_tiny_llava("qwen2", "siglip")
    compressor = SAP(VISION_DIM)
    assert compressor.training
    graft = graft_compressor(model.model, compressor, processor=processor)
    assert not compressor.training  # the model is in eval mode: no dropout at inference
    model.train()
    assert compressor.training
    assert graft.num_image_tokens == 9
    graft.remove()


def test_training_with_gradient_checkpointing() -> None:
    model, processor = build_tiny_llava("phi", "siglip")
    graft = graft_compressor(model, SAP(VISION_DIM, window=2), processor=processor)
    model.activation_checkpointing_enable()
    model.train()
    inputs = make_inputs(processor, n_images=2)
    model(**inputs, labels=inputs["input_ids"], use_cache=False).loss.backward()
    grads = {name: p.grad for name, p in graft.compressor.named_parameters()}
    assert all(grad is not None for grad in grads.values())
    # The score MLP's last bias shifts every score of a window alike, which the softmax
    # cancels: its gradient is exactly zero. Every other weight learns.
    assert all(grad.abs().sum() > 0 for name, grad in grads.items() if name != "score.3.bias")


def test_compressor_follows_the_model_dtype() -> None:
    model, processor = build_tiny_llava("qwen2", "clip")
    model.to(torch.bfloat16)
    graft = graft_compressor(model, SAP(VISION_DIM), processor=processor)
    assert all(p.dtype == torch.bfloat16 for p in graft.compressor.parameters())
    inputs = make_inputs(processor)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    assert _logits(model, inputs).dtype == torch.bfloat16


def test_features_with_several_vision_layers() -> None:
    # vision_feature_layer=[-2, -1] concatenates two layers: the projector takes 2 * 32.
    model, processor = build_tiny_llava("llama", "siglip", vision_feature_layer=[-2, -1])
    graft = graft_compressor(model, SAP(2 * VISION_DIM, window=4), processor=processor)
    inputs = make_inputs(processor)
    assert _image_token_counts(inputs, model) == [4]
    assert _logits(model, inputs).shape[1] == inputs["input_ids"].shape[1]
    graft.remove()


# -- docs/adapters.md ---------------------------------------------------------------------
def _doc_example(heading: str) -> str:
    doc = (Path(__file__).parents[2] / "docs" / "adapters.md").read_text(encoding="utf-8")
    section = doc.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, f"no python example under '## {heading}'"
    return "\n".join(blocks)


def test_docs_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the example saves to a relative folder
    namespace: dict[str, Any] = {}
    exec(compile(_doc_example("Compressor graft"), "docs/adapters.md", "exec"), namespace)
    assert namespace["graft"].active is False  # the example ends by removing the graft
