"""Index math (literal tables), resize math, and the coded sample data itself."""

import av
import decord
import numpy as np
import pytest

from pipeline.frames import clip_indices, resized_size
from pipeline.tools.sampledata import draw_frame, make_sample_data, read_code
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
    for c in truth:
        path = root / "hmdb51_org" / c.class_name / c.file_name
        lying_container += probe_video(path).container_frames != c.frames
        if c.kind == "bframes" and c.frames >= 16:
            vr = decord.VideoReader(str(path), num_threads=1)
            got = [read_code(f)[0] for f in vr.get_batch(clip_indices(len(vr), 16)).asnumpy()]
            wrong_random_access += got != clip_indices(c.frames, 16)
    assert wrong_random_access >= 1, "fixture lost its B-frame trap"
    assert lying_container >= 1, "fixture lost its truncated/overstated trap"
