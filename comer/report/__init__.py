"""Sweep reports: `python -m comer.report <multirun dir | run dirs>` gathers runs into one table and plot.

    collect(paths) -> (runs, sweep definitions)       read run and multirun directories (runs.py)
    runs_from_wandb(project, group) -> (runs, defs)   the same from a W&B project (wandb_source.py)
    build_table(runs, defs) -> Table                   Markdown / CSV (table.py)
    plot_sweep(table, out_stem, metric) -> [png, svg]  the metric against every swept value (plot.py)
    sweep.py: which keys a sweep varied; run names, W&B group/tags/config (conf/logger/wandb.yaml);
              optimized_value(summary, metric), the number an Optuna sweep optimises.
"""
from .plot import plot_sweep
from .runs import Run, collect, read_run, read_sweep
from .sweep import SweepDefinition, optimized_value, run_label, sweep_definition
from .table import Table, build_table

__all__ = ["Run", "SweepDefinition", "Table", "build_table", "collect", "optimized_value", "plot_sweep", "read_run",
           "read_sweep", "run_label", "sweep_definition"]
