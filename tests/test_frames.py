"""Index math (literal tables), resize math, and the coded sample data itself."""

import av
import decord
import numpy as np
import pytest

from pipeline.frames import clip_indices, resized_size
from pipeline.tools.sampledata import (
    draw_frame,
    make_sample_data,
    read_code,
    truncate_avi,
    write_avi,
)
from pipeline.video import DECODERS, decode_clip, probe_video


@pytest.mark.parametrize(
    "n, t, expected",
    [
        (16, 16, list(range(16))),
        (31, 16, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30]),
        (100, 16, [0, 7, 13, 20, 26, 33, 40, 46, 53, 59, 66, 73, 79, 86, 92, 99]),
        (17, 16, [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16]),
        (7, 16, [0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6]),
        (1, 16, [0] * 16),
        (2, 16, [0] * 8 + [1] * 8),
        (10, 4, [0, 3, 6, 9]),
        (4, 3, [0, 2, 3]),  # 1.5 rounds half up
        (9, 1, [4]),
        (10, 1, [5]),
        (1, 1, [0]),
    ],
)
def test_clip_indices_table(n, t, expected):
    assert clip_indices(n, t) == expected


def test_clip_indices_rejects_empty():
    with pytest.raises(ValueError):
        clip_indices(0, 16)
    with pytest.raises(ValueError):
        clip_indices(5, 0)


@pytest.mark.parametrize(
    "size, short, expected",
    [
        ((320, 240), 128, (171, 128)),
        ((176, 144), 128, (156, 128)),
        ((352, 240), 128, (188, 128)),
        ((240, 320), 128, (128, 171)),
        ((128, 128), 128, (128, 128)),
        ((320, 240), None, (320, 240)),
    ],
)
def test_resized_size_table(size, short, expected):
    assert resized_size(*size, short) == expected


def test_code_roundtrip_through_resize_and_jpeg():
    import cv2
    import simplejpeg

    for idx, cls in [(0, 0), (1, 50), (4095, 33), (1234, 7)]:
        img = draw_frame(idx, cls, 176, 144, "x")
        small = cv2.resize(img, (156, 128), interpolation=cv2.INTER_AREA)
        back = simplejpeg.decode_jpeg(simplejpeg.encode_jpeg(small, quality=75))
        assert read_code(back) == (idx, cls)


def test_read_code_rejects_uncoded_frame():
    with pytest.raises(ValueError):
        read_code(np.full((64, 64, 3), 128, np.uint8))


