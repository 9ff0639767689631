"""The ablation's report: per-variant statistics over seeds, JSON, Markdown and a PNG chart."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.report_files import write_report_files
from tokencompress.environment import environment_line

__all__ = ["CONTRASTS", "paired_differences", "render_markdown", "plot", "summarize", "write_report"]

# The paper's claims as paired (same seed) differences: (better?, than, what it tests).
CONTRASTS = (
    ("sap", "avgpool", "SAP beats average pooling at the same token budget"),
    ("sap_embq9", "sap", "EmbQ (9 queries) adds to SAP"),
    ("sap_embq3", "sap", "EmbQ (3 queries) adds to SAP"),
    ("none", "sap_embq9", "what is left of the gap to no compression"),
    ("none", "avgpool", "what average pooling loses"),
)


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
    """One row per variant (in the report's order): accuracy and per-type stats, tokens, time."""
    rows = []
    for variant in report["variants"]:
        runs = [r for r in report["runs"] if r["variant"] == variant["name"]]
        if not runs:
            continue
        types = sorted({t for r in runs for t in r["by_type"]})
        rows.append({
            **variant,
            "visual_tokens": runs[0]["visual_tokens"],
            "token_budget": runs[0]["token_budget"],
            "accuracy": _stats([r["accuracy"] for r in runs]),
            "by_type": {t: _stats([r["by_type"][t] for r in runs if t in r["by_type"]]) for t in types},
            "train_seconds": _stats([r["stage1_seconds"] + r["stage2_seconds"] for r in runs]),
            "stage2_loss": _stats([r["stage2_loss"] for r in runs]),
            "prior": statistics.fmean(r["prior"] for r in runs),
            "chance": statistics.fmean(r["chance"] for r in runs),
            "seeds": [r["seed"] for r in runs],
            "curve": _mean_curve(runs),
        })
    return rows


def _mean_curve(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy at each evaluated stage-2 step, over the runs that have that step."""
    steps = sorted({point["step"] for r in runs for point in r.get("curve", [])})
    curve = []
    for step in steps:
        values = [p["accuracy"] for r in runs for p in r.get("curve", []) if p["step"] == step]
        curve.append({"step": step, "accuracy": _stats(values)})
    return curve


def paired_differences(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Accuracy differences between two variants on the same seeds (same data, same init)."""
    accuracy = {(r["variant"], r["seed"]): r["accuracy"] for r in report["runs"]}
    found = []
    for better, than, claim in CONTRASTS:
        seeds = [s for s in report["seeds"] if (better, s) in accuracy and (than, s) in accuracy]
        if not seeds:
            continue
        diffs = [accuracy[(better, s)] - accuracy[(than, s)] for s in seeds]
        found.append({"a": better, "b": than, "claim": claim, "per_seed": diffs,
                      "positive": sum(d > 0 for d in diffs), **_stats(diffs)})
    return found


def _pct(stats: dict[str, Any]) -> str:
    return f"{stats['mean']:.1%} ± {stats['std']:.1%}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_markdown(report: dict[str, Any]) -> str:
    """The results as Markdown: the command, per-variant table, paired differences, per-run list."""
    rows, settings, machine = summarize(report), report["settings"], report["machine"]
    types = sorted({t for row in rows for t in row["by_type"]})
    lines = [
        "# Ablation: does SAP + EmbQ work? (tiny CPU reproduction of FlashSloth's Table 3)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Task: synthetic \"detail\" (`recipes.flashsloth.synthetic_detail`), {settings['num_train']} training "
        f"pictures, {settings['num_test']} held-out questions per seed; {settings['image_size']} px pictures, "
        f"9x9 vision patches, window 3. Stage 1 {settings['stage1_steps']} steps, stage 2 "
        f"{settings['stage2_steps']} steps, batch {settings['batch_size']}. Seeds {report['seeds']} "
        "(each seed: its own data set and initialisation, shared by every variant). "
        f"{report['jobs']} run(s) at a time, {report['threads']} thread(s) each; total {report['wall_seconds']:.0f} s.",
        "",
        "Accuracy: mean ± sample standard deviation over seeds [min-max].",
        "",
    ]
    header = ["variant", "Table 3 row", "visual tokens", "+ queries = budget", "accuracy [min-max]",
              *[f"{t}" for t in types], "train s / run", "stage-2 loss"]
    body = []
    for row in rows:
        acc = row["accuracy"]
        body.append([
            row["name"],
            row["label"],
            str(row["visual_tokens"]),
            f"{row['num_queries']} = {row['token_budget']}",
            f"{_pct(acc)} [{acc['min']:.1%}-{acc['max']:.1%}]",
            *[_pct(row["by_type"][t]) if t in row["by_type"] else "" for t in types],
            f"{row['train_seconds']['mean']:.0f}",
            f"{row['stage2_loss']['mean']:.3f}",
        ])
    lines += _table(header, body)
    if rows:
        lines += ["", f"Answer prior (most frequent answer per type): {rows[0]['prior']:.1%}; "
                      f"uniform chance: {rows[0]['chance']:.1%}."]
    steps = sorted({p["step"] for row in rows for p in row["curve"]})
    if len(steps) > 1:
        lines += ["", "Learning curve: held-out accuracy during stage 2 (mean ± std over seeds):", ""]
        lines += _table(["variant", *[f"step {step}" for step in steps]], [
            [row["name"], *[next((_pct(p["accuracy"]) for p in row["curve"] if p["step"] == step), "")
                            for step in steps]]
            for row in rows
        ])
    diffs = paired_differences(report)
    if diffs:
        lines += ["", "Paired differences (same seed), accuracy points:", ""]
        lines += _table(["a - b", "claim", "mean ± std", "per seed", "a better on"], [
            [f"{d['a']} - {d['b']}", d["claim"], f"{100 * d['mean']:+.1f} ± {100 * d['std']:.1f}",
             ", ".join(f"{100 * x:+.1f}" for x in d["per_seed"]), f"{d['positive']}/{d['n']} seeds"]
            for d in diffs
        ])
    lines += ["", "Per run:", ""]
    lines += _table(["variant", "seed", "accuracy", *types, "stage 1 s", "stage 2 s", "eval s"], [
        [r["variant"], str(r["seed"]), f"{r['accuracy']:.1%}",
         *[f"{r['by_type'].get(t, float('nan')):.1%}" for t in types],
         f"{r['stage1_seconds']:.0f}", f"{r['stage2_seconds']:.0f}", f"{r['eval_seconds']:.0f}"]
        for r in report["runs"]
    ])
    load = machine.get("load_average_1_5_15_min")
    lines += ["", f"Machine: {environment_line(machine)}; "
                  f"load average (1/5/15 min) {load} before, {machine.get('load_average_after')} after."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Left: bars of mean accuracy per variant and question type, seed spread as error
    bars. Right: the stage-2 learning curves (mean over seeds)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    rows = summarize(report)
    types = sorted({t for row in rows for t in row["by_type"]})
    series = [("all", lambda row: row["accuracy"])] + [(t, lambda row, t=t: row["by_type"].get(t)) for t in types]
    figure = Figure(figsize=(max(6.0, 1.6 * len(rows) + 2) + 4.5, 4.4), layout="constrained")
    axes, curves = figure.subplots(1, 2, width_ratios=[max(6.0, 1.6 * len(rows) + 2), 4.5])
    width = 0.8 / len(series)
    for k, (name, get) in enumerate(series):
        xs, means, errs = [], [], []
        for i, row in enumerate(rows):
            stats = get(row)
            if stats is not None:
                xs.append(i + (k - (len(series) - 1) / 2) * width)
                means.append(100 * stats["mean"])
                errs.append(100 * stats["std"])
        axes.bar(xs, means, width, yerr=errs, capsize=2, label=name)
    if rows:
        axes.axhline(100 * rows[0]["prior"], color="grey", linestyle="--", linewidth=1, label="answer prior")
    axes.set_xticks(range(len(rows)), [f"{r['name']}\n{r['token_budget']} tokens" for r in rows], fontsize=8)
    axes.set_ylabel("held-out accuracy (%)")
    axes.set_ylim(0, 112)  # room above 100 % for the legend
    axes.set_yticks(range(0, 101, 20))
    axes.set_title(f"Tiny FlashSloth ablation, {len(report['seeds'])} seed(s): mean ± std", fontsize=10)
    axes.legend(fontsize=7, ncols=len(series) + 1, loc="upper left")
    for row in rows:
        points = row["curve"]
        curves.errorbar([p["step"] for p in points], [100 * p["accuracy"]["mean"] for p in points],
                        yerr=[100 * p["accuracy"]["std"] for p in points], marker="o", capsize=2,
                        label=f"{row['name']} ({row['token_budget']})")
    if rows:
        curves.axhline(100 * rows[0]["prior"], color="grey", linestyle="--", linewidth=1)
    curves.set_xlabel("stage-2 step")
    curves.set_ylabel("held-out accuracy (%), all types")
    curves.set_ylim(0, 100)
    curves.set_title("learning curve", fontsize=10)
    curves.legend(fontsize=7, loc="upper left")
    figure.savefig(path, dpi=120)


def write_report(report: dict[str, Any], out_dir: Path, stem: str = "ablation") -> list[Path]:
    """Write ``<stem>.json`` (runs + summary), ``<stem>.md`` and ``<stem>.png`` to ``out_dir``."""
    full = {**report, "summary": summarize(report), "paired_differences": paired_differences(report)}
    return write_report_files(full, render_markdown(report), lambda path: plot(report, path), out_dir, stem)
