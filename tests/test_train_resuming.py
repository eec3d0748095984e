"""`--resume auto` and a resumed run's options (pipeline/train/resuming.py), on run folders written here."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.config import StreamConfig, TrainConfig
from pipeline.errors import UserError, as_options
from pipeline.train import resuming


def write_run(folder, name="options.json", **changes):
    cfg = TrainConfig(
        stream=StreamConfig(shards=("shards/<000..007>.tar",), batch_size=4, workers=2, seed=3),
        model="tiny",
        epochs=2,
        lr=0.003,
        max_steps=7,
        log_dir=str(folder),
    )
    cfg = dataclasses.replace(cfg, **changes)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"world_size": 2, "options": dataclasses.asdict(cfg)}
    (folder / name).write_text(json.dumps(record, default=str))
    return cfg


def test_resume_auto_is_the_folder_with_a_checkpoint_and_none_without(tmp_path):
    assert resuming.resolve_auto("auto", str(tmp_path / "new")) is None
    (tmp_path / "run").mkdir()
    assert resuming.resolve_auto("auto", str(tmp_path / "run")) is None
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"x")
    assert resuming.resolve_auto("auto", str(tmp_path / "run")) == str(tmp_path / "run")
    assert resuming.resolve_auto("runs/x", None) == "runs/x" and resuming.resolve_auto(None, None) is None
    with pytest.raises(UserError, match="`resume` auto needs `log_dir`"):
        resuming.resolve_auto("auto", None)


def test_the_newest_options_file_is_read_and_per_start_options_are_not_carried(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    write_run(run, "options-resume-9.json", epochs=4)
    write_run(run, "options-resume-10.json", epochs=6)
    saved, path = resuming.saved_options(run)
    assert path.name == "options-resume-10.json"
    assert saved["epochs"] == 6 and saved["model"] == "tiny" and saved["shards"] == ("shards/<000..007>.tar",)
    assert {"max_steps", "resume", "log_dir", "nproc_per_node"}.isdisjoint(saved)
    (run / "options-resume-11.json").write_text("{")
    with pytest.raises(UserError, match="unreadable run options .*options-resume-11.json"):
        resuming.saved_options(run)


def test_a_resume_takes_the_run_options_and_allows_more_epochs(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    (run / "checkpoint.pt").write_bytes(b"x")
    defaults = {"model": "r3d18", "epochs": 10, "lr": None}
    opts = resuming.resumed_options(str(run), None, {"epochs": 5, "workers": 1}, defaults)
    cfg = resuming.build_config(opts)
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.stream.seed, cfg.stream.workers) == ("tiny", 5, 0.003, 3, 1)
    assert cfg.stream.shards == ("shards/<000..007>.tar",) and cfg.max_steps == 0 and cfg.log_dir == str(run)
    assert resuming.resumed_options("auto", str(run), {}, defaults)["resume"] == "auto"


@pytest.mark.parametrize(
    "given, message",
    [
        ({"model": "r3d18"}, "--model 'r3d18' disagrees with 'tiny'"),
        ({"weight_decay": 0.01}, "--weight-decay 0.01 disagrees with 0.0001"),
        ({"seed": 0}, "--seed 0 disagrees with 3"),
    ],
)
def test_an_option_given_again_must_agree(tmp_path, given, message):
    """(The peak --lr may change: see test_a_resume_may_lower_the_peak_learning_rate.)"""
    run = tmp_path / "run"
    write_run(run)
    with pytest.raises(UserError) as e:
        resuming.resumed_options(str(run), None, given, {})
    line = as_options(str(e.value))
    assert message in line and "options.json" in line and "leave --" in line and "another --log-dir" in line
    assert resuming.resumed_options(str(run), None, {"lr": 0.003, "seed": 3, "model": "tiny"}, {})["lr"] == 0.003


def test_without_run_options_the_shards_must_be_given(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    ckpt = tmp_path / "elsewhere" / "checkpoint.pt"
    ckpt.write_bytes(b"x")
    with pytest.raises(UserError, match="no run options at .*options.json to continue from: give `shards`"):
        resuming.resumed_options(str(ckpt), None, {}, {})
    assert resuming.resumed_options(str(ckpt), None, {"shards": ("a.tar",)}, {})["shards"] == ("a.tar",)
    with pytest.raises(UserError, match="`shards` must name the training shards"):
        resuming.resumed_options("auto", str(tmp_path / "fresh"), {}, {})


def test_auto_in_a_folder_an_attempt_left_without_checkpoint_checks_its_options(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    opts = resuming.resumed_options("auto", str(run), {"shards": ("shards/<000..007>.tar",)}, {})
    assert opts["resume"] == "auto" and opts["model"] == "tiny"
    with pytest.raises(UserError, match="`model` 'r3d18' disagrees"):
        resuming.resumed_options("auto", str(run), {"model": "r3d18"}, {})


def test_a_resume_may_lower_the_peak_learning_rate(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    assert resuming.resumed_options(str(run), None, {"lr": 0.0005}, {})["lr"] == 0.0005
