"""The loader: one set of worker processes for the whole run, batches in reused shared-memory slots,
the step schedule that makes a resume exact, and what happens when a worker or the parent dies."""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import streamkit
import torch
from conftest import REPO
from shardmaker import shard_keys, write_tar
from streamkit import cfg_for, epoch_batches

from pipeline.config import StreamConfig
from pipeline.device import MEAN, STD, to_model_input
from pipeline.errors import WorkerDied
from pipeline.stream import plan
from pipeline.stream.workers import LocalRing, WorkerPool, threaded
from pipeline.tools.bench import child_pids

# --- the step schedule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "quotas, batch, expected",
    [
        ([8, 8], 4, [[(0, 4)], [(1, 4)], [(0, 4)], [(1, 4)]]),
        ([10, 6], 4, [[(0, 4)], [(1, 4)], [(0, 4)], [(0, 2), (1, 2)]]),
        ([7, 7, 6], 5, [[(0, 5)], [(1, 5)], [(2, 5)], [(0, 2), (1, 2), (2, 1)]]),
        ([3, 3, 3, 3], 4, [[(0, 3), (1, 1)], [(1, 2), (2, 2)], [(2, 1), (3, 3)]]),
        ([12], 4, [[(0, 4)], [(0, 4)], [(0, 4)]]),
        ([0, 8], 4, [[(1, 4)], [(1, 4)]]),
    ],
)
def test_step_schedule_table(quotas, batch, expected):
    schedule = plan.step_schedule(quotas, batch)
    assert schedule == expected
    assert all(sum(n for _, n in step) == batch for step in schedule)
    for w, q in enumerate(quotas):
        assert plan.worker_parts(schedule, w, 0) == (0, [n for step in schedule for v, n in step if v == w])
        assert sum(plan.worker_parts(schedule, w, 0)[1]) == q
        for s in range(len(schedule) + 1):
            done, rest = plan.worker_parts(schedule, w, s)
            assert done + sum(rest) == q


def test_step_schedule_refuses_quotas_that_do_not_fill_whole_batches():
    with pytest.raises(ValueError, match="whole batches"):
        plan.step_schedule([5, 2], 4)


# --- one set of workers for the whole run -----------------------------------------------------


def test_one_set_of_workers_serves_every_epoch_with_each_epoch_s_own_batches(packed):
    """Three epochs from one TrainLoader: the same worker processes throughout, and every epoch's
    batches (keys, crops, order) equal those of a loader started fresh at that epoch."""
    cfg = cfg_for(packed)
    ds = streamkit.resolve(cfg)
    with streamkit.train_loader(ds, cfg, 0, 1, epochs=4, copy=True) as loader:  # workers leave after their last epoch
        assert loader.pids() == []  # workers start with the first epoch asked for
        epochs = [list(loader.epoch(0))]
        pids = loader.pids()
        assert len(pids) == 2
        for epoch in range(1, 3):
            epochs.append(list(loader.epoch(epoch)))
            assert loader.pids() == pids and all(_alive(p) for p in pids)
    for epoch in range(3):
        with streamkit.train_loader(ds, cfg, 0, 1, epoch, epochs=epoch + 1, copy=True) as fresh:
            alone = list(fresh.epoch(epoch))
        assert [b["key"] for b in alone] == [b["key"] for b in epochs[epoch]]
        assert all(a["frames"].equal(b["frames"]) for a, b in zip(alone, epochs[epoch]))
    assert [b["key"] for b in epochs[0]] != [b["key"] for b in epochs[1]]


def test_epochs_must_be_asked_for_in_order(packed):
    cfg = cfg_for(packed, workers=0)
    ds = streamkit.resolve(cfg)
    with streamkit.train_loader(ds, cfg, 0, 1, epochs=3) as loader:
        with pytest.raises(ValueError, match="epoch 1 asked for; the loader is at epoch 0"):
            loader.epoch(1)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_live_in_a_few_reused_slots(packed, workers):
    """Over three epochs (36 batches) every batch's pixels sit in one of the workers' slots: the
    same few buffers again and again, none allocated per batch."""
    cfg = cfg_for(packed, workers=workers, prefetch=2)
    ds = streamkit.resolve(cfg)
    addresses = set()
    with streamkit.train_loader(ds, cfg, 0, 1, epochs=3) as loader:
        for epoch in range(3):
            for batch in loader.epoch(epoch):
                addresses.add(batch["frames"].data_ptr())
    assert len(addresses) <= max(1, workers) * (cfg.prefetch + 1) + 1  # + the buffer end-of-epoch remainders merge into


