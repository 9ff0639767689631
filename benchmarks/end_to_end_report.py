"""The end-to-end benchmark's report: JSON, a Markdown table and a PNG plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.report_files import write_report_files
from tokencompress.environment import environment_line

__all__ = ["render_markdown", "plot", "write_report"]

GIB = 2**30


def _ms(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return ""
    return f"{1e3 * stats['median']:,.1f} [{1e3 * stats['min']:,.1f}-{1e3 * stats['max']:,.1f}]"


def _rate(stats: dict[str, Any] | None) -> str:
    """The median to three significant digits: 43.9 at a quarter size, 0.0668 at full size."""
    if stats is None:
        return ""
    value = stats["median"]
    decimals = 0 if value <= 0 else max(0, 2 - math.floor(math.log10(value)))
    return f"{value:,.{decimals}f}"


def _share(variant: dict[str, Any], part: str) -> str:
    share = variant["parts_share"].get(part)
    return "" if share is None else f"{share:.2%}"


def _gmacs(variant: dict[str, Any]) -> str:
    counted_here = variant["multiply_adds_source"] != "tokencompress.profile"
    return f"{variant['multiply_adds'] / 1e9:,.1f}" + (" *" if counted_here else "")


def _speed_up(baseline: dict[str, Any] | None, variant: dict[str, Any]) -> str:
    if baseline is None:
        return ""
    return f"{baseline['first_token_s']['median'] / variant['first_token_s']['median']:.2f}x"


def _macs_ratio(baseline: dict[str, Any] | None, variant: dict[str, Any]) -> str:
    if baseline is None or not baseline.get("multiply_adds") or not variant.get("multiply_adds"):
        return ""
    return f"{baseline['multiply_adds'] / variant['multiply_adds']:.2f}x"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def machine_line(report: dict[str, Any], more: str = "") -> str:
    """The machine, its threads and its load during the run; `more` ends the sentence."""
    machine, settings = report["machine"], report["settings"]
    start, end = machine.get("load_average_at_start"), machine.get("load_average_1_5_15_min")
    return (
        f"Machine: {environment_line(machine)}; {settings['threads']} torch threads"
        + (f", 1-min load average {start[0]:.2f} at the start and {end[0]:.2f} at the end" if start and end else "")
        + more + "."
    )


def render_markdown(report: dict[str, Any]) -> str:
    """The settings, the main table (one row per variant) and the per-part times."""
    settings, variants = report["settings"], report["variants"]
    baseline = next((v for v in variants if v["name"] == "baseline"), None)
    vision, text = settings["vision"], settings["text"]
    lines = [
        f"# End-to-end: {settings['sizes']}",
        "",
        f"Command: `{report['command']}`",
        "",
        machine_line(report),
        "",
        f"Model: SigLIP {vision['hidden_size']} wide x {vision['num_hidden_layers']} layers (penultimate "
        f"layer's features, {vision['image_size']} px, patch {vision['patch_size']}) + phi-2 "
        f"{text['hidden_size']} wide x {text['num_hidden_layers']} layers, random weights; "
        f"{settings['dtype']} ({settings['dtype_choice'].get('reason', 'requested')}), attention "
        f"`{settings['attn_implementation']}` on {settings['device']}. Prompt: the visual tokens, "
        f"{settings['text_tokens']} text tokens, then the {settings['embq']['queries']} EmbQ queries "
        f"(EmbQ at layer {settings['embq']['layer']}). Medians of {settings['repeats']} runs after "
        f"{settings['warmup']} warm-up, [min-max] in brackets.",
        "",
    ]
    header = [
        "variant", "tokens", "prompt", "GMACs", "first token (ms)", "speed-up", "MACs ratio", "decode (tok/s)",
        f"batch {settings['batch_size']} (samples/s)", "peak memory (GiB)", "compressor share", "EmbQ share",
    ]
    rows = []
    for v in variants:
        rows.append([
            v["name"], str(v["tokens"]), str(v["prompt_tokens"]), _gmacs(v),
            _ms(v["first_token_s"]), _speed_up(baseline, v), _macs_ratio(baseline, v),
            _rate(v["decode_tokens_per_s"]), _rate(v["batch_samples_per_s"]),
            f"{v['peak_bytes'] / GIB:.2f}", _share(v, "compressor"), _share(v, "EmbQ"),
        ])
    lines += markdown_table(header, rows)
    parts = ["vision encoder", "compressor", "EmbQ", "LLM prefill", "first token"]
    lines += ["", "Parts of the first-token time (ms; hooks, in runs of their own; the LLM prefill includes EmbQ):", ""]
    lines += markdown_table(["variant", *parts], [
        [v["name"], *(_ms(v["parts_s"].get(part)) for part in parts)] for v in variants
    ])
    lines += [
        "",
        "tokens: visual + query tokens (the paper's token number); prompt: the LLM's prefill length. "
        "GMACs: first-round multiply-adds from `tokencompress.profile` (* where it failed: counted "
        "with `tokencompress.mac_count` on one real first-token call; the JSON has the error). "
        "Decode: tokens/s after the "
        f"first of {settings['decode_tokens']}, batch 1. Batch: prompts per second through the first "
        f"token, {settings['batch_size']} at a time. Peak memory: {settings['memory_method']}. "
        "Shares: part time / first-token time of the same run, median. Speed-up: the baseline's "
        "median first-token time over the variant's; MACs ratio: the baseline's multiply-adds over "
        "the variant's.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Tokens vs first-token time, and tokens vs multiply-adds, one point per variant."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    variants = report["variants"]
    tokens = [v["tokens"] for v in variants]
    figure = Figure(figsize=(11, 4.2), dpi=110, layout="constrained")
    time_axes, macs_axes = figure.subplots(1, 2)
    series = [
        (time_axes, [1e3 * v["first_token_s"]["median"] for v in variants], "first token (ms, median)"),
        (macs_axes, [v["multiply_adds"] / 1e9 for v in variants], "first-round multiply-adds (G)"),
    ]
    markers = "osD^vP*Xh<>"
    for axes, values, label in series:
        # One colour and marker per variant and a legend: 81- and 90-token points sit
        # too close together for labels next to them.
        for index, (v, x, y) in enumerate(zip(variants, tokens, values)):
            axes.scatter(x, y, color=f"C{index % 10}", marker=markers[index % len(markers)], s=45, zorder=3,
                         label=v["name"])
        axes.set_xlabel("visual + query tokens")
        axes.set_ylabel(label)
        axes.set_xlim(0, max(tokens) * 1.15)
        axes.set_ylim(0, max(values) * 1.15)
        axes.grid(alpha=0.3)
    time_axes.legend(fontsize=8, loc="upper left")
    settings = report["settings"]
    figure.suptitle(
        f"End-to-end, {settings['sizes']}: {settings['dtype']} on {settings['device']} "
        f"({report['machine'].get('gpu') or report['machine']['cpu']}, torch threads: {settings['threads']})",
        fontsize=10,
    )
    figure.savefig(path)


def write_report(report: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """Write `<stem>.json`, `<stem>.md` and `<stem>.png` to `out_dir`; return their paths."""
    return write_report_files(report, render_markdown(report), lambda path: plot(report, path), out_dir, stem)
