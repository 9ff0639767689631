"""The trade-off benchmark's report: a row per variant, JSON, Markdown and a PNG chart."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.report_files import write_report_files
from tokencompress.environment import environment_line

__all__ = ["METHOD_STYLES", "REFERENCE", "main_table", "plot", "render_markdown", "summarize", "write_report"]

#: The uncompressed variant: speed-ups and accuracy changes are against it.
REFERENCE = "none"
#: One marker and colour per method in the plot (matplotlib's tab10 colours).
METHOD_STYLES: dict[str, tuple[str, str, str]] = {
    "none": ("uncompressed", "D", "black"),
    "tome": ("ToMe", "o", "tab:blue"),
    "dart": ("DART", "s", "tab:orange"),
    "visionzip": ("VisionZip", "^", "tab:green"),
    "avgpool": ("AvgPool(3)", "v", "tab:red"),
    "fastv": ("FastV", "P", "tab:purple"),
    "sap": ("SAP, trained", "X", "tab:brown"),
    "flashsloth": ("SAP + EmbQ, trained", "*", "tab:pink"),
}


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min, max and n."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant, in report order: accuracy over seeds, the paired change
    against the uncompressed model, the tokens counted, and the first-token time."""
    accuracy = {(r["variant"], r["seed"]): r["accuracy"] for r in report["runs"]}
    timing = report["first_token_s"]
    reference_time = timing[REFERENCE]["median"] if REFERENCE in timing else None
    rows = []
    for variant in report["variants"]:
        name = variant["name"]
        runs = [r for r in report["runs"] if r["variant"] == name]
        paired = [accuracy[(name, s)] - accuracy[(REFERENCE, s)] for s in report["seeds"]
                  if (name, s) in accuracy and (REFERENCE, s) in accuracy]
        seconds = timing[name]["median"]
        rows.append({
            **variant,
            # Counted while lmms-eval scored; every seed gives one count unless something broke.
            "placeholders": sorted({r["placeholders"] for r in runs}),
            "features": sorted({r["features"] for r in runs}),
            "image_tokens_per_layer": sorted({tuple(r["image_tokens_per_layer"]) for r in runs}),
            "accuracy": _stats([r["accuracy"] for r in runs]),
            "change_vs_uncompressed": _stats(paired) if paired and name != REFERENCE else None,
            "first_token_ms": 1e3 * seconds,
            "speed_up": reference_time / seconds if reference_time else None,
        })
    return rows


def _pct(stats: dict[str, Any]) -> str:
    return f"{stats['mean']:.1%} ± {stats['std']:.1%}"


def _points(stats: dict[str, Any] | None) -> str:
    return "" if stats is None else f"{100 * stats['mean']:+.1f} ± {100 * stats['std']:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _layers(row: dict[str, Any]) -> str:
    return " / ".join("-".join(str(n) for n in counts) for counts in row["image_tokens_per_layer"])


def main_table(report: dict[str, Any]) -> list[str]:
    """The headline table: tokens, accuracy, its change and the first-token time per variant."""
    return _table(
        ["variant", "image tokens to the LLM", "accuracy", "change vs uncompressed (points)", "first token (ms)",
         "speed-up"],
        [[row["name"], row["tokens_label"], _pct(row["accuracy"]), _points(row["change_vs_uncompressed"]),
          f"{row['first_token_ms']:.2f}", f"{row['speed_up']:.2f}x" if row["speed_up"] else ""]
         for row in summarize(report)],
    )


