"""The tiny LLaVA builders of conftest.py: all 6 build, run, generate and reload."""

from __future__ import annotations

from pathlib import Path

import torch

from .conftest import TINY, TinyLlava, make_inputs, save_and_reload


def test_tiny_llava_runs_generates_and_reloads(tiny_llava: TinyLlava, tmp_path: Path) -> None:
    model, processor = tiny_llava.model, tiny_llava.processor
    assert not model.training
    assert model.config.text_config.num_hidden_layers >= 4
    inputs = make_inputs(processor, n_images=2)
    grid_tokens = (TINY["image_size"] // TINY["patch_size"]) ** 2
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 2 * grid_tokens
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3

    reloaded, reloaded_processor = save_and_reload(model, processor, tmp_path)
    again = make_inputs(reloaded_processor, n_images=2)
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(reloaded(**again).logits, logits)
