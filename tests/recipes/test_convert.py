"""Converting the release's checkpoints: every tensor mapped, nothing lost, errors that list names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from recipes.flashsloth.convert import (
    RELEASE_DOT_TOKEN_ID,
    ConversionError,
    canonical_name,
    convert_release_checkpoint,
    map_release_state_dict,
)
from recipes.flashsloth.model import FlashSloth, FlashSlothConfig, build_flashsloth

from .test_model import make_image, qa_batch, tiny_tokenizer

# The release's vocabulary must hold its hard-coded "dot" token id (764).
TINY = FlashSlothConfig.tiny(text={**FlashSlothConfig.tiny().text, "vocab_size": 1024})


def release_tensors(config: FlashSlothConfig, device: str = "cpu") -> dict[str, tuple[str, torch.Tensor]]:
    """Random tensors under the release's names, each with the canonical name it must get.

    Written from the release's module tree (FlashSlothForCausalLM, LLaVA's mlp2x_gelu,
    AttentionPooling, LQFormer, LearnableToken), independently of `convert.py`.
    """
    v, t = config.vision, config.text
    dv, dt, di = v["hidden_size"], t["hidden_size"], config.embq_inner_dim
    side = config.image_size // config.patch_size
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}

    def add(release: str, ours: str, *shape: int) -> None:
        shapes[release] = (ours, shape)

    def linear(release: str, ours: str, fan_in: int, fan_out: int) -> None:
        add(f"{release}.weight", f"{ours}.weight", fan_out, fan_in)
        add(f"{release}.bias", f"{ours}.bias", fan_out)

    def norm(release: str, ours: str, width: int) -> None:
        add(f"{release}.weight", f"{ours}.weight", width)
        add(f"{release}.bias", f"{ours}.bias", width)

    sv = "model.vision_tower.vision_tower.vision_model"
    add(f"{sv}.embeddings.patch_embedding.weight", "model.vision_tower.embeddings.patch_embedding.weight",
        dv, 3, config.patch_size, config.patch_size)
    add(f"{sv}.embeddings.patch_embedding.bias", "model.vision_tower.embeddings.patch_embedding.bias", dv)
    add(f"{sv}.embeddings.position_embedding.weight", "model.vision_tower.embeddings.position_embedding.weight",
        side * side, dv)
    for i in range(v["num_hidden_layers"]):
        release, ours = f"{sv}.encoder.layers.{i}", f"model.vision_tower.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(f"{release}.self_attn.{proj}", f"{ours}.self_attn.{proj}", dv, dv)
        norm(f"{release}.layer_norm1", f"{ours}.layer_norm1", dv)
        norm(f"{release}.layer_norm2", f"{ours}.layer_norm2", dv)
        linear(f"{release}.mlp.fc1", f"{ours}.mlp.fc1", dv, v["intermediate_size"])
        linear(f"{release}.mlp.fc2", f"{ours}.mlp.fc2", v["intermediate_size"], dv)
    linear("model.pooling.mlp.0", "compressor.score.0", dv, dv)
    linear("model.pooling.mlp.3", "compressor.score.3", dv, 1)
    linear("model.mm_projector.0", "model.multi_modal_projector.linear_1", dv, dt)
    linear("model.mm_projector.2", "model.multi_modal_projector.linear_2", dt, dt)
    add("model.embed_tokens.weight", "model.language_model.embed_tokens.weight", t["vocab_size"], dt)
    for i in range(t["num_hidden_layers"]):
        release, ours = f"model.layers.{i}", f"model.language_model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "dense"):
            linear(f"{release}.self_attn.{proj}", f"{ours}.self_attn.{proj}", dt, dt)
        linear(f"{release}.mlp.fc1", f"{ours}.mlp.fc1", dt, t["intermediate_size"])
        linear(f"{release}.mlp.fc2", f"{ours}.mlp.fc2", t["intermediate_size"], dt)
        norm(f"{release}.input_layernorm", f"{ours}.input_layernorm", dt)
    norm("model.final_layernorm", "model.language_model.final_layernorm", dt)
    linear("lm_head", "lm_head", dt, t["vocab_size"])
    add("model.learnable_tokens.token", "query_vectors", config.num_queries, dt)
    lq = "model.lqformer"
    linear(f"{lq}.down_projector_learnable_text", "embq.down_text", dt, di)
    linear(f"{lq}.down_projector_image", "embq.down_vision", dv, di)
    norm(f"{lq}.layers.0.ln_q", "embq.norm_query", di)
    norm(f"{lq}.layers.0.ln_text", "embq.norm_text", di)
    norm(f"{lq}.layers.0.ln_kv", "embq.norm_vision", di)
    for proj in ("q_proj", "k_proj"):
        linear(f"{lq}.layers.0.t2q_attn.{proj}", f"embq.text_attn.{proj}", di, di)
        linear(f"{lq}.layers.0.i2q_attn.{proj}", f"embq.vision_attn.{proj}", di, di)
    linear(f"{lq}.layers.0.t2q_attn.v_proj", "embq.text_attn.v_proj", di, di)
    linear(f"{lq}.layers.0.i2q_attn.v_proj", "embq.vision_attn.v_proj", dv, dv)
    linear(f"{lq}.up_projector", "embq.up", dv, dt)
    generator = torch.Generator().manual_seed(0)

    def tensor(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, device="meta") if device == "meta" else torch.randn(shape, generator=generator)

    return {release: (ours, tensor(shape)) for release, (ours, shape) in shapes.items()}


def write_release(folder: Path, tensors: dict[str, torch.Tensor], config: FlashSlothConfig = TINY) -> Path:
    """Two shards and their index, as the release publishes them, plus its config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(folder / shard), metadata={"format": "pt"})
    weight_map = {key: shard for shard, keys in shards.items() for key in keys}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    release_config = {
        "model_type": "flashsloth", "hidden_size": config.text["hidden_size"],
        "num_hidden_layers": config.text["num_hidden_layers"], "vocab_size": config.text["vocab_size"],
        "mm_hidden_size": config.vision["hidden_size"], "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(release_config))
    return folder


@pytest.fixture
def release() -> dict[str, tuple[str, torch.Tensor]]:
    return release_tensors(TINY)


def plain(release: dict[str, tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: tensor for name, (_, tensor) in release.items()}


def convert(folder: Path, **kwargs) -> FlashSloth:
    return convert_release_checkpoint(folder, config=TINY, tokenizer=tiny_tokenizer(), **kwargs)


def test_converted_weights_are_the_written_ones(tmp_path: Path, release) -> None:
    model = convert(write_release(tmp_path / "release", plain(release)))
    state = model.canonical_state_dict()
    assert set(state) == {ours for ours, _ in release.values()}
    for name, (ours, tensor) in release.items():
        assert torch.equal(state[ours], tensor), name
    assert model.embq_graft.dot_token_id == RELEASE_DOT_TOKEN_ID
    # The converted model runs, and survives its own save/load unchanged.
    batch = qa_batch(model, [["What colour is it?", "red"]], [True])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "embq_instruction_map")}
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path / "converted")
    with torch.no_grad():
        assert torch.equal(FlashSloth.from_pretrained(tmp_path / "converted")(**inputs).logits, logits)


