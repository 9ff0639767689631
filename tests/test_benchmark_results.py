"""Committed benchmark results: they say what made them, the docs quote them, and the
version-independent ones (multiply-adds) still come out the same today."""

from __future__ import annotations

import json
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from benchmarks import (
    ablation_report, compressors, end_to_end_report, tradeoff_report, training_free_report,
    training_free_speed_report,
)
from tokencompress.cli import _specs, build_parser
from tokencompress.profile import ProfileResult, compare_markdown, profile_model, savings_markdown
from tokencompress.profile_presets import PAPER_TFLOPS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
RESULT_FILES = sorted(RESULTS.rglob("*.json"))
# Which renderer wrote each kind of results Markdown (from the JSON beside it).
RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "ablation": ablation_report.render_markdown,
    "end_to_end": end_to_end_report.render_markdown,
    "compressors": compressors.render_markdown,
    "training_free_speed": training_free_speed_report.render_markdown,  # before its prefix "training_free"
    "training_free": training_free_report.render_markdown,
    "tradeoff": tradeoff_report.render_markdown,
}
PROFILE_FILES = sorted(RESULTS.glob("profile*.json"))
# The models of ours (compressed and not), whose docs tables are `savings_markdown`'s.
FAMILY_FILES = [RESULTS / f"profile_{name}.json" for name in ("llava_next", "qwen3_vl", "qwen3_vl_1024")]


@cache
def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- every result says what made it ---------------------------------------------------------
@pytest.mark.parametrize("path", RESULT_FILES, ids=_relative)
def test_every_result_records_versions_and_device(path: Path) -> None:
    machine = _load(path)["machine"]
    for key in ("python", "torch", "transformers", "tokencompress", "device"):
        assert isinstance(machine.get(key), str) and machine[key], f"{_relative(path)}: machine.{key} missing"
    assert "command" in _load(path)


@pytest.mark.parametrize(
    "path", [p for p in RESULT_FILES if p.with_suffix(".md").exists()], ids=_relative
)
def test_results_markdown_is_rendered_from_its_json(path: Path) -> None:
    """A results table is never edited by hand: it is what the report code makes of the JSON."""
    kind = next(name for name in RENDERERS if path.stem.startswith(name))
    assert path.with_suffix(".md").read_text() == RENDERERS[kind](_load(path))


# -- multiply-adds do not depend on the installed versions ------------------------------------
def _profile_results(path: Path) -> list[ProfileResult]:
    return [ProfileResult.from_dict(result) for result in _load(path)["results"]]


@pytest.mark.slow
@pytest.mark.parametrize("path", PROFILE_FILES, ids=_relative)
def test_profile_results_equal_a_fresh_count(path: Path) -> None:
    """The recorded command, run today, gives the same tokens, parameters and multiply-adds."""
    argv = shlex.split(_load(path)["command"])[1:]  # drop "tokencompress"
    args = build_parser().parse_args(argv)
    fresh = [profile_model(spec) for spec in _specs(args)]
    recorded = _profile_results(path)
    assert [r.name for r in fresh] == [r.name for r in recorded]
    for now, then in zip(fresh, recorded):
        assert (now.tokens, now.llm_tokens, now.params, now.kv_cache_bytes) == (
            then.tokens, then.llm_tokens, then.params, then.kv_cache_bytes)
        assert [(p.name, p.macs) for p in now.parts] == [(p.name, p.macs) for p in then.parts]


def test_compressor_multiply_adds_equal_a_fresh_count() -> None:
    recorded = {row["name"]: row["multiply_adds"] for row in _load(RESULTS / "compressors.json")["compressors"]}
    settings = dict(_load(RESULTS / "compressors.json")["settings"])
    run = {key: settings.pop(key) for key in ("batch", "dtype", "warmup", "repeats")}
    workload = compressors.Workload(**{**settings, "grid": tuple(settings["grid"]),
                                       "ldpv2_grid": tuple(settings["ldpv2_grid"])})
    fresh = {case.name: compressors.count_multiply_adds(case)
             for case in compressors.build_cases(workload, batch=run["batch"], device="meta")}
    assert fresh == recorded


# -- the docs quote the results -------------------------------------------------------------
def _docs_tables() -> Iterator[tuple[list[Path], list[str]]]:
    """(results files named by the marker, table lines) for every table of the docs."""
    lines = DOCS.read_text().splitlines()
    index = 0
    while index < len(lines):
        if not lines[index].startswith("|"):
            index += 1
            continue
        marker = re.fullmatch(r"<!-- figures: (.+) -->", lines[index - 1].strip())
        start = index
        while index < len(lines) and lines[index].startswith("|"):
            index += 1
        assert marker, f"docs/benchmarks.md line {start + 1}: a table without a <!-- figures: FILE --> marker"
        yield [ROOT / name for name in marker.group(1).split()], lines[start:index]


