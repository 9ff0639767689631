"""benchmarks.end_to_end: the --quick run's report, the sizes, the inputs and the grafts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from benchmarks import end_to_end  # noqa: E402
from benchmarks.end_to_end import (  # noqa: E402
    TEXT_TOKENS,
    VARIANTS,
    build_base_model,
    build_variant_modules,
    graft_variant,
    make_inputs,
    model_sizes,
    profile_spec,
)
from tokencompress.profile_presets import preset  # noqa: E402

EXPECTED_TOKENS = {
    "baseline": 729,
    "avgpool": 81,
    "sap": 81,
    "flashsloth": 90,
    "pixelshuffle": 196,  # 27x27 padded to 28x28, 2x2 -> 14x14
    "ldpv2": 144,
    "flashsloth-hd": 414,  # 5 x 81 + 9
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("end_to_end")
    report = end_to_end.main(["--quick", "--no-progress", "--out", str(out)])
    return report, out


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def test_quick_run_measures_every_variant(quick_run: tuple[dict[str, Any], Path]) -> None:
    _, out = quick_run
    report = json.loads((out / "end_to_end_quick.json").read_text())
    variants = {v["name"]: v for v in report["variants"]}
    assert list(variants) == [v.name for v in VARIANTS]
    for name, v in variants.items():
        assert v["tokens"] == EXPECTED_TOKENS[name]
        assert v["prompt_tokens"] == v["tokens"] + TEXT_TOKENS
        for key in ("first_token_s", "decode_tokens_per_s", "batch_samples_per_s"):
            assert len(v[key]["runs"]) == report["settings"]["repeats"]
            assert all(_positive(x) for x in v[key]["runs"]) and _positive(v[key]["median"])
        assert _positive(v["multiply_adds"]) and v["peak_bytes"] > v["weight_bytes"] > 0
        parts = {"vision encoder", "LLM prefill", "first token"}
        parts |= {"compressor"} if name != "baseline" else set()
        parts |= {"EmbQ"} if name.startswith("flashsloth") else set()
        assert set(v["parts_s"]) == parts
        assert all(_positive(stats["median"]) for stats in v["parts_s"].values())
        assert set(v["parts_share"]) == parts - {"first token"}
        assert all(0 < share < 1 for share in v["parts_share"].values())
    # Fewer tokens, fewer multiply-adds.
    assert variants["sap"]["multiply_adds"] < variants["baseline"]["multiply_adds"]
    assert variants["flashsloth"]["multiply_adds"] > variants["sap"]["multiply_adds"]


def test_quick_run_says_where_the_figures_come_from(quick_run: tuple[dict[str, Any], Path]) -> None:
    report, out = quick_run
    assert report["command"] == f"python -m benchmarks.end_to_end --quick --no-progress --out {out}"
    machine = report["machine"]
    for key in ("cpu", "logical_cores", "torch", "transformers", "python"):
        assert machine[key]
    settings = report["settings"]
    assert settings["dtype"] in ("float32", "bfloat16") and settings["dtype_choice"]["reason"]
    assert settings["threads"] == torch.get_num_threads()

    markdown = (out / "end_to_end_quick.md").read_text()
    assert report["command"] in markdown and machine["cpu"] in markdown
    for name in EXPECTED_TOKENS:
        assert f"| {name} | {EXPECTED_TOKENS[name]} |" in markdown

    from PIL import Image

    with Image.open(out / "end_to_end_quick.png") as picture:
        assert picture.format == "PNG" and min(picture.size) > 100


def test_scale_one_is_the_profile_presets() -> None:
    sizes = model_sizes(1.0)
    for name in ("baseline", "avgpool", "sap", "flashsloth", "flashsloth-hd"):
        ours = profile_spec(next(v for v in VARIANTS if v.name == name), sizes, torch.bfloat16)
        theirs = preset(name, text_tokens=TEXT_TOKENS)
        assert ours.vision_config.to_dict() == theirs.vision_config.to_dict()
        assert ours.text_config.to_dict() == theirs.text_config.to_dict()
        assert type(ours.compressor) is type(theirs.compressor)
        assert ours.num_images == theirs.num_images and ours.projector == theirs.projector
        if theirs.embq is None:
            assert ours.embq is None
        else:
            assert (ours.embq.num_queries, ours.embq.layer) == (theirs.embq.num_queries, theirs.embq.layer)
            assert repr(ours.embq.module) == repr(theirs.embq.module)


def test_scaled_sizes_keep_head_sizes_and_the_grid() -> None:
    sizes = model_sizes(0.25)
    assert (sizes.vision.hidden_size, sizes.vision.num_attention_heads, sizes.vision.num_hidden_layers) == (288, 4, 7)
    assert (sizes.text.hidden_size, sizes.text.num_attention_heads, sizes.text.num_hidden_layers) == (640, 8, 8)
    assert (sizes.embq_inner_dim, sizes.embq_heads, sizes.embq_layer) == (144, 8, 2)
    assert sizes.vision.image_size // sizes.vision.patch_size == 27
    with pytest.raises(ValueError, match="scale"):
        model_sizes(0)


def test_inputs_and_grafts() -> None:
    sizes = model_sizes(1 / 16, vocab_size=512)
    model, tokenizer = build_base_model(sizes, torch.float32, torch.device("cpu"), "sdpa")
    hd = next(v for v in VARIANTS if v.name == "flashsloth-hd")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with graft_variant(model, tokenizer, build_variant_modules(hd, sizes), sizes) as grafted:
        inputs = make_inputs(model, tokenizer, grafted, hd, batch_size=2)
        ids, instruction = inputs["input_ids"], inputs["embq_instruction_map"]
        assert ids.shape == (2, 5 * 81 + TEXT_TOKENS + 9)
        assert ((ids == model.config.image_token_id).sum(1) == 5 * 81).all()
        assert (instruction[:, 5 * 81:5 * 81 + TEXT_TOKENS] == 1).all() and instruction.sum() == 2 * TEXT_TOKENS
        assert (ids[:, -9:] == torch.tensor(grafted.query_token_ids)).all()
        assert inputs["pixel_values"].shape == (10, 3, 384, 384)
        with torch.no_grad():
            assert model(**inputs).logits.isfinite().all()
    # Removed again: the model is as it was.
    assert type(model.model.multi_modal_projector).__name__ == "LlavaMultiModalProjector"
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_bad_arguments_are_refused() -> None:
    for argv in (["--scale", "0"], ["--scale", "1.5"], ["--repeats", "0"], ["--quick", "--scale", "0.5"]):
        with pytest.raises(SystemExit):
            end_to_end.parse_args(argv)


@pytest.mark.parametrize(
    "median, shown",
    [(0.06661, "0.0666"), (3.5, "3.50"), (43.94, "43.9"), (105.4, "105"), (12345.6, "12,346"), (0.0, "0")],
)
def test_rates_show_three_significant_digits(median: float, shown: str) -> None:
    """Full-size CPU throughputs are below 1/s: one decimal would show 0.1 for 0.0666."""
    from benchmarks.end_to_end_report import _rate

    assert _rate({"median": median}) == shown
