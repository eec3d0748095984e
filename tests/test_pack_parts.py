"""Slurm job arrays (issue 25) and parts that race (issue 22): `--part auto` takes its part from the
SLURM_ARRAY_* variables; four parts started at the same moment on one folder, or on one bucket, all
exit 0, and what they leave is the single-machine pack byte for byte."""

import subprocess
import uuid

import pytest
import s3kit
from conftest import assert_one_line_error, cli_command, cli_env, run_cli

from pipeline.cli import pack_app
from pipeline.errors import UserError
from pipeline.pack.parts import slurm_part

ARGS = ["--quiet", "--shards", "4", "--test-shards", "2", "--workers", "1"]
PARTS = 4
REPEATS = 5


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    """2 classes x 4 clips: six shards over four parts, so that every part starts at once and most
    finish together (the races are in the start and in the assembly, not in the decoding)."""
    from pipeline.tools.sampledata import make_sample_data

    root = tmp_path_factory.mktemp("tiny")
    make_sample_data(root, classes=2, clips_per_class=4, seed=0)
    return root


@pytest.fixture(scope="module")
def reference(tiny_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    result = run_cli(pack_app, tiny_tree, out, *ARGS)
    assert result.exit_code == 0, result.output
    return out


def _files(folder) -> dict[str, bytes]:
    """The published files and the pack's state records (the plan and one record per shard)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _array_env(task: int, count: int = PARTS, first: int = 0, **extra) -> dict:
    return cli_env(
        SLURM_ARRAY_TASK_ID=str(first + task),
        SLURM_ARRAY_TASK_COUNT=str(count),
        SLURM_ARRAY_TASK_MIN=str(first),
        SLURM_ARRAY_TASK_MAX=str(first + count - 1),
        **extra,
    )


def _run_array(data, out: str, **extra) -> list[subprocess.CompletedProcess]:
    """Start every task of the array at once (as sbatch --array does on an idle cluster), then wait."""
    cmd = cli_command("pack_app") + [str(data), out, *ARGS, "--part", "auto"]
    procs = [
        subprocess.Popen(cmd, env=_array_env(t, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for t in range(PARTS)
    ]
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done


def _assert_all_succeeded(done) -> None:
    for task, p in enumerate(done):
        assert p.returncode == 0, f"task {task}: {p.stderr}"
        assert f"--part auto: part {task + 1}/{PARTS} from SLURM_ARRAY_TASK_ID={task}" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr


# ---------------------------------------------------------------- the part from the environment


@pytest.mark.parametrize(
    "env, part",
    [
        ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}, (1, 4)),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}, (4, 4)),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1"}, (1, 8)),
        ({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1"}, (8, 8)),
        # --array=10-13: the ids need not start at 0 or 1
        ({"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "10"}, (3, 4)),
        # --array=0-12:4 is the ids 0, 4, 8, 12
        (
            {
                "SLURM_ARRAY_TASK_ID": "8",
                "SLURM_ARRAY_TASK_COUNT": "4",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_MAX": "12",
                "SLURM_ARRAY_TASK_STEP": "4",
            },
            (3, 4),
        ),
        # a single task: --array=5
        ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MIN": "5"}, (1, 1)),
    ],
)
def test_slurm_part_table(env, part):
    found, said = slurm_part(env)
    assert found == part
    assert f"SLURM_ARRAY_TASK_ID={env['SLURM_ARRAY_TASK_ID']}" in said


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT, SLURM_ARRAY_TASK_MIN"),
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, "missing: SLURM_ARRAY_TASK_MIN"),
        ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}, "'x'"),
        ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}, "outside"),
        ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "0", "SLURM_ARRAY_TASK_MIN": "0"}, "COUNT"),
        # --array=1,3,7: ids that are not evenly spaced cannot be numbered 1..N from these variables
        (
            {
                "SLURM_ARRAY_TASK_ID": "3",
                "SLURM_ARRAY_TASK_COUNT": "3",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_MAX": "7",
            },
            "evenly spaced",
        ),
    ],
)
def test_slurm_part_refuses_what_it_cannot_number(env, message):
    with pytest.raises(UserError, match=message):
        slurm_part(env)


def test_part_auto_without_slurm_is_one_line(tiny_tree, tmp_path, monkeypatch):
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name, raising=False)
    result = run_cli(pack_app, tiny_tree, tmp_path / "out", *ARGS, "--part", "auto")
    assert_one_line_error(result, r"--part auto .*SLURM_ARRAY_TASK_ID.*sbatch --array")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- parts that start together


@pytest.mark.slow
def test_array_tasks_started_together_on_one_folder_all_succeed(tiny_tree, reference, tmp_path):
    for rep in range(REPEATS):
        out = tmp_path / f"out{rep}"
        done = _run_array(tiny_tree, str(out))
        _assert_all_succeeded(done)
        assert sum("every part has finished" not in p.stdout for p in done) >= 1  # someone assembled
        assert _files(out) == _files(reference), f"repeat {rep}"  # no temp file left behind either


@pytest.mark.slow
def test_array_tasks_started_together_on_one_bucket_all_succeed(tiny_tree, reference):
    server = s3kit.MotoServer()
    try:
        fs = s3kit.s3fs_for(server.url)
        for rep in range(REPEATS):
            bucket = f"array-{uuid.uuid4().hex[:12]}"
            fs.mkdir(bucket)
            done = _run_array(tiny_tree, f"s3://{bucket}/pack/", **s3kit.client_env(server.url))
            _assert_all_succeeded(done)
            root = f"{bucket}/pack"
            found = {p[len(root) + 1 :]: fs.cat_file(p) for p in fs.find(root)}
            assert found == _files(reference), f"repeat {rep}"
    finally:
        server.stop()


def test_a_part_re_run_later_finishes_the_job(tiny_tree, reference, tmp_path):
    """One task of the array was lost (never ran): re-submitting it alone assembles the pack."""
    out = tmp_path / "out"
    cmd = cli_command("pack_app") + [str(tiny_tree), str(out), *ARGS, "--part", "auto"]
    for task in (0, 1, 3):
        p = subprocess.run(cmd, env=_array_env(task), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        assert "every part has finished" in p.stdout
    assert not (out / "index.json").exists()
    p = subprocess.run(cmd, env=_array_env(2), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert _files(out) == _files(reference)
