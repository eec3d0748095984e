"""Clip decoding: a raw sample's JPEG pack -> one (T, crop, crop, 3) uint8 row of a batch.

A pack stores S >= T frames of the source clip (S = T by default; see docs/FORMAT.md). Which T of
them a clip contributes is pure index math (`pipeline.frames`: `segment_positions`, `view_positions`);
only those T are decoded, the rest of the pack is skipped. One crop box and one flip decision per
clip, and in training one frame per segment, all drawn from (seed, epoch, key): the same clip gets
the same frames and crop in an epoch whichever rank, worker, loader (ClipLoader or ClipDataset
under a DataLoader) or resume delivers it, and different ones the next epoch.
"""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np

from pipeline.errors import ShardFormatError, UserError
from pipeline.frames import clip_draw, crop_box, training_positions
from pipeline.shardformat import CLS, JPGS, jpeg_size, parse_label, unpack_jpegs
from pipeline.stream.stages import Faults


def check_crop(crop: int | None, source) -> None:
    """A crop larger than the pack's frames, said before any worker starts (the index knows the
    frames' shorter side): otherwise every clip fails to decode, one fault at a time. `source` is
    a ShardSet."""
    for index, side in [(p.index, p.short_side) for p in source.packs] or [(source.index, source.short_side)]:
        if crop is not None and side is not None and crop > side:
            raise UserError(
                f"`crop` {crop} is larger than the frames of the pack, whose shorter side is {side} px "
                f"(index {index}): use a crop of at most {side}"
            )


def crop_clip(
    pack: bytes,
    crop: int | None,
    draw: int | None,
    out: np.ndarray | None = None,
    scratch: dict | None = None,
    choose=None,
    spatial: int = 0,
) -> np.ndarray:
    """Decode the chosen frames of a `.jpgs` pack and cut one crop (and flip) out of each:
    (T, crop, crop, 3) uint8, written into `out` when given (a row of a batch slot: no allocation,
    no copy afterwards). `choose(S)` -> the T pack positions to decode (default: all S); the other
    frames are never decoded. `crop=None`: whole frames, (T, H, W, 3), no flip.

    One crop box and one flip decision for the whole clip, so motion stays coherent. Each frame is
    decoded into a one-frame buffer and cropped at once, while it is still in the CPU's cache (5 %
    faster than decoding the whole clip first). `scratch`, a dict kept by the caller, holds that
    buffer from clip to clip.
    """
    jpegs = unpack_jpegs(pack)
    positions = range(len(jpegs)) if choose is None else choose(len(jpegs))
    if out is not None and len(positions) != len(out):
        raise ShardFormatError(f"clip has {len(positions)} frames, the index says {len(out)}")
    height, width = jpeg_size(jpegs[positions[0]])
    if crop is None:
        if out is None:
            out = np.empty((len(positions), height, width, 3), np.uint8)
        for t, p in enumerate(positions):
            decode_frame(jpegs[p], p, out[t])
        return out
    top, left, flip = crop_box(height, width, crop, draw, spatial)
    frame = frame_buffer(height, width, scratch)
    window = frame[top : top + crop, left : left + crop]  # the same view for every frame
    if out is None:
        out = np.empty((len(positions), crop, crop, 3), np.uint8)
    for t, p in enumerate(positions):
        decode_frame(jpegs[p], p, frame)
        crop_frame(window, flip, out[t])
    return out


def frame_buffer(height: int, width: int, scratch: dict | None) -> np.ndarray:
    """A (height, width, 3) uint8 buffer, kept in `scratch` for the next clip of that size."""
    if scratch is None:
        return np.empty((height, width, 3), np.uint8)
    frame = scratch.get((height, width))
    if frame is None:
        scratch.clear()  # one size at a time: the clips of one dataset share it
        frame = scratch[(height, width)] = np.empty((height, width, 3), np.uint8)
    return frame


def decode_frame(jpeg, t: int, out: np.ndarray) -> None:
    """Decode frame `t` of a clip into `out` (libjpeg-turbo), which has frame 0's size; a frame of
    another size is a ShardFormatError. simplejpeg returns the decoded image's own shape (a smaller
    frame fills part of the buffer) and refuses a larger one, so the check costs no header parse."""
    import simplejpeg

    try:
        decoded = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", buffer=out)
    except ValueError as e:
        if "too small" in str(e):
            raise ShardFormatError(f"frames of one clip differ in size (frame {t}: {e})") from None
        raise ShardFormatError(f"unreadable JPEG frame {t}: {e}") from None
    if decoded.shape != out.shape:
        raise ShardFormatError(
            f"frames of one clip differ in size (frame {t} is {decoded.shape[1]}x{decoded.shape[0]}, frame 0 {out.shape[1]}x{out.shape[0]})"
        )


