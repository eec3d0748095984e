"""inspect-shards, verify-shards, plot-run and the progress helper, on a real pack of generated clips."""

import collections
import hashlib
import io
import json
import re
import shutil
import tarfile

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import read_shard
from pipeline.cli import inspect_app, pack_app, plot_app, verify_app
from pipeline.errors import UserError
from pipeline.progress import progress
from pipeline.shardformat import split_member_name
from pipeline.tools.inspect import (
    GAP,
    LABEL_STRIP,
    choose_samples,
    contact_sheet,
    scan_shards,
    shard_paths,
    write_png,
)
from pipeline.tools.plots import plot_run
from pipeline.tools.sampledata import read_code
from tests.conftest import assert_one_line_error, run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def pack(small_tree, tmp_path_factory):
    """The small tree plus one unreadable video listed for training, packed into 3 + 3 shards."""
    data = tmp_path_factory.mktemp("inspect-data")
    shutil.copytree(small_tree[0], data, dirs_exist_ok=True)
    (data / "hmdb51_org" / "catch" / "broken_clip_0.avi").write_bytes(b"not a video")
    with open(data / "testTrainMulti_7030_splits" / "catch_test_split1.txt", "a") as f:
        f.write("broken_clip_0.avi 1 \n")
    out = tmp_path_factory.mktemp("inspect-pack")
    result = run_cli(pack_app, data, out, "--shards", "3", "--max-failures", "1", "--quiet")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def damaged(pack, tmp_path):
    dst = tmp_path / "pack"
    shutil.copytree(pack, dst)
    return dst


def _index(folder):
    return json.loads((folder / "index.json").read_text())


# ---------------------------------------------------------------- patterns


def test_patterns_expand_like_the_streaming_side(pack):
    train = [pack / f"{i:03d}.tar" for i in range(3)]
    assert shard_paths(f"{pack}/<000..002>.tar") == train
    assert shard_paths(f"{pack}/{{000..002}}.tar") == train
    assert shard_paths(f"{pack}/{{000,002}}.tar") == [train[0], train[2]]
    assert shard_paths(f"{pack}/001.tar::{pack}/test-000.tar") == [train[1], pack / "test-000.tar"]
    assert shard_paths(str(pack / "001.tar")) == [train[1]]
    assert shard_paths(str(pack)) == train + [pack / f"test-{i:03d}.tar" for i in range(3)]
    for bad, message in (
        (f"{pack}/<000..009>.tar", "7 of 10 shards"),
        (f"{pack}/<100..102>.tar", "no shards match"),
        (f"{pack}/<0a..2>.tar", "malformed range <0a..2>"),
        (f"{pack}/{{000..002.tar", "malformed range"),
    ):
        with pytest.raises(UserError, match=message):
            shard_paths(bad)


def test_member_names_split_like_webdataset():
    from webdataset.tariterators import base_plus_ext

    for name in (
        "a-1.jpgs",
        "a.b.c",
        "dir/key.json",
        "dir.x/key.cls",
        "noext",
        "dir/",
        ".hidden",
        "k.",
        "x/y.z/w.tar.gz",
    ):
        assert split_member_name(name) == base_plus_ext(name), name


# ---------------------------------------------------------------- summary


def test_summary_counts_equal_manifest_and_index(pack):
    result = run_cli(inspect_app, pack, "--quiet")
    assert result.exit_code == 0, result.output
    out = result.stdout
    index = _index(pack)
    rows = pq.read_table(pack / "manifest.parquet").to_pylist()
    packed = [r for r in rows if r["status"] == "packed"]

    expected = {c: collections.Counter() for c in index["classes"]}
    for r in packed:
        expected[r["class_name"]][r["split"]] += 1
    table = {}
    for line in out.splitlines():
        m = re.fullmatch(r"(\S+)\s+(\d+)\s+(\d+)\s+(\d+)", line)
        if m:
            table[m[1]] = tuple(int(x) for x in m.groups()[1:])
    for c in index["classes"]:
        tr, te = expected[c]["train"], expected[c]["test"]
        assert table[c] == (tr, te, tr + te), c
    total = (index["splits"]["train"]["samples"], index["splits"]["test"]["samples"])
    assert table["all"] == (*total, sum(total)) == (*total, len(packed))

    n_padded = sum(bool(r["padded"]) for r in packed)
    assert n_padded >= 1
    assert re.search(rf"padded clips .*: {n_padded} \(", out)
    assert f"{len(rows)} videos, {len(packed)} packed, 1 failed, {index['counts']['unused']} unused" in out
    assert re.search(r"^failed: hmdb51_org/catch/broken_clip_0\.avi: \S", out, re.M)
    sizes = re.search(r"^frame sizes: (.*)$", out, re.M)[1]
    assert sum(int(n) for n in re.findall(r"\((\d+) clips\)", sizes)) == len(packed)
    assert f"6 shards, {len(packed)} clips" in out and "warning" not in out


