"""comer.report: run states, sweep tables, plots, W&B names and the W&B reader (with a fake API)."""
from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app_utils import CONFIG_DIR, compose_config
from comer.report import build_table, collect, optimized_value, plot_sweep, read_run
from comer.report.__main__ import main as report_main
from comer.report.sweep import BASIC_SWEEPER, wandb_config, wandb_group, wandb_name, wandb_tags
from comer.report.wandb_source import runs_from_wandb

SWEEP_TIME = "2025-01-31_12-00-00"


def write_run(run_dir: Path, overrides: list[str], status: str | None = "finished", miou: float | None = 0.4,
              step: int = 8, run_name: str = "ablation_interactions", lock: str | None = None,
              model: dict | None = None, interrupted_by: str | None = None) -> Path:
    """A run directory as comer.app leaves it: .hydra/overrides.yaml, config.yaml, metrics.json, maybe a lock."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"run_name": run_name, "backbone": {"num_interactions": 2}}))
    if status is not None:
        metrics = {} if miou is None else {"val/mIoU": miou, "val/aAcc": miou + 0.4, "val/IoU/disc": 0.1}
        best = {"step": step, "metrics": metrics} if miou is not None else None
        summary = {"run_dir": str(run_dir), "status": status, "interrupted_by": interrupted_by, "global_step": step,
                   "metrics": metrics, "best": best, "monitor": "val/mIoU", "best_checkpoint": "",
                   "history": [{"step": step, "metrics": metrics}] if metrics else [], "skipped_samples": {}}
        if model is not None:
            summary["model"] = model
        (run_dir / "metrics.json").write_text(json.dumps(summary))
    if lock is not None:
        (run_dir / ".run.lock").write_text(lock)
    return run_dir


def write_multirun(sweep_dir: Path, task_overrides: list[str], params: dict | None = None) -> Path:
    """The part of Hydra's multirun.yaml the report reads."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    master = {"run_name": "ablation_interactions",
              "hydra": {"sweeper": {"_target_": BASIC_SWEEPER, "max_batch_size": None, "params": params},
                        "overrides": {"hydra": [], "task": task_overrides}}}
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump(master))
    return sweep_dir


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture()
def sweep(tmp_path) -> Path:
    """A sweep the command line set to n1,n2,n3,n4,n6 (replacing the experiment's declared n1,n2,n4), with
    jobs finished, finished, killed (stale lock), failed (an error) and one never started."""
    sweep_dir = write_multirun(tmp_path / "multirun" / SWEEP_TIME,
                               ["experiment=ablation_interactions", "interactions=n1,n2,n3,n4,n6", "scale=toy"],
                               params={"interactions": "n1,n2,n4"})
    job = ["experiment=ablation_interactions", "scale=toy"]
    write_run(sweep_dir / "0", ["interactions=n1", *job], miou=0.30, model={"params": 27_260_000, "flops": 1.6e9})
    write_run(sweep_dir / "1", ["interactions=n2", *job], miou=0.42, model={"params": 28_650_000, "flops": 1.8e9})
    write_run(sweep_dir / "2", ["interactions=n3", *job], status="running", miou=0.35, step=4,
              lock=f"{socket.gethostname()} {dead_pid()}")
    write_run(sweep_dir / "3", ["interactions=n4", *job], status=None)
    return sweep_dir


def test_layout_matches_what_comer_app_writes():
    from comer.app.run_dir import CONFIG_FILE, LOCK_FILE
    from comer.app.summary import METRICS_FILE
    from comer.report import runs

    assert (runs.CONFIG_FILE, runs.LOCK_FILE, runs.METRICS_FILE) == (CONFIG_FILE, LOCK_FILE, METRICS_FILE)


