"""benchmarks.training_free_speed: the quick run's report, the tokens each variant feeds, the
multiply-add ratios and the scoring shares."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from benchmarks import training_free_speed  # noqa: E402
from benchmarks.end_to_end import VARIANTS, profile_spec  # noqa: E402
from benchmarks.training_free_speed import FASTV_LAYER, METHODS, quick_sizes, timed_calls  # noqa: E402
from benchmarks.training_free_speed_report import render_markdown  # noqa: E402
from tokencompress.profile import profile_model  # noqa: E402

# Image tokens that decoder layers 1..K, then K+1..N, run on. FastV rounds the kept share
# half up: 50% of 729 is 364.5 -> 365, 25% is 182.25 -> 182.
EXPECTED_IMAGE_TOKENS = {
    "baseline": (729, 729),
    "visionzip-64": (64, 64),
    "fastv-k2-50%": (729, 365),
    "fastv-k2-25%": (729, 182),
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("training_free_speed")
    training_free_speed.main(["--quick", "--no-progress", "--out", str(out)])
    return json.loads((out / "training_free_speed_quick.json").read_text()), out


def test_the_report_renders_from_its_json(quick_run: tuple[dict[str, Any], Path]) -> None:
    report, out = quick_run
    assert (out / "training_free_speed_quick.md").read_text() == render_markdown(report)
    assert (out / "training_free_speed_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["command"] == f"python -m benchmarks.training_free_speed --quick --no-progress --out {out}"


def test_the_environment_is_recorded(quick_run: tuple[dict[str, Any], Path]) -> None:
    report, _ = quick_run
    machine = report["machine"]
    for key in ("python", "torch", "transformers", "tokencompress", "device", "cpu", "logical_cores"):
        assert machine[key]
    assert report["settings"]["threads"] == torch.get_num_threads()
    assert report["settings"]["fastv_layer"] == FASTV_LAYER


def test_each_variant_feeds_its_image_tokens(quick_run: tuple[dict[str, Any], Path]) -> None:
    report, _ = quick_run
    variants = {v["name"]: v for v in report["variants"]}
    assert list(variants) == [m.name for m in METHODS] == list(EXPECTED_IMAGE_TOKENS)
    for name, (before, after) in EXPECTED_IMAGE_TOKENS.items():
        v = variants[name]
        assert (v["image_tokens_to_layer_k"], v["image_tokens_after_layer_k"]) == (before, after)
        layers = report["settings"]["text"]["num_hidden_layers"]
        assert v["image_tokens_per_layer"] == [before] * FASTV_LAYER + [after] * (layers - FASTV_LAYER)
        assert v["image_placeholders"] == before  # FastV prunes inside the LLM, not in the prompt


def test_multiply_adds_fall_with_the_tokens(quick_run: tuple[dict[str, Any], Path]) -> None:
    report, _ = quick_run
    ratio = {v["name"]: v["mac_ratio"] for v in report["variants"]}
    assert ratio["baseline"] == 1.0
    assert 0 < ratio["fastv-k2-25%"] < ratio["fastv-k2-50%"] < ratio["baseline"]
    assert 0 < ratio["visionzip-64"] < 1


def test_the_baseline_count_is_the_profilers(quick_run: tuple[dict[str, Any], Path]) -> None:
    """The real run's count equals `tokencompress.profile`'s on the meta device (a counter
    that missed ops, e.g. under inference mode, would fall short)."""
    report, _ = quick_run
    baseline = next(v for v in report["variants"] if v["name"] == "baseline")
    spec = profile_spec(VARIANTS[0], quick_sizes(), torch.float32)
    assert baseline["multiply_adds"] == profile_model(spec).macs


def test_times_and_shares(quick_run: tuple[dict[str, Any], Path]) -> None:
    report, _ = quick_run
    repeats = report["settings"]["repeats"]
    for v in report["variants"]:
        for key in ("first_token_s", "first_token_cpu_s"):
            times = v[key]["runs"]
            assert len(times) == repeats and all(math.isfinite(t) and t > 0 for t in times)
        assert all(math.isfinite(v[key]) and v[key] > 0 for key in ("speed_up", "cpu_speed_up"))
        if v["name"] == "baseline":
            assert v["scoring_share"] is None and v["scoring_s"] is None
            assert v["speed_up"] == v["cpu_speed_up"] == 1.0
            continue
        assert 0 <= v["scoring_share"] <= 1
        assert v["scoring_calls"] == 1  # one image; FastV ranks once per prefill
        assert len(v["scoring_s"]["runs"]) == repeats


def test_timed_calls_times_and_restores() -> None:
    module = sys.modules[__name__]
    original = _double
    with timed_calls(__name__, "_double", torch.device("cpu")) as seconds:
        assert module._double(2) == 4 and module._double(3) == 6
    assert len(seconds) == 2 and all(s >= 0 for s in seconds)
    assert module._double is original


def test_bad_arguments_are_refused() -> None:
    for argv in (["--scale", "0"], ["--scale", "0.05"], ["--repeats", "0"], ["--quick", "--scale", "0.5"]):
        with pytest.raises(SystemExit):
            training_free_speed.parse_args(argv)


def _double(x: int) -> int:
    return 2 * x
