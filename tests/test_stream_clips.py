"""pipeline/stream/clips.py: one crop and one flip per clip, the source frames in order."""

import numpy as np
import pytest
import simplejpeg
import streamkit
from streamkit import cfg_for, epoch_batches

from pipeline import read_shard
from pipeline.frames import clip_draw, crop_box
from pipeline.shardformat import pack_jpegs
from pipeline.stream import clips


def _still_clip(frames=6, width=60, height=40):
    """A clip whose frames are all the same random-texture image: any per-frame crop would differ."""
    img = np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)
    img = np.kron(img[::4, ::4], np.ones((4, 4, 1), np.uint8))  # 4x4 blocks survive JPEG
    pack = pack_jpegs([simplejpeg.encode_jpeg(img, quality=100, colorspace="RGB")] * frames)
    return pack, simplejpeg.decode_jpeg(pack_jpegs_first(pack), colorspace="RGB")


def pack_jpegs_first(pack):
    from pipeline.shardformat import unpack_jpegs

    return unpack_jpegs(pack)[0]


def test_one_crop_and_one_flip_per_clip():
    pack, full = _still_clip()
    boxes = set()
    for seed in range(40):
        clip = clips.crop_clip(pack, 24, clip_draw(seed, 0, "k"))
        top, left, flip = crop_box(40, 60, 24, clip_draw(seed, 0, "k"))
        boxes.add((top, left, flip))
        expected = full[top : top + 24, left : left + 24]
        expected = expected[:, ::-1] if flip else expected
        for t in range(clip.shape[0]):
            assert np.array_equal(clip[t], expected), f"frame {t} was cropped differently"
    assert len({b[:2] for b in boxes}) > 10 and {b[2] for b in boxes} == {False, True}


def test_eval_crop_is_centred_and_unflipped():
    pack, full = _still_clip()
    clip = clips.crop_clip(pack, 24, None)
    assert all(np.array_equal(f, full[8:32, 18:42]) for f in clip)


def test_streamed_clips_are_the_source_frames_in_order_under_one_crop(packed):
    cfg = cfg_for(packed)
    ds = streamkit.resolve(cfg)
    source = {s["key"]: s for shard in ds.train.shards for s in read_shard(shard.url)}
    checked = 0
    for b in epoch_batches(ds, cfg, 0, 0, 1)[:3]:
        for key, clip, label in zip(b["key"], b["frames"].numpy(), b["label"].tolist()):
            frames = source[key]["frames"]
            assert label == source[key]["label"]
            t, h, w, _ = frames.shape
            matches = [
                (top, left, flip)
                for top in range(h - 24 + 1)
                for left in range(w - 24 + 1)
                for flip in (False, True)
                if np.array_equal(clip, _crop(frames, top, left, flip))
            ]
            assert len(matches) == 1, f"{key}: no single crop box explains all frames"
            checked += 1
    assert checked == 12


def _crop(frames, top, left, flip):
    out = frames[:, top : top + 24, left : left + 24]
    return out[:, :, ::-1] if flip else out


@pytest.mark.parametrize("other", [(32, 48), (48, 72)])
def test_a_frame_of_another_size_is_a_fault_not_garbage(other):
    """A smaller frame would fit the clip's buffer and a larger one would not: both are named."""
    from pipeline.errors import ShardFormatError

    rng = np.random.default_rng(0)
    frames = [
        simplejpeg.encode_jpeg(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), colorspace="RGB") for _ in range(4)
    ]
    frames[2] = simplejpeg.encode_jpeg(rng.integers(0, 256, (*other, 3), dtype=np.uint8), colorspace="RGB")
    with pytest.raises(ShardFormatError, match="frames of one clip differ in size"):
        clips.crop_clip(pack_jpegs(frames), 24, None)
