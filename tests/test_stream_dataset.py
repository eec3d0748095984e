"""ClipDataset in the frameworks' loaders: torchdata's StatefulDataLoader resumes it exactly from a
state saved with torch.save and loaded in a new process (no fast-forward, no batch decoded twice);
each pass is the next epoch with persistent and non-persistent workers, forked or spawned; len()
is what a rank gets; rank and world size are read when iteration starts; constructor checks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_env
from torch.utils.data import DataLoader

from pipeline import ClipDataset, ClipLoader, read_shard
from pipeline.errors import UserError

pytest.importorskip("torchdata")
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

ARGS = dict(crop=24, seed=5, shuffle_buffer=8)

# Runs in a fresh process: a StatefulDataLoader over a ClipDataset, either to step STOP (then its
# state is torch.save'd) or from that saved state to the end; every decoded batch's keys are
# appended to DECODED (TrainClips.fill counted, in the workers too: they are forked from here).
STATEFUL = textwrap.dedent(
    """
    import json, logging, sys
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader
    import pipeline.stream.clips as clips
    from pipeline import ClipDataset

    pack, workers, snapshot, out, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    fill = clips.TrainClips.fill
    def counted(self, rows):
        got = fill(self, rows)
        with open(out + ".decoded", "a") as f:
            f.write(json.dumps(got[0]) + "\\n")
        return got
    clips.TrainClips.fill = counted
    logging.basicConfig(level=logging.WARNING)  # torchdata's fast-forward warning is a log record
    dataset = ClipDataset(pack, batch_size=4, num_workers=workers, crop=24, seed=5, shuffle_buffer=8)
    loader = StatefulDataLoader(dataset, batch_size=None, num_workers=workers, snapshot_every_n_steps=snapshot)
    keys = []
    if stop:
        for epoch in range(3):
            for batch in loader:
                keys.append(batch["key"])
                if len(keys) == stop:
                    torch.save(loader.state_dict(), out + ".state")
                    json.dump(keys, open(out + ".head", "w"))
                    sys.exit(0)
    loader.load_state_dict(torch.load(out + ".state", weights_only=True))
    json.dump([[b["key"] for b in loader] for _ in range(2)], open(out + ".tail", "w"))
    """
)


def _passes(loader, passes: int) -> list[list[list[str]]]:
    return [[b["key"] for b in loader] for _ in range(passes)]


def _run(tmp_path: Path, packed: Path, workers: int, snapshot: int, stop: int) -> subprocess.CompletedProcess:
    script = tmp_path / "stateful.py"
    script.write_text(STATEFUL)
    command = [sys.executable, str(script), str(packed), str(workers), str(snapshot), str(tmp_path / "run"), str(stop)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=cli_env(OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.parametrize("workers, snapshot", [(0, 1), (2, 1), (2, 3)])
def test_stateful_dataloader_resumes_in_a_new_process_without_decoding_used_batches(
    packed, tmp_path, workers, snapshot
):
    dataset = ClipDataset(packed, batch_size=4, num_workers=workers, **ARGS)
    reference = _passes(DataLoader(dataset, batch_size=None, num_workers=workers), 3)
    per_epoch = len(reference[0])
    stop = per_epoch + 5  # inside epoch 1
    _run(tmp_path, packed, workers, snapshot, stop)
    (tmp_path / "run.decoded").unlink()
    resumed = _run(tmp_path, packed, workers, snapshot, 0)
    head = json.loads((tmp_path / "run.head").read_text())
    tail = json.loads((tmp_path / "run.tail").read_text())
    assert head + tail[0] == reference[0] + reference[1]  # the rest of epoch 1, exactly
    assert tail[1] == reference[2]  # and the next pass is epoch 2
    assert "fast-forward" not in resumed.stderr
    decoded = [json.loads(line) for line in (tmp_path / "run.decoded").read_text().splitlines()]
    # torchdata replays the steps since its last snapshot (snapshot_every_n_steps > 1): those only
    replayed = (stop % snapshot) if snapshot > 1 else 0
    assert len(decoded) == len(tail[0]) + len(tail[1]) + replayed
    assert sum(keys in head for keys in decoded) == replayed


@pytest.mark.parametrize("workers", [0, 2])
def test_a_state_saved_after_an_epochs_last_batch_resumes_at_the_next_epoch(packed, workers):
    def make(kind=StatefulDataLoader):
        dataset = ClipDataset(packed, batch_size=4, num_workers=workers, **ARGS)
        return kind(dataset, batch_size=None, num_workers=workers)

    reference = _passes(make(DataLoader), 2)
    loader = make()
    batches = iter(loader)
    first = [next(batches)["key"] for _ in range(len(loader))]  # as Lightning: never asks past the last
    state = loader.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert first == reference[0] and _passes(resumed, 1)[0] == reference[1]


@pytest.mark.parametrize(
    "workers, persistent, method", [(0, False, None), (2, False, "fork"), (2, True, "fork"), (1, False, "spawn")]
)
def test_each_pass_is_the_next_epoch_without_set_epoch(packed, workers, persistent, method):
    dataset = ClipDataset(packed, batch_size=4, **ARGS)
    loader = DataLoader(
        dataset, batch_size=None, num_workers=workers, persistent_workers=persistent, multiprocessing_context=method
    )
    passes = _passes(loader, 2 if method == "spawn" else 3)  # spawning a worker costs seconds
    for epoch, keys in enumerate(passes):
        chosen = ClipDataset(packed, batch_size=4, **ARGS)
        chosen.set_epoch(epoch)
        # one worker plans as no worker does: the in-process pass is the reference for spawn
        assert _passes(DataLoader(chosen, batch_size=None, num_workers=workers if workers > 1 else 0), 1)[0] == keys
    assert all(a != b for a, b in zip(passes, passes[1:]))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("batch_size", [None, 5])
def test_len_is_what_each_rank_gets(packed, world, workers, batch_size):
    for rank in range(world):
        dataset = ClipDataset(
            packed, batch_size=batch_size, rank=rank, world_size=world, num_workers=workers, epoch_fill="drop", **ARGS
        )
        loader = DataLoader(dataset, batch_size=None, num_workers=workers)
        for _ in range(2):
            expected = len(loader)
            assert expected == len(dataset) > 0
            assert sum(1 for _ in loader) == expected


def test_len_needs_num_workers_and_the_dataloader_must_agree(packed):
    dataset = ClipDataset(packed, batch_size=4, **ARGS)
    with pytest.raises(TypeError, match="`num_workers`"):
        len(dataset)
    mismatched = ClipDataset(packed, batch_size=4, num_workers=2, **ARGS)
    with pytest.raises(UserError, match="`num_workers`=2, the DataLoader has num_workers=0"):
        next(iter(DataLoader(mismatched, batch_size=None)))


def test_a_dataloader_batching_the_batches_again_is_a_clear_error(packed):
    dataset = ClipDataset(packed, batch_size=4, **ARGS)
    with pytest.raises(UserError, match="batched 1 of them again: give the DataLoader batch_size=None"):
        next(iter(DataLoader(dataset)))  # the DataLoader's default batch_size=1
    clips = ClipDataset(packed, **ARGS)
    batch = next(iter(DataLoader(clips, batch_size=4)))  # single clips: the DataLoader batches them
    assert batch["frames"].shape == (4, 4, 24, 24, 3) and list(batch)[0] == "frames"


def test_a_crop_larger_than_the_packs_frames_is_a_constructor_error(packed):
    for make in (ClipDataset, ClipLoader):
        with pytest.raises(UserError, match=r"`crop` 160 is larger than the frames of the pack, .* 32 px"):
            make(packed, crop=160)


def test_rank_is_read_when_iteration_starts(packed, monkeypatch):
    # made before the process group exists, as in a DataModule's __init__
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    dataset = ClipDataset(packed, batch_size=4, **ARGS)
    loader = ClipLoader(packed, batch_size=4, workers=0, **ARGS)
    for started in (lambda: next(iter(dataset)), lambda: next(iter(loader)), lambda: len(loader)):
        with pytest.raises(UserError, match="WORLD_SIZE=2 and RANK=1 say .* not initialised"):
            started()
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        # the process group now says 0 of 1: that is what they read, not the environment
        assert dataset.world_size == 1 and len(loader) == len(ClipLoader(packed, batch_size=4, workers=0, **ARGS))
        assert next(iter(dataset))["frames"].shape == (4, 4, 24, 24, 3)
    finally:
        torch.distributed.destroy_process_group()


def test_read_shard_takes_what_shards_takes(packed):
    one = [s["key"] for s in read_shard(packed / "000.tar")]
    two = [s["key"] for s in read_shard(packed / "<000..001>.tar")]
    assert two[: len(one)] == one and len(two) == 2 * len(one)
    assert [s["key"] for s in read_shard([packed / "000.tar", packed / "001.tar"])] == two
    folder = [s["key"] for s in read_shard(packed)]
    assert len(folder) == 48 + 16 and set(two) <= set(folder)
    with pytest.raises(UserError, match="no shards match"):
        next(read_shard(packed / "nothing-*.tar"))
    with pytest.raises(UserError, match="cannot read index"):
        next(read_shard(packed.parent))


# A program with a SIGTERM handler of its own (Lightning's, a requeue helper's) that leaves its
# loaders open: it must still exit. The handler only notes the signal, so a worker that kept it
# would ignore the SIGTERM that ends it at exit.
OWN_HANDLER = textwrap.dedent(
    """
    import signal, sys
    signal.signal(signal.SIGTERM, lambda *a: print("SIGTERM noted", flush=True))
    from torch.utils.data import DataLoader
    from pipeline import ClipDataset, ClipLoader
    loader = ClipLoader(sys.argv[1], batch_size=4, crop=24, workers=2)
    next(iter(loader))
    dataset = ClipDataset(sys.argv[1], batch_size=4, crop=24)
    next(iter(DataLoader(dataset, batch_size=None, num_workers=2, persistent_workers=True)))
    print("returning", flush=True)
    """
)


@pytest.mark.slow
def test_a_program_with_its_own_sigterm_handler_exits(packed, tmp_path):
    script = tmp_path / "own_handler.py"
    script.write_text(OWN_HANDLER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(packed)], stdout=subprocess.PIPE, text=True, env=cli_env(OMP_NUM_THREADS="1")
    )
    try:
        assert proc.stdout.readline().strip() == "returning"
        start = time.monotonic()
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - start < 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
