"""FlashSloth builders: paper sizes on meta, tiny models that train, generate, save and load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    PhiConfig,
    PhiForCausalLM,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from recipes.flashsloth.checkpoint import load_checkpoint, save_checkpoint
from recipes.flashsloth.config import COMPONENTS
from recipes.flashsloth.data import DataCollator
from recipes.flashsloth.model import (
    WEIGHTS_NAME,
    FlashSloth,
    FlashSlothConfig,
    build_flashsloth,
    component_of,
)
from recipes.flashsloth.tokenizer import build_tiny_tokenizer
from tokencompress.adapters._embq_layers import EmbQDecoderLayer, QueryEmbedding

CORPUS = ["What colour is the square in the centre?", "red green blue yellow", "A circle and a square."]

# Paper sizes (spec: SigLIP so400m without its last layer, post-layernorm and head; phi-2).
SIGLIP_LAYER = 4 * (1152 * 1152 + 1152) + 2 * 2 * 1152 + (1152 * 4304 + 4304) + (4304 * 1152 + 1152)
PAPER_COUNTS = {
    "vision_encoder": (3 * 14 * 14 * 1152 + 1152) + 729 * 1152 + 26 * SIGLIP_LAYER,  # 397,745,440
    "compressor": 1_329_409,
    "projector": (1152 * 2560 + 2560) + (2560 * 2560 + 2560),  # 9,507,840
    "embq_module": 8_084_416,
    "query_vectors": 9 * 2560,
    "llm": 2_779_683_840,  # phi-2, LM head bias included
}


# -- helpers (also used by test_convert and test_chat) --------------------------------------
def tiny_tokenizer() -> Any:
    return build_tiny_tokenizer(CORPUS, vocab_size=300)


def tiny_model(seed: int = 0, tokenizer: Any = None, **overrides: Any) -> FlashSloth:
    """A tiny FlashSloth whose query vectors and EmbQ update are large enough to matter."""
    torch.manual_seed(seed)
    model = build_flashsloth(FlashSlothConfig.tiny(**overrides), tokenizer or tiny_tokenizer())
    if model.embq_graft is not None:
        with torch.no_grad():
            model.embq_graft.query_vectors.normal_(std=0.5)
            model.embq_graft.embq.up.weight.mul_(4.0)
    return model


def make_image(seed: int = 0, size: tuple[int, int] = (60, 44)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


def qa_batch(model: FlashSloth, conversations: list[list[str]], with_image: list[bool],
             padding_side: str = "right", template: str = "vicuna_v1") -> dict[str, Any]:
    """A collated batch of LLaVA-format conversations (alternating human / gpt values)."""
    encode = model.make_template(template).encode
    samples = []
    for index, (values, has_image) in enumerate(zip(conversations, with_image)):
        turns = [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]
        if has_image:
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
        prompt = encode(turns, num_images=int(has_image), add_generation_prompt=len(values) % 2 == 1)
        pixels = model.image_processor(make_image(index)).unsqueeze(0) if has_image else None
        samples.append({"id": str(index), "prompt": prompt, "pixel_values": pixels})
    return DataCollator(model.pad_token_id, padding_side=padding_side)(samples)


def model_inputs(batch: dict[str, Any], labels: bool = False) -> dict[str, Any]:
    keys = ["input_ids", "attention_mask", "pixel_values", "embq_instruction_map"] + (["labels"] if labels else [])
    return {key: batch[key] for key in keys}


TRAIN = [["What colour is the square?", "red"], ["Is there a circle?", "yes", "Where?", "top left"]]


# -- paper sizes ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["paper", "paper_hd"])
def paper(request) -> FlashSloth:
    config = getattr(FlashSlothConfig, request.param)()
    return build_flashsloth(config, tiny_tokenizer(), device="meta", dtype=torch.bfloat16)


def test_paper_parameter_counts_per_part(paper: FlashSloth) -> None:
    counts = paper.parameter_counts()
    assert counts["vision_encoder"] == PAPER_COUNTS["vision_encoder"] == 397_745_440
    assert counts["compressor"] == PAPER_COUNTS["compressor"]
    assert counts["projector"] == PAPER_COUNTS["projector"]
    assert sum(p.numel() for p in paper.embq_graft.embq.parameters()) == PAPER_COUNTS["embq_module"]
    assert counts["query_vectors"] == PAPER_COUNTS["query_vectors"]
    assert counts["embq"] == PAPER_COUNTS["embq_module"] + PAPER_COUNTS["query_vectors"]
    assert counts["llm"] == PAPER_COUNTS["llm"]
    assert counts["total"] == sum(counts[c] for c in COMPONENTS) == 3_196_373_985  # "about 3.2B"
    assert all(p.device.type == "meta" for p in paper.parameters())


def test_paper_token_budget(paper: FlashSloth) -> None:
    hd = paper.config.hd
    assert paper.config.grid == (27, 27)
    assert paper.compressor_graft.num_image_tokens == 81  # per view
    assert paper.num_image_tokens == (405 if hd else 81)
    assert paper.config.token_budget == (414 if hd else 90)
    # What a prompt actually holds for one picture and one question.
    prompt = paper.make_template().encode(
        [{"from": "human", "value": "<image>\nWhat is it?"}], num_images=1, add_generation_prompt=True
    )
    ids = torch.tensor(prompt.input_ids)
    assert int((ids == paper.image_token_id).sum()) == paper.num_image_tokens
    assert int(torch.isin(ids, torch.tensor(paper.query_token_ids)).sum()) == 9
    assert paper.image_processor.num_views == (5 if hd else 1)


def test_paper_architecture_builds_nothing_unused(paper: FlashSloth) -> None:
    llava = paper.llava
    tower = llava.model.vision_tower
    assert len(tower.encoder.layers) == 26  # SigLIP's 27th layer is not built
    assert isinstance(tower.post_layernorm, nn.Identity) and not hasattr(tower, "head")
    assert llava.config.vision_feature_layer == -1 and llava.config.vision_feature_select_strategy == "full"
    projector = paper.compressor_graft.module.base_layer
    assert (projector.linear_1.in_features, projector.linear_1.out_features) == (1152, 2560)
    assert projector.linear_1.bias is not None and projector.linear_2.bias is not None
    assert llava.config.projector_hidden_act == "gelu"
    assert llava.lm_head.bias is not None and llava.lm_head.weight.shape == (51200, 2560)
    layers = llava.model.language_model.layers
    assert isinstance(layers[7], EmbQDecoderLayer) and not any(isinstance(l, EmbQDecoderLayer) for l in layers[:7])
    assert isinstance(llava.model.language_model.embed_tokens, QueryEmbedding)
    assert paper.embq_graft.layer == 8 and len(paper.query_token_ids) == 9
    assert (paper.embq_graft.embq.inner_dim, paper.embq_graft.embq.num_heads) == (576, 32)


def test_every_tensor_belongs_to_one_component(paper: FlashSloth) -> None:
    names = list(paper.canonical_state_dict())
    assert len(names) == len(set(names)) == len(paper.state_dict())
    owners = {name: component_of(name) for name in names}
    assert set(owners.values()) == set(COMPONENTS)
    assert all(not name.startswith("llava.") and ".base_layer." not in name for name in names)


def test_config_round_trip_and_checks() -> None:
    for config in (FlashSlothConfig.paper(), FlashSlothConfig.paper_hd(), FlashSlothConfig.tiny(image_size=72)):
        assert FlashSlothConfig.from_dict(config.to_dict()) == config
    assert FlashSlothConfig.tiny(image_size=72).tokens_per_view == 9  # the tiny recipe's 3x3 cells
    with pytest.raises(ValueError, match="1-based"):
        FlashSlothConfig.paper(embq_layer=0)
    with pytest.raises(ValueError, match="unknown FlashSloth config keys"):
        FlashSlothConfig.from_dict({**FlashSlothConfig.paper().to_dict(), "window": 3})
    small_vocab = FlashSlothConfig.tiny(text={**FlashSlothConfig.tiny().text, "vocab_size": 256})
    with pytest.raises(ValueError, match="embedding rows"):
        build_flashsloth(small_vocab, tiny_tokenizer(), device="meta")


# -- tiny models -----------------------------------------------------------------------------------
def test_tiny_forward_with_labels_trains_every_component() -> None:
    model = tiny_model().train()
    model.set_trainable(COMPONENTS)
    batch = qa_batch(model, TRAIN, [True, True])
    output = model(**model_inputs(batch, labels=True))
    assert torch.isfinite(output.loss)
    output.loss.backward()
    for component in COMPONENTS:
        grads = [p.grad for p in model.component_parameters(component)]
        assert grads and all(g is not None for g in grads), component
        assert sum(float(g.abs().sum()) for g in grads) > 0, component
    assert float(model.embq_graft.query_vectors.grad.abs().sum()) > 0


def test_set_trainable_selects_components() -> None:
    model = tiny_model()
    model.set_trainable(["compressor", "projector"])
    trainable = {n for n, t in model.canonical_state_dict(keep_vars=True).items() if t.requires_grad}
    assert trainable and {component_of(n) for n in trainable} == {"compressor", "projector"}
    with pytest.raises(ValueError, match="unknown components"):
        model.set_trainable(["sap"])


def test_tiny_generate_uses_the_cache_and_matches_recompute() -> None:
    model = tiny_model()
    with torch.no_grad():
        model.llava.lm_head.bias[model.tokenizer.eos_token_id] = -1e4  # keep decoding
    batch = qa_batch(model, [["What colour is the square?"]], [True], padding_side="left")
    steps = 4
    calls = []
    forward_packed = model.embq_graft.embq.forward_packed
    model.embq_graft.embq.forward_packed = lambda *a, **k: calls.append(1) or forward_packed(*a, **k)
    try:
        cached = model.generate(**model_inputs(batch), max_new_tokens=steps, do_sample=False)
    finally:
        del model.embq_graft.embq.forward_packed
    assert calls == [1]  # EmbQ ran on the prefill only: the decoding steps read the KV cache
    new = cached[:, batch["input_ids"].shape[1]:]
    assert new.shape == (1, steps)
    # Greedy decoding that recomputes the whole prefix (EmbQ included) at every step.
    ids, mask, imap = batch["input_ids"], batch["attention_mask"], batch["embq_instruction_map"]
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, mask, batch["pixel_values"], embq_instruction_map=imap, use_cache=False).logits[:, -1]
            logits[:, list(model.query_token_ids)] = float("-inf")
            token = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
            imap = torch.cat([imap, torch.zeros_like(token)], 1)
    assert torch.equal(new, ids[:, batch["input_ids"].shape[1]:])


def _logits(model: FlashSloth, batch: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(batch)).logits


@pytest.mark.parametrize("hd", [False, True])
def test_save_and_load_give_identical_logits(tmp_path: Path, hd: bool) -> None:
    model = tiny_model(hd=hd)
    batch = qa_batch(model, [*TRAIN, ["Describe it."]], [True, True, False])
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"flashsloth_config.json", WEIGHTS_NAME, "compressor_graft.safetensors", "embq_graft.safetensors"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    loaded = FlashSloth.from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.query_token_ids == model.query_token_ids
    assert torch.equal(_logits(loaded, batch), expected)
    state = model.canonical_state_dict()
    assert all(torch.equal(value, state[name]) for name, value in loaded.canonical_state_dict().items())


def test_loading_refuses_extra_or_missing_tensors(tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    tensors = load_file(str(path))
    save_file({**tensors, "model.vision_tower.post_layernorm.weight": torch.ones(32)}, str(path))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        FlashSloth.from_pretrained(tmp_path)
    tensors.pop("lm_head.bias")
    save_file(tensors, str(path))
    with pytest.raises(RuntimeError, match="Missing key"):
        FlashSloth.from_pretrained(tmp_path)


def test_canonical_names_are_the_plain_llava_names() -> None:
    model = tiny_model()
    base = {n for n in model.canonical_state_dict() if component_of(n) in ("vision_encoder", "projector", "llm")}
    model.embq_graft.remove()
    model.compressor_graft.remove()
    assert set(model.llava.state_dict()) == base


def test_hd_views_are_images_and_embq_reads_all_raw_tokens() -> None:
    model = tiny_model(hd=True)
    batch = qa_batch(model, [["What colour?"], ["Where?"]], [True, True], padding_side="left")
    assert batch["pixel_values"].shape == (2, 5, 3, 48, 48)
    per_view = model.config.tokens_per_view
    assert (batch["input_ids"] == model.image_token_id).sum(1).tolist() == [5 * per_view] * 2
    seen = {}
    forward_packed = model.embq_graft.embq.forward_packed

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen["vision"], seen["cu_vision"] = args[2], args[5]
        return forward_packed(*args, **kwargs)

    model.embq_graft.embq.forward_packed = spy
    try:
        _logits(model, batch)
    finally:
        del model.embq_graft.embq.forward_packed
    grid = model.config.grid[0] * model.config.grid[1]
    assert seen["vision"].shape == (2 * 5 * grid, 32)  # every view, uncompressed
    assert seen["cu_vision"].tolist() == [0, 5 * grid, 10 * grid]
    with pytest.raises(ValueError, match="views per picture"):
        model(batch["input_ids"], pixel_values=batch["pixel_values"][:, :1])


def test_stage1_model_has_no_embq_and_takes_plain_batches() -> None:
    model = tiny_model(num_queries=0)
    assert model.embq_graft is None and model.query_token_ids == ()
    assert model.parameter_counts()["embq"] == 0
    batch = qa_batch(model, [["", "a red square"]], [True], template="plain")
    assert torch.isfinite(model(**model_inputs(batch, labels=True)).loss)
    with pytest.raises(ValueError, match="no EmbQ"):
        model(**{**model_inputs(batch), "embq_instruction_map": torch.ones_like(batch["input_ids"])})


def test_stage2_starts_from_stage1_sap_and_projector(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    stage1 = tiny_model(seed=1, tokenizer=tokenizer, num_queries=0)
    with torch.no_grad():
        for p in [*stage1.component_parameters("compressor"), *stage1.component_parameters("projector")]:
            p.add_(torch.randn_like(p))
    save_checkpoint(tmp_path, 10, model_state=stage1.state_dict())
    stage2 = tiny_model(seed=2, tokenizer=tokenizer)
    before = stage2.canonical_state_dict()
    stage2.load_components(load_checkpoint(tmp_path).model_state, ["compressor", "projector"])
    after, source = stage2.canonical_state_dict(), stage1.canonical_state_dict()
    for name, value in after.items():
        if component_of(name) in ("compressor", "projector"):
            assert torch.equal(value, source[name]), name
        else:
            assert torch.equal(value, before[name]), name
    # Canonical names work as well; a checkpoint without a component's tensors is refused.
    stage2.load_components(stage1.component_state_dict(["compressor"]), ["compressor"])
    with pytest.raises(ValueError, match="missing"):
        stage2.load_components(stage1.component_state_dict(["compressor"]), ["embq"])


@pytest.mark.parametrize("layout", ["vision_model", "siglip_model"])
def test_pretrained_parts_load_and_the_penultimate_layer_is_used(tmp_path: Path, layout: str) -> None:
    config = FlashSlothConfig.tiny()
    config = FlashSlothConfig.tiny(text={**config.text, "vocab_size": 384})
    # A SigLIP checkpoint with one more layer than FlashSloth builds, and its head; either
    # vision-only or a full SiglipModel (text + vision), as google/siglip-so400m-patch14-384.
    vision_config = SiglipVisionConfig(**{**config.vision, "num_hidden_layers": 3})
    if layout == "vision_model":
        siglip = SiglipVisionModel(vision_config).eval()
        siglip.save_pretrained(tmp_path / "siglip")
    else:
        text_config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "vocab_size": 50}
        full = SiglipModel(SiglipConfig(vision_config=vision_config.to_dict(), text_config=text_config)).eval()
        full.save_pretrained(tmp_path / "siglip")
        siglip = full.vision_model
    tokenizer = tiny_tokenizer()
    phi = PhiForCausalLM(PhiConfig(**{**config.text, "vocab_size": 384})).eval()
    with torch.no_grad():
        phi.lm_head.bias.normal_()
    phi.save_pretrained(tmp_path / "phi")
    model = build_flashsloth(config, tokenizer, vision_weights=tmp_path / "siglip", llm_weights=tmp_path / "phi")
    state = model.canonical_state_dict()
    for name, value in phi.state_dict().items():
        ours = name if name.startswith("lm_head.") else "model.language_model." + name.removeprefix("model.")
        assert torch.equal(state[ours], value), name
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        reference = siglip(pixels, output_hidden_states=True).hidden_states[-2]  # SigLIP's penultimate layer
        features = model.llava.model.get_image_features(pixels, vision_feature_layer=-1,
                                                        vision_feature_select_strategy="full")
    torch.testing.assert_close(features.hidden_states[-1], reference, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        build_flashsloth(FlashSlothConfig.tiny(text={**config.text, "hidden_size": 32}), tiny_tokenizer(),
                         llm_weights=tmp_path / "phi")
    deeper = FlashSlothConfig.tiny(vision={**config.vision, "num_hidden_layers": 4})  # more than stored
    with pytest.raises(ValueError, match="lacks tensors"):
        build_flashsloth(deeper, tiny_tokenizer(), vision_weights=tmp_path / "siglip")
