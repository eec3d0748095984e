"""Every script in examples/ runs as a real subprocess on a small pack, and reports what the index implies."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli_env

from pipeline import ClipLoader, read_shard
from pipeline.stream.plan import steps_per_epoch
from pipeline.stream.sources import resolve

EXAMPLES = REPO / "examples"
SMALL = ["--crop", "24", "--batch-size", "4"]  # the `packed` fixture's frames are 32 px high


def run_example(name: str, *args, launcher: list[str] = ()) -> dict[str, str]:
    """Run examples/NAME with ARGS (after `python LAUNCHER...`, e.g. torchrun's module); exit code 0
    and one `name: k=v ...` line, returned as a dict."""
    done = subprocess.run(
        [sys.executable, *launcher, str(EXAMPLES / name), *map(str, args)],
        check=False, capture_output=True, text=True, timeout=120, env=cli_env(OMP_NUM_THREADS="1"), cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(name.removesuffix(".py") + ": "), done.stdout
    return dict(re.findall(r"(\w+)=(\[[^\]]*\]|\S+)", lines[0]))


def test_every_example_is_tested():
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    tested = {
        name.removeprefix("test_") + ".py"
        for name in globals()
        if name.startswith("test_") and name != "test_every_example_is_tested"
    }
    assert scripts == tested


def test_train_cliploader(packed: Path):
    # 2 workers, batch 4: the steps are those ClipLoader plans from the index; the in-run restore
    # halfway through epoch 0 neither repeats nor skips a clip.
    expected = len(ClipLoader(packed, batch_size=4, crop=24, workers=2))
    out = run_example("train_cliploader.py", packed, *SMALL, "--workers", "2", "--epochs", "1")
    assert int(out["steps"]) == expected
    assert int(out["clips"]) == int(out["epoch0_distinct"]) == 4 * expected
    assert int(out["resumed_at_step"]) == expected // 2 > 0
    assert float(out["loss"]) > 0


def test_train_dataloader(packed: Path):
    # Each of the 2 DataLoader workers delivers whole batches of its own (separate_workers=2).
    counts = [s.samples for s in resolve([str(packed)]).shards]
    expected = steps_per_epoch(counts, 4, 1, seed=0, epoch=0, resample=False, separate_workers=2)
    out = run_example("train_dataloader.py", packed, *SMALL, "--workers", "2", "--epochs", "1")
    assert int(out["steps"]) == expected > 0
    assert int(out["clips"]) == int(out["distinct"]) == 4 * expected
    assert float(out["loss"]) > 0


def test_custom_stage(packed: Path):
    # Single training clips are all delivered once (batch of one divides everything): the kept
    # clips are exactly the training clips of classes 0 and 2.
    labels = [s["label"] for shard in resolve([str(packed)]).shards for s in read_shard(shard.url)]
    out = run_example("custom_stage.py", packed, *SMALL, "--workers", "2", "--classes", "0", "2")
    assert int(out["clips"]) == sum(label in (0, 2) for label in labels) > 0
    assert out["labels"] == "[0, 2]"
    assert -(-int(out["clips"]) // 4) <= int(out["batches"]) <= -(-int(out["clips"]) // 4) + 1
    assert float(out["mean_motion"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.parametrize("route", ["cliploader", "stateful"])
def test_train_lightning(packed: Path, tmp_path: Path, route: str, devices: int):
    # A real lightning.Trainer, killed mid-epoch 1 and resumed from its checkpoint (see frameworkkit).
    from frameworkkit import check_lightning_resume

    check_lightning_resume(packed, tmp_path, route, devices)


@pytest.mark.slow
@pytest.mark.parametrize("route, processes", [("dataloader", 1), ("cliploader", 2), ("dataloader", 2)])
def test_train_accelerate(packed: Path, route: str, processes: int):
    # accelerate in 1 process (the DataLoader prepared) and in 2 (torchrun; ClipLoader through
    # prepare, the DataLoader left unprepared): every training clip exactly once per epoch.
    pytest.importorskip("accelerate")
    args = [packed, "--route", route, *SMALL, "--workers", "1", "--epochs", "2"]
    if processes == 1:
        out = run_example("train_accelerate.py", *args)
    else:
        out = run_example(
            "train_accelerate.py", *args, launcher=["-m", "torch.distributed.run", "--nproc-per-node", "2"]
        )
    assert int(out["processes"]) == processes
    assert out["clips"] == out["distinct"] == "[48, 48]"
    assert int(out["steps"]) == 2 * 48 // (4 * processes)


def test_train_stateful(packed: Path):
    # StatefulDataLoader(ClipDataset), 2 workers, restored halfway through epoch 1: both epochs
    # still use each of the 48 training clips exactly once (batch 4 divides every worker's share).
    pytest.importorskip("torchdata")
    out = run_example("train_stateful.py", packed, *SMALL, "--workers", "2", "--epochs", "2")
    assert int(out["steps"]) == 2 * 12 and int(out["resumed_at_step"]) == 18
    assert int(out["clips"]) == 96 and out["distinct"] == "[48, 48]"
    assert float(out["loss"]) > 0
