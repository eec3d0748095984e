"""The training loop and the train-stream CLI on tiny fixture shards (tiny model, 24 px crops)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import streamkit
import torch
from conftest import cli_command, cli_env, run_cli
from shardmaker import shard_keys

from pipeline.cli import train_app
from pipeline.config import StreamConfig, TrainConfig
from pipeline.device import DistEnv
from pipeline.errors import UserError
from pipeline.stream import plan
from pipeline.train.evaluate import evaluate
from pipeline.train.launch import launch
from pipeline.train.schedule import learning_rate

SMALL = [
    "--model",
    "tiny",
    "--crop",
    "24",
    "--batch-size",
    "4",
    "--workers",
    "2",
    "--shuffle-buffer",
    "8",
    "--no-progress",
]


def cfg_for(packed: Path, log_dir: Path, **kw) -> TrainConfig:
    stream_kw = {k: kw.pop(k) for k in list(kw) if k in StreamConfig.__dataclass_fields__}
    stream_kw = {"batch_size": 4, "workers": 2, "crop": 24, "shuffle_buffer": 8, **stream_kw}
    sc = StreamConfig(shards=(f"{packed}/<000..007>.tar",), **stream_kw)
    kw = {"lr": 3e-3, **kw}
    return TrainConfig(stream=sc, model="tiny", log_dir=str(log_dir), progress=False, **kw)


def records(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def audit(log_dir: Path, epoch: int, rank: int) -> list[str]:
    return (log_dir / "audit" / f"epoch-{epoch:03d}-rank-{rank}.txt").read_text().split()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shards", "{packed}/<100..131>.tar"], "no shards match '.*<100..131>.tar'"),
        (["--shards", "{packed}/<000..0x7>.tar"], "malformed range <000..0x7>"),
        (["--shards", "{packed}/{{000..007.tar"], "malformed range .* unbalanced braces"),
        (["--shards", "{packed}/<000..007>.tar", "--model", "resnet-9000"], "resnet-9000"),
        (
            ["--shards", "{packed}/<000..007>.tar", "--workers", "3", "--nproc-per-node", "3"],
            "8 training shards for 3 ranks x 3 workers",
        ),
        (["--shards", "{packed}/<000..007>.tar", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--shards", "pipe:cat {packed}/000.tar"], "--allow-pipe"),
        (["--shards", "{broken}/<000..007>.tar"], "unreadable index"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(packed, tmp_path, args, message):
    broken = tmp_path / "broken"
    shutil.copytree(packed, broken)
    (broken / "index.json").write_text('{"format": "clipstream", "version": 1, "splits": ')
    result = run_cli(train_app, *[a.format(packed=packed, broken=broken) for a in args], "--log-dir", tmp_path / "run")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()


def test_learns_the_fixture_classes_and_writes_metrics(packed, tmp_path):
    log = tmp_path / "run"
    summary = launch(cfg_for(packed, log, epochs=5, log_every=5, lr=1e-2))
    recs = records(log)
    steps = [r for r in recs if r["kind"] == "step"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["kind"] for r in recs][-1] == "summary" and len(evals) == 5
    for r in steps:
        assert set(r) >= {"step", "epoch", "loss", "lr", "clips_per_s", "clips_per_s_rank", "data_wait", "step_time"}
        assert 0 <= r["data_wait"] <= 1 and r["clips_per_s"] > 0 and len(r["clips_per_s_rank"]) == 1
    assert [r["step"] for r in steps] == sorted(
        set(range(5, 61, 5)) | {12, 24, 36, 48}
    )  # every 5th and each epoch's last
    assert evals[-1]["clips"] == 16 and set(evals[-1]["per_class"]) == {"brush_hair", "cartwheel", "catch", "chew"}
    assert summary["steps"] == 60 and summary["epochs"] == 5
    assert summary["top1"] >= 0.8, summary
    assert records(log)[-1]["top1"] == summary["top1"]
    # cosine schedule ends near zero; loss went down
    assert steps[-1]["lr"] < 0.01 * 1e-2 and steps[-1]["loss"] < steps[0]["loss"]


def test_plot_draws_the_run_curves_at_the_end(packed, tmp_path):
    log = tmp_path / "run"
    args = ["--shards", f"{packed}/<000..007>.tar", *SMALL, "--epochs", "1", "--log-dir", log]
    result = run_cli(train_app, *args, "--plot")
    assert result.exit_code == 0, result.output
    curves = (log / "curves.png").read_bytes()  # --plot draws the run's curves at the end
    assert curves[:8] == b"\x89PNG\r\n\x1a\n" and len(curves) > 10_000
    assert f"curves: {log / 'curves.png'}" in result.stdout.splitlines()
    assert records(log)[-1]["kind"] == "summary"  # drawn after the run, from its metrics


def test_learning_needs_the_right_labels(packed, tmp_path):
    """The learning test above would pass with a broken label path only if chance were >= 80 %: it is 25 %."""
    log = tmp_path / "run"
    summary = launch(cfg_for(packed, log, epochs=1, lr=1e-9, seed=3))
    assert summary["top1"] < 0.8


def test_resume_mid_epoch_neither_repeats_nor_skips_clips(packed, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    launch(cfg_for(packed, full, epochs=2, audit_keys=True, eval_every=0))
    first = launch(cfg_for(packed, part, epochs=2, audit_keys=True, eval_every=0, max_steps=17))
    assert first["stopped_early"] and first["steps"] == 17
    ckpt = torch.load(part / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 5)
    second = launch(cfg_for(packed, part, epochs=2, audit_keys=True, eval_every=0, resume=str(part)))
    assert second["steps"] == 24 and second["epochs"] == 2
    for epoch in (0, 1):
        resumed, uninterrupted = audit(part, epoch, 0), audit(full, epoch, 0)
        assert len(resumed) == len(set(resumed)) == 48
        assert sorted(resumed) == sorted(uninterrupted)
    # the clips before the stop are kept in order; the rest are the ones the epoch had left
    assert audit(part, 1, 0)[:20] == audit(full, 1, 0)[:20]
    summaries = [r for r in records(part) if r["kind"] == "summary"]
    assert len(summaries) == 2


def test_resume_refuses_a_different_world_mid_epoch(packed, tmp_path):
    log = tmp_path / "run"
    launch(cfg_for(packed, log, epochs=1, max_steps=3, eval_every=0))
    with pytest.raises(UserError, match="needs the same .*batch_size"):
        launch(cfg_for(packed, log, epochs=1, batch_size=2, resume=str(log)))


def test_gradient_accumulation_and_sgd_step_schedule_run(packed, tmp_path):
    log = tmp_path / "run"
    summary = launch(
        cfg_for(
            packed,
            log,
            epochs=2,
            grad_accum=5,
            optimizer="sgd",
            schedule="step",
            lr_step_epochs=1,
            lr_gamma=0.5,
            lr=0.05,
        )
    )
    steps = [r for r in records(log) if r["kind"] == "step"]
    assert summary["steps"] == 24
    assert {r["epoch"]: r["lr"] for r in steps} == {1: 0.05, 2: 0.025}


@pytest.mark.parametrize(
    "step, lr",
    [(0, 0.25), (3, 1.0), (4, 1.0), (14, 0.5), (24, 0.0)],
)
def test_cosine_schedule_with_warmup_table(packed, tmp_path, step, lr):
    cfg = cfg_for(packed, tmp_path, lr=1.0, warmup_steps=4)
    assert learning_rate(cfg, step, 24, 0) == pytest.approx(lr, abs=1e-9)


def test_checkpoint_loads_with_weights_only(packed, tmp_path):
    log = tmp_path / "run"
    launch(cfg_for(packed, log, epochs=1, eval_every=0))
    ckpt = torch.load(log / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == 0 and ckpt["step"] == 12
    assert set(ckpt["rng"]) == {"torch"} and ckpt["rng"]["torch"].shape[0] == 1
    assert not list(log.glob(".*.tmp"))


@pytest.mark.slow
def test_two_processes_split_the_epoch_and_evaluate_like_one(packed, tmp_path):
    log = tmp_path / "run"
    cmd = cli_command("train_app") + ["--shards", f"{packed}/<000..007>.tar", *SMALL, "--epochs", "2", "--lr", "0.003"]
    cmd += ["--nproc-per-node", "2", "--audit-keys", "--log-dir", str(log), "--plot"]
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("curves: ") == 1 and (log / "curves.png").is_file()  # drawn once, by the command
    all_keys = sorted(k for i in range(8) for k in shard_keys(packed / f"{i:03d}.tar"))
    for epoch in (0, 1):
        r0, r1 = audit(log, epoch, 0), audit(log, epoch, 1)
        assert len(r0) == len(r1) == 24  # same number of steps (6 of 4 clips) on both ranks
        assert not set(r0) & set(r1)
        assert sorted(r0 + r1) == all_keys
    assert audit(log, 0, 0) != audit(log, 1, 0)
    recs = records(log)
    summary = recs[-1]
    assert summary["kind"] == "summary" and summary["world_size"] == 2 and summary["steps"] == 12
    assert all(len(r["clips_per_s_rank"]) == 2 for r in recs if r["kind"] == "step")
    assert done.stdout.count("epoch 2: test top-1") == 1  # only rank 0 prints
    # the two-rank evaluation equals a one-process evaluation of the saved weights
    final = [r for r in recs if r["kind"] == "eval"][-1]
    from pipeline.train.models import build_model

    cfg = cfg_for(packed, tmp_path / "eval")
    dataset = streamkit.resolve(cfg.stream)
    model = build_model("tiny", 4)
    model.load_state_dict(torch.load(log / "checkpoint.pt", weights_only=True)["model"])
    alone = evaluate(
        model, dataset.test, cfg, DistEnv(), torch.device("cpu"), False, __import__("contextlib").nullcontext()
    )
    assert alone["clips"] == final["clips"] == 16
    assert (alone["top1"], alone["top5"], alone["per_class"]) == (final["top1"], final["top5"], final["per_class"])


@pytest.mark.slow
def test_plain_torchrun_with_the_same_arguments(packed, tmp_path):
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "pipeline.train",
    ]
    cmd += ["--shards", f"{packed}/<000..007>.tar", *SMALL, "--epochs", "1", "--audit-keys"]
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (log,) = (tmp_path / "runs").iterdir()  # runs/<timestamp>, chosen by rank 0 and shared
    r0, r1 = audit(log, 0, 0), audit(log, 0, 1)
    assert len(r0) == len(r1) == 24 and not set(r0) & set(r1)
    assert records(log)[-1]["world_size"] == 2


@pytest.mark.parametrize(
    "shards, world, cores, resample, expected",
    [
        (32, 1, 2, False, 1),
        (32, 1, 16, False, 8),
        (32, 8, 2, False, 1),
        (32, 8, 16, False, 4),
        (4, 8, 16, True, 8),
        (32, 2, 1, False, 1),
    ],
)
def test_auto_workers_table(shards, world, cores, resample, expected):
    assert plan.auto_workers(shards, world, cores, resample) == expected


def _audit_lines(log_dir: Path, epoch: int, rank: int) -> list[str]:
    return (log_dir / "audit" / f"epoch-{epoch:03d}-rank-{rank}.txt").read_text().splitlines()


def test_two_ranks_with_pad_audit_every_clip_once_plus_marked_repeats_and_resume_exactly(packed, tmp_path):
    """Batch 5 on 2 ranks of 24 clips: pad runs 5 steps (25 clips) a rank, one marked repeat each;
    a run killed mid-epoch (--max-steps) and resumed audits exactly the uninterrupted run's lines."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = {"batch_size": 5, "epochs": 2, "audit_keys": True, "eval_every": 0, "nproc_per_node": 2, "epoch_fill": "pad"}
    launch(cfg_for(packed, full, **args))
    all_keys = sorted(k for i in range(8) for k in shard_keys(packed / f"{i:03d}.tar"))
    for epoch in (0, 1):
        ranks = [_audit_lines(full, epoch, r) for r in (0, 1)]
        assert [len(lines) for lines in ranks] == [25, 25]  # equal steps on both ranks
        firsts = [line for lines in ranks for line in lines if "\t" not in line]
        repeats = [line.split("\t") for lines in ranks for line in lines if "\t" in line]
        assert sorted(firsts) == all_keys  # every training clip exactly once across the ranks
        assert len(repeats) == 2 and all(mark == "repeat" and key in firsts for key, mark in repeats)
    first = launch(cfg_for(packed, part, max_steps=7, **args))
    assert first["stopped_early"] and first["steps"] == 7
    second = launch(cfg_for(packed, part, resume=str(part), **args))
    assert second["steps"] == 10 and second["epochs"] == 2
    for epoch in (0, 1):
        for rank in (0, 1):
            assert _audit_lines(part, epoch, rank) == _audit_lines(full, epoch, rank)