def test_hd_flag_and_single_file_checkpoints(tmp_path: Path, release) -> None:
    folder = tmp_path / "release"
    folder.mkdir()
    save_file(plain(release), str(folder / "model.safetensors"))
    hd = FlashSlothConfig.tiny(text=TINY.text, hd=True)
    model = convert_release_checkpoint(folder, config=hd, tokenizer=tiny_tokenizer())
    assert model.config.hd and model.num_image_tokens == 5 * model.config.tokens_per_view
    assert model.image_processor(make_image()).shape[0] == 5


def test_a_missing_tensor_is_named(tmp_path: Path, release) -> None:
    tensors = plain(release)
    del tensors["model.lqformer.layers.0.ln_kv.bias"]
    with pytest.raises(ConversionError, match=r"does not provide \(1\):\n  embq\.norm_vision\.bias"):
        convert(write_release(tmp_path, tensors))


def test_extra_tensors_are_named(tmp_path: Path, release) -> None:
    tensors = plain(release)
    sv = "model.vision_tower.vision_tower.vision_model"
    tensors[f"{sv}.post_layernorm.weight"] = torch.ones(32)  # the release replaced it by an identity
    tensors[f"{sv}.encoder.layers.2.layer_norm1.weight"] = torch.ones(32)  # a layer the model does not build
    with pytest.raises(ConversionError) as error:
        convert(write_release(tmp_path, tensors))
    message = str(error.value)
    assert "no place in the model (2)" in message
    assert f"{sv}.post_layernorm.weight" in message
    assert "encoder.layers.2.layer_norm1.weight -> model.vision_tower.encoder.layers.2.layer_norm1.weight" in message


