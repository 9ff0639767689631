"""The training-free benchmark's report: statistics over seeds, JSON, Markdown and a PNG chart."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.report_files import write_report_files
from tokencompress.environment import environment_line

__all__ = ["REFERENCE", "paired_differences", "plot", "render_markdown", "summarize", "write_report"]

#: The uncompressed model's method name in the runs.
REFERENCE = "none"


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min, max and n."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _paired(report: dict[str, Any], a: tuple[str, int], b: tuple[str, int]) -> dict[str, Any] | None:
    """Accuracy of (method, budget) `a` minus `b` on the seeds that have both."""
    accuracy = {(r["method"], r["budget"], r["seed"]): r["accuracy"] for r in report["runs"]}
    seeds = [s for s in report["seeds"] if (*a, s) in accuracy and (*b, s) in accuracy]
    if not seeds:
        return None
    diffs = [accuracy[(*a, s)] - accuracy[(*b, s)] for s in seeds]
    return {"per_seed": diffs, "positive": sum(d > 0 for d in diffs), **_stats(diffs)}


def _labels(report: dict[str, Any]) -> dict[str, str]:
    return {REFERENCE: "uncompressed", **{m["name"]: m["label"] for m in report["methods"]}}


def summarize(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (method, budget), in the runs' order: accuracy and per-type statistics
    over seeds, the tokens really fed, and the paired change against the uncompressed model."""
    keys = list(dict.fromkeys((r["method"], r["budget"]) for r in report["runs"]))
    reference = next(((m, b) for m, b in keys if m == REFERENCE), None)
    labels = _labels(report)
    rows = []
    for method, budget in keys:
        runs = [r for r in report["runs"] if (r["method"], r["budget"]) == (method, budget)]
        types = sorted({t for r in runs for t in r["by_type"]})
        change = None
        if reference is not None and (method, budget) != reference:
            change = _paired(report, (method, budget), reference)
        rows.append({
            "method": method,
            "label": labels.get(method, method),
            "budget": budget,
            "compressor": runs[0]["compressor"],
            # Every seed feeds the same count; a set of one unless something went wrong.
            "visual_tokens": sorted({r["visual_tokens"] for r in runs}),
            "placeholders": sorted({r["placeholders"] for r in runs}),
            "accuracy": _stats([r["accuracy"] for r in runs]),
            "by_type": {t: _stats([r["by_type"][t] for r in runs if t in r["by_type"]]) for t in types},
            "change_vs_uncompressed": change,
            "prior": statistics.fmean(r["prior"] for r in runs),
            "chance": statistics.fmean(r["chance"] for r in runs),
            "seeds": [r["seed"] for r in runs],
        })
    return rows


