import shutil
import sys
from pathlib import Path

import pytest

from pipeline.tools.sampledata import make_sample_data

sys.path.insert(0, str(Path(__file__).parent))

from shardmaker import make_packed  # noqa: E402


@pytest.fixture(scope="session")
def hmdb_tree(tmp_path_factory):
    """All 51 HMDB class names, 4 clips each: (data dir, ground truth list of SampleClip)."""
    root = tmp_path_factory.mktemp("hmdb")
    truth = make_sample_data(root, classes=51, clips_per_class=4, seed=0)
    return root, truth


@pytest.fixture(scope="session")
def small_tree(tmp_path_factory):
    """4 classes x 6 clips: quick packs for option, fault and resume tests."""
    root = tmp_path_factory.mktemp("small")
    truth = make_sample_data(root, classes=4, clips_per_class=6, seed=1)
    return root, truth


@pytest.fixture
def copy_tree(tmp_path):
    """Copy a session tree so a test may damage it."""

    def copy(tree):
        dst = tmp_path / "data"
        shutil.copytree(tree[0], dst)
        return dst

    return copy


def run_cli(app, *args):
    """Run a Typer app in-process; returns click's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(a) for a in args])


REPO = Path(__file__).resolve().parent.parent


def cli_command(app_name: str) -> list[str]:
    """argv that runs one of pipeline.cli's apps in a fresh process (installed or not)."""
    import sys

    return [sys.executable, "-c", f"from pipeline.cli import {app_name}; {app_name}()"]


def cli_env(**extra) -> dict:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def packed(tmp_path_factory) -> Path:
    """Shards written directly in the docs/FORMAT.md layout: 4 classes, 48 training clips in 8 shards
    of 6, 16 test clips in 2 shards; 4 frames of 32 px height, 40-56 px wide."""
    out = tmp_path_factory.mktemp("packed")
    make_packed(out)
    return out


def assert_one_line_error(result, pattern: str) -> None:
    """Exit code 2, exactly one `error: ...` line on stderr matching `pattern`, no traceback."""
    import re

    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="session")
def pack(small_tree, tmp_path_factory):
    """The small tree plus one unreadable video listed for training, packed into 3 + 3 shards."""
    data = tmp_path_factory.mktemp("inspect-data")
    shutil.copytree(small_tree[0], data, dirs_exist_ok=True)
    (data / "hmdb51_org" / "catch" / "broken_clip_0.avi").write_bytes(b"not a video")
    with open(data / "testTrainMulti_7030_splits" / "catch_test_split1.txt", "a") as f:
        f.write("broken_clip_0.avi 1 \n")
    out = tmp_path_factory.mktemp("inspect-pack")
    from pipeline.cli import pack_app

    result = run_cli(pack_app, data, out, "--shards", "3", "--max-failures", "1", "--quiet")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def damaged(pack, tmp_path):
    dst = tmp_path / "pack"
    shutil.copytree(pack, dst)
    return dst


ONE_WORKER_MODULES = ("tests/test_pack_engines_ray.py::",)
"""Test modules whose tests share a costly module fixture (a Ray cluster): xdist runs each one's
tests in one worker, so the fixture is made once."""


def pytest_xdist_make_scheduler(config, log):
    """`-n N` as `--dist load`, except that a module of ONE_WORKER_MODULES goes to one worker. (What
    `--dist loadgroup` and `xdist_group` would do, but with pytest 9.2 and xdist 3.8 they do not
    group.) Any other `--dist` is left to xdist."""
    if config.getoption("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return next((m for m in ONE_WORKER_MODULES if nodeid.startswith(m)), nodeid)

    return OneWorkerModules(config, log)