def test_summary_of_some_shards_counts_only_those(pack):
    result = run_cli(inspect_app, f"{pack}/<000..001>.tar", "--quiet")
    assert result.exit_code == 0, result.output
    entries = _index(pack)["splits"]["train"]["shards"][:2]
    n = sum(e["samples"] for e in entries)
    assert f": 2 of 6 shards, {n} clips (train {n}, test 0)" in result.stdout
    assert re.search(rf"^all\s+{n}\s+0\s+{n}$", result.stdout, re.M)


def test_summary_of_shards_without_index_or_manifest(pack, tmp_path):
    for name in ("001.tar", "002.tar"):
        shutil.copy(pack / name, tmp_path / name)
        # Without class 0 the classes present are not the pack's class list: names must come from the metadata.
        first = {s["key"] for s in read_shard(tmp_path / name) if s["label"] == 0}
        _rewrite(tmp_path / name, lambda key, ext, data: None if key in first else data)  # noqa: B023 (called at once)
    result = run_cli(inspect_app, f"{tmp_path}/<001..002>.tar", "--quiet")
    assert result.exit_code == 0, result.output
    expected = collections.Counter(
        s["meta"]["class_name"] for p in ("001.tar", "002.tar") for s in read_shard(tmp_path / p)
    )
    got = {m[1]: int(m[2]) for m in re.finditer(r"^(\S+)\s+(\d+)\s+0\s+\d+$", result.stdout, re.M)}
    assert got == {**expected, "all": sum(expected.values())}
    assert "warning: no index.json beside the shards" in result.stdout
    assert "no manifest.parquet beside the shards" in result.stdout


# ---------------------------------------------------------------- contact sheet


def _by_key(pack):
    return {s["key"]: s for p in sorted(pack.glob("*.tar")) for s in read_shard(p)}


@pytest.mark.parametrize("frame_height", [128, 64])
def test_contact_sheet_is_exact_png_of_the_drawn_clips(pack, tmp_path, frame_height):
    n = 3
    rows = choose_samples(scan_shards(shard_paths(str(pack)), quiet=True), n, seed=5)
    assert len({(r.shard, r.key) for r in rows}) == n
    sheet = contact_sheet(rows, frame_height)
    path = tmp_path / "sheet.png"
    write_png(sheet.image, path)

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    png = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[..., ::-1]
    truth = _by_key(pack)
    clips = [truth[r.key] for r in rows]
    t = clips[0]["frames"].shape[0]
    widths = [round(c["frames"].shape[2] * frame_height / c["frames"].shape[1]) for c in clips]
    cell = max(widths)
    assert png.shape == (n * (LABEL_STRIP + frame_height), t * cell + (t - 1) * GAP, 3)
    assert len(set(widths)) > 1 or frame_height != 128, "the draw should mix frame widths"

    for r, (clip, w) in enumerate(zip(clips, widths)):
        y = r * (LABEL_STRIP + frame_height)
        strip = png[y : y + LABEL_STRIP]
        assert (strip > 128).any(), "label text missing"
        for i in range(t):
            x = i * (cell + GAP) + (cell - w) // 2
            got = png[y + LABEL_STRIP : y + LABEL_STRIP + frame_height, x : x + w]
            if frame_height == clip["frames"].shape[1]:
                assert np.array_equal(got, clip["frames"][i]), (clip["key"], i)
            assert read_code(got) == (clip["meta"]["indices"][i], clip["label"]), (clip["key"], i)


