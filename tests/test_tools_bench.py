"""bench-stream on the tiny fixture shards: it runs, prints one valid JSON line per configuration,
and bad arguments are one line on stderr with exit code 2."""

import json
import re

import numpy as np
import pytest
import streamkit
from conftest import run_cli

from pipeline.cli import bench_app
from pipeline.config import StreamConfig
from pipeline.stream import plan
from pipeline.tools import bench

SMALL = ["--crop", "24", "--batch-size", "4", "--shuffle-buffer", "8", "--batches", "3", "--warmup", "1"]


def test_json_lines_one_per_configuration(packed):
    result = run_cli(bench_app, "--shards", f"{packed}/<000..007>.tar", *SMALL, "--workers", "0,2", "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    runs = [r for r in lines if r["bench"] == "stream"]
    assert [r["workers"] for r in runs] == [0, 2]
    for r in runs:
        assert r["mode"] == "loader" and r["source"] == "shards"
        assert r["clips"] == 12 and r["clips_per_s"] > 0
        assert r["frames_per_s"] == pytest.approx(4 * r["clips_per_s"], rel=1e-3)
        assert r["mb_per_s"] > 0 and 0 <= r["data_wait"] <= 1
        assert 0 < r["first_batch_s"] < 60
        assert r["peak_rss_mb"] > 0 and r["peak_rss_main_mb"] > 0
    assert runs[1]["worker_processes"] >= 2 and runs[1]["peak_rss_worker_mb"] > 0  # the workers are counted
    (stages,) = [r for r in lines if r["bench"] == "stream-stages"]
    assert set(stages["ms_per_clip"]) == {"tar_read_group", "jpeg_decode", "crop_augment", "collate", "host_to_device"}
    assert sum(stages["share"].values()) == pytest.approx(1, abs=1e-3)


def test_end_to_end_with_synthetic_source_and_table(packed):
    result = run_cli(
        bench_app,
        "--shards",
        f"{packed}/<000..007>.tar",
        *SMALL,
        "--workers",
        "1",
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--synthetic",
        "--no-stages",
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert re.search(r"^shards\s+1\s+[\d.]+", out, re.M), out
    assert re.search(r"^synthetic\s+1\s+[\d.]+", out, re.M), out
    assert "real / synthetic: 1 workers" in out and "stages" not in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shards", "{packed}/<100..131>.tar"], "no shards match"),
        (["--shards", "{packed}/<000..007>.tar", "--workers", "0,x"], "--workers must be a comma-separated list"),
        (["--shards", "{packed}/<000..007>.tar", "--workers", "-1"], "--workers counts must be >= 0"),
        (["--shards", "{packed}/<000..007>.tar", "--workers", "9"], "8 training shards for 1 ranks x 9 workers"),
        (["--shards", "{packed}/<000..007>.tar", "--batches", "0"], "--batches must be >= 1, got 0"),
        (["--shards", "{packed}/<000..007>.tar", "--synthetic"], "--synthetic .* give --model"),
        (["--shards", "{packed}/<000..007>.tar", "--model", "resnet-9000"], "resnet-9000"),
        (["--shards", "{packed}/<000..007>.tar", "--device", "tpu"], "--device must be"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(packed, args, message):
    result = run_cli(bench_app, *SMALL, *[a.format(packed=packed) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]


def test_endless_batches_crosses_epochs_with_the_stream_s_own_batches(packed):
    cfg = StreamConfig(shards=(f"{packed}/<000..007>.tar",), batch_size=4, workers=0, crop=24, shuffle_buffer=8)
    dataset = streamkit.resolve(cfg)
    steps = plan.steps_per_epoch([s.samples for s in dataset.train.shards], 4, 1, 0, 0, False)
    source = bench.endless_batches(dataset.train, cfg, pin_memory=False, copy=True)
    got = [next(source) for _ in range(steps + 2)]
    with streamkit.train_loader(dataset, cfg, 0, 1, epochs=1, copy=True) as loader:
        first_epoch = list(loader.epoch(0))
    for a, b in zip(got, first_epoch):
        assert a["key"] == b["key"] and np.array_equal(a["frames"].numpy(), b["frames"].numpy())
    assert tuple(got[-1]["frames"].shape) == (4, 4, 24, 24, 3)  # the second epoch goes on