def test_run_states(tmp_path):
    here = socket.gethostname()
    cases = {
        "finished": write_run(tmp_path / "a", ["x=1"]),
        "interrupted": write_run(tmp_path / "b", ["x=2"], status="interrupted", interrupted_by="SIGTERM"),
        "running": write_run(tmp_path / "c", ["x=3"], status="running", lock=f"{here} {os.getpid()}"),
        "killed": write_run(tmp_path / "d", ["x=4"], status="running", lock=f"{here} {dead_pid()}"),
        "failed": write_run(tmp_path / "e", ["x=5"], status="running"),
    }
    for state, run_dir in cases.items():
        assert read_run(run_dir).state == state, state
    assert "SIGTERM" in read_run(cases["interrupted"]).detail
    assert "is gone" in read_run(cases["killed"]).detail
    other_host = write_run(tmp_path / "f", ["x=6"], status="running", lock="elsewhere 1")
    assert (read_run(other_host).state, "elsewhere" in read_run(other_host).detail) == ("running", True)
    no_summary = write_run(tmp_path / "g", ["x=7"], status=None)
    assert read_run(no_summary).state == "failed" and "no metrics.json" in read_run(no_summary).detail
    still_starting = write_run(tmp_path / "h", ["x=8"], status=None, lock=f"{here} {os.getpid()}")
    assert read_run(still_starting).state == "running"


def test_sweep_table_lists_every_run_with_its_state(sweep):
    runs, definitions = collect([sweep])
    assert [r.state for r in runs] == ["finished", "finished", "killed", "failed", "not started"]
    table = build_table(runs, definitions)
    assert table.swept == ["interactions"]
    assert table.fixed == {"experiment": "ablation_interactions", "scale": "toy"}
    assert table.metrics == ["val/mIoU", "val/aAcc"] and table.monitor == "val/mIoU"
    assert [table.value(r, "interactions") for r in runs] == ["n1", "n2", "n3", "n4", "n6"]
    assert runs[4].location == str(sweep / "4")
    markdown = table.markdown()
    lines = markdown.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["run", "state", "step", "interactions", "mIoU (%)", "aAcc (%)", "best mIoU (%)", "best step",
                      "params (M)", "GFLOPs"]
    row = [c.strip() for c in lines[3].strip("|").split("|")]
    assert row == ["ablation_interactions interactions=n2", "finished", "8", "n2", "42.00", "82.00", "42.00", "8",
                   "28.65", "1.8"]
    killed = [c.strip() for c in lines[4].strip("|").split("|")]
    assert killed[:5] == ["ablation_interactions interactions=n3", "killed", "4", "n3", "35.00"]
    assert "5 runs: 2 finished, 1 killed, 1 failed, 1 not started." in markdown
    assert "`experiment=ablation_interactions` `scale=toy`" in markdown
    assert "interactions=n6: **not started** (planned by the sweep, never started)" in markdown

    csv_path = table.write_csv(sweep / "t.csv")
    with csv_path.open() as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == 5
    assert float(records[1]["val/mIoU"]) == 0.42 and int(records[1]["params"]) == 28_650_000
    assert records[3]["state"] == "failed" and records[3]["val/mIoU"] == ""
    assert records[0]["run_dir"] == str(sweep / "0")


def test_plot_draws_the_metric_against_every_swept_key(tmp_path):
    """Two swept keys: one panel per key, one line per value of the other key, each point labelled."""
    sweep_dir = write_multirun(tmp_path / SWEEP_TIME, ["interactions=n1,n2", "mrfp=k3,k3_5"])
    values = {("n1", "k3"): 0.30, ("n1", "k3_5"): 0.34, ("n2", "k3"): 0.36, ("n2", "k3_5"): 0.41}
    for job, ((n, k), miou) in enumerate(values.items()):
        write_run(sweep_dir / str(job), [f"interactions={n}", f"mrfp={k}"], miou=miou)
    table = build_table(*collect([sweep_dir]))
    assert table.swept == ["interactions", "mrfp"]
    png, svg = plot_sweep(table, tmp_path / "plot", "val/mIoU")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    text = svg.read_text()
    texts = set(re.findall(r">([^<>]+)</text>", text))
    for expected in ("interactions", "mrfp", "mIoU (%)", "val/mIoU vs interactions", "val/mIoU vs mrfp",
                     "mrfp=k3", "mrfp=k3_5", "interactions=n1", "interactions=n2", "30.0", "34.0", "36.0", "41.0",
                     "n1", "n2", "k3", "k3_5"):
        assert expected in texts, expected
    # one line per other key's value in each panel: 2 + 2 legend entries
    assert text.count("mrfp=k3_5") == 1 and text.count("interactions=n2") == 1


