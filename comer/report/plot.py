"""The metric against each swept value: one panel per swept key, one line per combination of the other
swept keys, every point labelled with its value; PNG and SVG (matplotlib)."""
from __future__ import annotations

import math
from pathlib import Path

from .runs import FINISHED, Run, natural_key
from .sweep import is_choice
from .table import Table, metric_label

PANEL_SIZE = (5.6, 4.2)  # inches per panel
DPI = 150
MAX_PANELS_PER_ROW = 3
MAX_NOTED_RUNS = 8  # runs named under the plot as not plotted


def _as_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _ordered_values(table: Table, key: str, runs: list[Run]) -> list[str]:
    """The sweep's own order where it declared one, else numbers by value and names naturally."""
    present = list(dict.fromkeys(table.value(run, key) for run in runs))
    declared = [v for v in table.order.get(key, []) if v in present]
    rest = [v for v in present if v not in declared]
    if all(_as_float(v) is not None for v in rest):
        rest.sort(key=lambda v: _as_float(v))
    else:
        rest.sort(key=natural_key)
    return declared + rest


def plot_sweep(table: Table, out_stem: str | Path, metric: str | None = None) -> list[Path]:
    """Draws `metric` (default: the runs' monitor, else the first metric column) against every swept key
    and writes `<out_stem>.png` and `.svg`. Returns the files written (none when nothing was swept or no
    run has the metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or table.monitor or (table.metrics[0] if table.metrics else None)
    if metric is None or not table.swept:
        return []
    scored = [run for run in table.runs if table.metric(run, metric) is not None]
    if not scored:
        return []
    missing = [run for run in table.runs if table.metric(run, metric) is None]

    panels = len(table.swept)
    columns = min(panels, MAX_PANELS_PER_ROW)
    rows = math.ceil(panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows + 0.4),
                                squeeze=False)
    for index, key in enumerate(table.swept):
        _panel(axes[index // columns][index % columns], table, key, scored, metric)
    for index in range(panels, rows * columns):
        axes[index // columns][index % columns].set_visible(False)

    notes = []
    if any(run.state != FINISHED for run in scored):
        so_far = "best validation so far" if table.at_best else "latest validation"
        notes.append(f"open markers: runs not finished (their {so_far})")
    if missing:
        notes.append(f"not plotted (no {metric}):")
        notes += [f"    {table.label(r)} ({r.state})" for r in missing[:MAX_NOTED_RUNS]]
        if len(missing) > MAX_NOTED_RUNS:
            notes.append(f"    and {len(missing) - MAX_NOTED_RUNS} more (see the table)")
    shared = " ".join(f"{k}={v}" for k, v in table.fixed.items() if is_choice(k, v))
    at = f", at each run's best {table.monitor}" if table.at_best else ""
    title = f"{metric}{at} ({table.counts()})" + (f"\n{shared}" if shared else "")
    figure.suptitle(title, fontsize=12)
    height = figure.get_figheight()
    for index, note in enumerate(reversed(notes)):  # one text per line, bottom up
        figure.text(0.01, (0.1 + 0.16 * index) / height, note, fontsize=8, va="bottom", ha="left")
    figure.tight_layout(rect=(0, (0.15 + 0.16 * len(notes)) / height if notes else 0, 1, 0.93 if shared else 0.95))
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text (searchable, editable)
        for suffix in (".png", ".svg"):
            path = stem.with_suffix(suffix)
            figure.savefig(path, dpi=DPI)
            written.append(path)
    plt.close(figure)
    return written


def _panel(axis, table: Table, key: str, runs: list[Run], metric: str) -> None:
    others = [k for k in table.swept if k != key]
    values = _ordered_values(table, key, runs)
    numeric = all(_as_float(v) is not None for v in values)
    positions = {v: (_as_float(v) if numeric else i) for i, v in enumerate(values)}
    lines: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        lines.setdefault(tuple(table.value(run, k) for k in others), []).append(run)
    for line_values, members in sorted(lines.items(), key=lambda item: [natural_key(v) for v in item[0]]):
        members.sort(key=lambda r: positions[table.value(r, key)])
        xs = [positions[table.value(r, key)] for r in members]
        ys = [100 * table.metric(r, metric) for r in members]
        label = ", ".join(f"{k}={v}" for k, v in zip(others, line_values)) or "all runs"
        (drawn,) = axis.plot(xs, ys, "-", linewidth=1.5, label=label)
        for run, x, y in zip(members, xs, ys):
            finished = run.state == FINISHED
            axis.plot([x], [y], "o", markersize=7, color=drawn.get_color(),
                      markerfacecolor=drawn.get_color() if finished else "white")
            axis.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=9)
    axis.set_xlabel(key, fontsize=11)
    axis.set_ylabel(metric_label(metric), fontsize=11)
    axis.set_title(f"{metric} vs {key}", fontsize=11)
    if numeric:
        finite = [positions[v] for v in values]
        if min(finite) > 0 and max(finite) / min(finite) >= 10:
            axis.set_xscale("log")
        axis.set_xticks(finite)
        axis.set_xticklabels(values)
    else:
        axis.set_xticks(range(len(values)))
        axis.set_xticklabels(values, rotation=20 if max(map(len, values)) > 8 else 0,
                             ha="right" if max(map(len, values)) > 8 else "center")
        axis.set_xlim(-0.5, len(values) - 0.5)
    low, high = axis.get_ylim()
    axis.set_ylim(low, high + 0.08 * (high - low or 1.0))  # room for the value labels
    axis.grid(True, alpha=0.3)
    if others:
        axis.legend(fontsize=8)