def _profile_table(files: list[Path]) -> str:
    results = [result for path in files if path in PROFILE_FILES for result in _profile_results(path)]
    return compare_markdown(results, {name: figure.tflops for name, figure in PAPER_TFLOPS.items()})


def test_the_profile_table_is_the_one_the_results_give() -> None:
    tables = [table for files, table in _docs_tables() if files == [RESULTS / "profile.json"]]
    assert tables, "the profile table of docs/benchmarks.md is gone or lost its marker"
    assert "\n".join(tables[0]) == _profile_table([RESULTS / "profile.json"])


@pytest.mark.parametrize("path", FAMILY_FILES, ids=_relative)
def test_the_family_tables_are_the_ones_the_results_give(path: Path) -> None:
    tables = [table for files, table in _docs_tables() if files == [path]]
    assert tables, f"docs/benchmarks.md has no table marked with {_relative(path)}"
    assert "\n".join(tables[0]) == savings_markdown(_profile_results(path))


NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")
# The units the docs use for what the JSON holds: as is, percent of a fraction, ms of
# seconds, s of ms, G/T of a count, GiB/MiB of bytes.
SCALES = (1.0, 100.0, 1e3, 1e-3, 1e-9, 1e-12, 2.0**-30, 2.0**-20)


def _numbers(text: str) -> list[str]:
    return NUMBER.findall(text)


def _json_values(node: Any) -> Iterator[float]:
    if isinstance(node, bool):
        return
    if isinstance(node, (int, float)):
        yield abs(float(node))
    elif isinstance(node, dict):
        for value in node.values():
            yield from _json_values(value)
    elif isinstance(node, list):
        for value in node:
            yield from _json_values(value)


def _sources(files: list[Path]) -> tuple[list[float], set[float]]:
    """What a docs figure may be: a JSON value (in some unit), or a figure of the rendered
    results (the results Markdown, or the profile table), which has the derived ones."""
    values = [value for path in files for value in _json_values(_load(path))]
    rendered = [path.with_suffix(".md").read_text() for path in files if path.with_suffix(".md").exists()]
    if any(path in PROFILE_FILES for path in files):
        rendered.append(_profile_table(files))
        rendered.append(savings_markdown([r for p in files if p in PROFILE_FILES for r in _profile_results(p)]))
    shown = {float(number.replace(",", "")) for text in rendered for number in _numbers(text)}
    return values, shown


def _matches(figure: str, values: list[float], shown: set[float]) -> bool:
    target = float(figure.replace(",", ""))
    if target in shown:
        return True
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    half_unit = 0.5 * 10.0**-decimals + 1e-9
    return any(abs(value * scale - target) <= half_unit for value in values for scale in SCALES)


def test_every_figure_of_the_docs_tables_is_in_its_results_file() -> None:
    """Each number of each docs table is a value of the results file its marker names,
    rounded as shown (in one of the docs' units), or a figure the file's report shows."""
    stale = []
    for files, table in _docs_tables():
        values, shown = _sources(files)
        for row in table[2:]:  # header and rule left out
            for figure in _numbers(row):
                if not _matches(figure, values, shown):
                    stale.append(f"{figure!r} in {row[:60]!r}... ({', '.join(_relative(p) for p in files)})")
    assert not stale, "figures not in their results files:\n" + "\n".join(stale)


def test_the_figure_check_catches_a_stale_figure() -> None:
    values, shown = _sources([RESULTS / "end_to_end.json"])
    assert _matches("16.19", values, shown)  # the baseline's first token, in seconds
    assert _matches("16,188.4", values, shown)  # ... in ms, as the results table shows it
    assert not _matches("16.39", values, shown)
    assert not _matches("2.292", *_sources([RESULTS / "profile.json"]))  # torch 2.14.1's FlopCounterMode


def _prose() -> str:
    return " ".join(DOCS.read_text().split())


def _assert_quoted(sentences: list[str]) -> None:
    prose = _prose()
    missing = [sentence for sentence in sentences if sentence not in prose]
    assert not missing, "docs/benchmarks.md does not quote the results:\n" + "\n".join(missing)


