"""What a run shows a person: a table in the terminal, `report.md`, and PNG plots next to the numbers."""

import json
import textwrap
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from steper_dspy.evals.evaluate import EvaluationReport
from steper_dspy.evals.experiment.systems import SYSTEMS
from steper_dspy.evals.stats import mcnemar_p, paired_bootstrap_p
from steper_dspy.stages import STAGES

console = Console()

COLUMNS = (
    "accuracy",
    "accuracy_ci95",
    "accuracy_per_seed",
    "em",
    "f1",
    "recall",
    "avg_steps",
    "failures",
    "n",
    "s/question",
    "tokens/s",
)
LABELS = {"accuracy_ci95": "accuracy 95% CI", "accuracy_per_seed": "accuracy per seed"}
PAPER_METRICS = ("accuracy", "em", "f1")

# Results of a run: test set name -> system name -> its evaluation.
Results = dict[str, dict[str, EvaluationReport]]


def results_table(results: dict[str, EvaluationReport], title: str = "Held-out questions") -> Table:
    """A rich table: one row per system, accuracy / EM / F1 / recall / steps / failures."""
    table = Table(title=title)
    table.add_column("system")
    for column in COLUMNS:
        table.add_column(LABELS.get(column, column), justify="right")
    for system, report in results.items():
        summary = report.summary()
        table.add_row(system, *(_cell(summary, column) for column in COLUMNS))
    return table


def paper_table(results: Results) -> Table:
    """A rich table in the paper's shape: one row per system, accuracy / EM / F1 per test set."""
    table = Table(title="Accuracy / EM / F1 per test set")
    table.add_column("system")
    for name in results:
        for metric in PAPER_METRICS:
            table.add_column(f"{name} {metric}", justify="right")
    for system in _systems(results):
        table.add_row(system, *_paper_cells(results, system))
    return table


def _systems(results: Results) -> list[str]:
    return list(dict.fromkeys(system for by_system in results.values() for system in by_system))


def _paper_cells(results: Results, system: str) -> list[str]:
    return [
        _fmt(getattr(by_system[system], metric)) if system in by_system else "-"
        for by_system in results.values()
        for metric in PAPER_METRICS
    ]


def _cell(summary: dict[str, Any], column: str) -> str:
    """One summary figure as a table cell: an interval as low-high, a system's seeds as a / b / c."""
    if column == "accuracy_per_seed" and summary.get(column):
        return " / ".join(f"{value:.1f}" for value in summary[column])
    return _fmt(summary.get(column))


