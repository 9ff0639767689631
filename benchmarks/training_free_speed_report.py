"""The training-free speed benchmark's report: JSON, a Markdown table and a PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.end_to_end_report import machine_line, markdown_table
from benchmarks.report_files import write_report_files

__all__ = ["render_markdown", "plot", "write_report"]


def _ms(stats: dict[str, Any] | None, decimals: int = 1) -> str:
    if stats is None:
        return ""
    scaled = [1e3 * stats[key] for key in ("median", "min", "max")]
    return "{:,.{d}f} [{:,.{d}f}-{:,.{d}f}]".format(*scaled, d=decimals)


def _share(share: float | None) -> str:
    return "" if share is None else f"{share:.2%}"


def render_markdown(report: dict[str, Any]) -> str:
    """The settings and one row per variant: tokens, multiply-adds, first token, scoring share."""
    settings, variants = report["settings"], report["variants"]
    vision, text, k = settings["vision"], settings["text"], settings["fastv_layer"]
    lines = [
        f"# Training-free reduction, first token against multiply-adds: {settings['sizes']}",
        "",
        f"Command: `{report['command']}`",
        "",
        machine_line(report, f"; {report['wall_time_s']:,.0f} s in all"),
        "",
        f"Model: SigLIP {vision['hidden_size']} wide x {vision['num_hidden_layers']} layers (penultimate "
        f"layer's features, {settings['image_tokens']} image tokens) + phi-2 {text['hidden_size']} wide x "
        f"{text['num_hidden_layers']} layers, random weights; {settings['dtype']} "
        f"({settings['dtype_choice'].get('reason', 'requested')}), attention `{settings['attn_implementation']}` "
        f"on {settings['device']}. Prompt: the image tokens, then {settings['text_tokens']} text tokens; batch "
        f"{settings['batch_size']}. Medians of {settings['repeats']} rounds after {settings['warmup']} warm-up, "
        "[min-max] in brackets.",
        "",
    ]
    header = [
        "variant", f"image tokens, layers 1-{k}", f"image tokens after layer {k}", "prompt", "GMACs",
        "MAC ratio", "1 / MAC ratio", "first token (ms)", "speed-up", "CPU time (ms)", "CPU speed-up",
        "scoring (ms)", "scoring share",
    ]
    rows = [
        [
            v["name"], str(v["image_tokens_to_layer_k"]), str(v["image_tokens_after_layer_k"]),
            str(v["prompt_tokens"]), f"{v['multiply_adds'] / 1e9:,.1f}", f"{v['mac_ratio']:.3f}",
            f"{1 / v['mac_ratio']:.2f}x", _ms(v["first_token_s"]), f"{v['speed_up']:.2f}x",
            _ms(v["first_token_cpu_s"]), f"{v['cpu_speed_up']:.2f}x",
            _ms(v["scoring_s"], 2), _share(v["scoring_share"]),
        ]
        for v in variants
    ]
    lines += markdown_table(header, rows)
    scorers = [f"{v['name']}: `{v['scoring_function']}` ({v['scoring_calls']} call(s) per first token)"
               for v in variants if v["scoring_function"]]
    lines += [
        "",
        "Image tokens: what decoder layers 1-K and K+1-N run on, counted with hooks during the "
        "multiply-add run. GMACs: multiply-adds of one real first-token call "
        "(`tokencompress.mac_count`, as the variant ran it, scoring included). MAC ratio: the "
        "variant's multiply-adds over the baseline's; 1 / MAC ratio is the speed-up if time followed "
        "multiply-adds. Speed-up: the baseline's median first-token time over the variant's. "
        "CPU time: the process's CPU seconds (all threads) to the first token in the same runs, which "
        "leave out the waits for a core on a shared machine; CPU speed-up as the speed-up. "
        "Scoring: wall time of the ranking function in runs of their own (wrapped with a timer); "
        "share: scoring time / that run's first-token time, median over rounds. Scoring functions: "
        + "; ".join(scorers) + ".",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """First-token speed-up (wall and CPU time) against MAC ratio, one labelled point per variant,
    with 1 / ratio for reference."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    variants, settings = report["variants"], report["settings"]
    baseline = next(v for v in variants if v["name"] == "baseline")["first_token_s"]["median"]
    figure = Figure(figsize=(6.4, 4.6), dpi=110, layout="constrained")
    axes = figure.subplots()
    ratios = [v["mac_ratio"] for v in variants]
    low = min(ratios) * 0.85
    grid = [low + (1.05 - low) * i / 100 for i in range(101)]
    axes.plot(grid, [1 / x for x in grid], color="0.6", linestyle="--", linewidth=1,
              label="time in proportion to multiply-adds")
    for index, v in enumerate(variants):
        times = v["first_token_s"]
        # Bars: the baseline's median over the variant's slowest and fastest rounds.
        low_bar, high_bar = baseline / times["max"], baseline / times["min"]
        axes.errorbar(v["mac_ratio"], v["speed_up"], yerr=[[v["speed_up"] - low_bar], [high_bar - v["speed_up"]]],
                      fmt="o", color=f"C{index % 10}", capsize=3, zorder=3,
                      label="wall time (bars: slowest to fastest round)" if index == 0 else None)
        axes.scatter(v["mac_ratio"], v["cpu_speed_up"], marker="D", s=40, facecolors="none",
                     edgecolors=f"C{index % 10}", zorder=3, label="CPU time" if index == 0 else None)
        axes.annotate(v["name"], (v["mac_ratio"], v["speed_up"]), textcoords="offset points", xytext=(6, 6),
                      fontsize=8)
    axes.set_xlabel("multiply-adds / baseline's")
    axes.set_ylabel("first-token speed-up over the baseline")
    axes.set_xlim(low, 1.05)
    highest = max(max(v["speed_up"], v["cpu_speed_up"], baseline / v["first_token_s"]["min"]) for v in variants)
    axes.set_ylim(0, max(1 / low, highest) * 1.1)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper right")
    figure.suptitle(
        f"Training-free reduction, {settings['sizes']}: {settings['dtype']} on {settings['device']} "
        f"({report['machine'].get('gpu') or report['machine']['cpu']}, {settings['threads']} threads)",
        fontsize=9,
    )
    figure.savefig(path)


def write_report(report: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """Write `<stem>.json`, `<stem>.md` and `<stem>.png` to `out_dir`; return their paths."""
    return write_report_files(report, render_markdown(report), lambda path: plot(report, path), out_dir, stem)