def paired_differences(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every two methods at a budget both run at (a before b in the runs' order; AvgPool
    last), as accuracy differences on the same seeds, so on the same trained model."""
    methods = [m for m in dict.fromkeys(r["method"] for r in report["runs"]) if m != REFERENCE]
    budgets = sorted({r["budget"] for r in report["runs"] if r["method"] != REFERENCE}, reverse=True)
    found = []
    for budget in budgets:
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                diff = _paired(report, (a, budget), (b, budget))
                if diff is not None:
                    found.append({"a": a, "b": b, "budget": budget, **diff})
    return found


def _pct(stats: dict[str, Any]) -> str:
    return f"{stats['mean']:.1%} ± {stats['std']:.1%}"


def _points(stats: dict[str, Any]) -> str:
    return f"{100 * stats['mean']:+.1f} ± {100 * stats['std']:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _tokens(values: list[int]) -> str:
    return "/".join(str(v) for v in values)


def render_markdown(report: dict[str, Any]) -> str:
    """The results as Markdown: accuracy by method and tokens kept, the details per row,
    paired differences, training and per-run lists, the machine."""
    rows, settings, machine = summarize(report), report["settings"], report["machine"]
    types = sorted({t for row in rows for t in row["by_type"]})
    budgets = sorted({row["budget"] for row in rows}, reverse=True)
    splits = ", ".join(f"{b} = {d} + {c}" for b, (d, c) in settings["visionzip_splits"].items())
    lines = [
        "# Training-free token reduction: accuracy against tokens kept (tiny FlashSloth)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"One model per seed, trained uncompressed ({settings['all_tokens']} tokens per picture, the 9x9 grid; "
        f"the ablation's `none` variant: stage 1 {settings['stage1_steps']} steps, stage 2 "
        f"{settings['stage2_steps']} steps, batch {settings['batch_size']}, {settings['num_train']} training "
        f"pictures), then each method grafted at inference with no retraining, on the "
        f"{settings['num_test']} held-out questions of the synthetic \"detail\" set. Seeds {report['seeds']} "
        f"(data and initialisation; every method is evaluated on the same model). VisionZip's dominant + "
        f"contextual split: {splits}. This command took {report['wall_seconds']:.0f} s; of the "
        f"{len(report['training'])} models it trained {sum(not t['reused'] for t in report['training'])} and "
        f"reused {sum(t['reused'] for t in report['training'])} from an earlier run (see Training).",
        "",
        "Accuracy over all questions, mean ± sample standard deviation over seeds, by tokens kept per picture:",
        "",
    ]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    cell = {(row["method"], row["budget"]): row for row in rows}
    lines += _table(["method", *[f"{b} tokens" for b in budgets]], [
        [method, *[_pct(cell[(method, b)]["accuracy"]) if (method, b) in cell else "" for b in budgets]]
        for method in methods
    ])
    lines += ["", "Per row: tokens really fed per picture (image features / prompt placeholders), "
                  "accuracy [min-max], per question type, and the paired change against the "
                  "uncompressed model (accuracy points, mean ± std over seeds):", ""]
    body = []
    for row in rows:
        acc, change = row["accuracy"], row["change_vs_uncompressed"]
        body.append([
            row["method"], str(row["budget"]), f"{_tokens(row['visual_tokens'])} / {_tokens(row['placeholders'])}",
            f"{_pct(acc)} [{acc['min']:.1%}-{acc['max']:.1%}]",
            *[_pct(row["by_type"][t]) if t in row["by_type"] else "" for t in types],
            _points(change) if change else "", f"{change['positive']}/{change['n']}" if change else "",
        ])
    lines += _table(["method", "budget", "tokens fed", "accuracy [min-max]", *types,
                     "change vs uncompressed", "seeds better"], body)
    if rows:
        lines += ["", f"Answer prior (most frequent answer per type): {rows[0]['prior']:.1%}; "
                      f"uniform chance: {rows[0]['chance']:.1%}."]
    diffs = paired_differences(report)
    if diffs:
        lines += ["", "Paired differences between methods at the same budget (same seed, same model), "
                      "accuracy points:", ""]
        lines += _table(["a - b", "tokens", "mean ± std", "per seed", "a better on"], [
            [f"{d['a']} - {d['b']}", str(d["budget"]), _points(d), ", ".join(f"{100 * x:+.1f}" for x in d["per_seed"]),
             f"{d['positive']}/{d['n']} seeds"]
            for d in diffs
        ])
    lines += ["", "Compressors:", ""]
    lines += _table(["method", "label", "budget", "compressor"], [
        [row["method"], row["label"], str(row["budget"]), f"`{row['compressor']}`" if row["compressor"] else "none"]
        for row in rows
    ])
    lines += ["", "Training (uncompressed; accuracy as the ablation's evaluation after training):", ""]
    lines += _table(["seed", "accuracy", "stage 1 s", "stage 2 s", "stage-2 loss", "threads", "reused"], [
        [str(t["seed"]), f"{t['accuracy']:.1%}", f"{t['stage1_seconds']:.0f}", f"{t['stage2_seconds']:.0f}",
         f"{t['stage2_loss']:.3f}", str(t["threads"]), "yes" if t["reused"] else "no"]
        for t in report["training"]
    ])
    lines += ["", "Per run:", ""]
    lines += _table(["seed", "method", "budget", "accuracy", *types, "eval s"], [
        [str(r["seed"]), r["method"], str(r["budget"]), f"{r['accuracy']:.1%}",
         *[f"{r['by_type'].get(t, float('nan')):.1%}" for t in types], f"{r['eval_seconds']:.1f}"]
        for r in report["runs"]
    ])
    load = machine.get("load_average_1_5_15_min")
    lines += ["", f"Machine: {environment_line(machine)}; "
                  f"load average (1/5/15 min) {load} before, {machine.get('load_average_after')} after."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy against tokens kept, one line per method, seed spread as error bars, the
    uncompressed model as a reference band; one panel for all questions, one per type."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    rows = summarize(report)
    types = sorted({t for row in rows for t in row["by_type"]})
    panels = [("all questions", lambda row: row["accuracy"])] + [
        (t, lambda row, t=t: row["by_type"].get(t)) for t in types
    ]
    figure = Figure(figsize=(3.6 * len(panels) + 0.4, 3.8), layout="constrained")
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    budgets = sorted({row["budget"] for row in rows})
    reference = next((row for row in rows if row["method"] == REFERENCE), None)
    methods = [m for m in dict.fromkeys(row["method"] for row in rows) if m != REFERENCE]
    for ax, (title, get) in zip(axes, panels):
        if reference is not None and get(reference) is not None:
            stats = get(reference)
            mean, std = 100 * stats["mean"], 100 * stats["std"]
            ax.axhline(mean, color="black", linewidth=1, label=f"uncompressed ({reference['budget']})")
            ax.axhspan(mean - std, mean + std, color="black", alpha=0.08, linewidth=0)
            ax.errorbar([reference["budget"]], [mean], yerr=[std], color="black", marker="D", capsize=3)
        for k, method in enumerate(methods):
            points = [(row["budget"], get(row)) for row in rows if row["method"] == method and get(row) is not None]
            if not points:
                continue
            # A small sideways offset per method, so overlapping error bars stay readable.
            xs = [b * (1 + 0.025 * (k - (len(methods) - 1) / 2)) for b, _ in points]
            ax.errorbar(xs, [100 * s["mean"] for _, s in points], yerr=[100 * s["std"] for _, s in points],
                        marker="o" if len(points) > 1 else "s", capsize=3, label=method,
                        linestyle="-" if len(points) > 1 else "none")
        if rows and ax is axes[0]:  # the prior is over all questions; the types have their own
            ax.axhline(100 * rows[0]["prior"], color="grey", linestyle="--", linewidth=1, label="answer prior")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("visual tokens kept per picture")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 105)
    axes[0].set_ylabel("held-out accuracy (%)")
    axes[0].legend(fontsize=7, loc="lower right")
    figure.suptitle(f"Tiny FlashSloth trained uncompressed, reduced at inference only: mean ± std over "
                    f"{len(report['seeds'])} seed(s)", fontsize=10)
    figure.savefig(path, dpi=120)


def write_report(report: dict[str, Any], out_dir: Path, stem: str = "training_free") -> list[Path]:
    """Write ``<stem>.json`` (runs + summary), ``<stem>.md`` and ``<stem>.png`` to ``out_dir``."""
    full = {**report, "summary": summarize(report), "paired_differences": paired_differences(report)}
    return write_report_files(full, render_markdown(report), lambda path: plot(report, path), out_dir, stem)
