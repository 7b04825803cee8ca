"""`python -m comer.report <multirun dir | run dirs | outputs/...>`: one table (Markdown to the terminal,
report.md and report.csv) and one plot (PNG and SVG) of a sweep. `--wandb entity/project` reads W&B instead."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

from .plot import plot_sweep
from .runs import collect
from .table import build_table

REPORT_DIR = "report"


def _file_stem(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m comer.report",
        description="Gather the runs of a sweep (metrics.json, config.yaml, .hydra/overrides.yaml) into one table "
                    "and plot the metric against every swept value.",
        epilog="examples: python -m comer.report outputs/multirun/2025-01-31_12-00-00 | "
               "python -m comer.report outputs/ablation_full outputs/ablation_cti_both | "
               "python -m comer.report --wandb my-team/comer --group '2025-01-31_12-00-00'")
    parser.add_argument("paths", nargs="*", help="multirun directories, run directories, or folders holding them")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from this W&B project instead")
    parser.add_argument("--group", help="with --wandb: only this group (one sweep)")
    parser.add_argument("--out", type=Path, help="where to write report.md, report.csv and the plot "
                                                 "(default: <the one path given>/report, else ./report)")
    parser.add_argument("--metric", help="the metric to plot (default: the runs' monitored metric, e.g. val/mIoU)")
    parser.add_argument("--metrics", help="comma-separated metric columns (default: those of mIoU, aAcc, "
                                          "bbox_mAP, segm_mAP the runs have)")
    parser.add_argument("--columns", default="", help="comma-separated keys of the resolved config to add as "
                                                      "columns, e.g. backbone.num_interactions")
    parser.add_argument("--complexity", action="store_true",
                        help="count parameters and FLOPs (comer.flops) for runs whose metrics.json lacks them")
    parser.add_argument("--at-best", action="store_true",
                        help="metric columns and plot from each run's best validation (by the monitored metric) "
                             "instead of its latest")
    parser.add_argument("--no-plot", action="store_true", help="write the table only")
    options = parser.parse_args(argv)
    if bool(options.paths) == bool(options.wandb):
        parser.error("give run/multirun directories or --wandb ENTITY/PROJECT (one of the two)")

    if options.wandb:
        from .wandb_source import runs_from_wandb

        runs, definitions = runs_from_wandb(options.wandb, group=options.group)
        default_out = Path(REPORT_DIR) / _file_stem(options.group or options.wandb)
    else:
        runs, definitions = collect(options.paths)
        default_out = Path(options.paths[0]) / REPORT_DIR if len(options.paths) == 1 else Path(REPORT_DIR)
    if not runs:
        print(f"no runs found in {options.wandb or ', '.join(options.paths)}", file=sys.stderr)
        return 1
    if options.complexity:
        from .complexity import fill_missing_complexity

        fill_missing_complexity(runs)
    metrics = [m for m in options.metrics.split(",") if m] if options.metrics else None
    table = build_table(runs, definitions, metrics=metrics, columns=[c for c in options.columns.split(",") if c],
                        at_best=options.at_best)
    out = options.out or default_out
    out.mkdir(parents=True, exist_ok=True)
    markdown = table.markdown()
    (out / "report.md").write_text(markdown)
    written = [out / "report.md", table.write_csv(out / "report.csv")]
    if not options.no_plot:
        metric = options.metric or table.monitor or (table.metrics[0] if table.metrics else None)
        if metric:
            written += plot_sweep(table, out / _file_stem(metric), metric)
    print(markdown)
    print("written: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
