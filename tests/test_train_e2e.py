"""End to end, through the console entry points: make-sample-data -> pack-shards -> train-stream."""

import json
import subprocess

import pytest
from conftest import cli_command, cli_env


@pytest.mark.slow
def test_tiny_model_learns_the_packed_sample_data(tmp_path):
    env = cli_env()
    data, shards, run = tmp_path / "data", tmp_path / "shards", tmp_path / "run"

    def cli(app, *args):
        done = subprocess.run(
            cli_command(app) + [str(a) for a in args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    cli("sample_data_app", data, "--classes", 8, "--clips-per-class", 24, "-q")
    cli("pack_app", data, shards, "-q")
    done = cli(
        "train_app", "--shards", f"{shards}/<000..031>.tar", "--model", "tiny", "--no-progress", "--log-dir", run
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = records[-1]
    assert summary["kind"] == "summary"
    index = json.loads((shards / "index.json").read_text())
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[-1]["clips"] == index["splits"]["test"]["samples"]  # every test clip, once
    assert summary["top1"] >= 0.8, summary
    assert "test top-1" in done.stdout
