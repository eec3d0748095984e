"""Issue #22 (hardening, round 3) on real files, servers and processes: what we read never decides
where we write or delete, a resume or an evaluation on other contents is an error (never a silently
wrong run), every byte of a resumed HTTP read is accounted for, secrets never reach a log, numbers are
bounded, torn state recovers, a folder in use is locked, and layouts are found one level down."""

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpkit
import pytest
from conftest import assert_one_line_error, cli_command, cli_env, run_cli
from shardmaker import make_packed, write_tar

from pipeline import cli
from pipeline.errors import UserError
from pipeline.stream.sources import Shard
from pipeline.stream.stages import Faults, read_samples

SMALL = ["--model", "tiny", "--crop", "24", "--batch-size", "4", "--workers", "2", "--no-progress"]


def train(folder: Path, log: Path, *extra):
    return run_cli(
        cli.train_app, "--shards", f"{folder}/<000..007>.tar", *SMALL, "--epochs", "1", "--log-dir", log, *extra
    )


def pack(root: Path, out: Path, *extra):
    return run_cli(cli.pack_app, root, out, "--quiet", "--shards", "2", *extra)


def no_traceback(result) -> None:
    assert "Traceback" not in result.output, result.output[-2000:]
    assert not result.exception or isinstance(result.exception, SystemExit), repr(result.exception)


def json_lines(path: Path) -> list[dict]:
    """Every line of a JSON-lines file, parsed strictly (a bare NaN or Infinity is not JSON)."""

    def refuse(name):
        raise ValueError(f"{name} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.fixture
def own(tmp_path, packed):
    folder = tmp_path / "p"
    shutil.copytree(packed, folder)
    return folder


# --- 1. nothing read from a file decides where we write or delete -------------------------------


def test_overwrite_deletes_only_our_own_names_whatever_the_old_plan_lists(small_tree, tmp_path):
    root, _ = small_tree
    out = tmp_path / "out"
    assert pack(root, out).exit_code == 0
    victims = [tmp_path / "victim.txt", tmp_path / "victim.tar", out / "notes.txt"]
    for v in victims:
        v.write_text("precious")
    plan = out / ".clipstream" / "plan.json"
    state = json.loads(plan.read_text())
    state["files"] += [str(victims[0]), "../victim.tar", "notes.txt", "/etc/hostname"]
    plan.write_text(json.dumps(state))
    result = pack(root, out, "--frames", "8", "--overwrite")
    assert result.exit_code == 0, result.output
    assert all(v.read_text() == "precious" for v in victims)
    assert json.loads((out / "index.json").read_text())["frames_per_clip"] == 8


def test_symlinks_planted_in_the_state_folder_are_never_written_through(small_tree, tmp_path):
    root, _ = small_tree
    out = tmp_path / "out"
    assert pack(root, out).exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    # every temp name a re-run writes: the plan's, a shard's, its record's
    for link in (
        out / ".clipstream" / ".plan.json.partial",
        out / ".clipstream" / "state" / ".000.tar.json.partial",
        out / ".000.tar.partial",
    ):
        link.unlink(missing_ok=True)
        link.symlink_to(victim)
    (out / "000.tar").unlink()  # so that the re-run writes it again
    result = pack(root, out)
    no_traceback(result)
    assert victim.read_text() == "precious"
    assert result.exit_code == 0, result.output
    assert (out / "000.tar").is_file() and not (out / "000.tar").is_symlink()


def test_a_state_folder_that_is_a_symlink_is_refused(small_tree, tmp_path):
    root, _ = small_tree
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / ".clipstream").symlink_to(elsewhere)
    result = pack(root, out)
    assert_one_line_error(result, r"\.clipstream is a symbolic link")
    assert not any(elsewhere.iterdir())


def test_run_folder_temp_names_are_never_written_through(packed, tmp_path):
    log = tmp_path / "run"
    assert train(packed, log, "--max-steps", "2").exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in (".options-resume-1.json.tmp", ".metrics.jsonl.tmp"):
        (log / name).symlink_to(victim)
    result = train(packed, log, "--max-steps", "4", "--resume", log)
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious"
    assert json.loads((log / "options-resume-1.json").read_text())["options"]["max_steps"] == 4