def render_markdown(report: dict[str, Any]) -> str:
    """The results as Markdown: the headline table, then tokens, runs, timing, training, machine."""
    rows, settings, machine = summarize(report), report["settings"], report["machine"]
    trained_now = sum(not t["reused"] for t in report["training"])
    intro = (
        f"Accuracy: lmms-eval {machine['lmms_eval']}'s `simple_evaluate` with the `tokencompress` model and "
        f"each variant's `model_args`, exact match on {settings['questions']} held-out questions of the "
        f"synthetic \"detail\" set per seed (a local task), batches of {settings['lmms_eval_batch_size']}; "
        f"mean ± sample standard deviation over seeds {report['seeds']}, and the change against the "
        f"uncompressed model on the same seeds. Models: the ablation's tiny FlashSloth (stage 1 "
        f"{settings['stage1_steps']} steps, stage 2 {settings['stage2_steps']} steps, batch "
        f"{settings['batch_size']}, {settings['num_train']} training pictures), uncompressed unless the "
        f"variant says trained; {trained_now} of the {len(report['training'])} were trained by this command, "
        f"the rest reused. First token: `generate` from pixel values to the first answer token, batch "
        f"{settings['timing_batch_size']}, on {settings['timing_device']} with {report['threads']} thread(s), the "
        f"seed-{settings['timing_seed']} models, median of {settings['rounds']} rounds after "
        f"{settings['warmup']} warm-up rounds, round-robin over the variants. This command took "
        f"{report['wall_seconds']:.0f} s."
    )
    lines = [
        "# Accuracy against first-token time (tiny FlashSloth, lmms-eval)",
        "",
        f"Command: `{report['command']}`",
        "",
        intro,
        "",
        *main_table(report),
        "",
        f"Each run is, on lmms-eval's command line: `{settings['lmms_eval_cli']}`.",
        "",
        ("Tokens counted while lmms-eval scored (prompt placeholders / projector outputs per picture, and the "
         "image tokens each decoder layer ran on), and each variant's `model_args` besides `pretrained`:"),
        "",
    ]
    lines += _table(["variant", "placeholders / features", "per decoder layer", "queries", "model_args"], [
        [row["name"], f"{'/'.join(map(str, row['placeholders']))} / {'/'.join(map(str, row['features']))}",
         _layers(row), str(row["query_tokens"]), f"`{row['args']}`" if row["args"] else "(none)"]
        for row in rows
    ])
    types = sorted({t for r in report["runs"] for t in r["by_type"]})
    lines += ["", ("Per run (lmms-eval's standard error; the recipe's own `evaluate` on the same questions where "
                   "nothing is grafted at inference, which the local task must equal):"), ""]
    lines += _table(["seed", "variant", "accuracy", "stderr", *types, "recipe evaluate", "eval s"], [
        [str(r["seed"]), r["variant"], f"{r['accuracy']:.1%}", f"{r['stderr']:.1%}",
         *[f"{r['by_type'][t]:.1%}" if t in r["by_type"] else "" for t in types],
         f"{r['recipe_accuracy']:.1%}" if "recipe_accuracy" in r else "", f"{r['eval_seconds']:.1f}"]
        for r in report["runs"]
    ])
    lines += ["", "First-token time (ms) over the timed rounds:", ""]
    timing = report["first_token_s"]
    lines += _table(["variant", "median", "min", "max", "rounds"], [
        [row["name"], f"{1e3 * timing[row['name']]['median']:.2f}", f"{1e3 * timing[row['name']]['min']:.2f}",
         f"{1e3 * timing[row['name']]['max']:.2f}", str(len(timing[row["name"]]["runs"]))]
        for row in rows
    ])
    lines += ["", "Training (accuracy: the ablation's evaluation after training, on all held-out questions):", ""]
    lines += _table(["model", "seed", "accuracy", "stage 1 s", "stage 2 s", "stage-2 loss", "reused"], [
        [t["model"], str(t["seed"]), f"{t['accuracy']:.1%}", f"{t['stage1_seconds']:.0f}",
         f"{t['stage2_seconds']:.0f}", f"{t['stage2_loss']:.3f}", "yes" if t["reused"] else "no"]
        for t in report["training"]
    ])
    load = machine.get("load_average_1_5_15_min")
    lines += ["", (f"Machine: {environment_line(machine)}; lmms-eval {machine['lmms_eval']}; "
                   f"load average (1/5/15 min) {load} before, {machine.get('load_average_after')} after.")]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy against first-token time: one marker and colour per method, each point
    labelled with its tokens, the seed spread as vertical error bars."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    rows = summarize(report)
    figure = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = figure.subplots()
    for method in dict.fromkeys(row["method"] for row in rows):
        label, marker, colour = METHOD_STYLES.get(method, (method, "o", "grey"))
        points = [row for row in rows if row["method"] == method]
        ax.errorbar([row["first_token_ms"] for row in points], [100 * row["accuracy"]["mean"] for row in points],
                    yerr=[100 * row["accuracy"]["std"] for row in points], marker=marker, color=colour,
                    markersize=9 if marker == "*" else 6, capsize=3, linestyle="none", label=label)
        for row in points:
            ax.annotate(row["tokens_label"], (row["first_token_ms"], 100 * row["accuracy"]["mean"]),
                        textcoords="offset points", xytext=(5, 4), fontsize=7, color=colour)
    reference = next((row for row in rows if row["name"] == REFERENCE), None)
    if reference is not None:
        ax.axhline(100 * reference["accuracy"]["mean"], color="black", linewidth=0.8, linestyle=":")
        ax.axvline(reference["first_token_ms"], color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel(f"time to first token, ms (median of {report['settings']['rounds']} rounds, batch 1, "
                  f"{report['settings']['timing_device']})")
    ax.set_ylabel("held-out accuracy, % (lmms-eval exact match)")
    ax.margins(x=0.08)  # room for the labels of the outermost points
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    figure.suptitle(f"Tiny FlashSloth: accuracy against first-token time; labels: image tokens per picture "
                    f"(mean ± std over {len(report['seeds'])} seed(s))", fontsize=9)
    figure.savefig(path, dpi=120)


def write_report(report: dict[str, Any], out_dir: Path, stem: str = "tradeoff") -> list[Path]:
    """Write ``<stem>.json`` (report + summary), ``<stem>.md`` and ``<stem>.png`` to ``out_dir``."""
    full = {**report, "summary": summarize(report)}
    return write_report_files(full, render_markdown(report), lambda path: plot(report, path), out_dir, stem)
