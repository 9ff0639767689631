"""Configs: the paper's hyperparameters, overrides, and clear errors."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from recipes.flashsloth.config import (
    BUNDLED_CONFIG_DIR,
    COMPONENTS,
    ConfigError,
    RecipeConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_cli,
    parse_override,
)

ALL = ["stage1", "stage2", "hd_stage2", "tiny_stage1", "tiny_stage2"]


def raw(name: str) -> dict:
    return yaml.safe_load((BUNDLED_CONFIG_DIR / f"{name}.yaml").read_text())


def keys_of(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= keys_of(value, f"{prefix}{key}.")
    return out


@pytest.mark.parametrize("name", ALL)
def test_bundled_configs_load_and_share_the_paper_recipe(name):
    config = load_config(name)
    assert isinstance(config, RecipeConfig)
    assert config.schedule.warmup_ratio == 0.03
    assert config.training.epochs == (12 if name == "tiny_stage2" else 1)
    assert config.optimizer.betas == (0.9, 0.999)
    assert config.checkpoint.save_every_n_steps >= 1
    # Every file spells out every key: the YAML is the documentation of a run.
    assert keys_of(raw(name)) == keys_of(config_to_dict(config))


def test_stage1_is_alignment_pretraining():
    config = load_config("stage1")
    assert config.stage == 1
    assert config.optimizer.lr == 1e-3
    assert config.optimizer.weight_decay == 0.0
    assert config.training.global_batch_size == 256
    assert set(config.model.trainable) == {"projector", "compressor"}
    assert config.data.template == "plain"
    assert (config.training.dtype, config.training.gradient_checkpointing) == ("bf16", True)
    assert (config.model.image_size, config.model.sap_window, config.model.hd) == (384, 3, False)


@pytest.mark.parametrize("name", ["stage2", "hd_stage2"])
def test_stage2_is_instruction_tuning_from_stage1_projector_and_sap(name):
    config = load_config(name)
    assert config.stage == 2
    assert config.optimizer.lr == 2e-5
    assert config.training.global_batch_size == 128
    assert config.data.max_length == 3072
    assert config.data.template == "vicuna_v1"
    assert config.model.num_queries == 9 and config.model.embq_layer == 8  # 1-based, as graft_embq
    assert config.model.init_from == "outputs/flashsloth-stage1"
    assert {"projector", "compressor"} <= set(config.model.init_components)
    assert (config.training.dtype, config.training.gradient_checkpointing) == ("bf16", True)
    trainable = set(config.model.trainable)
    if name == "stage2":
        assert trainable == set(COMPONENTS) - {"vision_encoder"}
        assert not config.model.hd
    else:
        assert trainable == set(COMPONENTS)  # HD unfreezes the vision encoder
        assert config.model.hd


@pytest.mark.parametrize("paper, tiny", [("stage1", "tiny_stage1"), ("stage2", "tiny_stage2")])
def test_tiny_configs_have_the_same_structure(paper, tiny):
    big, small = load_config(paper), load_config(tiny)
    assert keys_of(config_to_dict(big)) == keys_of(config_to_dict(small))
    assert small.model.preset == "tiny" and small.training.device == "cpu"
    assert (small.stage, small.data.template) == (big.stage, big.data.template)
    assert small.model.trainable == big.model.trainable
    # Tiny stage 2 also takes the random LLM and vision encoder from stage 1 (the paper
    # loads the same pretrained ones in both stages).
    extra = set(small.model.init_components) - set(big.model.init_components)
    assert set(big.model.init_components) <= set(small.model.init_components)
    assert extra == ({"vision_encoder", "llm"} if tiny == "tiny_stage2" else set())


def test_gradient_accumulation_from_world_size():
    training = load_config("stage2").training  # 128 global, 8 per GPU
    assert training.gradient_accumulation_steps(8) == 2
    assert training.gradient_accumulation_steps(1) == 16
    with pytest.raises(ConfigError, match="micro_batch_size \\* world_size = 8 \\* 3"):
        training.gradient_accumulation_steps(3)


@pytest.mark.parametrize(
    "text, keys, value",
    [
        ("optimizer.lr=2e-5", ["optimizer", "lr"], "2e-5"),  # YAML 1.1: a string; the float field parses it
        ("training.seed=7", ["training", "seed"], 7),
        ("checkpoint.keep_last=null", ["checkpoint", "keep_last"], None),
        ("checkpoint.keep_last=", ["checkpoint", "keep_last"], None),
        ("model.trainable=[llm, embq]", ["model", "trainable"], ["llm", "embq"]),
        ("model.hd=true", ["model", "hd"], True),
        ("name=a=b", ["name"], "a=b"),
    ],
)
def test_parse_override_reads_yaml_values(text, keys, value):
    assert parse_override(text) == (keys, value)


def test_overrides_are_applied_and_typed():
    config = load_config(
        "stage1",
        ["optimizer.lr=2e-4", "training.seed=3", "checkpoint.keep_last=null", "model.trainable=[projector]",
         "optimizer.betas=[0.9, 0.95]", "data.eval_json=x.json"],
    )
    assert config.optimizer.lr == 2e-4 and isinstance(config.optimizer.lr, float)
    assert config.training.seed == 3
    assert config.checkpoint.keep_last is None
    assert config.model.trainable == ["projector"]
    assert config.optimizer.betas == (0.9, 0.95)
    assert config.data.eval_json == "x.json"
    # The file on disk is untouched; the raw dict passed in is not mutated either.
    original = raw("stage1")
    apply_overrides(original, ["training.seed=3"])
    assert original["training"]["seed"] == 42


def test_unknown_override_key_names_the_key_and_the_known_ones():
    with pytest.raises(ConfigError) as info:
        load_config("stage1", ["optimizer.lrr=3"])
    message = str(info.value)
    assert "'optimizer.lrr'" in message and "lr, weight_decay, betas, eps" in message
    with pytest.raises(ConfigError, match="unknown key 'trainer'.*known keys under top level: name, stage"):
        load_config("stage1", ["trainer.lr=3"])


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="'optimizer.lr' is a value, not a section"):
        load_config("stage1", ["optimizer.lr.x=3"])


@pytest.mark.parametrize("text", ["optimizer.lr", "=3", "optimizer..lr=3", "a.b=[unclosed"])
def test_malformed_override_is_an_error(text):
    with pytest.raises(ConfigError, match="override"):
        parse_override(text)


@pytest.mark.parametrize(
    "override, match",
    [
        ("training.seed=abc", "'training.seed': expected an integer, got 'abc'"),
        ("training.seed=1.5", "'training.seed': expected an integer, got 1.5"),
        ("optimizer.lr=fast", "'optimizer.lr': expected a number, got 'fast'"),
        ("model.hd=yes please", "'model.hd': expected true or false"),
        ("training.dtype=fp8", "'training.dtype': expected one of \\['bf16', 'fp16', 'fp32'\\], got 'fp8'"),
        ("optimizer.betas=[0.9]", "'optimizer.betas': expected a list of 2 items"),
        ("model.trainable=[llm, decoder]", "unknown component\\(s\\) \\['decoder'\\]"),
        ("optimizer.lr=-1", "optimizer.lr must be > 0"),
        ("training.micro_batch_size=48", "not a multiple of training.micro_batch_size=48"),
        ("model=3", "'model': expected a mapping"),
    ],
)
def test_bad_values_name_the_key_and_value(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("stage1", [override])


def test_unknown_key_in_a_file_names_the_file_and_key(tmp_path):
    data = raw("stage2")
    data["optimizer"]["momentum"] = 0.9
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "'optimizer.momentum'" in str(info.value)


def test_missing_required_key_is_named(tmp_path):
    data = raw("stage1")
    del data["data"]["train_json"]
    with pytest.raises(ConfigError, match="missing required config key 'data.train_json'"):
        config_from_dict(data)


def test_stage2_must_load_sap_as_well_as_the_projector():
    # The release re-created SAP at stage 2; a config that would repeat that is refused.
    with pytest.raises(ConfigError, match="lacks \\['compressor'\\]"):
        load_config("stage2", ["model.init_components=[projector]"])
    # Without init_from (an ablation from scratch) there is nothing to load.
    config = load_config("stage2", ["model.init_from=null", "model.init_components=[]"])
    assert config.model.init_from is None


def test_init_components_need_init_from():
    with pytest.raises(ConfigError, match="needs model.init_from"):
        load_config("stage1", ["model.init_components=[projector]"])


def test_unknown_config_name_lists_the_bundled_ones():
    with pytest.raises(ConfigError, match="stage3.*'hd_stage2', 'stage1'"):
        load_config("stage3")


@pytest.mark.parametrize("name", ALL)
def test_dump_and_reload_gives_an_equal_config(name):
    config = load_config(name)
    assert config_from_dict(yaml.safe_load(dump_config(config))) == config


def test_parse_cli():
    config = parse_cli(["--config", "tiny_stage2", "optimizer.lr=5e-4", "training.epochs=1"])
    assert (config.name, config.optimizer.lr, config.training.epochs) == ("tiny-stage2", 5e-4, 1)


def test_configs_are_plain_dataclasses():
    config = load_config("stage1")
    assert dataclasses.is_dataclass(config.model) and dataclasses.is_dataclass(config.training)