def _tmacs(path: str, name: str, digits: int = 3) -> str:
    result = next(r for r in _profile_results(RESULTS / path) if r.name == name)
    return f"{result.macs / 1e12:.{digits}f}"


def _part(name: str, part: str, scale: float = 1e-12, digits: int = 3, path: str = "profile.json") -> str:
    result = next(r for r in _profile_results(RESULTS / path) if r.name == name)
    return f"{result.part(part).macs * scale:.{digits}f}"


def _gap(path: str, name: str) -> str:
    result = next(r for r in _profile_results(RESULTS / path) if r.name == name)
    paper = PAPER_TFLOPS[name].tflops
    return f"{(result.macs / 1e12 - paper) / paper:+.1%}"


def test_profile_prose_figures_come_from_the_results() -> None:
    lm = "profile_lm_head_all.json"
    text32, text0 = "profile_text_tokens_32.json", "profile_text_tokens_0.json"
    main = {r.name: r for r in _profile_results(RESULTS / "profile.json")}
    queries = {r.name: r for r in _profile_results(RESULTS / "profile_queries.json")}
    expected = [
        f"its baseline's 2.40 matches our {_tmacs('profile.json', 'baseline', 2)} TMACs",
        f"(`--lm-head all`): baseline {_tmacs(lm, 'baseline')} ({_gap(lm, 'baseline')}), flashsloth "
        f"{_tmacs(lm, 'flashsloth')} ({_gap(lm, 'flashsloth')}), flashsloth-hd {_tmacs(lm, 'flashsloth-hd')} "
        f"({_gap(lm, 'flashsloth-hd')}), llava-1.5-7b {_tmacs(lm, 'llava-1.5-7b')} ({_gap(lm, 'llava-1.5-7b')}).",
        f"Where FlashSloth's {_tmacs('profile.json', 'flashsloth')} TMACs go: SigLIP "
        f"{_part('flashsloth', 'vision encoder')} T, SAP {_part('flashsloth', 'compressor')} T, projector "
        f"{_part('flashsloth', 'projector')} T, EmbQ {_part('flashsloth', 'EmbQ')} T, phi-2 prefill of "
        f"{main['flashsloth'].llm_tokens} tokens {_part('flashsloth', 'LLM prefill')} T, LM head "
        f"{_part('flashsloth', 'LM head', digits=4)} T.",
        f"SigLIP alone costs {_part('flashsloth', 'vision encoder')} T; 81 visual tokens with no text at all "
        f"already give {_tmacs(text0, 'avgpool')} T",  # average pooling: no compressor cost
        f"**SAP vs average pooling: {(main['sap'].macs - main['avgpool'].macs) / 1e12:.3f} T, not 0.08 T.**",
        f"SAP's scoring MLP costs {_part('sap', 'compressor', 1e-9, 2)} GMACs",
        f"**9 queries + EmbQ: {(main['flashsloth'].macs - main['sap'].macs) / 1e12:.3f} T, not 0.24 T.**",
        f"EmbQ costs {_part('flashsloth', 'EmbQ', 1e-9, 1)} GMACs in all",
        f"ours step by {(queries['flashsloth/q=12'].macs - queries['flashsloth'].macs) / 1e12:.3f} T",
        f"the profiler gives {_tmacs(text32, 'flashsloth')} at 32 text tokens (GQA, POPE: 0.64) and "
        f"{_tmacs('profile.json', 'flashsloth')} at 64",
        f"LLaVA-1.5-7B gives {_tmacs(text32, 'llava-1.5-7b')} at 32 and {_tmacs('profile.json', 'llava-1.5-7b')} at 64",
        f"(ours: {_tmacs(text32, 'baseline')} at 32 text tokens)",
        f"five tiles through SigLIP cost {_part('flashsloth-hd', 'vision encoder', digits=2)} T, and 414 LLM tokens "
        f"without any text bring it to {_tmacs(text0, 'flashsloth-hd', 2)} T",
        f"our estimate is {main['flashsloth'].memory_bytes / 2**30:.2f} GiB",
        f"and {main['llava-1.5-7b'].memory_bytes / 2**30:.2f} GiB",
    ]
    _assert_quoted(expected)