def _fmt(value: float | int | list | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return "-".join(f"{v:.1f}" for v in value)
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def plot_training(log_path: Path, out: Path) -> Path | None:
    """Plot loss and sigma per stage over training steps from a ``stage_log.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not log_path.exists():
        return None
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "step" in row and any(f"loss_{s.value}" in row for s in STAGES)]
    if not rows:
        return None
    fig, (loss_ax, sigma_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for stage in STAGES:
        points = [(r["step"], r[f"loss_{stage.value}"]) for r in rows if r.get(f"loss_{stage.value}") is not None]
        if points:
            loss_ax.plot(*zip(*points, strict=True), marker=".", label=stage.value)
        sigmas = [(r["step"], r[f"sigma_{stage.value}"]) for r in rows if r.get(f"sigma_{stage.value}") is not None]
        if sigmas:
            sigma_ax.plot(*zip(*sigmas, strict=True), marker=".", label=stage.value)
    loss_ax.set(title="token cross-entropy per stage", xlabel="step", ylabel="loss")
    sigma_ax.set(title="difficulty sigma per stage", xlabel="step", ylabel="sigma")
    loss_ax.legend()
    sigma_ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_accuracy(results: Results, out: Path) -> Path:
    """Bar chart of accuracy, EM and F1 per system, one panel per test set, stacked, on a shared percent axis
    that ends a little above the highest bar (its interval included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = _systems(results)
    width = 0.8 / len(PAPER_METRICS)
    # The 95% bootstrap interval over questions of each accuracy, computed once for the error bars and the axis.
    intervals = {
        name: {s: report.summary()["accuracy_ci95"] for s, report in by_system.items()}
        for name, by_system in results.items()
    }
    top = max(
        [getattr(report, metric) for by_system in results.values() for report in by_system.values()
         for metric in PAPER_METRICS]
        + [high for by_system in intervals.values() for _, high in by_system.values()]
    )  # fmt: skip
    fig, axes = plt.subplots(len(results), 1, figsize=(max(5, 1.5 * len(systems)), 3.4 * len(results)), squeeze=False)
    for ax, (name, by_system) in zip(axes[:, 0], results.items(), strict=True):
        for i, metric in enumerate(PAPER_METRICS):
            values = [getattr(by_system[s], metric) if s in by_system else 0.0 for s in systems]
            errors = None
            if metric == "accuracy":
                bounds = [intervals[name].get(s, [0, 0]) for s in systems]
                errors = [[max(0.0, v - lo) for v, (lo, _) in zip(values, bounds, strict=True)],
                          [max(0.0, hi - v) for v, (_, hi) in zip(values, bounds, strict=True)]]  # fmt: skip
            xs = [x + i * width for x in range(len(systems))]
            bars = ax.bar(xs, values, width, label=metric, yerr=errors, capsize=3 if errors else 0)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks([x + width for x in range(len(systems))], [textwrap.fill(s, 14) for s in systems], fontsize=8)
        ax.set(ylabel="%", ylim=(0, min(105, 1.15 * top + 5)), title=name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# The paper's claims: STEPER against the baselines, against fixed per-stage weights (its weighting ablation) and
# against training on fewer stages' data (its data ablation), on the same questions.
COMPARED = tuple(
    (SYSTEMS["steper"].name, SYSTEMS[other].name)
    for other in ("vanilla-kd", "stepwise-kd", "fixed", "steper-agg-init", "steper-agg-expand")
)


def comparisons(results: Results) -> dict[str, dict[str, dict[str, float]]]:
    """Paired tests of STEPER against each baseline per test set: the accuracy difference (points), the paired
    bootstrap p-value over questions, and McNemar's exact p-value (when every run answered 1/0 per question)."""
    tests: dict[str, dict[str, dict[str, float]]] = {}
    for name, by_system in results.items():
        for ours, theirs in COMPARED:
            if ours not in by_system or theirs not in by_system:
                continue
            a = [float(row["accuracy"]) for row in by_system[ours].rows]
            b = [float(row["accuracy"]) for row in by_system[theirs].rows]
            test = {"difference": 100 * (sum(a) - sum(b)) / len(a), "p_value": paired_bootstrap_p(a, b), "n": len(a)}
            if all(x in (0.0, 1.0) for x in a + b):
                test["mcnemar_p"] = mcnemar_p([x == 1.0 for x in a], [x == 1.0 for x in b])
            tests.setdefault(name, {})[f"{ours} vs {theirs}"] = test
    return tests


def write_report(
    out_dir: Path,
    results: Results,
    *,
    title: str,
    details: dict[str, str],
    timings: dict[str, float],
    harvest_summary: str | None = None,
    training: dict[str, list[dict[str, Any]]] | None = None,
    training_log: Path | None = None,
) -> Path:
    """Write ``report.md`` (results per test set, per-type breakdown, training runs, timings, plots) and
    ``results.json``. `training` holds each trained system's runs (seed and `TrainingResult.figures()`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    lines += [f"- **{key}**: {value}" for key, value in details.items()]
    if len(results) > 1:
        header = [f"{name} {metric}" for name in results for metric in PAPER_METRICS]
        lines += ["", "## Accuracy / EM / F1 per test set", ""]
        lines += ["| system | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
        lines += [f"| {system} | " + " | ".join(_paper_cells(results, system)) + " |" for system in _systems(results)]
    if any(results.values()):
        accuracy_png = plot_accuracy(results, out_dir / "accuracy.png")
        lines += ["", f"![accuracy per system]({accuracy_png.name})"]
    for name, by_system in results.items():
        lines += ["", f"## {name}", ""] + _test_set_lines(by_system)
    paired = comparisons(results)
    if paired:
        lines += ["", "## Paired tests (accuracy, same questions)", ""]
        lines += [
            "| test set | comparison | difference (points) | paired bootstrap p | McNemar p | n |",
            "|---|---|---|---|---|---|",
        ]
        for name, tests in paired.items():
            for label, t in tests.items():
                difference = round(t["difference"], 1) + 0.0  # float noise below 0 would print "-0.0"
                lines.append(
                    f"| {name} | {label} | {difference:+.1f} | {t['p_value']:.3f} | "
                    f"{'-' if 'mcnemar_p' not in t else format(t['mcnemar_p'], '.3f')} | {t['n']} |"
                )
    if harvest_summary:
        lines += ["", "## Harvest", "", "```", harvest_summary, "```"]
    if training:
        lines += ["", "## Training runs", ""] + _training_lines(training)
    if training_log is not None:
        png = plot_training(training_log, out_dir / "training.png")
        if png:
            lines += ["", "## Training", "", f"![loss and sigma per stage]({png.name})"]
    total = sum(timings.values())
    lines += ["", "## Time", "", "| stage | seconds | share |", "|---|---|---|"]
    lines += [f"| {name} | {sec:.1f} | {100 * sec / total:.0f}% |" for name, sec in timings.items() if total]
    lines.append(f"| total | {total:.1f} | 100% |")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    scores = {
        name: {
            system: {**r.summary(), "by_type": r.by_type, "by_hops": {str(k): v for k, v in r.by_hops.items()}}
            for system, r in by_system.items()
        }
        for name, by_system in results.items()
    }
    (out_dir / "results.json").write_text(
        json.dumps(
            {
                "details": details,
                "timings": timings,
                "results": scores,
                "comparisons": paired,
                "training": training or {},
            },
            indent=2,
        )
    )
    return path


def _training_lines(training: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown: one row per trained run, with its samples, time, speed, final loss and sigma per stage."""
    lines = [
        "| system | seed | samples per stage | train s | tokens/s | final loss | sigma per stage |",
        "|---|---|---|---|---|---|---|",
    ]
    for system, runs in training.items():
        for run in runs:
            samples = ", ".join(f"{k} {v}" for k, v in run.get("num_samples", {}).items())
            sigmas = ", ".join(f"{k} {v:.2f}" for k, v in run.get("sigmas", {}).items())
            loss = "-" if run.get("final_loss") is None else f"{run['final_loss']:.3f}"
            seconds = f"same training as {run['same_as']}" if run.get("same_as") else _fmt(run.get("train_seconds"))
            lines.append(
                f"| {system} | {run['seed']} | {samples} | {seconds} | "
                f"{_fmt(run.get('tokens_per_second'))} | {loss} | {sigmas} |"
            )
    return lines


def _test_set_lines(results: dict[str, EvaluationReport]) -> list[str]:
    """Markdown: the results table of one test set, why questions failed, and accuracy by question type and hops."""
    lines = ["| system | " + " | ".join(LABELS.get(c, c) for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    reasons: dict[str, dict[str, float]] = {}
    for system, report in results.items():
        summary = report.summary()
        lines.append(f"| {system} | " + " | ".join(_cell(summary, c) for c in COLUMNS) + " |")
        if summary.get("failure_reasons"):
            reasons[system] = summary["failure_reasons"]
    if reasons:
        lines += ["", "Failed questions by reason (per run):", ""]
        lines += [f"- {system}: {_reasons(by_reason)}" for system, by_reason in reasons.items()]
    groups = sorted(
        {(kind, key) for r in results.values() for kind in ("type", "hops") for key in getattr(r, f"by_{kind}")},
        key=str,
    )
    if groups:
        lines += ["", "Accuracy by question type and hops:", ""]
        lines += ["| group | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
        for kind, key in groups:
            cells = [_fmt(getattr(r, f"by_{kind}").get(key, {}).get("accuracy")) for r in results.values()]
            lines.append(f"| {kind} {key} | " + " | ".join(cells) + " |")
    return lines


def _reasons(counts: dict[str, float], shown: int = 5) -> str:
    """The most frequent failure reasons with their counts, the rest summed into "other"."""
    parts = [f"{round(count, 1):g} {reason}" for reason, count in list(counts.items())[:shown]]
    rest = sum(list(counts.values())[shown:])
    return ", ".join(parts + ([f"{round(rest, 1):g} other"] if rest else []))


def print_results(results: Results) -> None:
    """Print one table per test set, and the paper-shaped table when there are several."""
    for name, by_system in results.items():
        console.print(results_table(by_system, title=name))
    if len(results) > 1:
        console.print(paper_table(results))
