"""`benchmarks/compressors.py`: the quick run's report, its measuring functions, and the
multiply-add table of docs/compressors.md."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.compressors import (
    QUICK,
    build_cases,
    count_multiply_adds,
    main,
    multiply_add_table,
    peak_bytes,
    sap_window_loop,
)
from tokencompress import SAP
from tokencompress.ldp import make_divisible

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"sap", "avgpool", "pixel_shuffle", "ldp", "ldpv2", "embq"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    report = main(["--quick", "--no-progress", "--out", str(out)])
    return out, report


def test_quick_run_writes_every_compressor(quick_run: tuple[Path, dict[str, Any]]) -> None:
    out, report = quick_run
    saved = json.loads((out / "compressors_quick.json").read_text())
    assert saved == json.loads(json.dumps(report))  # what was returned is what was written
    assert {entry["key"] for entry in saved["compressors"]} == KEYS
    for entry in saved["compressors"]:
        assert entry["forward_ms"] > 0 and entry["forward_backward_ms"] > 0, entry["name"]
        assert len(entry["forward_seconds"]) == saved["settings"]["repeats"] == 3
        assert entry["peak_forward_bytes"] >= 0 and entry["peak_forward_backward_bytes"] > 0, entry["name"]
        assert entry["multiply_adds"] >= 0 and entry["tokens_out"] >= 1
    assert saved["command"] == f"python -m benchmarks.compressors --quick --no-progress --out {out}"
    machine = saved["machine"]
    assert machine["torch"] == torch.__version__ and machine["cpu"] and machine["logical_cores"] >= 1
    assert "profile_memory=True" in saved["memory_method"]  # says how memory was measured


def test_quick_run_markdown(quick_run: tuple[Path, dict[str, Any]]) -> None:
    out, report = quick_run
    markdown = (out / "compressors_quick.md").read_text()
    assert report["command"] in markdown and torch.__version__ in markdown
    for entry in report["compressors"]:
        assert f"| {entry['name']} |" in markdown
    assert "window loop" in markdown


def test_sap_window_loop_gives_the_same_numbers(quick_run: tuple[Path, dict[str, Any]]) -> None:
    sap = quick_run[1]["sap_window_loop"]
    assert sap["max_abs_diff"] <= 1e-5 * max(1.0, sap["max_abs_output"])  # float32 rounding only
    assert sap["max_abs_diff_float64"] < 1e-12
    assert sap["loop_forward_ms"] > 0 and sap["forward_speedup"] > 0


@pytest.mark.parametrize("grid", [(7, 5), (2, 9), (1, 1), (9, 9)], ids=str)
def test_sap_window_loop_matches_sap_on_any_grid(grid: tuple[int, int]) -> None:
    sap = SAP(8).double().eval()
    x = torch.randn(2, grid[0] * grid[1], 8, dtype=torch.float64)
    torch.testing.assert_close(sap_window_loop(sap, x, grid), sap(x, grid=grid), rtol=1e-12, atol=1e-12)


def test_multiply_adds_match_hand_counts() -> None:
    cases = {case.key: case for case in build_cases(QUICK, batch=1)}
    n, c_in, c, (h, w) = QUICK.num_tokens, QUICK.vision_dim, QUICK.llm_dim, QUICK.grid
    # SAP: score MLP C -> C -> 1 on every token, then a 1 x |w| by |w| x C product per window.
    assert count_multiply_adds(cases["sap"]) == n * (c_in * c_in + c_in) + n * c_in
    assert count_multiply_adds(cases["avgpool"]) == 0
    # LDP: MLP; per block depthwise 9 per output value, SE on a 1x1 map, 1x1 projection.
    squeeze, n_half = make_divisible(c // 4), ((h + 1) // 2) * ((w + 1) // 2)
    mlp = n * c_in * c + n * c * c
    block1 = n * 9 * c + 2 * c * squeeze + n * c * c
    block2 = n_half * 9 * c + 2 * c * squeeze + n_half * c * c
    assert count_multiply_adds(cases["ldp"]) == mlp + block1 + block2
    # LDPv2: fc2 and the positional conv run on the pooled grid.
    pooled = QUICK.ldpv2_grid[0] * QUICK.ldpv2_grid[1]
    assert count_multiply_adds(cases["ldpv2"]) == n * c_in * c + pooled * c * c + pooled * 9 * c


def test_peak_bytes_counts_tensors_alive_together() -> None:
    def two_alive_then_one() -> None:
        a = torch.ones(250_000)  # 1 MB
        b = a * 2  # 2 MB alive
        del a
        c = b + 1  # still 2 MB
        del b, c

    peak = peak_bytes(two_alive_then_one, torch.device("cpu"))
    assert 2_000_000 <= peak < 2_001_000


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--repeats", "0"], ["--warmup", "-1"]])
def test_bad_arguments_exit(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--quick", *argv])


@pytest.mark.slow
def test_docs_table_is_current() -> None:
    doc = (ROOT / "docs" / "compressors.md").read_text()
    match = re.search(r"<!-- multiply-add-table:start -->\n(.*?)<!-- multiply-add-table:end -->", doc, re.DOTALL)
    assert match, "docs/compressors.md lost its multiply-add-table markers"
    assert match.group(1).strip() == multiply_add_table().strip(), (
        "docs/compressors.md is out of date: paste the output of `python -m benchmarks.compressors --docs-table`"
    )
