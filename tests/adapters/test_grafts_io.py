"""A compressor graft and an EmbQ graft on one model: lift, save, load, remove in any order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from tokencompress import AvgPool, EmbQ
from tokencompress.adapters import (
    CompressedProjector,
    CompressorGraft,
    EmbQGraft,
    graft_compressor,
    graft_embq,
    load_grafted,
    pad_prompts,
    save_grafted,
)
from tokencompress.adapters._image_tokens import processor_image_token_count
from tokencompress.adapters.compressor_graft_io import CONFIG_NAME
from tokencompress.adapters.embq_io import EMBQ_CONFIG_NAME
from tokencompress.adapters.grafts_io import GRAFTS_NAME

from .conftest import TINY, TinyLlava, build_tiny_llava, make_images, make_inputs

LAYER, NUM_QUERIES = 2, 3
IMAGE_SIZE = (TINY["image_size"],) * 2
CONVERSATIONS = [
    [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A box."},
     {"role": "user", "content": "How big?"}],
    [{"role": "user", "content": "<image><image>\nSame?"}],
]


def graft_both(tiny: TinyLlava, order: str) -> tuple[CompressorGraft | EmbQGraft, ...]:
    """Both grafts, in `order`, with EmbQ weights that make a visible difference."""

    def compressor() -> CompressorGraft:
        return graft_compressor(tiny.model, AvgPool(2), processor=tiny.processor)

    def queries() -> EmbQGraft:
        torch.manual_seed(0)
        embq = EmbQ(TINY["text_hidden"], TINY["vision_hidden"], inner_dim=16, num_heads=2)
        handle = graft_embq(tiny.model, embq, layer=LAYER, num_queries=NUM_QUERIES,
                            tokenizer=tiny.processor.tokenizer)
        with torch.no_grad():
            handle.query_vectors.normal_(std=0.5)
            handle.embq.up.weight.mul_(4.0)
        return handle

    if order == "compressor_first":
        return compressor(), queries()
    embq_graft = queries()
    return embq_graft, compressor()


def embq_of(grafts) -> EmbQGraft:
    return next(graft for graft in grafts if isinstance(graft, EmbQGraft))


def batch_for(grafts, processor) -> dict[str, torch.Tensor]:
    queries = embq_of(grafts)
    prompts = [queries.build_prompt(messages, processor=processor) for messages in CONVERSATIONS]
    batch = pad_prompts(prompts, pad_token_id=queries.tokenizer.pad_token_id)
    images = make_images(sum(prompt.num_images for prompt in prompts))
    batch["pixel_values"] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return batch


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def no_wrappers(model) -> bool:
    return not any(isinstance(getattr(m, "base_layer", None), torch.nn.Module) for m in model.modules())


@pytest.mark.parametrize("order", ["compressor_first", "embq_first"])
def test_both_grafts_save_and_load_into_a_fresh_base(tiny_llava: TinyLlava, order: str, tmp_path: Path) -> None:
    grafts = graft_both(tiny_llava, order)
    batch = batch_for(grafts, tiny_llava.processor)
    expected = logits(tiny_llava.model, batch)
    save_grafted(tiny_llava.model, tmp_path, *grafts)

    # The model in memory is grafted as before.
    assert torch.equal(logits(tiny_llava.model, batch), expected)
    assert all(graft.active for graft in grafts)
    kinds = ["compressor" if isinstance(graft, CompressorGraft) else "embq" for graft in grafts]
    assert json.loads((tmp_path / GRAFTS_NAME).read_text())["grafts"] == kinds
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / EMBQ_CONFIG_NAME).is_file()

    # The folder's model and processor are the plain ones.
    model, info = LlavaForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.config.image_seq_length == 64 and model.generation_config.suppress_tokens is None
    processor = LlavaProcessor.from_pretrained(tmp_path, backend="pil")
    assert processor_image_token_count(processor, IMAGE_SIZE) == 64
    assert processor.tokenizer.convert_tokens_to_ids(embq_of(grafts).query_tokens) == list(
        embq_of(grafts).token_ids
    )

    loaded = load_grafted(model.eval(), tmp_path, processor=processor)
    assert [type(graft) for graft in loaded] == [type(graft) for graft in grafts]
    assert processor_image_token_count(processor, IMAGE_SIZE) == 16  # 8x8 -> AvgPool(2) -> 4x4
    assert torch.equal(logits(model, batch), expected)


@pytest.mark.parametrize("first_removed", ["compressor", "embq"])
def test_remove_in_any_order_restores_bit_identical_logits(first_removed: str) -> None:
    tiny = TinyLlava(*build_tiny_llava("phi", "clip"), "phi", "clip")
    model, processor = tiny.model, tiny.processor
    plain = make_inputs(processor, n_images=1)
    before = logits(model, plain)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    grafts = graft_both(tiny, "compressor_first")
    logits(model, batch_for(grafts, processor))
    compressor, queries = grafts
    for graft in (compressor, queries) if first_removed == "compressor" else (queries, compressor):
        graft.remove()
    assert torch.equal(logits(model, plain), before)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert no_wrappers(model) and model.generation_config.suppress_tokens is None
    assert model.config.image_seq_length == 64 and processor_image_token_count(processor, IMAGE_SIZE) == 64


def test_compressor_lifted_is_the_ungrafted_model_and_processor() -> None:
    model, processor = build_tiny_llava("qwen2", "siglip")
    plain = make_inputs(processor, n_images=1)  # 64 placeholders: the ungrafted count
    before = logits(model, plain)
    graft = graft_compressor(model, AvgPool(2), processor=processor)
    compressed = make_inputs(processor, n_images=1)
    grafted = logits(model, compressed)
    with graft.lifted():
        assert processor_image_token_count(processor, IMAGE_SIZE) == 64 and model.config.image_seq_length == 64
        assert not isinstance(model.model.multi_modal_projector, CompressedProjector)
        assert torch.equal(logits(model, plain), before)  # the placeholder check is idle too
    assert processor_image_token_count(processor, IMAGE_SIZE) == 16 and model.config.image_seq_length == 16
    assert torch.equal(logits(model, compressed), grafted)
    with pytest.raises(ValueError, match="64 image placeholder tokens \\(the ungrafted count\\)"):
        logits(model, plain)  # checked again
    graft.remove()
    with pytest.raises(RuntimeError, match="was removed"):
        with graft.lifted():
            pass


@pytest.mark.parametrize("saving", ["compressor", "embq"])
def test_one_grafts_base_model_save_refuses_the_other_and_writes_nothing(saving: str, tmp_path: Path) -> None:
    tiny = TinyLlava(*build_tiny_llava("llama", "siglip"), "llama", "siglip")
    grafts = graft_both(tiny, "compressor_first")
    graft = grafts[0] if saving == "compressor" else grafts[1]
    with pytest.raises(RuntimeError, match="other grafts .*save_grafted"):
        graft.save_pretrained(tmp_path / "out", save_base_model=True)
    assert not (tmp_path / "out").exists()
    assert all(g.active for g in grafts) and isinstance(tiny.model.model.multi_modal_projector, CompressedProjector)


def test_save_grafted_checks_its_arguments(tmp_path: Path) -> None:
    tiny = TinyLlava(*build_tiny_llava("phi", "siglip"), "phi", "siglip")
    compressor, queries = graft_both(tiny, "compressor_first")
    other, _ = build_tiny_llava("phi", "siglip")
    with pytest.raises(ValueError, match="no grafts"):
        save_grafted(tiny.model, tmp_path)
    with pytest.raises(ValueError, match="another model"):
        save_grafted(other, tmp_path, compressor, queries)
    with pytest.raises(ValueError, match="at most one graft of each kind"):
        save_grafted(tiny.model, tmp_path, compressor, compressor)
    with pytest.raises(TypeError, match="graft_compressor and graft_embq"):
        save_grafted(tiny.model, tmp_path, compressor, object())
    # A graft left out leaves its wrapper in the model: refused before anything is written.
    with pytest.raises(RuntimeError, match="other grafts"):
        save_grafted(tiny.model, tmp_path / "partial", compressor)
    assert not (tmp_path / "partial").exists()
    assert isinstance(tiny.model.model.multi_modal_projector, CompressedProjector)  # lifted back
    # A processor whose tokenizer lacks the query tokens would write other tokenizer files.
    copy = LlavaProcessor.from_pretrained(_saved(tiny.processor, tmp_path / "processor"), backend="pil")
    compressor.processor, original = copy, compressor.processor
    with pytest.raises(ValueError, match="does not hold the EmbQ graft's tokenizer"):
        save_grafted(tiny.model, tmp_path, compressor, queries)
    compressor.processor = original
    queries.remove()
    with pytest.raises(RuntimeError, match="embq graft was removed"):
        save_grafted(tiny.model, tmp_path, compressor, queries)


def _saved(processor, folder: Path) -> Path:
    processor.save_pretrained(folder)
    return folder


def test_load_grafted_checks_the_folder_and_undoes_a_partial_load(tmp_path: Path) -> None:
    tiny = TinyLlava(*build_tiny_llava("qwen2", "clip"), "qwen2", "clip")
    grafts = graft_both(tiny, "compressor_first")
    save_grafted(tiny.model, tmp_path, *grafts)
    fresh = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    processor = LlavaProcessor.from_pretrained(tmp_path, backend="pil")

    with pytest.raises(ValueError, match="holds an EmbQ graft: pass tokenizer="):
        load_grafted(fresh, tmp_path)
    assert no_wrappers(fresh)

    # The EmbQ graft fails (a tokenizer that gives the query tokens other ids): the
    # compressor graft loaded before it is removed again.
    shifted = build_tiny_llava("qwen2", "clip")[1].tokenizer  # no query tokens: they get new ids
    shifted.add_tokens(["<x>", "<y>"], special_tokens=True)
    with pytest.raises(ValueError, match="gives the query tokens the ids"):
        load_grafted(fresh, tmp_path, processor=processor, tokenizer=shifted)
    assert no_wrappers(fresh) and processor_image_token_count(processor, IMAGE_SIZE) == 64

    (tmp_path / GRAFTS_NAME).write_text(json.dumps({"format": "tokencompress.grafts", "format_version": 1,
                                                    "grafts": ["lora"]}))
    with pytest.raises(ValueError, match="lists grafts"):
        load_grafted(fresh, tmp_path, processor=processor)
    (tmp_path / GRAFTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="not written by save_grafted"):
        load_grafted(fresh, tmp_path, processor=processor)