def _pyav_codes(path):
    with av.open(str(path)) as c:
        return [read_code(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]


def test_sample_data_frames_carry_their_index(tmp_path):
    truth = make_sample_data(tmp_path, classes=2, clips_per_class=4, seed=3)
    kinds = {c.kind for c in truth}
    assert {"plain", "bframes", "overstated"} <= kinds
    for c in truth:
        codes = _pyav_codes(tmp_path / "hmdb51_org" / c.class_name / c.file_name)
        assert codes == [(i, c.class_index) for i in range(c.frames)], c.file_name
    lines = (tmp_path / "testTrainMulti_7030_splits" / "brush_hair_test_split1.txt").read_text().splitlines()
    assert all(line.endswith(" ") for line in lines)  # official files carry trailing white space


@pytest.mark.parametrize("decoder", DECODERS)
def test_decode_clip_matches_a_sequential_decode(decoder, small_tree):
    """decode_clip's frames are PyAV's sequential decode at clip_indices of the true length, on
    every clip, traps included (B-frames, overstated and truncated headers)."""
    root, truth = small_tree
    for c in truth:
        path = root / "hmdb51_org" / c.class_name / c.file_name
        seq = _pyav_codes(path)
        clip = decode_clip(path, lambda n: clip_indices(n, 16), decoder)
        assert clip.decoded_frames == len(seq) == c.frames
        assert clip.indices == clip_indices(c.frames, 16)
        assert [read_code(f) for f in clip.frames] == [seq[i] for i in clip.indices], (decoder, c.file_name)


def test_the_traps_are_real(small_tree):
    """decord's get_batch returns neighbouring frames on B-frame clips, and container counts lie on
    truncated and overstated files: what decode_clip must not trust."""
    root, truth = small_tree
    wrong_random_access = 0
    lying_container = 0
    overstated = [c for c in truth if c.kind == "overstated"]
    for c in truth:
        path = root / "hmdb51_org" / c.class_name / c.file_name
        lying_container += probe_video(path).container_frames != c.frames
        if c.kind == "overstated":  # each claims 5 frames more than it holds, to PyAV itself
            assert probe_video(path).container_frames == c.frames + 5, c.file_name
        if c.kind == "bframes" and c.frames >= 16:
            vr = decord.VideoReader(str(path), num_threads=1)
            got = [read_code(f)[0] for f in vr.get_batch(clip_indices(len(vr), 16)).asnumpy()]
            wrong_random_access += got != clip_indices(c.frames, 16)
    assert wrong_random_access >= 1, "fixture lost its B-frame trap"
    assert lying_container >= 1, "fixture lost its truncated/overstated trap"
    assert overstated, "fixture lost its overstated clips"


def _misstate_frame_count(path, delta: int) -> None:
    """Make PyAV's container count (stream.frames) `delta` off the truth: without the idx1 index
    FFmpeg's AVI demuxer takes the count from the stream header's dwLength, which is patched.
    (sampledata.overstate_frame_count patches dwLength alone, idx1 kept: a count too high.)"""
    import struct

    data = bytearray(path.read_bytes())
    idx1 = data.rfind(b"idx1")
    data[idx1 : idx1 + 4] = b"JUNK"
    off = data.find(b"strh") + 8 + 32  # chunk id and size, then fccType .. dwStart, then dwLength
    struct.pack_into("<I", data, off, struct.unpack_from("<I", data, off)[0] + delta)
    path.write_bytes(bytes(data))


def _wrong_header_clips(root):
    """Clips whose container count is the trap for a decoder that trusts it as its guess: a header
    claiming 9 more frames than the file holds, one claiming 9 fewer (a fast path keeping the frames
    of the header's count would store the wrong ones), B-frames with a low count, a truncated file,
    and Matroska (no count at all, so the packets are counted). Frames carry their index."""
    clips = []
    for name, n, lie, b in (
        ("over.avi", 40, 9, 0),
        ("under.avi", 40, -9, 0),
        ("short.avi", 20, -12, 2),
        ("cut.avi", 60, None, 0),
    ):
        path = root / name
        write_avi(path, (draw_frame(i, 3, 176, 144) for i in range(n)), gop=12, b_frames=b)
        if lie is None:
            truncate_avi(path, 0.6)
        else:
            _misstate_frame_count(path, lie)
        clips.append(path)
    mkv = root / "nocount.mkv"
    write_avi(mkv, (draw_frame(i, 3, 176, 144) for i in range(33)), gop=12, b_frames=2, container_format="matroska")
    return clips + [mkv]


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_wrong_or_missing_header_count_still_gives_the_exact_frames(decoder, tmp_path, monkeypatch):
    """decode_clip guesses the length from the container's header and decodes once; where the header
    is wrong the decoded count differs and a second pass must take the indices of the true length."""
    import pipeline.video as video

    passes = []
    for name in ("_decode_keeping", "_pass_decord"):  # one call a sequential decode pass
        real = getattr(video, name)
        monkeypatch.setattr(video, name, lambda *a, _real=real, **k: passes.append(1) or _real(*a, **k))
    for path in _wrong_header_clips(tmp_path):
        seq = _pyav_codes(path)
        header = probe_video(path).container_frames
        assert header != len(seq) or path.suffix == ".mkv", "the trap lost its wrong header"
        passes.clear()
        clip = decode_clip(path, lambda n: clip_indices(n, 16), decoder, planes=decoder == "pyav")
        assert clip.decoded_frames == len(seq)
        assert clip.container_frames == header
        assert clip.indices == clip_indices(len(seq), 16)
        rgb = [_rgb_of(f) for f in clip.frames]
        assert [read_code(f) for f in rgb] == [seq[i] for i in clip.indices], (decoder, path.name)
        # a wrong count costs a second decode; no count at all the packet count, not a second decode
        assert len(passes) == (1 if path.suffix == ".mkv" else 2), (decoder, path.name)


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_right_header_count_is_one_decode_and_no_packet_count(decoder, small_tree, monkeypatch):
    """The common case pays one sequential decode: no demux pass counting packets (pyav: one open)."""
    import pipeline.video as video

    root, truth = small_tree
    opened = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    checked = 0
    for c in truth:
        path = root / "hmdb51_org" / c.class_name / c.file_name
        if probe_video(path).container_frames != c.frames:
            continue
        opened.clear()
        clip = decode_clip(path, lambda n: clip_indices(n, 16), decoder, check=lambda p: None)
        assert clip.indices == clip_indices(c.frames, 16)
        assert [read_code(f) for f in clip.frames] == [(i, c.class_index) for i in clip.indices]
        # pyav: the one open decodes; decord: PyAV opens once for the header and the keyframe check
        assert len(opened) == 1, (decoder, c.file_name, opened)
        checked += 1
    assert checked >= 5
    assert video.probe_video(path, count=False).packets is None


def _rgb_of(frame):
    """RGB of a kept frame, also when it came as full-range 4:2:0 planes (Y, U, V)."""
    import cv2

    if not isinstance(frame, tuple):
        return frame
    y, u, v = frame
    h, w = y.shape
    yuv = np.concatenate([y.ravel(), u.ravel(), v.ravel()]).reshape(h * 3 // 2, w)
    return cv2.cvtColor(yuv, cv2.COLOR_YUV2RGB_I420)