def test_sheet_from_the_cli(pack, tmp_path):
    path = tmp_path / "out" / "sheet.png"
    a = run_cli(inspect_app, f"{pack}/<000..002>.tar", "--sheet", path, "--samples", "2", "--seed", "1", "--quiet")
    assert a.exit_code == 0, a.output
    first = path.read_bytes()
    assert first[:8] == PNG_SIGNATURE
    h, w = cv2.imread(str(path)).shape[:2]
    assert f"contact sheet: {path} (2 clips, {w}x{h} px)" in a.stdout
    assert h == 2 * (LABEL_STRIP + 128)
    again = run_cli(inspect_app, f"{pack}/<000..002>.tar", "--sheet", path, "--samples", "2", "--seed", "1", "--quiet")
    assert again.exit_code == 0 and path.read_bytes() == first, "same seed, same sheet"
    every = run_cli(inspect_app, pack / "001.tar", "--sheet", path, "--samples", "50", "--quiet")
    k = _index(pack)["splits"]["train"]["shards"][1]["samples"]
    assert every.exit_code == 0 and f"({k} clips (the shards hold only {k})" in every.stdout
    assert cv2.imread(str(path)).shape[0] == k * (LABEL_STRIP + 128)


def test_inspect_bad_arguments(pack, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "file.png").mkdir()
    cases = [
        ((f"{pack}/<100..101>.tar",), "no shards match"),
        ((f"{pack}/<a..b>.tar",), "malformed range"),
        ((empty,), "no index.json in"),
        ((pack, "--samples", "0"), "--samples must be >= 1"),
        ((pack, "--frame-height", "2"), "--frame-height"),
        ((pack, "--sheet", tmp_path / "file.png"), "must name a file"),
    ]
    for args, pattern in cases:
        assert_one_line_error(run_cli(inspect_app, *args, "--quiet"), pattern)


# ---------------------------------------------------------------- verify


def _problems(result):
    lines = result.stdout.strip().splitlines()
    return lines[:-1], lines[-1]


def test_verify_passes_on_a_clean_pack(pack):
    result = run_cli(verify_app, pack, "--quiet")
    assert result.exit_code == 0, result.output
    problems, summary = _problems(result)
    n = _index(pack)["counts"]["packed"]
    assert problems == [] and re.fullmatch(rf"checked 6 shards, {n} clips, .* clips/s\): all well", summary)
    assert result.stderr == ""
    serial = run_cli(verify_app, pack, "--workers", "1")  # not a terminal: a plain progress line or two
    assert serial.exit_code == 0 and serial.stdout.endswith("all well\n")
    bar = serial.stderr.splitlines()
    assert (
        "\r" not in serial.stderr
        and bar[0].startswith("verify:   0% 0/")
        and bar[-1].startswith(f"verify: 100% {n}/{n} [")
    )


def _member(path, suffix, which=0):
    with tarfile.open(path) as tar:
        return [m for m in tar.getmembers() if m.name.endswith(suffix)][which]


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_names_the_shard_after_a_byte_flip_in_a_jpeg(damaged):
    shard = damaged / "001.tar"
    m = _member(shard, ".jpgs", 1)
    payload = shard.read_bytes()[m.offset_data : m.offset_data + m.size]
    scan = payload.index(b"\xff\xda")  # start of the first frame's entropy-coded data
    _flip(shard, m.offset_data + scan + 400)
    result = run_cli(verify_app, damaged, "--quiet")
    assert result.exit_code == 1, result.output
    problems, summary = _problems(result)
    assert problems and all(p.startswith("001.tar: ") for p in problems), problems
    assert re.fullmatch(r"001\.tar: sha256 mismatch \(index [0-9a-f]{16}\.\.\., file [0-9a-f]{16}\.\.\.\)", problems[0])
    assert summary.endswith("in 1 file(s)")


def test_verify_names_the_shard_after_a_byte_flip_in_a_tar_header(damaged):
    shard = damaged / "002.tar"
    m = _member(shard, ".cls", 1)  # the second sample's first header
    _flip(shard, m.offset + 20)
    result = run_cli(verify_app, damaged, "--quiet")
    assert result.exit_code == 1, result.output
    problems, _ = _problems(result)
    assert all(p.startswith("002.tar: ") for p in problems), problems
    assert any("sha256 mismatch" in p for p in problems)
    assert (
        f"002.tar: unreadable after 1 samples (corrupt tar header (bad checksum) at byte {m.offset}); readers lose the rest of the shard"
        in problems
    )
    assert any(re.fullmatch(r"002\.tar: 1 sample, index says \d+", p) for p in problems)


