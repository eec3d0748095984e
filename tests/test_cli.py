"""Every bad argument of every console script: exit code 2, one `error: ...` line on stderr, no traceback.
click's own usage errors (unknown option, non-integer value, missing argument) included."""

import subprocess

import pytest
from conftest import assert_one_line_error, cli_command, cli_env, run_cli

from pipeline import cli

SMALL = ["--model", "tiny", "--crop", "24", "--batch-size", "4", "--workers", "2", "--no-progress"]
T = "{packed}/<000..007>.tar"

CASES = [
    # make-sample-data
    ("sample_data_app", ["{file}"], "is a file"),
    ("sample_data_app", ["{tmp}/s", "--classes", "52"], "--classes must be in 1..51"),
    ("sample_data_app", ["{tmp}/s", "--clips-per-class", "0"], "--clips-per-class must be >= 1"),
    ("sample_data_app", ["{tmp}/s", "--classes", "eight"], "Invalid value for '--classes'"),
    ("sample_data_app", ["{tmp}/s", "--colour"], "No such option: --colour"),
    # pack-shards
    ("pack_app", [], "Missing argument"),
    ("pack_app", ["{tmp}/missing", "{tmp}/o"], "data folder not found"),
    ("pack_app", ["{empty}", "{tmp}/o"], "empty"),
    ("pack_app", ["{tree}", "{file}/sub"], "not writable"),
    ("pack_app", ["{tree}", "{tmp}/o", "--part", "2..3"], "--part"),
    ("pack_app", ["{tree}", "{tmp}/o", "--shards", "0"], "--shards must be >= 1"),
    ("pack_app", ["{tree}", "{tmp}/o", "--frames", "-3"], r"--frames must be >= 1, got -3"),
    ("pack_app", ["{tree}", "{tmp}/o", "--timeout", "0"], "--timeout must be > 0"),
    ("pack_app", ["{tree}", "{tmp}/o", "--workers", "0"], "--workers must be >= 1"),
    ("pack_app", ["{tree}", "{tmp}/o", "--quality", "high"], "Invalid value for '--quality'"),
    ("pack_app", ["{tree}", "{tmp}/o", "--engine", "spark"], "unknown engine 'spark'; choose local or ray"),
    ("pack_app", ["{tree}", "{tmp}/o", "--ray-address", "10.0.0.1:6379"], "--ray-address is for --engine ray"),
    # train-stream
    ("train_app", [], "Missing option '--shards'"),
    ("train_app", ["--shards", ""], "--shards must name at least one pattern"),
    ("train_app", ["--shards", "{tmp}/<000..007>.tar"], "no shards match"),
    ("train_app", ["--shards", "{packed}/<000..0x7>.tar"], "malformed range"),
    ("train_app", ["--shards", "{packed}/<007..000.tar"], "malformed range"),
    ("train_app", ["--shards", T, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("train_app", ["--shards", T, "--batch-size", "-4"], "--batch-size must be >= 1, got -4"),
    ("train_app", ["--shards", T, "--crop", "0"], "--crop must be >= 1"),
    ("train_app", ["--shards", T, "--epochs", "0"], "--epochs must be >= 1"),
    ("train_app", ["--shards", T, "--epochs", "1.5"], "Invalid value for '--epochs'"),
    ("train_app", ["--shards", T, "--max-bad", "-1"], "--max-bad must be >= 0"),
    ("train_app", ["--shards", T, "--lr", "0"], "--lr must be > 0"),
    ("train_app", ["--shards", T, *SMALL, "--model", "resnet-9000"], "resnet-9000"),
    ("train_app", ["--shards", T, *SMALL, "--workers", "1", "--nproc-per-node", "9"], "8 training shards for 9 ranks"),
    ("train_app", ["--shards", T, *SMALL, "--log-dir", "{file}/run"], "cannot create the run folder .* is a file"),
    ("train_app", ["--shards", T, *SMALL, "--resume", "{tmp}/nothing"], "no checkpoint at"),
    ("train_app", ["--shards", T, "--index", "{tmp}/index.json"], "cannot read index"),
    ("train_app", ["--shards", "pipe:cat {packed}/000.tar"], "--allow-pipe"),
    ("train_app", ["--shards", "nosuch://bucket/000.tar"], "unsupported URL scheme 'nosuch'"),
    ("train_app", ["--shards", T, "--bogus"], "No such option: --bogus"),
    (
        "train_app",
        ["--shards", T, "--cache-dir", "{tmp}/c", "--cache-size", "lots"],
        "--cache-size must be a size like 50GB",
    ),
    ("train_app", ["--shards", T, "--cache-dir", "{tmp}/c", "--cache-size", "-5GB"], "--cache-size must be a size"),
    (
        "train_app",
        ["--shards", T, "--cache-dir", "{tmp}/c", "--cache-size", "0"],
        "--cache-size must be between 1 byte",
    ),
    ("train_app", ["--shards", T, "--cache-dir", "{tmp}/c", "--cache-size", "5XB"], "--cache-size must be a size"),
    ("train_app", ["--shards", T, "--cache-size", "50GB"], "a cache size .* needs --cache-dir"),
    ("train_app", ["--shards", T, "--cache-dir", "s3://b/c"], "--cache-dir must be a local folder"),
    ("bench_app", ["--shards", T, "--cache-dir", "{tmp}/c", "--cache-size", "nan"], "--cache-size must be a size"),
    # inspect-shards
    ("inspect_app", [], "Missing argument"),
    ("inspect_app", ["{tmp}/<000..003>.tar"], "no shards match"),
    ("inspect_app", ["{packed}/<000..0x3>.tar"], "malformed range"),
    ("inspect_app", ["{packed}", "--samples", "0"], "--samples must be >= 1"),
    ("inspect_app", ["{packed}", "--frame-height", "4"], "--frame-height must be in 8..1024"),
    # verify-shards
    ("verify_app", [], "Missing argument"),
    ("verify_app", ["{tmp}/missing"], "not found"),
    ("verify_app", ["{empty}"], "index.json"),
    ("verify_app", ["{packed}", "--workers", "many"], "Invalid value for '--workers'"),
    # plot-run
    ("plot_app", [], "Missing argument"),
    ("plot_app", ["{tmp}/missing"], "run folder not found"),
    ("plot_app", ["{empty}"], "metrics.jsonl"),
]


@pytest.mark.parametrize("app, args, message", CASES, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(CASES)])
def test_bad_argument_is_one_line_and_exit_2(app, args, message, packed, small_tree, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    fill = {"tmp": tmp_path, "packed": packed, "tree": small_tree[0], "empty": empty, "file": a_file}
    assert_one_line_error(run_cli(getattr(cli, app), *[a.format(**fill) for a in args]), message)


@pytest.mark.parametrize("args", [["--epochs", "x"], ["--bogus"], []])
def test_usage_errors_of_the_real_console_script(args):
    done = subprocess.run(cli_command("train_app") + args, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr


def test_help_still_works():
    for app in ("sample_data_app", "pack_app", "train_app", "inspect_app", "verify_app", "plot_app"):
        result = run_cli(getattr(cli, app), "--help")
        assert result.exit_code == 0 and "Usage" in result.stdout and not result.stderr


@pytest.mark.parametrize(
    "text, size",
    [("50GB", 50 * 10**9), ("500MB", 500 * 10**6), ("123456", 123456), ("1.5TiB", 3 << 39), ("2g", 2 * 10**9),
     ("64 KiB", 65536), ("10b", 10), ("1e3", None), ("GB", None), ("-1", None), ("0", None), ("inf", None)],
)  # fmt: skip
def test_cache_size_takes_human_sizes(text, size):
    from pipeline.config import parse_size
    from pipeline.errors import UserError

    if size is None:
        with pytest.raises(UserError, match="--cache-size"):
            parse_size(text, "--cache-size")
    else:
        assert parse_size(text, "--cache-size") == size


def test_help_explains_the_cache_options():
    for app in ("train_app", "bench_app"):
        text = " ".join(run_cli(getattr(cli, app), "--help").stdout.split())
        assert "--cache-dir" in text and "Local folder caching remote shards" in text, app
        assert "--cache-size" in text and "least recently used shards are evicted" in text, app
        assert "50GB" in text, app