def test_a_misshapen_tensor_is_named(tmp_path: Path, release) -> None:
    tensors = plain(release)
    tensors["model.learnable_tokens.token"] = torch.zeros(6, 64)  # 6 queries, the model has 9
    with pytest.raises(ConversionError, match=r"model\.learnable_tokens\.token: \(6, 64\), the model's query_vectors"):
        convert(write_release(tmp_path, tensors))


def test_position_ids_buffer_is_checked_then_dropped(tmp_path: Path, release) -> None:
    tensors = plain(release)
    key = "model.vision_tower.vision_tower.vision_model.embeddings.position_ids"
    tensors[key] = torch.arange(36).unsqueeze(0)
    convert(write_release(tmp_path / "good", tensors))
    tensors[key] = torch.arange(36).flip(0).unsqueeze(0)
    with pytest.raises(ConversionError, match="position_ids is not the positions"):
        convert(write_release(tmp_path / "bad", tensors))


def test_pickle_checkpoints_and_wrong_configs_are_refused(tmp_path: Path, release) -> None:
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickle files"):
        convert(tmp_path / "pickled")
    folder = write_release(tmp_path / "release", plain(release))
    (folder / "config.json").write_text(json.dumps({"hidden_size": 2560, "mm_vision_select_layer": -1}))
    with pytest.raises(ConversionError, match="hidden_size: release 2560, model 64"):
        convert(folder)


def test_index_must_match_its_shards(tmp_path: Path, release) -> None:
    folder = write_release(tmp_path, plain(release))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="does not match its shards"):
        convert(folder)


@pytest.mark.parametrize("hd", [False, True])
def test_every_paper_tensor_is_accounted_for(hd: bool) -> None:
    """At paper size (meta tensors): the release's names map one-to-one onto the model's."""
    config = FlashSlothConfig.paper_hd() if hd else FlashSlothConfig.paper()
    model = build_flashsloth(config, tiny_tokenizer(), device="meta", dot_token_id=RELEASE_DOT_TOKEN_ID)
    expected = {name: tensor.shape for name, tensor in model.canonical_state_dict().items()}
    release = release_tensors(config, device="meta")
    assert len(release) == len(expected) == 905  # 419 vision + 4 SAP + 4 projector + 453 phi-2 + 25 EmbQ
    mapped = map_release_state_dict(plain(release), expected)
    assert {name: ours for name, (ours, _) in release.items()} == {
        name: canonical_name(name) for name in release
    }
    assert set(mapped) == set(expected)


def test_canonical_names_of_some_release_tensors() -> None:
    assert canonical_name("model.layers.31.self_attn.dense.bias") == (
        "model.language_model.layers.31.self_attn.dense.bias"
    )
    assert canonical_name("lm_head.bias") == "lm_head.bias"
    assert canonical_name("model.pooling.mlp.3.weight") == "compressor.score.3.weight"
    assert canonical_name("model.lqformer.layers.0.i2q_attn.v_proj.weight") == "embq.vision_attn.v_proj.weight"
    assert canonical_name("model.vision_tower.vision_tower.vision_model.encoder.layers.25.mlp.fc2.bias") == (
        "model.vision_tower.encoder.layers.25.mlp.fc2.bias"
    )
    assert canonical_name("model.pooling.mlp.1.weight") is None  # ReLU has no weights
    assert canonical_name("model.layers.0.mixer.Wqkv.weight") is None  # not the release's phi-2 layout