def test_verify_names_a_deleted_shard_and_a_stray_one(damaged):
    (damaged / "test-001.tar").unlink()
    shutil.copy(damaged / "000.tar", damaged / "017.tar")
    result = run_cli(verify_app, damaged, "--quiet")
    assert result.exit_code == 1, result.output
    problems, summary = _problems(result)
    n = _index(damaged)["splits"]["test"]["shards"][1]["samples"]
    assert problems[0] == f"test-001.tar: missing (the index lists it with {n} samples)"
    assert problems[1:] == ["017.tar: not in index.json (left over from another pack?)"]
    assert summary.endswith("2 problem(s) in 2 file(s)")


def _rewrite(shard, edit):
    """Rewrite a shard member by member: edit(key, ext, data) returns new bytes or None to drop."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for m, data in members:
            data = edit(*m.name.split(".", 1), data)
            if data is not None:
                m.size = len(data)
                out.addfile(m, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    return list(dict.fromkeys(m.name.split(".")[0] for m, _ in members))


def test_verify_checks_samples_inside_a_well_hashed_shard(damaged):
    """A shard rewritten with bad members, its index entry updated: only the sample checks can tell."""
    shard = damaged / "000.tar"
    keys = _rewrite(shard, lambda key, ext, data: data)
    bad_label, no_json, bad_pack = keys[0], keys[1], keys[2]

    def edit(key, ext, data):
        if key == bad_label and ext == "cls":
            return b"99"
        if key == no_json and ext == "json":
            return None
        if key == bad_pack and ext == "jpgs":
            return b"XXXX" + data[4:]
        return data

    _rewrite(shard, edit)
    index = _index(damaged)
    data = shard.read_bytes()
    index["splits"]["train"]["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (damaged / "index.json").write_text(json.dumps(index))

    result = run_cli(verify_app, damaged, "--quiet")
    assert result.exit_code == 1, result.output
    problems, _ = _problems(result)
    assert problems == [
        f"000.tar: sample {bad_label}: label 99 outside 0..3",
        f"000.tar: sample {bad_label}: label 99 in .cls but {index['classes'].index(_class_of(damaged, bad_label))} in .json",
        f"000.tar: sample {no_json}: no .json",
        f"000.tar: sample {bad_pack}: frames do not decode (not a JPEG pack (bad magic))",
    ]


def test_summary_warns_when_shards_disagree_with_index_and_manifest(damaged):
    keys = _rewrite(damaged / "001.tar", lambda key, ext, data: data)
    _rewrite(damaged / "001.tar", lambda key, ext, data: None if key == keys[-1] else data)
    shutil.copy(damaged / "000.tar", damaged / "017.tar")
    result = run_cli(inspect_app, f"{damaged}/{{000,001,017}}.tar", "--quiet")
    assert result.exit_code == 0, result.output
    n = _index(damaged)["splits"]["train"]["shards"][1]["samples"]
    m = _index(damaged)["splits"]["train"]["shards"][0]["samples"]
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: 001.tar holds {n - 1} samples, index.json says {n}: run verify-shards {damaged}",
        "warning: 017.tar is not in index.json",
        f"warning: 001.tar holds {n - 1} samples, manifest.parquet lists {n}",
        f"warning: 017.tar holds {m} samples, manifest.parquet lists 0",
    ]


def _class_of(pack, key):
    rows = pq.read_table(pack / "manifest.parquet").to_pylist()
    return next(r["class_name"] for r in rows if r["key"] == key)


def test_verify_bad_arguments(pack, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli(verify_app, tmp_path / "missing"), "folder not found")
    assert_one_line_error(run_cli(verify_app, empty), "no index.json in")
    assert_one_line_error(run_cli(verify_app, pack / "000.tar"), "not a folder")
    assert_one_line_error(run_cli(verify_app, pack, "--workers", "0"), "--workers must be >= 1")


# ---------------------------------------------------------------- plot-run


def _write_metrics(path, evals=True, ranks=2):
    """Records in the shape train-stream writes: steps every 10, an eval per epoch, a summary."""
    rng = np.random.default_rng(0)
    lines = []
    for step in range(10, 201, 10):
        epoch = 1 + (step - 1) // 50
        per_rank = [float(40 + 5 * rng.random()) for _ in range(ranks)]
        lines.append({"kind": "step", "step": step, "epoch": epoch, "loss": 3.9 * 0.99**step, "lr": 1e-3 * (1 - step / 200),
                      "clips_per_s": sum(per_rank), "clips_per_s_rank": per_rank, "data_wait": 0.3 - step / 1000,
                      "step_time": 0.2})  # fmt: skip
        if evals and step % 50 == 0:
            lines.append({"kind": "eval", "step": step, "epoch": epoch, "top1": step / 250, "top5": step / 210,
                          "per_class": {"clap": 0.5, "dive": None}, "clips": 56})  # fmt: skip
    lines.append({"kind": "summary", "top1": 0.8 if evals else None, "top5": 0.95 if evals else None, "clips_per_s": 85.0,
                  "data_wait": 0.2, "wall_s": 61.0, "steps": 200, "epochs": 4})  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def _quadrants(png):
    h, w = png.shape[:2]
    return {
        "loss": png[: h // 2, : w // 2],
        "accuracy": png[: h // 2, w // 2 :],
        "speed": png[h // 2 :, : w // 2],
        "wait": png[h // 2 :, w // 2 :],
    }


def _has_colour(img, rgb):
    return int((np.abs(img.astype(int) - rgb).sum(axis=2) < 30).sum())


BLUE, ORANGE, GREEN, RED, PURPLE = (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)


def test_plot_run_draws_every_panel_from_a_metrics_file(tmp_path):
    run = tmp_path / "run"
    _write_metrics(run)
    result = run_cli(plot_app, run)
    assert result.exit_code == 0, result.output
    path = run / "curves.png"
    assert result.stdout.strip() == f"wrote {path}"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    png = cv2.imread(str(path))[..., ::-1]
    assert png.shape == (750, 1200, 3)
    q = _quadrants(png)
    assert _has_colour(q["loss"], BLUE) > 200
    assert _has_colour(q["accuracy"], GREEN) > 100 and _has_colour(q["accuracy"], ORANGE) > 100
    assert _has_colour(q["speed"], RED) > 200
    assert _has_colour(q["wait"], PURPLE) > 200
    assert not _has_colour(q["wait"], RED) and not _has_colour(q["loss"], GREEN)


def test_plot_run_without_evals_and_with_a_line_being_written(tmp_path):
    run = tmp_path / "run"
    _write_metrics(run, evals=False, ranks=1)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 21')  # a live run mid-write
    out = plot_run(run, tmp_path / "plots" / "c.png")
    assert out == tmp_path / "plots" / "c.png"
    q = _quadrants(cv2.imread(str(out))[..., ::-1])
    assert _has_colour(q["loss"], BLUE) > 200
    assert not _has_colour(q["accuracy"], GREEN), "no evaluation, no accuracy curve"


def test_plot_run_bad_arguments(tmp_path):
    assert_one_line_error(run_cli(plot_app, tmp_path / "missing"), "run folder not found")
    assert_one_line_error(run_cli(plot_app, tmp_path), "no metrics.jsonl in")
    (tmp_path / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\nnot json\n{"kind": "step"}\n')
    assert_one_line_error(run_cli(plot_app, tmp_path), r"metrics\.jsonl:2: not a JSON line")
    (tmp_path / "metrics.jsonl").write_text("")
    assert_one_line_error(run_cli(plot_app, tmp_path), "no step or eval records")


# ---------------------------------------------------------------- progress


def test_progress_in_a_log_is_a_few_plain_lines():
    log = io.StringIO()  # not a terminal
    clock = [0.0]
    bar = progress(100, "verify", file=log)
    bar._time = lambda: clock[0]
    bar.start_t = bar.last_print_t = 0.0
    for _ in range(100):
        clock[0] += 1.0  # 100 s of work, one clip a second
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0].startswith("verify:   0% 0/100") and lines[-1].startswith("verify: 100% 100/100")
    assert len(lines) == 11, lines  # the start, then every 10 %
    assert "1.00clip/s" in lines[5] and "<00:50" in lines[5], "rate and ETA"


def test_progress_quiet_prints_nothing():
    log = io.StringIO()
    with progress(10, "verify", quiet=True, file=log) as bar:
        bar.update(10)
    assert log.getvalue() == ""