def test_a_batch_is_valid_until_the_next_one_and_copy_keeps_it(packed):
    cfg = cfg_for(packed, workers=0, prefetch=1)
    ds = streamkit.resolve(cfg)
    with streamkit.train_loader(ds, cfg, 0, 1, epochs=1, copy=True) as loader:
        kept = list(loader.epoch(0))
    with streamkit.train_loader(ds, cfg, 0, 1, epochs=1) as loader:
        for got, want in zip(loader.epoch(0), kept):
            assert got["key"] == want["key"] and got["frames"].equal(want["frames"])


def test_spawned_workers_give_the_same_batches_as_forked_ones(packed):
    """Where fork is not the start method (macOS, Windows) the ring is a torch shared-memory tensor."""
    cfg = cfg_for(packed)
    ds = streamkit.resolve(cfg)
    got = {}
    for method in ("fork", "spawn"):
        with streamkit.train_loader(ds, cfg, 0, 1, epochs=1, copy=True, start_method=method) as loader:
            got[method] = list(loader.epoch(0))
    assert [b["key"] for b in got["fork"]] == [b["key"] for b in got["spawn"]]
    assert all(a["frames"].equal(b["frames"]) for a, b in zip(got["fork"], got["spawn"]))


# --- dying workers, dying parents -------------------------------------------------------------