def crop_frame(window: np.ndarray, flip: bool, out: np.ndarray) -> None:
    """Copy a frame's crop window (a view of the frame buffer), mirrored if `flip`, into `out`."""
    if flip:
        # numpy copies a reversed axis of 3-byte pixels element by element (1.4 ms a 16-frame clip);
        # OpenCV's flip does the same mirror in 0.04 ms.
        cv2.flip(window, 1, dst=out)
    else:
        np.copyto(out, window)


def decode_sample(
    raw: dict,
    crop: int | None,
    label_maps: tuple[tuple[int, ...], ...],
    draw: int | None,
    row: np.ndarray | None,
    scratch: dict,
    choose=None,
    spatial: int = 0,
):
    """Check a raw sample's members and label, decode its clip into `row` (see crop_clip); returns
    the label (and the frames when `row` is None). Anything unreadable is a ShardFormatError.
    `label_maps` (ShardSet.label_maps): per pack, the set's label of each stored label; a sample's
    pack is its `__pack__` (read_samples sets it from its shard), 0 when absent."""
    if JPGS not in raw or CLS not in raw:
        raise ShardFormatError(f"missing member(s): has {sorted(k for k in raw if not k.startswith('__'))}")
    labels = label_maps[raw.get("__pack__", 0)]
    label = labels[parse_label(raw[CLS], len(labels))]
    frames = crop_clip(raw[JPGS], crop, draw, row, scratch, choose, spatial)
    return label if row is not None else (label, frames)


class TrainClips:
    """Decodes training clips straight into the rows of batch slots, in stream order.

    An unreadable clip's row gets the worker's previous good clip instead (decoded again: the same
    crop), or, before any good clip, the next good one; every replacement is a named fault, and the
    count stays as planned.
    """

    def __init__(
        self,
        src: Iterable[dict],
        crop: int,
        label_maps: tuple[tuple[int, ...], ...],
        seed: int,
        epoch: int,
        faults: Faults,
        temporal: str = "segment",
    ):
        self.src, self.crop, self.label_maps, self.seed, self.epoch, self.faults = (
            iter(src),
            crop,
            label_maps,
            seed,
            epoch,
            faults,
        )
        self.temporal = temporal
        self.scratch: dict = {}
        self.last_good: tuple[dict, int] | None = None  # (raw, label)
        self.repeat: tuple[np.ndarray, str, int, int, int] | None = None  # (clip, key, label, pack, rows still owed)

    def _decode(self, raw: dict, row: np.ndarray) -> int:
        key = raw["__key__"]
        choose = training_positions(self.temporal, len(row), self.seed, self.epoch, key)
        return decode_sample(
            raw, self.crop, self.label_maps, clip_draw(self.seed, self.epoch, key), row, self.scratch, choose
        )

    def fill(self, rows: np.ndarray) -> tuple[list[str], list[int], list[bool], list[int]]:
        """Write len(rows) clips into `rows`; returns their keys, labels, repeat marks (a clip
        delivered again to top the epoch up, see samples.fit_to_quota) and packs."""
        keys: list[str] = []
        labels: list[int] = []
        repeats: list[bool] = []
        packs: list[int] = []
        for row in rows:
            if self.repeat is not None:
                clip, key, label, pack, owed = self.repeat
                row[...] = clip
                self.repeat = (clip, key, label, pack, owed - 1) if owed > 1 else None
                keys.append(key)
                labels.append(label)
                repeats.append(False)
                packs.append(pack)
                continue
            owed = 0
            repeated = False
            for raw in self.src:
                repeated = "__repeat__" in raw
                key = raw.get("__key__", "?")
                try:
                    label = self._decode(raw, row)
                    self.last_good = (raw, label)
                except ShardFormatError as e:
                    # The trainer counts faults against --max-bad for the whole rank (see train.py).
                    self.faults.add(f"{raw.get('__url__', '?')}:{key}", str(e))
                    if self.last_good is None:
                        owed += 1
                        continue
                    raw, label = self.last_good
                    key = raw["__key__"]
                    self._decode(raw, row)
                break
            else:
                raise UserError(f"every clip of a loader worker's shards is unreadable ({self.faults.bad} bad)")
            pack = raw.get("__pack__", 0)
            if owed:
                self.repeat = (row.copy(), key, label, pack, owed)
            keys.append(key)
            labels.append(label)
            repeats.append(repeated)
            packs.append(pack)
        return keys, labels, repeats, packs