# --- 2. content identity, not names -------------------------------------------------------------


def test_resume_on_shards_repacked_with_other_contents_is_one_line(tmp_path):
    data = tmp_path / "p"
    make_packed(data, seed=0)
    log = tmp_path / "run"
    assert train(data, log, "--max-steps", "2").exit_code == 0  # stopped mid-epoch
    make_packed(data, seed=1)  # the same names, other clips
    result = train(data, log, "--resume", log)
    assert_one_line_error(result, r"not the pack .*8 of 8 training shards differ .*000\.tar")
    # the same contents elsewhere (copied, renamed folder) resume fine
    make_packed(data, seed=0)
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    ok = train(moved, log, "--resume", log)
    assert ok.exit_code == 0, ok.output


def test_cliploader_refuses_a_state_of_another_pack(tmp_path):
    from pipeline import ClipLoader

    a, b = tmp_path / "a", tmp_path / "b"
    make_packed(a, seed=0)
    make_packed(b, seed=1)
    loader = ClipLoader(str(a), batch_size=4, crop=24, workers=0, seed=0)
    state = {**loader.state_dict(), "step": 3}
    other = ClipLoader(str(b), batch_size=4, crop=24, workers=0, seed=0)
    with pytest.raises(ValueError, match="another pack"):
        other.load_state_dict(state)
    same = ClipLoader(str(a), batch_size=4, crop=24, workers=0, seed=0)
    same.load_state_dict(state)  # the same pack: fine


