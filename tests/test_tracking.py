"""Experiment tracking (`report_to`): TensorBoard event files hold both loss terms, a missing
tracker package is a one-line error, and the tracker never changes a run's setting or stage key."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml
from test_data import make_cf_folder
from test_run import write_config

from cftune.cli import main
from cftune.errors import CftuneError
from cftune.experiment.config import Experiment
from cftune.experiment.plan import Runner
from cftune.train.config import TrainConfig
from cftune.train.stage import train

ROWS = [{"question": f"What is {i} plus {i + 3}?", "answer": f"{i}+{i + 3}={2 * i + 3}\n#### {2 * i + 3}"}
        for i in range(24)]


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {"model": str(tiny_model), "task": str(task),
            "cfs": str(make_cf_folder(root / "cfs", tiny_model, 40))}


def config(files, out: Path, **kw) -> TrainConfig:
    values = dict(model=files["model"], task=files["task"], cfs=files["cfs"], out=str(out),
                  method="cfs", prompt_field="question", response_field="answer", max_steps=3,
                  batch_size=4, learning_rate=1e-3, dtype="fp32", save_steps=100, warmup=0.0)
    return TrainConfig(**{**values, **kw})


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed (`make install-trl` installs it)")
def test_tensorboard_gets_both_loss_terms_as_scalars(files, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = train(config(files, tmp_path / "run", report_to="tensorboard", run_name="cfs-tb"))
    assert not (out / "checkpoints").exists()  # the event files outlive the checkpoints
    events = list((out / "logs").glob("events.out.tfevents.*"))
    assert len(events) == 1
    scalars = EventAccumulator(str(out / "logs"))
    scalars.Reload()
    tags = set(scalars.Tags()["scalars"])
    assert {"train/loss", "train/task_loss", "train/cf_loss", "train/learning_rate",
            "train/grad_norm"} <= tags
    log = [json.loads(x) for x in (out / "training_log.jsonl").read_text().splitlines()]
    for term in ("task_loss", "cf_loss", "loss"):  # the same numbers as the run's own log
        got = {e.step: e.value for e in scalars.Scalars(f"train/{term}")}
        assert sorted(got) == [1, 2, 3]
        for record in log:
            assert got[record["step"]] == pytest.approx(record[term], rel=1e-5)
    assert {e.value for e in scalars.Scalars("train/task_loss")} != \
        {e.value for e in scalars.Scalars("train/cf_loss")}  # two terms, not one logged twice
    args = json.loads((out / "training_args.json").read_text())
    assert args["report_to"] == ["tensorboard"] and args["run_name"] == "cfs-tb"


def test_a_missing_tracker_package_is_one_line_naming_it(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec: "not installed"
    argv = ["train", "--model", files["model"], "--task", files["task"], "--cfs", files["cfs"],
            "--prompt-field", "question", "--response-field", "answer", "--max-steps", "1",
            "--out", str(tmp_path / "o"), "--report-to", "wandb"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "`report_to` = wandb needs the wandb package: pip install wandb" in err
    assert "\n" not in err and not (tmp_path / "o" / "training_log.jsonl").exists()
    assert main([*argv[:-1], "neptune"]) == 2  # not one of the trackers offered
    err = capsys.readouterr().err.strip()
    assert "`report_to` = 'neptune' is not one of none, tensorboard, wandb, mlflow, trackio" in err


def test_tracking_options_are_not_settings(files, tmp_path):
    plain = config(files, tmp_path / "a")
    tracked = config(files, tmp_path / "a", report_to="tensorboard", run_name="x",
                     push_to_hub="me/x")
    assert tracked.setting() == plain.setting()


def test_the_runner_passes_the_tracker_per_run_outside_every_stage_key(tiny_model, tmp_path):
    plain = write_config(tmp_path, tiny_model)
    train_ = {**yaml.safe_load(plain.read_text())["train"], "report_to": "tensorboard"}
    (tmp_path / "plain.yaml").write_text(plain.read_text())
    tracked = write_config(tmp_path, tiny_model, train=train_)
    out = tmp_path / "e"
    before = Runner(Experiment(tmp_path / "plain.yaml", out), [])
    after = Runner(Experiment(tracked, out), [])
    override = Runner(Experiment(tracked, out, report_to="wandb"), [])  # `cftune run --report-to`
    assert [s.folder for s in before.stages] == [s.folder for s in after.stages] == \
        [s.folder for s in override.stages]
    trains = {s.name: s.args["settings"] for s in after.stages if s.action == "train"}
    assert trains and all(v["report_to"] == "tensorboard" and v["run_name"] == k.split()[1]
                          for k, v in trains.items())
    assert {s.args["settings"]["report_to"] for s in override.stages
            if s.action == "train"} == {"wandb"}
    bad = write_config(tmp_path, tiny_model, train={**train_, "push_to_hub": "me/x"})
    with pytest.raises(CftuneError, match="`push_to_hub` is not a runner setting"):
        Experiment(bad, out)


def test_cftune_run_refuses_a_missing_tracker_before_any_stage(tiny_model, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec: "not installed"
    path = write_config(tmp_path, tiny_model)
    assert main(["run", str(path), "--out", str(tmp_path / "e"), "--report-to", "wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install wandb" in err and "\n" not in err
    assert not (tmp_path / "e" / "data").exists()  # not one stage ran