def test_a_killed_worker_is_a_one_line_error_not_a_hang(packed):
    cfg = cfg_for(packed)
    ds = streamkit.resolve(cfg)
    with streamkit.train_loader(ds, cfg, 0, 1, epochs=2) as loader:
        batches = loader.epoch(0)
        next(batches)
        os.kill(loader.pids()[1], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(WorkerDied, match=r"loader worker 1 died: killed by SIGKILL \(out of memory\? see dmesg\)"):
            for _ in batches:
                pass
        assert time.monotonic() - started < 10


def test_workers_exit_when_the_parent_is_killed(packed, tmp_path):
    """kill -9 of the training process must not leave its loader workers behind (each one holds
    the others' pipes open unless it closes them, and would wait for ever)."""
    script = (
        "import sys, time\n"
        "from pipeline import ClipLoader\n"
        f"loader = ClipLoader('{packed}/<000..007>.tar', batch_size=4, workers=3, crop=24, shuffle_buffer=8)\n"
        "next(loader.epoch(0))\n"
        "print(*loader.pids(), flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    pids = []
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 3 and all(_alive(p) for p in pids)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "loader workers outlived their parent"
    finally:
        proc.kill()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- the pool and the transfer thread, on their own -------------------------------------------


def _counting(worker, ring):
    """A producer writing its worker number and a counter into each slot; fails at 99 if asked."""
    for i in range(6):
        slot, rows = ring.take()
        rows[:2] = worker * 100 + i
        yield {"slot": slot, "n": 2, "i": i}


def test_pool_hands_slots_back_and_forth():
    with WorkerPool(_counting, 2, (3, 4), slots=2) as pool:
        for i in range(6):
            for w in range(2):
                message = pool.get(w)
                assert message["i"] == i and message["frames"].shape == (2, 4)
                assert (message["frames"] == w * 100 + i).all()
                pool.release(w, message)
        assert "done" in pool.get(0) and "done" in pool.get(1)


def _failing(worker, ring):
    slot, rows = ring.take()
    yield {"slot": slot, "n": 1}
    raise ZeroDivisionError("a bug in a producer")


def test_a_producer_bug_reaches_the_parent_with_its_traceback():
    from pipeline.errors import LoaderError

    with WorkerPool(_failing, 1, (2,), slots=2) as pool:
        pool.release(0, pool.get(0))
        with pytest.raises(LoaderError, match="(?s)loader worker 0 failed:.*ZeroDivisionError: a bug in a producer"):
            pool.get(0)


def test_in_process_ring_refuses_a_slot_the_consumer_still_holds():
    ring = LocalRing(np.zeros((2, 3), np.uint8))
    ring.take()
    ring.take()
    with pytest.raises(RuntimeError, match="no free batch slot"):
        ring.take()


def test_transfer_thread_keeps_order_runs_ahead_and_passes_errors_on():
    pulled = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield {"i": i}
        raise KeyError("broken source")

    ran_in = []
    got = threaded(
        source(), lambda item: {**item, "copied": True}, depth=2, init=lambda: ran_in.append(threading.current_thread())
    )
    first = next(got)
    assert ran_in and ran_in[0] is not threading.main_thread()
    assert first == {"i": 0, "copied": True}
    time.sleep(0.2)
    assert len(pulled) >= 3  # ran ahead of the consumer, by at most depth + 1 items
    assert [item["i"] for item in got_until_error(got)] == [1, 2, 3, 4]


def test_transfer_thread_ends_at_once_when_the_consumer_stops_early():
    """A consumer that stops while the queue is full (a step budget reached): the thread, waiting to
    queue the end of its source, must end with it, not hold the consumer in close()."""
    got = threaded(iter([{"i": i} for i in range(3)]), lambda item: item, depth=2)
    next(got)
    time.sleep(0.2)  # the thread queues 1 and 2, then waits to queue the end
    (thread,) = [t for t in threading.enumerate() if t.name == "clipstream-transfer"]
    started = time.monotonic()
    got.close()
    assert time.monotonic() - started < 1 and not thread.is_alive()


def got_until_error(got):
    out = []
    with pytest.raises(KeyError, match="broken source"):
        for item in got:
            out.append(item)
    return out


# --- to_model_input ---------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
def test_model_input_is_the_normalised_batch_in_the_asked_layout(channels_last):
    video = torch.randint(0, 256, (3, 4, 10, 14, 3), dtype=torch.uint8)
    want = (
        video.permute(0, 4, 1, 2, 3).double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1, 1).double()
    ) / torch.tensor(STD).view(1, 3, 1, 1, 1).double()
    got = to_model_input(video, torch.device("cpu"), channels_last)
    assert got.shape == (3, 3, 4, 10, 14) and got.dtype == torch.float32
    assert (got.double() - want).abs().max() < 1e-5
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    assert got.is_contiguous(memory_format=layout)


def test_model_input_reuses_its_buffer_and_matches_the_function():
    from pipeline.device import ModelInput

    model_input = ModelInput(torch.device("cpu"), channels_last=True)
    a = torch.randint(0, 256, (2, 4, 8, 8, 3), dtype=torch.uint8)
    b = torch.randint(0, 256, (2, 4, 8, 8, 3), dtype=torch.uint8)
    first = model_input(a)
    assert first.equal(to_model_input(a, torch.device("cpu"), True))
    second = model_input(b)
    assert second.data_ptr() == first.data_ptr() and second.equal(to_model_input(b, torch.device("cpu"), True))


def test_train_stream_stops_with_one_line_when_a_loader_worker_is_killed(packed, tmp_path):
    """The out-of-memory killer taking a loader worker: train-stream says which one died and how,
    on one line, exits 1, and leaves no process behind."""
    from conftest import cli_command, cli_env

    args = [
        "--shards",
        f"{packed}/<000..007>.tar",
        "--model",
        "tiny",
        "--crop",
        "24",
        "--batch-size",
        "4",
        "--workers",
        "2",
    ]
    args += [
        "--shuffle-buffer",
        "8",
        "--no-progress",
        "--epochs",
        "500",
        "--eval-every",
        "0",
        "--log-every",
        "1",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(
        cli_command("train_app") + args + ["--log-dir", str(tmp_path / "run")],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        workers = []
        while len(workers) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            workers = child_pids(proc.pid)
            time.sleep(0.2)
        assert len(workers) == 2, workers
        metrics = tmp_path / "run" / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count('"step"') >= 2) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(workers[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = err.strip().splitlines()
    assert proc.returncode == 1, err
    assert len(lines) == 1 and re.match(r"error: loader worker [01] died: killed by SIGKILL", lines[0]), err
    time.sleep(1)
    assert not any(_alive(p) for p in workers)


@pytest.mark.parametrize("world, workers", [(1, 2), (2, 2), (2, 0), (4, 2)])
def test_ranks_read_disjoint_keys_covering_the_epoch(packed, world, workers):
    cfg = cfg_for(packed, workers=workers)
    ds = streamkit.resolve(cfg)
    all_keys = sorted(k for s in ds.train.shards for k in shard_keys(Path(s.url)))
    steps = plan.steps_per_epoch([s.samples for s in ds.train.shards], 4, world, cfg.seed, 0, False)
    per_rank = []
    for rank in range(world):
        got = epoch_batches(ds, cfg, 0, rank, world)
        assert len(got) == steps
        assert all(b["frames"].shape == (4, 4, 24, 24, 3) and str(b["frames"].dtype) == "torch.uint8" for b in got)
        per_rank.append([k for b in got for k in b["key"]])
    flat = [k for keys in per_rank for k in keys]
    assert len(flat) == len(set(flat)), "a key was read twice"
    assert sorted(flat) == all_keys  # 8 shards of 6 split evenly in all these cases


def test_uneven_split_uses_the_smallest_ranks_steps(packed):
    cfg = cfg_for(packed, workers=1, epoch_fill="drop")
    ds = streamkit.resolve(cfg)
    keys = [[k for b in epoch_batches(ds, cfg, 0, r, 3) for k in b["key"]] for r in range(3)]
    assert [len(k) for k in keys] == [12, 12, 12]  # ranks hold 18, 18, 12 samples
    flat = [k for ks in keys for k in ks]
    assert len(set(flat)) == len(flat) == 36


@pytest.mark.parametrize("workers, batch", [(1, 4), (2, 5), (0, 7)])
def test_pad_uses_every_clip_once_plus_marked_repeats_with_equal_steps(packed, workers, batch):
    """3 ranks hold 18, 18 and 12 clips: pad runs the largest rank's ceil(18 / batch) steps on
    every rank; each rank reads all its clips once, and only clips marked as repeats come again."""
    cfg = cfg_for(packed, workers=workers, batch_size=batch)
    ds = streamkit.resolve(cfg)
    all_keys = sorted(k for s in ds.train.shards for k in shard_keys(Path(s.url)))
    steps = -(-18 // batch)
    firsts, lengths = [], []
    for rank in range(3):
        got = epoch_batches(ds, cfg, 0, rank, 3)
        lengths.append(len(got))
        keys = [k for b in got for k in b["key"]]
        repeat = [r for b in got for r in b["repeat"].tolist()]
        first = [k for k, r in zip(keys, repeat) if not r]
        assert len(first) == len(set(first)), "a clip not marked as a repeat came twice"
        assert set(k for k, r in zip(keys, repeat) if r) <= set(first), "a repeat of a clip this rank never read"
        firsts += first
    assert lengths == [steps] * 3
    assert sorted(firsts) == all_keys  # every training clip exactly once across the ranks


def test_labels_match_frames_and_epochs_differ(packed):
    cfg = cfg_for(packed)
    ds = streamkit.resolve(cfg)
    e0 = epoch_batches(ds, cfg, 0, 0, 1)
    for b in e0:
        for key, label in zip(b["key"], b["label"].tolist()):
            assert key.startswith(ds.train.classes[label] + "_clip")
    order0 = [k for b in e0 for k in b["key"]]
    order0_again = [k for b in epoch_batches(ds, cfg, 0, 0, 1) for k in b["key"]]
    order1 = [k for b in epoch_batches(ds, cfg, 1, 0, 1) for k in b["key"]]
    assert order0 == order0_again
    assert order1 != order0 and sorted(order1) == sorted(order0)
    assert [b["frames"] for b in epoch_batches(ds, cfg, 0, 0, 1)][0].equal(e0[0]["frames"])


@pytest.mark.parametrize("workers, batch_size, start", [(2, 4, 3), (3, 5, 1), (3, 5, 3), (0, 4, 5)])
def test_a_resume_at_step_s_gives_exactly_the_remaining_steps(packed, workers, batch_size, start):
    """Resuming at step s yields the uninterrupted epoch's steps s.. : same keys, same crops, same
    order, including the steps merged from several workers' remainders (batch 5: 24 clips a rank)."""
    cfg = cfg_for(packed, workers=workers, batch_size=batch_size)
    ds = streamkit.resolve(cfg)
    full = epoch_batches(ds, cfg, 1, 0, 2)
    rest = epoch_batches(ds, cfg, 1, 0, 2, start_step=start)
    assert len(rest) == len(full) - start
    for a, b in zip(full[start:], rest):
        assert a["key"] == b["key"] and a["worker"].equal(b["worker"]) and a["frames"].equal(b["frames"])
    # the schedule's count of what each worker delivered before step s is what the batches say
    plans = plan.train_plan(ds.train.shards, cfg, 1, 0, 2, max(1, cfg.workers or 0))
    schedule = plan.step_schedule([p.quota for p in plans], batch_size)
    for w in range(max(1, workers)):
        delivered = sum(int((b["worker"] == w).sum()) for b in full[:start])
        assert plan.worker_parts(schedule, w, start)[0] == delivered


def test_resample_gives_the_planned_steps_even_with_one_shard(packed):
    cfg = StreamConfig(shards=(f"{packed}/000.tar",), batch_size=2, workers=2, crop=24, resample=True)
    ds = streamkit.resolve(cfg)
    for rank in range(2):
        got = epoch_batches(ds, cfg, 0, rank, 2)
        assert len(got) == 6 // (2 * 2) == 1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_counts_every_test_clip_once(packed, world):
    cfg = cfg_for(packed)
    ds = streamkit.resolve(cfg)
    keys = []
    for rank in range(world):
        for b in streamkit.eval_batches(ds, cfg, rank, world):
            keys.extend(b["key"])
    expected = sorted(k for s in ds.test.shards for k in shard_keys(Path(s.url)))
    assert sorted(keys) == expected and len(expected) == 16


def test_a_corrupt_sample_is_replaced_counted_and_named(tmp_path, packed):
    folder = tmp_path / "p"
    shutil.copytree(packed, folder)
    victim = shard_keys(folder / "003.tar")[0]
    samples = []
    import tarfile

    with tarfile.open(folder / "003.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for key in sorted({n.split(".")[0] for n in members}):
        jpgs = b"JPGS garbage" if key == victim else members[f"{key}.jpgs"]
        samples.append({"key": key, "label": int(members[f"{key}.cls"]), "jpgs": jpgs, "meta": {}})
    write_tar(folder / "003.tar", samples)
    cfg = cfg_for(folder, max_bad=0.5)
    ds = streamkit.resolve(cfg)
    got = epoch_batches(ds, cfg, 0, 0, 1)
    assert len(got) == 12
    faults = [f for b in got for f in b["faults"]]
    assert len(faults) == 1 and victim in faults[0]["what"] and "JPEG pack" in faults[0]["reason"]
    keys = [k for b in got for k in b["key"]]
    assert victim not in keys and len(keys) == 48 and len(set(keys)) == 47


def test_a_truncated_shard_costs_its_missing_clips_not_the_epoch(tmp_path, packed):
    folder = tmp_path / "p"
    shutil.copytree(packed, folder)
    data = (folder / "005.tar").read_bytes()
    (folder / "005.tar").write_bytes(data[: len(data) // 2])
    cfg = cfg_for(folder, max_bad=0.5)
    ds = streamkit.resolve(cfg)
    got = epoch_batches(ds, cfg, 0, 0, 1)
    assert len(got) == 12 and all(len(b["key"]) == 4 for b in got)
    faults = [f for b in got for f in b["faults"]]
    assert len(faults) == 1 and faults[0]["what"].endswith("005.tar") and 1 <= faults[0]["samples"] <= 6
    keys = [k for b in got for k in b["key"]]
    assert len(set(keys)) == 48 - faults[0]["samples"]