def test_plot_names_the_runs_it_could_not_draw(sweep):
    table = build_table(*collect([sweep]))
    _, svg = plot_sweep(table, sweep / "p", None)
    text = svg.read_text()
    assert "open markers: runs not finished" in text  # the killed run's latest validation is drawn open
    assert "not plotted (no val/mIoU)" in text and "interactions=n4 (failed)" in text
    assert "interactions=n6 (not started)" in text


def test_cli_writes_markdown_csv_and_plot(sweep, capsys):
    assert report_main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| ablation_interactions interactions=n1\s+\| finished\s+\|", out)
    for name in ("report.md", "report.csv", "val_mIoU.png", "val_mIoU.svg"):
        assert (sweep / "report" / name).is_file(), name
    assert (sweep / "report" / "report.md").read_text() in out


def test_cli_without_runs_or_with_a_missing_path(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report_main([str(tmp_path / "empty")]) == 1
    assert "no runs found" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no such directory"):
        report_main([str(tmp_path / "missing")])


def test_loose_run_directories_are_compared_by_what_differs(tmp_path):
    """Run directories from separate launches: the keys whose values differ become the columns; where a
    run leaves a key to its default the table says so."""
    write_run(tmp_path / "outputs" / "ablation_full" / "t1", ["experiment=ablation_full", "data.root=/a", "seed=1"],
              run_name="ablation_full", miou=0.40)
    write_run(tmp_path / "outputs" / "ablation_cti_both" / "t2", ["experiment=ablation_cti_both", "data.root=/b",
                                                                  "mrfp=k3"], run_name="ablation_cti_both", miou=0.38)
    runs, definitions = collect([tmp_path / "outputs"])
    table = build_table(runs, definitions, columns=["backbone.num_interactions"])
    assert table.swept == ["experiment", "mrfp", "seed"], "data.root says where the data is, not what was compared"
    assert table.fixed == {}
    assert [table.label(r) for r in runs] == ["ablation_cti_both mrfp=k3 seed=(default)",
                                              "ablation_full mrfp=(default) seed=1"]
    assert "backbone.num_interactions" in table.header() and table.rows()[0][6] == "2"


# ------------------------------------------------------------------------------------------------ W&B
def test_wandb_names_groups_and_tags_of_a_multirun_job(tmp_path):
    sweep_dir = write_multirun(tmp_path / "multirun" / SWEEP_TIME,
                               ["experiment=ablation_interactions", "interactions=n1,n2", "scale=toy",
                                "data.root=/data/ade", "logger=wandb"], params={"interactions": "n1,n2,n3,n4,n6"})
    job = dict(run_name="ablation_interactions", run_dir=str(sweep_dir / "1"), sweep_dir=str(sweep_dir),
               overrides=["interactions=n2", "experiment=ablation_interactions", "scale=toy", "data.root=/data/ade"],
               sweeper_params={"interactions": "n1,n2,n3,n4,n6"})
    assert wandb_name(**job) == "ablation_interactions interactions=n2"
    assert wandb_group(**job) == f"{SWEEP_TIME} experiment=ablation_interactions scale=toy"
    assert wandb_tags(**job) == ["interactions=n2"]
    config = wandb_config(**job)
    assert config["sweep"] == {"interactions": "n2"} and config["overrides"]["data.root"] == "/data/ade"
    assert config["sweep_dir"] == str(sweep_dir.resolve()) and config["run_name"] == "ablation_interactions"
    # a single run (its directory is not inside the sweep directory): named and grouped by run_name
    single = {**job, "run_dir": str(tmp_path / "outputs" / "ablation_interactions" / "t")}
    assert (wandb_name(**single), wandb_group(**single), wandb_tags(**single)) == (
        "ablation_interactions", "ablation_interactions", [])
    # Optuna writes no multirun.yaml: its declared params say what is swept; tags stay within W&B's 64 chars
    optuna_dir = tmp_path / "optuna"
    trial = {**job, "sweep_dir": str(optuna_dir), "run_dir": str(optuna_dir / "0"),
             "overrides": ["module.optimizer.lr=" + "1" * 80],
             "sweeper_params": {"module.optimizer.lr": "interval(0,1)"}}
    (tag,) = wandb_tags(**trial)
    assert len(tag) == 64 and tag.startswith("module.optimizer.lr=111")
    # a sweep definition that cannot be read does not stop the run: it is named as a single run
    (sweep_dir / "multirun.yaml").write_text("hydra: {overrides: {task: ['interactions=(']}}")
    assert (wandb_name(**job), wandb_tags(**job)) == ("ablation_interactions", [])


def test_wandb_logger_config_keeps_its_keys_and_resolves(tmp_path):
    """conf/logger/wandb.yaml as train() instantiates it (here into a dict instead of a WandbLogger)."""
    import hydra

    cfg = compose_config("train", ["experiment=ablation_interactions", "scale=toy"], tmp_path)
    kwargs = hydra.utils.instantiate(cfg.logger.wandb, _target_="builtins.dict")
    assert set(kwargs) >= {"save_dir", "project", "name", "id", "offline", "log_model", "group", "tags", "job_type",
                           "config"}
    written = yaml.safe_load((CONFIG_DIR / "logger" / "wandb.yaml").read_text())["wandb"]
    assert (written["_target_"], written["id"]) == ("comer.app.wandb_logger.WandbLogger", "${run_id}")
    assert (kwargs["name"], kwargs["group"], kwargs["tags"], kwargs["job_type"]) == (
        "ablation_interactions", "ablation_interactions", [], "train")
    assert kwargs["config"]["overrides"] == {"paths.root_dir": str(tmp_path), "experiment": "ablation_interactions",
                                             "scale": "toy", "preflight.memory_check": "False"}  # + app_utils' default


class FakeRun:
    def __init__(self, run_id, state, sweep, miou, history, group=SWEEP_TIME):
        self.id, self.state, self.group = run_id, state, group
        self.name = f"ablation_interactions {sweep}"
        key, value = sweep.split("=")
        self.config = {"run_name": "ablation_interactions", "sweep": {key: value},
                       "overrides": {key: value, "experiment": "ablation_interactions"},
                       "model": {"params": 28_650_000, "flops": 1_800_000_000}}
        self.summary = {"val/mIoU": miou, "val/aAcc": 0.9, "trainer/global_step": 16} if miou is not None else {}
        self._history = history

    def history(self, keys, pandas):
        assert pandas is False
        return [{k: row.get(k) for k in (*keys, "trainer/global_step")} for row in self._history]


class FakeApi:
    def __init__(self, runs):
        self._runs = runs
        self.calls = []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        group = (filters or {}).get("group")
        return [r for r in self._runs if group is None or r.group == group]


def fake_api() -> FakeApi:
    return FakeApi([
        FakeRun("a1", "finished", "interactions=n1", 0.31,
                [{"val/mIoU": 0.35, "trainer/global_step": 8}, {"val/mIoU": 0.31, "trainer/global_step": 16}]),
        FakeRun("a2", "crashed", "interactions=n2", 0.20, [{"val/mIoU": 0.20, "trainer/global_step": 8}]),
        FakeRun("a3", "running", "interactions=n4", None, []),
        FakeRun("b1", "finished", "interactions=n6", 0.5, [], group="another sweep"),
    ])


def test_report_from_wandb_with_a_fake_api():
    api = fake_api()
    runs, definitions = runs_from_wandb("team/comer", group=SWEEP_TIME, api=api)
    assert api.calls == [("team/comer", {"group": SWEEP_TIME})]
    assert [(r.state, r.overrides["interactions"]) for r in runs] == [
        ("finished", "n1"), ("killed", "n2"), ("running", "n4")]
    assert runs[0].best == {"step": 8, "metrics": {"val/mIoU": 0.35}} and runs[0].step == 16
    assert runs[0].location == "wandb:team/comer/a1" and runs[0].params == 28_650_000
    table = build_table(runs, definitions)
    assert table.swept == ["interactions"] and table.metrics == ["val/mIoU", "val/aAcc"]
    rows = table.rows()
    assert rows[0][:7] == ["ablation_interactions interactions=n1", "finished", "16", "n1", "31.00", "90.00", "35.00"]
    assert rows[2][1:5] == ["running", "-", "n4", "-"]
    # --at-best: the metrics of each run's best validation (n1 peaked at 35.0 at step 8, then fell to 31.0)
    at_best = build_table(runs, definitions, at_best=True)
    assert [row[4] for row in at_best.rows()] == ["35.00", "20.00", "-"]
    assert "best validation by val/mIoU" in at_best.markdown()


def test_cli_reads_wandb(monkeypatch, tmp_path, capsys):
    import wandb

    monkeypatch.setattr(wandb, "Api", fake_api)
    assert report_main(["--wandb", "team/comer", "--group", SWEEP_TIME, "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "3 runs: 1 finished, 1 killed, 1 running." in out
    assert (tmp_path / "r" / "val_mIoU.png").is_file() and (tmp_path / "r" / "report.csv").is_file()


def test_optimized_value_is_the_best_validation():
    summary = {"metrics": {"val/mIoU": 0.3, "val/aAcc": 0.8}, "best": {"step": 4, "metrics": {"val/mIoU": 0.35}}}
    assert optimized_value(summary, "val/mIoU") == 0.35
    assert optimized_value(summary, "val/aAcc") == 0.8  # not in the best entry: the latest
    assert optimized_value(summary, None) is None
    nan = optimized_value({"metrics": {"val/mIoU": None}}, "val/mIoU")
    assert nan != nan


# ------------------------------------------------------------------------------------------------ end to end
def recording_wandb_logger(save_dir, **kwargs):
    """Stands in for WandbLogger in a real multirun: writes the keyword arguments train() passes it to
    <save_dir>/wandb_kwargs.json and returns a CSV logger."""
    from lightning.pytorch.loggers import CSVLogger

    Path(save_dir).mkdir(parents=True, exist_ok=True)
    (Path(save_dir) / "wandb_kwargs.json").write_text(json.dumps({"save_dir": save_dir, **kwargs}, default=str))
    return CSVLogger(save_dir, name="recorded_wandb")


@pytest.mark.slow
def test_toy_sweep_end_to_end(tmp_path):
    """`python train.py -m experiment=ablation_interactions interactions=n1,n2,n4 scale=toy` makes three run
    directories; `python -m comer.report` turns them into a table and a plot; each job's W&B arguments carry
    its name, the sweep as group, its swept value as tag and config."""
    repo = CONFIG_DIR.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo / "tests"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(repo / "train.py"), "-m", "experiment=ablation_interactions",
               "interactions=n1,n2,n4", "scale=toy", f"paths.root_dir={tmp_path}", "logger=wandb",
               "logger.wandb._target_=test_report.recording_wandb_logger", "trainer.enable_progress_bar=false",
               "trainer.enable_model_summary=false", "preflight.memory_check=false"]
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "outputs" / "toy" / "multirun").iterdir()
    jobs = sorted(d for d in sweep_dir.iterdir() if d.is_dir())
    assert [d.name for d in jobs] == ["0", "1", "2"]
    for job, value in zip(jobs, ("n1", "n2", "n4")):
        summary = json.loads((job / "metrics.json").read_text())
        assert summary["status"] == "finished" and summary["global_step"] == 4
        recorded = json.loads((job / "wandb_kwargs.json").read_text())
        assert recorded["name"] == f"ablation_interactions interactions={value}"
        assert recorded["group"] == f"{sweep_dir.name} experiment=ablation_interactions scale=toy"
        assert recorded["tags"] == [f"interactions={value}"] and recorded["job_type"] == "train"
        assert recorded["config"]["sweep"] == {"interactions": value} and recorded["id"].startswith(job.name)
    params = [json.loads((job / "metrics.json").read_text())["model"]["params"] for job in jobs]
    assert params[0] < params[1] < params[2], "each interaction stage adds its CTI modules"

    report = subprocess.run([sys.executable, "-m", "comer.report", str(sweep_dir)], cwd=repo, capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    with (sweep_dir / "report" / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["interactions"], r["state"], r["step"]) for r in rows] == [
        ("n1", "finished", "4"), ("n2", "finished", "4"), ("n4", "finished", "4")]
    assert all(0.0 <= float(r["val/mIoU"]) <= 1.0 for r in rows)
    assert [int(r["params"]) for r in rows] == params, "the report reads the counts train() recorded"
    assert "3 runs: 3 finished." in report.stdout
    assert (sweep_dir / "report" / "val_mIoU.png").stat().st_size > 10_000