def _relabel(src: Path, dst: Path, classes: list[str]) -> None:
    """dst: src's test shards, keeping only the clips of `classes` and labelling them by their position
    there (another pack's class list: a subset of src's, in another order)."""
    index = json.loads((src / "index.json").read_text())
    dst.mkdir()
    entries = []
    for e in index["splits"]["test"]["shards"]:
        samples = {}
        with tarfile.open(src / e["name"]) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"key": key})[ext] = tar.extractfile(m).read()
        kept = []
        for s in samples.values():
            meta = json.loads(s["json"])
            name = index["classes"][int(s["cls"])]
            if name in classes:
                meta["label"] = classes.index(name)
                kept.append({"key": s["key"], "label": classes.index(name), "jpgs": s["jpgs"], "meta": meta})
        write_tar(dst / e["name"], kept)
        data = (dst / e["name"]).read_bytes()
        entries.append(
            {"name": e["name"], "samples": len(kept), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
    index["classes"] = classes
    index["splits"] = {
        "train": {"samples": 0, "shards": []},
        "test": {"samples": sum(e["samples"] for e in entries), "shards": entries},
    }
    (dst / "index.json").write_text(json.dumps(index))


def _eval(log: Path) -> dict:
    return next(r for r in json_lines(log / "metrics.jsonl") if r["kind"] == "eval")


def test_eval_shards_of_another_pack_are_compared_by_class_name(packed, tmp_path):
    classes = json.loads((packed / "index.json").read_text())["classes"]
    subset = tmp_path / "subset"
    _relabel(packed, subset, [classes[2], classes[0]])
    home = train(packed, tmp_path / "home")
    assert home.exit_code == 0, home.output
    result = train(packed, tmp_path / "away", "--eval-shards", f"{subset}/test-<000..001>.tar")
    assert result.exit_code == 0, result.output
    assert "mapped by name" in result.stdout, result.stdout
    got, want = _eval(tmp_path / "away"), _eval(tmp_path / "home")
    # the same model (same seed, same training shards) scores each kept clip exactly as on its own pack
    for name in (classes[0], classes[2]):
        assert got["per_class"][name] == want["per_class"][name], (got, want)
    assert got["per_class"][classes[1]] is None and got["clips"] == 8
    # a class the model does not know: an error, not top-1 0 %
    foreign = tmp_path / "foreign"
    _relabel(packed, foreign, [classes[0], classes[1]])
    index = json.loads((foreign / "index.json").read_text())
    index["classes"] = [classes[0], "juggling"]
    (foreign / "index.json").write_text(json.dumps(index))
    bad = train(packed, tmp_path / "bad", "--eval-shards", f"{foreign}/test-<000..001>.tar")
    assert_one_line_error(bad, r"evaluation shards' index .* classes the model was not trained on: 'juggling'")


# --- 3. every byte accounted for over HTTP ------------------------------------------------------


def _splicing(data: bytes, cut: int, reply: str):
    """A server that drops the first connection after `cut` bytes and answers the resuming Range
    request wrongly: `whole` (206, a plausible Content-Range, but the body from byte 0) or `offset`
    (206 for a range starting at 0)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802 - http.server's name
            asked = self.headers.get("Range")
            if asked is None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:cut])
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            start = int(asked.split("=")[1].split("-")[0])
            self.send_response(206)
            if reply == "whole":
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data)))
            else:
                self.send_header("Content-Range", f"bytes 0-{len(data) - start - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data if reply == "whole" else data[: len(data) - start])

    return Handler


@pytest.mark.parametrize("reply", ["whole", "offset"])
def test_a_misread_http_resume_is_a_fault_never_spliced(packed, reply):
    shard = packed / "000.tar"
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    cut = members[6].offset  # at a sample boundary: two whole samples, then the break
    with httpkit.serve(handler=_splicing(data, cut, reply)) as base:
        faults = Faults()
        keys = [s["__key__"] for s in read_samples([Shard(f"{base}/000.tar", 6)], False, faults)]
    assert len(keys) == len(set(keys)), f"clips read twice: {keys}"
    [fault] = faults.take()
    assert fault["samples"] == 6 - len(keys) and "Range" in fault["reason"], fault


# --- 4. secrets never printed or written --------------------------------------------------------

SECRET = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLEKEY%2F20260101&X-Amz-Signature=deadbeef1234"


def test_redact_hides_query_strings_and_userinfo():
    from pipeline.redact import redact

    assert redact(f"https://bucket.s3.amazonaws.com/hmdb/000.tar?{SECRET}") == (
        "https://bucket.s3.amazonaws.com/hmdb/000.tar?<redacted>"
    )
    assert redact("cannot open 'https://me:hunter2@host:8080/a/000.tar': 404") == (
        "cannot open 'https://<redacted>@host:8080/a/000.tar': 404"
    )
    assert redact("s3://bucket/x/000.tar and shards/000.tar") == "s3://bucket/x/000.tar and shards/000.tar"


def test_pre_signed_urls_never_reach_messages_logs_or_options(own, tmp_path):
    (own / "003.tar").unlink()  # a 404: a broken shard, named in a warning and the faults log
    log = tmp_path / "run"
    with httpkit.serve(own) as base:
        result = run_cli(
            cli.train_app,
            "--shards",
            f"{base}/<000..007>.tar?{SECRET}",
            "--index",
            own / "index.json",
            *SMALL,
            "--epochs",
            "1",
            "--max-bad",
            "100",
            "--log-dir",
            log,
        )
    assert result.exit_code == 0, result.output
    assert "003.tar" in result.output  # the fault is reported ...
    written = result.output + "".join(p.read_text() for p in log.rglob("*") if p.is_file() and p.suffix != ".pt")
    for secret in ("deadbeef1234", "AKIAEXAMPLEKEY"):
        assert secret not in written  # ... without its signature
    assert "<redacted>" in (log / "options.json").read_text()


# --- 5. numbers bounded -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value",
    [("--timeout", "nan"), ("--timeout", "inf"), ("--timeout", "1e12"), ("--max-failures", "nan")]
    + [("--max-failures", "inf")],
)
def test_pack_numbers_refuse_nan_inf_and_huge(small_tree, tmp_path, option, value):
    result = pack(small_tree[0], tmp_path / "out", option, value)
    assert_one_line_error(result, rf"{option} must be")


@pytest.mark.parametrize(
    "option, value",
    [("--max-bad", "inf"), ("--max-bad", "nan"), ("--weight-decay", "nan"), ("--weight-decay", "inf")]
    + [("--lr", "inf"), ("--lr", "nan"), ("--lr-gamma", "nan")],
)
def test_train_numbers_refuse_nan_and_inf(packed, tmp_path, option, value):
    assert_one_line_error(train(packed, tmp_path / "run", option, value), rf"{option} must be")


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(packed, tmp_path):
    log = tmp_path / "run"
    assert train(packed, log).exit_code == 0
    good = (log / "checkpoint.pt").read_bytes()
    result = train(packed, log, "--resume", log, "--epochs", "2", "--lr", "1e30", "--log-every", "1")
    assert_one_line_error(result, r"loss is not finite .*step 1[3-9].*checkpoint .* kept")
    assert (log / "checkpoint.pt").read_bytes() == good
    json_lines(log / "metrics.jsonl")  # still JSON: no bare NaN


# --- 6. full disk while training ----------------------------------------------------------------


def test_a_checkpoint_on_a_full_disk_is_one_line_and_leaves_no_temp(packed, tmp_path):
    import resource
    import signal

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))  # a tiny checkpoint is ~700 KB

    log = tmp_path / "run"
    cmd = cli_command("train_app") + ["--shards", f"{packed}/<000..007>.tar", *SMALL, "--epochs", "1"]
    cmd += ["--max-steps", "2", "--log-dir", str(log)]
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300, preexec_fn=limited)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write checkpoint"), done.stderr
    assert "File too large" in lines[0] and "Traceback" not in done.stderr
    assert not [p.name for p in log.iterdir() if p.name.endswith(".tmp")]


# --- 7. torn state is recovered -----------------------------------------------------------------


@pytest.mark.parametrize("torn", [b"", b'{"format_version": 1, "opti'])
def test_a_torn_plan_is_named_and_overwrite_recovers(small_tree, tmp_path, torn):
    root, _ = small_tree
    out = tmp_path / "out"
    assert pack(root, out).exit_code == 0
    (out / ".clipstream" / "plan.json").write_bytes(torn)
    again = pack(root, out)
    assert_one_line_error(again, r"plan\.json is unreadable .*--overwrite")
    fixed = pack(root, out, "--overwrite")
    assert fixed.exit_code == 0, fixed.output
    assert json.loads((out / ".clipstream" / "plan.json").read_text())["files"]


def test_a_torn_metrics_line_is_dropped_on_resume_and_plot_run_reads_the_run(packed, tmp_path):
    log = tmp_path / "run"
    assert train(packed, log, "--max-steps", "2", "--log-every", "1").exit_code == 0
    with open(log / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 3, "lo')  # killed mid-line
    assert train(packed, log, "--resume", log, "--max-steps", "4", "--log-every", "1").exit_code == 0
    records = json_lines(log / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4]
    plotted = run_cli(cli.plot_app, log)
    assert plotted.exit_code == 0, plotted.output


def test_a_zero_byte_checkpoint_says_what_is_wrong(packed, tmp_path):
    empty = tmp_path / "checkpoint.pt"
    empty.write_bytes(b"")
    result = train(packed, tmp_path / "run", "--resume", empty)
    assert_one_line_error(result, r"cannot load checkpoint .*: it is empty \(0 bytes\)")


def test_an_emptied_index_is_rewritten_and_not_called_nothing_to_do(small_tree, tmp_path):
    root, _ = small_tree
    out = tmp_path / "out"
    assert pack(root, out).exit_code == 0
    (out / "index.json").write_bytes(b"")
    again = pack(root, out)
    assert again.exit_code == 0, again.output
    assert "nothing to do" not in again.stdout and json.loads((out / "index.json").read_text())["splits"]


# --- 8. a folder in use is locked ---------------------------------------------------------------


def _held(cmd: list[str], pause: str, ready: Path) -> subprocess.Popen:
    """Start `cmd` held at failpoint `pause:NAME`; returns once it is near there (`ready` exists)."""
    proc = subprocess.Popen(cmd, env=cli_env(CLIPSTREAM_FAILPOINT=f"pause:{pause}"), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    return proc


def test_a_run_folder_in_use_is_locked(packed, tmp_path):
    log = tmp_path / "run"
    assert train(packed, log, "--max-steps", "2").exit_code == 0
    cmd = cli_command("train_app") + ["--shards", f"{packed}/<000..007>.tar", *SMALL, "--epochs", "1"]
    cmd += ["--log-dir", str(log), "--resume", str(log), "--log-every", "1"]
    first = _held(cmd, "step:3", log / "options-resume-1.json")
    try:
        time.sleep(2)  # at step 3 by now
        second = train(packed, log, "--resume", log)
        assert_one_line_error(second, rf"the run folder {log} is in use by pid {first.pid} on ")
        assert not (log / "options-resume-2.json").exists()
    finally:
        first.kill()
        first.wait()
    # the holder is gone: the lock went with it
    assert train(packed, log, "--resume", log).exit_code == 0


def test_an_out_dir_being_packed_is_locked(small_tree, tmp_path):
    root, _ = small_tree
    out = tmp_path / "out"
    cmd = cli_command("pack_app") + [str(root), str(out), "--quiet", "--shards", "2", "--workers", "1"]
    first = _held(cmd, "after-shards:1", out / "000.tar")
    try:
        second = pack(root, out)
        assert_one_line_error(second, rf"{out} is being packed by pid {first.pid} on ")
    finally:
        first.kill()
        first.wait()
    assert pack(root, out).exit_code == 0


# --- 9. layouts found one level down under any name ---------------------------------------------


def test_layouts_are_found_one_level_down_under_any_name(small_tree, tmp_path):
    from pipeline.tools.sampledata import make_sample_data

    ucf = tmp_path / "ucf-src"
    make_sample_data(ucf, classes=3, clips_per_class=4, seed=2, layout="ucf101")
    data = tmp_path / "ucf"
    (data / "UCF101").mkdir(parents=True)
    for entry in ucf.iterdir():
        shutil.move(str(entry), str(data / ("." if entry.name == "ucfTrainTestlist" else "UCF101") / entry.name))
    result = pack(data, tmp_path / "ucf-out")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ucf-out" / "index.json").read_text())["layout"] == "ucf101"

    hmdb = tmp_path / "hmdb"
    shutil.copytree(small_tree[0], hmdb)
    (hmdb / "hmdb51_org").rename(hmdb / "HMDB51")
    result = pack(hmdb, tmp_path / "hmdb-out")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "hmdb-out" / "index.json").read_text())["split_source"] == "official"

    kinetics = tmp_path / "kinetics"
    make_sample_data(kinetics / "kinetics400", classes=2, clips_per_class=3, seed=3, layout="kinetics")
    result = pack(kinetics, tmp_path / "kinetics-out", "--shards", "1")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "kinetics-out" / "index.json").read_text())["layout"] == "kinetics"


# --- 10. paths and names ------------------------------------------------------------------------


def test_a_non_utf8_name_under_the_grouped_fallback_packs(small_tree, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_tree[0] / "hmdb51_org", data)  # class folders, no split files
    good = next((data / "brush_hair").glob("*.avi")).read_bytes()
    with open(os.fsencode(data / "brush_hair") + b"/odd \xff name_0.avi", "wb") as f:
        f.write(good)
    result = pack(data, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "manifest.parquet").exists()


@pytest.mark.slow
def test_a_long_non_utf8_log_dir_reaches_every_rank_whole(packed, tmp_path):
    """--nproc-per-node hands rank 0's run folder to the others: it was cut at 1,024 bytes (the run
    wrote into a parent folder) and a non-UTF-8 one failed with no message at all."""
    log = os.fsencode(tmp_path) + b"/" + b"/".join([b"d" * 200] * 5) + b"/run-\xff"
    cmd = [os.fsencode(a) for a in cli_command("train_app")]
    cmd += [b"--shards", os.fsencode(f"{packed}/<000..007>.tar"), *(a.encode() for a in SMALL), b"--workers", b"1"]
    cmd += [b"--epochs", b"1", b"--max-steps", b"2", b"--nproc-per-node", b"2", b"--log-dir", log]
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    assert len(log) > 1024 and os.path.isfile(log + b"/metrics.jsonl")
    assert os.path.isfile(log + b"/checkpoint.pt")


def _kinetics_csv(tmp_path, row: bytes) -> Path:
    from pipeline.tools.sampledata import make_sample_data

    root = tmp_path / "k"
    make_sample_data(root, classes=2, clips_per_class=3, seed=3, layout="kinetics")
    with open(root / "annotations" / "train.csv", "ab") as f:
        f.write(row)
    return root


@pytest.mark.parametrize(
    "row, message",
    [
        (b"abseiling,abc,inf,10,train\n", r"train\.csv:\d+: time_start/time_end are not finite numbers"),
        (b"abseiling,abc," + b"9" * 200_000 + b",10,train\n", r"train\.csv: .*field larger than"),
        (b"abseiling,\xff\xfe,0,10,train\n", r"train\.csv: not UTF-8"),
    ],
)
def test_damaged_kinetics_csvs_are_one_line(tmp_path, row, message):
    assert_one_line_error(pack(_kinetics_csv(tmp_path, row), tmp_path / "out"), message)


# --- 11. small ones ------------------------------------------------------------------------------


def test_an_epoch_iterator_superseded_by_a_second_one_says_so(packed):
    from pipeline import ClipLoader

    with ClipLoader(str(packed), batch_size=4, crop=24, workers=0, seed=0) as loader:
        first = loader.epoch(0)
        next(first)
        second = loader.epoch(0)
        assert len(next(second)["key"]) == 4  # the newer one reads on
        with pytest.raises(ValueError, match="superseded: epoch\\(\\) was asked for again while it was open"):
            next(first)


def test_nothing_to_do_prints_no_rate(small_tree, tmp_path):
    root, _ = small_tree
    out = tmp_path / "out"
    assert pack(root, out).exit_code == 0
    again = pack(root, out)
    assert "nothing to do" in again.stdout and "clips/s" not in again.stdout, again.stdout


def test_loader_only_bench_prints_no_wait_share(packed):
    args = ["--crop", "24", "--batch-size", "4", "--batches", "3", "--warmup", "1", "--workers", "0"]
    result = run_cli(cli.bench_app, "--shards", f"{packed}/<000..007>.tar", *args)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith("shards"))
    assert "100%" not in row and " - " in row, row


def test_library_numbers_refuse_nan(packed):
    from pipeline.config import StreamConfig, TrainConfig

    with pytest.raises(UserError, match="`max_bad` must be"):
        StreamConfig(shards=(str(packed),), max_bad=float("inf"))
    with pytest.raises(UserError, match="`weight_decay` must be"):
        TrainConfig(stream=StreamConfig(shards=(str(packed),)), weight_decay=float("nan"))


# --- fail fast: a dead or trickling source stops the run at its first fault past --max-bad -------


def test_a_rank_whose_shards_all_trickle_stops_at_the_first_shard_deadline(packed, tmp_path, monkeypatch):
    """Every shard of a real HTTP server trickles: the worker meets the first shard's deadline, and
    that one shard (6 clips) is past --max-bad's budget at once. Before, the worker met all 8
    deadlines in turn before it could report a single fault (the budget checked at a batch)."""
    from pipeline.storage import httpio

    monkeypatch.setattr(httpio, "HTTP_SHARD_DEADLINE_S", 1.0)
    monkeypatch.setattr(httpio, "HTTP_MIN_BYTES_PER_S", 1 << 40)  # the deadline is the 1 s alone
    log = tmp_path / "run"
    with httpkit.trickle(packed) as base:
        result = run_cli(
            cli.train_app, "--shards", f"{base}/<000..007>.tar", *SMALL[:-3], "--workers", "1", "--no-progress",
            "--epochs", "1", "--log-dir", log,
        )  # fmt: skip
    assert_one_line_error(result, r"rank 0: [0-9]+ unreadable clips in epoch 1, more than --max-bad 0.01 allows \(0\)")
    shards = [f for f in json_lines(log / "faults-rank0.jsonl") if f["what"].endswith(".tar")]
    assert len(shards) == 1 and "not read whole within 1 s" in shards[0]["reason"], shards
