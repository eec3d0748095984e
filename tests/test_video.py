"""Every decoder packs the same frames, and odd inputs get one behaviour whichever decoder runs.

Real files written by pipeline.tools.sampledata, real pack-shards runs; each case for both decoders.
"""

import json
import re
import shutil
import subprocess
import sys

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import read_shard
from pipeline.cli import pack_app
from pipeline.frames import clip_indices
from pipeline.tools.sampledata import (
    draw_frame,
    drop_leading_keyframe,
    read_code,
    write_avi,
    write_rotated_mp4,
)
from pipeline.video import DECODERS
from tests.conftest import REPO, cli_command, cli_env, run_cli


def _samples(out):
    return {s["meta"]["source"].split("/")[-1]: s for p in sorted(out.glob("*.tar")) for s in read_shard(p)}


def _rows(out):
    return {r["source"].split("/")[-1]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_packs_exact_frames_on_the_traps(decoder, small_tree, tmp_path):
    """B-frames, headers overstating the length, files cut short: the stored frames are the source
    frames round(i(n-1)/(T-1)) of the decodable length, read back from the codes they carry."""
    root, truth = small_tree
    out = tmp_path / "out"
    result = run_cli(pack_app, root, out, "--quiet", "--shards", "4", "--decoder", decoder)
    assert result.exit_code == 0, result.output
    samples = _samples(out)
    kinds = set()
    for c in truth:
        s = samples.get(c.file_name)
        if s is None:
            continue  # tag 0 in split 1
        assert s["meta"]["decoded_frames"] == c.frames, (c.kind, c.file_name)
        assert s["meta"]["indices"] == clip_indices(c.frames, 16)
        assert [read_code(f) for f in s["frames"]] == [(i, c.class_index) for i in clip_indices(c.frames, 16)], (
            c.file_name
        )
        kinds.add(c.kind)
    assert kinds == {"plain", "bframes", "overstated", "truncated"}


def _tree(tmp_path, files: dict):
    """DATA/hmdb51_org/<class>/<name>, plus one good clip per class so each class has a train side."""
    root = tmp_path / "data"
    for i, cls in enumerate(("clap", "wave")):
        (root / "hmdb51_org" / cls).mkdir(parents=True)
        write_avi(root / "hmdb51_org" / cls / f"good_{cls}_0.avi", [draw_frame(f, i, 176, 144) for f in range(20)])
    for name, write in files.items():
        write(root / "hmdb51_org" / "clap" / name)
    return root


def _pack(root, out, decoder, *extra):
    result = run_cli(
        pack_app, root, out, "--quiet", "--shards", "1", "--max-failures", "100", "--decoder", decoder, *extra
    )
    assert result.exit_code == 0, result.output
    return _samples(out), _rows(out)


@pytest.mark.parametrize("decoder", DECODERS)
def test_tiny_videos_pack_exactly(decoder, tmp_path):
    """1x1 and 2x2 clips (decord 0.6 returns rows padded to 96 bytes below 32 px): frame f is grey
    level 10 f, so the stored mean says which frame it is."""

    def tiny(side):
        return lambda p: write_avi(p, [np.full((side, side, 3), 10 * f, np.uint8) for f in range(20)])

    root = _tree(tmp_path, {"tiny_1x1_0.avi": tiny(1), "tiny_2x2_0.avi": tiny(2)})
    samples, rows = _pack(root, tmp_path / "out", decoder)
    for name in ("tiny_1x1_0.avi", "tiny_2x2_0.avi"):
        assert rows[name]["status"] == "packed", rows[name]
        s = samples[name]
        assert s["frames"].shape == (16, 128, 128, 3)
        assert s["meta"]["indices"] == clip_indices(20, 16)
        levels = s["frames"].reshape(16, -1).mean(axis=1)
        assert np.abs(levels - 10 * np.array(s["meta"]["indices"])).max() < 4, levels


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_picture_named_like_a_video_is_not_a_video(decoder, tmp_path):
    import cv2

    def picture(p):
        p.write_bytes(cv2.imencode(".jpg", draw_frame(3, 0, 160, 120))[1].tobytes())

    root = _tree(tmp_path, {"holiday_photo_0.avi": picture})
    samples, rows = _pack(root, tmp_path / "out", decoder)
    assert rows["holiday_photo_0.avi"]["status"] == "failed"
    assert re.fullmatch(r"not a video: a single picture \(jpeg\)", rows["holiday_photo_0.avi"]["reason"])
    assert "holiday_photo_0.avi" not in samples


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_clip_cut_before_its_first_keyframe_fails_with_a_reason(decoder, tmp_path):
    def cut(p):
        write_avi(p, [draw_frame(f, 0, 176, 144) for f in range(30)], gop=12)
        drop_leading_keyframe(p)

    root = _tree(tmp_path, {"cut_mid_gop_0.avi": cut})
    with av.open(str(next(root.glob("**/cut_mid_gop_0.avi")))) as c:
        assert len(list(c.decode(video=0))) == 29  # the trap: every packet still decodes, to grey
    samples, rows = _pack(root, tmp_path / "out", decoder)
    assert rows["cut_mid_gop_0.avi"]["status"] == "failed"
    assert "cut before its first keyframe" in rows["cut_mid_gop_0.avi"]["reason"]


@pytest.mark.parametrize("decoder", DECODERS)
def test_rotation_metadata_is_applied(decoder, tmp_path):
    """A 128x64 clip whose MP4 header says 'turn 90 degrees clockwise' is stored 64 wide, 128 high,
    code band on the right: what players show."""

    root = _tree(
        tmp_path, {"phone_0.mp4": lambda p: write_rotated_mp4(p, [draw_frame(f, 0, 128, 64) for f in range(20)], 90)}
    )
    samples, rows = _pack(root, tmp_path / "out", decoder, "--keep-size")
    s = samples["phone_0.mp4"]
    assert s["meta"]["original_size"] == [64, 128] and s["frames"].shape == (16, 128, 64, 3)
    assert [read_code(np.rot90(f, 1))[0] for f in s["frames"]] == clip_indices(20, 16)


@pytest.mark.parametrize("decoder", DECODERS)
def test_frames_readers_would_refuse_are_refused_at_pack_time(decoder, tmp_path):
    """A 4:1 clip at --short-side 4200 would be 16800 px wide, over shardformat.MAX_JPEG_SIDE."""
    root = _tree(tmp_path, {"wide_0.avi": lambda p: write_avi(p, [draw_frame(f, 0, 64, 16) for f in range(5)])})
    samples, rows = _pack(root, tmp_path / "out", decoder, "--short-side", "4200")
    assert rows["wide_0.avi"]["status"] == "failed"
    assert (
        rows["wide_0.avi"]["reason"]
        == "frames would be 16800x4200 px (64x16 source), above the 8192 px a side shard readers accept"
    )


@pytest.mark.parametrize("decoder", DECODERS)
def test_decoder_logs_stay_out_of_stderr_and_reasons(decoder, small_tree, tmp_path):
    """decord's C++ logging writes '[hh:mm:ss] src/...cc:NN: ...' to file descriptor 2 on damaged
    files; a real pack-shards process must print none of it, and no reason may carry a clock."""
    root = tmp_path / "data"
    shutil.copytree(small_tree[0], root)
    good = next((root / "hmdb51_org" / "brush_hair").glob("*.avi")).read_bytes()
    for name, data in {
        "half_0.avi": good[:300],
        "garbage_0.avi": bytes(range(256)) * 20,
        "tail_0.avi": good[: len(good) * 2 // 3],
    }.items():
        (root / "hmdb51_org" / "brush_hair" / name).write_bytes(data)
        with open(root / "testTrainMulti_7030_splits" / "brush_hair_test_split1.txt", "a") as f:
            f.write(f"{name} 1\n")
    out = tmp_path / "out"
    cmd = cli_command("pack_app") + [
        str(root),
        str(out),
        "--quiet",
        "--shards",
        "4",
        "--max-failures",
        "10",
        "--decoder",
        decoder,
    ]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    reasons = [r["reason"] for r in _rows(out).values() if r["reason"]]
    assert len(reasons) >= 2  # the broken files are named, with a reason each
    for reason in reasons:
        assert not re.search(r"\d\d:\d\d:\d\d|\.cc:\d+|Stack trace", reason), reason


@pytest.mark.parametrize("decoder", DECODERS)
def test_pack_clip_gives_the_same_bytes_every_time(decoder, tmp_path):
    """Odd output sizes (320x240 -> 171x128, 240x175 -> 176x128 with odd source height): libjpeg-turbo
    reads 4:2:0 luma in 2x2 blocks, past the end of an odd-sized plane, unless it is padded."""
    from pipeline.pack.clip import pack_clip

    for w, h in ((320, 240), (240, 175)):
        path = tmp_path / f"clip_{w}x{h}.avi"
        write_avi(path, [draw_frame(f, 2, w, h) for f in range(20)])
        runs = {pack_clip(str(path), 16, 128, 90, decoder)["jpgs"] for _ in range(6)}
        assert len(runs) == 1, (decoder, w, h)


# 600 frames of 1280x720 (20 s of 720p at 30 fps): every frame kept as RGB is 1.6 GB.
MEMORY_BOUND_MB = 400


@pytest.fixture(scope="module")
def long_720p(tmp_path_factory):
    path = tmp_path_factory.mktemp("long") / "long_720p_0.avi"
    write_avi(path, (draw_frame(f, 1, 1280, 720) for f in range(600)), gop=12)
    return path


@pytest.mark.parametrize("decoder", DECODERS)
def test_pack_memory_is_bounded_by_the_frames_kept(decoder, long_720p):
    """Peak resident memory of a process packing the 600-frame 720p clip stays under the bound,
    which holding every decoded frame (RGB or YUV) exceeds several times over."""
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child of a
    # large pytest process would report the parent's size.
    code = (
        "import re, sys; from pipeline.pack.clip import pack_clip; "
        f"r = pack_clip(sys.argv[1], 16, 128, 90, {decoder!r}); assert 'error' not in r, r; "
        "assert r['decoded_frames'] == 600, r['decoded_frames']; "
        "print(int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1]) // 1024)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(long_720p)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    peak_mb = int(proc.stdout.strip())
    assert peak_mb < MEMORY_BOUND_MB, f"{decoder}: peak RSS {peak_mb} MB"


def test_decoders_store_the_same_frames(small_tree, tmp_path):
    """Same indices and codes from both; pixels within JPEG noise (pyav hands the decoder's 4:2:0
    planes to the JPEG encoder, decord goes through RGB)."""
    root, _ = small_tree
    got = {}
    for decoder in DECODERS:
        out = tmp_path / decoder
        assert run_cli(pack_app, root, out, "--quiet", "--shards", "4", "--decoder", decoder).exit_code == 0
        got[decoder] = _samples(out)
        index = json.loads((out / "index.json").read_text())
        assert index["options"]["decoder"] == decoder
    a, b = got["pyav"], got["decord"]
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert a[k]["meta"] == b[k]["meta"]
        assert [read_code(f) for f in a[k]["frames"]] == [read_code(f) for f in b[k]["frames"]]
        assert np.abs(a[k]["frames"].astype(int) - b[k]["frames"].astype(int)).mean() < 3.0
