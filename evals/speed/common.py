"""What both speed benchmarks share: the machine description, memory probes, the table, JSON and the plot."""

from __future__ import annotations

import importlib
import json
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.table import Table

from steper_dspy.errors import SteperError

BENCH_EXTRA = "pip install -e .[bench]"

# A row of a comparison table: (label, ours, baseline, how to format both, True when larger is better).
Row = tuple[str, float | None, float | None, str, bool]


def require(module: str, package: str) -> ModuleType:
    """Import an optional benchmark dependency, or say how to install it.

    Args:
        module: The module to import, e.g. `"trl"`.
        package: Its distribution name, e.g. `"rank-bm25"`.

    Raises:
        SteperError: The module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise SteperError(
            f"This benchmark needs {package} ({err}): install the benchmark extra with `{BENCH_EXTRA}` "
            f"(or `pip install {package}`)."
        ) from None


def machine() -> dict[str, Any]:
    """The machine a benchmark ran on: CPU model, usable cores, load average, GPU, library versions."""
    from steper_dspy.lm.models import cpu_has_native_bf16, cpu_info

    cpuinfo = cpu_info()
    info: dict[str, Any] = {
        "cpu": cpuinfo.get("model name") or platform.processor() or platform.machine(),
        # AMD family 25 is Zen 3 (model 0-15) or Zen 4, family 26 Zen 5: the same job differs ~2x between them.
        "cpu_family": cpuinfo.get("cpu family"),
        "cpu_model": cpuinfo.get("model"),
        "cpu_native_bf16": cpu_has_native_bf16(),  # without it the in-process engine computes in fp32
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def peak_rss_mb() -> float:
    """The peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def rss_mb() -> float:
    """The resident memory of this process now, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / (1024 * 1024)


class RssPeak:
    """Samples this process's resident memory in a thread while the block runs.

    `ru_maxrss` only ever grows, so it cannot give the peak of one phase after an earlier, larger one;
    this gives the peak of the block itself, relative to the memory when it began.

    Attributes:
        start_mb: Resident memory when the block began.
        peak_mb: The highest resident memory seen during the block.
        end_mb: Resident memory when the block ended.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start_mb = self.peak_mb = self.end_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RssPeak:
        self.start_mb = self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.end_mb = rss_mb()
        self.peak_mb = max(self.peak_mb, self.end_mb)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """`(fn(), wall seconds)`."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def ratio(ours: float | None, baseline: float | None) -> float | None:
    """`ours / baseline`, or None when either is missing or the baseline is zero."""
    if ours is None or baseline is None or baseline == 0:
        return None
    return ours / baseline


def comparison_table(title: str, rows: Sequence[Row], *, ours: str, baseline: str) -> Table:
    """A rich table: one figure per row, ours and the baseline's side by side, and their ratio.

    Args:
        title: The table title.
        rows: `(label, ours, baseline, format, higher_is_better)` per figure.
        ours: Header of our column.
        baseline: Header of the baseline's column.
    """
    table = Table(title=title)
    for header in ("figure", ours, baseline, "ratio ours/baseline"):
        table.add_column(header, justify="left" if header == "figure" else "right")
    for label, mine, theirs, fmt, higher_is_better in rows:
        value = ratio(mine, theirs)
        shown = "-" if value is None else f"{value:.2f}x"
        if value is not None and label_marks_better(value, higher_is_better):
            shown = f"[green]{shown}[/green]"
        table.add_row(label, _fmt(mine, fmt), _fmt(theirs, fmt), shown)
    return table


def label_marks_better(value: float, higher_is_better: bool) -> bool:
    """Whether a ratio ours/baseline means ours is better by more than 5%."""
    return value > 1.05 if higher_is_better else value < 0.95


def markdown_table(rows: Sequence[Row], *, ours: str, baseline: str) -> str:
    """The rows of `comparison_table` as a Markdown table (for BENCHMARKS.md)."""
    lines = [f"| figure | {ours} | {baseline} | ratio ours/baseline |", "|---|---:|---:|---:|"]
    for label, mine, theirs, fmt, _ in rows:
        value = ratio(mine, theirs)
        lines.append(
            f"| {label} | {_fmt(mine, fmt)} | {_fmt(theirs, fmt)} | {'-' if value is None else f'{value:.2f}x'} |"
        )
    return "\n".join(lines)


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def write_json(path: Path, value: dict[str, Any]) -> Path:
    """Write `value` as indented JSON to `path` (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    return path


def bar_plot(
    out: Path, panels: Sequence[tuple[str, Sequence[str], dict[str, Sequence[float | None]]]], *, log: bool = False
) -> Path:
    """Grouped bar charts side by side, one panel per figure.

    Args:
        out: The PNG file to write.
        panels: `(title, group labels, {series name: one value per group})` per panel; None values are skipped.
        log: Log-scale y axes (for figures that span orders of magnitude).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, groups, series) in zip(axes[0], panels, strict=True):
        width = 0.8 / max(1, len(series))
        for i, (name, values) in enumerate(series.items()):
            xs = [x + i * width for x, v in enumerate(values) if v is not None]
            ys = [v for v in values if v is not None]
            bars = ax.bar(xs, ys, width, label=name)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(groups))], groups, fontsize=8)
        ax.set_title(title, fontsize=9)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