def test_family_prose_figures_come_from_the_results() -> None:
    llava = {r.name: r for r in _profile_results(RESULTS / "profile_llava_next.json")}
    qwen = {r.name: r for r in _profile_results(RESULTS / "profile_qwen3_vl.json")}
    big = {r.name.split("@")[0]: r for r in _profile_results(RESULTS / "profile_qwen3_vl_1024.json")}
    tera = lambda macs: f"{macs / 1e12:.3f}"  # noqa: E731
    giga = lambda macs: f"{macs / 1e9:.1f}"  # noqa: E731
    llm = lambda r: r.part("LLM prefill").macs + r.part("LM head").macs  # noqa: E731
    ratio = lambda family, name: f"{family[name.split('/')[0]].macs / family[name].macs:.2f}x"  # noqa: E731
    base, vision = llava["llava-next-7b"], lambda r: r.part("vision encoder").macs  # noqa: E731
    expected = [
        f"the LLM is {llm(base) / base.macs:.0%} of the cost, and a quarter of the tokens is "
        f"{ratio(llava, 'llava-next-7b/avgpool2')} fewer multiply-adds.",
        f"Vicuna-7B's prefill of {base.llm_tokens:,} tokens costs {tera(llm(base))} of {tera(base.macs)} TMACs, "
        f"CLIP on the 5 views {tera(vision(base))}.",
        f"SAP {llava['llava-next-7b/sap'].part('compressor').macs / 1e9:.1f} GMACs on the 5 views, PixelShuffle's "
        f"new 4096-wide projector {giga(llava['llava-next-7b/pixelshuffle'].part('projector').macs)} GMACs against the "
        f"original projector's {giga(llava['llava-next-7b/avgpool2'].part('projector').macs)} on the same 720 tokens "
        f"({giga(base.part('projector').macs)} uncompressed)",
        f"At 512x512 its 1,024 patches cost {tera(vision(qwen['qwen3-vl-2b']))} TMACs, "
        f"{vision(qwen['qwen3-vl-2b']) / qwen['qwen3-vl-2b'].macs:.0%} of Qwen3-VL-2B's "
        f"{tera(qwen['qwen3-vl-2b'].macs)}; "
        f"a quarter of the visual tokens then saves {ratio(qwen, 'qwen3-vl-2b/avgpool2')} (2B) and "
        f"{ratio(qwen, 'qwen3-vl-4b/avgpool2')} (4B).",
        f"At 1024x1024 the tower's 4,096 patches cost {tera(vision(big['qwen3-vl-2b']))} TMACs, more than the 2B's "
        f"prefill of {big['qwen3-vl-2b'].llm_tokens:,} tokens ({tera(llm(big['qwen3-vl-2b']))}), and the ratio is "
        f"{ratio(big, 'qwen3-vl-2b/avgpool2')} (2B) and {ratio(big, 'qwen3-vl-4b/avgpool2')} (4B).",
    ]
    _assert_quoted(expected)
    for family in (llava, qwen, big):  # "within 1% of each other at the same budget"
        for model in {name.split("/")[0] for name in family}:
            compressed = [r.macs for name, r in family.items() if name.startswith(model + "/")]
            assert max(compressed) / min(compressed) < 1.01, f"{model}: compressors no longer within 1%"


def _variant(path: str, name: str) -> dict[str, Any]:
    return next(v for v in _load(RESULTS / path)["variants"] if v["name"] == name)


def test_end_to_end_headline_figures_come_from_the_results() -> None:
    full_base, full_fs = _variant("end_to_end.json", "baseline"), _variant("end_to_end.json", "flashsloth")
    small_base, small_fs = (_variant("end_to_end_scale0.25.json", name) for name in ("baseline", "flashsloth"))
    seconds = lambda v: v["first_token_s"]["median"]  # noqa: E731
    expected = [
        f"FlashSloth's first token comes {seconds(full_base) / seconds(full_fs):.1f}x sooner than the baseline's** "
        f"({seconds(full_fs):.2f} s against {seconds(full_base):.2f} s), in line with its "
        f"{full_base['multiply_adds'] / full_fs['multiply_adds']:.1f}x fewer multiply-adds "
        f"({full_fs['multiply_adds'] / 1e12:.3f} against {full_base['multiply_adds'] / 1e12:.3f} TMACs)",
        f"FlashSloth as a whole answers {seconds(small_base) / seconds(small_fs):.0f}x faster than the baseline "
        f"({1e3 * seconds(small_fs):.0f} vs {1e3 * seconds(small_base):.0f} ms) with "
        f"{small_base['multiply_adds'] / small_fs['multiply_adds']:.1f}x fewer multiply-adds "
        f"({small_fs['multiply_adds'] / 1e9:.1f} vs {small_base['multiply_adds'] / 1e9:.1f} G)",
    ]
    _assert_quoted(expected)
