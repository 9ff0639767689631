"""The compressor choice of FlashSloth's Table 3 ("sap", "avgpool", "none") and models without EmbQ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipes.flashsloth.chat import FlashSlothChat
from recipes.flashsloth.config import ConfigError, load_config
from recipes.flashsloth.model import CONFIG_NAME, FlashSloth, FlashSlothConfig
from recipes.flashsloth.model_setup import flashsloth_config
from tests.recipes.test_model import TRAIN, make_image, model_inputs, qa_batch, tiny_model
from tokencompress import SAP, AvgPool


def _logits(model: FlashSloth, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(batch)).logits


@pytest.mark.parametrize(("compressor", "per_view"), [("sap", 9), ("avgpool", 9), ("none", 81)])
def test_token_counts_per_compressor(compressor: str, per_view: int) -> None:
    config = FlashSlothConfig.tiny(image_size=72, compressor=compressor)
    assert config.tokens_per_view == per_view and config.token_budget == per_view + 9
    assert FlashSlothConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="compressor must be one of"):
        FlashSlothConfig.tiny(compressor="ldp")


def test_default_is_sap_and_old_configs_still_load() -> None:
    config = FlashSlothConfig.tiny()
    assert config.compressor == "sap"
    record = config.to_dict()
    del record["compressor"]  # written before the choice existed
    assert FlashSlothConfig.from_dict(record) == config


@pytest.mark.parametrize("compressor", ["avgpool", "none"])
def test_build_train_save_and_load(tmp_path: Path, compressor: str) -> None:
    model = tiny_model(compressor=compressor).train()
    assert model.parameter_counts()["compressor"] == 0
    if compressor == "none":
        assert model.compressor_graft is None
    else:
        assert type(model.compressor_graft.compressor) is AvgPool
    batch = qa_batch(model, TRAIN, [True, True])
    assert (batch["input_ids"] == model.image_token_id).sum(1).tolist() == [model.num_image_tokens] * 2
    output = model(**model_inputs(batch, labels=True))
    output.loss.backward()
    assert all(p.grad is not None for p in model.component_parameters("projector"))

    model.eval().save_pretrained(tmp_path)
    assert (tmp_path / "compressor_graft_config.json").exists() == (compressor != "none")
    loaded = FlashSloth.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))


def test_loading_refuses_a_folder_of_another_compressor(tmp_path: Path) -> None:
    tiny_model(compressor="avgpool").save_pretrained(tmp_path)
    path = tmp_path / CONFIG_NAME
    record = json.loads(path.read_text())
    record["config"]["compressor"] = "sap"
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="the config asks for SAP"):
        FlashSloth.from_pretrained(tmp_path)


def test_avgpool_graft_averages_each_window() -> None:
    model = tiny_model(compressor="avgpool", image_size=48)
    features = torch.randn(1, 36, 32)
    pooled = model.compressor_graft.compressor(features, (6, 6))
    window = features.view(1, 2, 3, 2, 3, 32)[:, 0, :, 0, :, :].reshape(1, 9, 32).mean(1)
    torch.testing.assert_close(pooled[:, 0], window)
    assert not isinstance(model.compressor_graft.compressor, SAP)


def test_a_model_without_embq_answers_when_allowed() -> None:
    model = tiny_model(num_queries=0, compressor="none")
    batch = qa_batch(model, TRAIN, [True, True])  # "vicuna_v1", no query blocks
    assert not bool((batch["embq_instruction_map"] != 0).any())
    assert torch.isfinite(model(**model_inputs(batch, labels=True)).loss)
    with pytest.raises(ValueError, match="stage-1"):
        FlashSlothChat(model)
    answers = FlashSlothChat(model, allow_no_queries=True).answer([make_image(1)], ["What colour?"],
                                                                  max_new_tokens=2)
    assert len(answers) == 1


def test_recipe_config_passes_the_compressor() -> None:
    config = load_config("tiny_stage2", ["model.compressor=avgpool"])
    assert flashsloth_config(config.model).compressor == "avgpool"
    assert load_config("tiny_stage2").model.compressor == "sap"
    with pytest.raises(ConfigError, match="model.compressor"):
        load_config("tiny_stage2", ["model.compressor=ldp"])
