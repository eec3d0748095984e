"""Which frames a clip contributes (pure index math), and one call that decodes them exactly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

DECODERS = ("decord", "pyav")


def clip_indices(n: int, t: int) -> list[int]:
    """T equally spaced indices over n decodable frames: round(i * (n - 1) / (t - 1)), halves up.

    Integer arithmetic, so no float error decides a frame. For n < t indices repeat (padding);
    t == 1 takes the middle frame.
    """
    if n < 1:
        raise ValueError(f"a clip needs at least one frame, got n={n}")
    if t < 1:
        raise ValueError(f"frames per clip must be >= 1, got {t}")
    if t == 1:
        return [n // 2]  # round((n - 1) / 2), half up
    return [(2 * i * (n - 1) + (t - 1)) // (2 * (t - 1)) for i in range(t)]


def resized_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) with the shorter side set to `short_side`, aspect kept (halves round up)."""
    if short_side is None:
        return width, height
    if width <= height:
        return short_side, (2 * height * short_side + width) // (2 * width)
    return (2 * width * short_side + height) // (2 * height), short_side


class DecodeError(Exception):
    """A video that cannot be decoded at all; the message names the file."""


@dataclasses.dataclass
class SampledClip:
    frames: np.ndarray | list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    """(T, H, W, 3) uint8 RGB at source size; or, when asked for planes, T full-range (Y, U, V)."""
    indices: list[int]
    decoded_frames: int
    """n: frames a sequential decode of the whole file produced."""
    container_frames: int | None
    fps: float
    size: tuple[int, int]
    """(width, height) of the source frames."""
    note: str | None = None
    """Set when decoding stopped on an error after some frames (a damaged tail)."""


def decode_clip(path: str | Path, t: int, decoder: str = "decord", planes: bool = False) -> SampledClip:
    """Decode the whole file sequentially, then take the T frames of `clip_indices`.

    Sequential on purpose: container frame counts of AVI files can be wrong (a truncated file keeps
    its header), and decord's random access returns neighbouring frames on files with B-frames. A
    full sequential decode both finds the true length n and yields each frame exactly once, in order.
    Only the chosen frames are converted to RGB where the decoder allows it.

    planes=True (pyav only): frames of 4:2:0 video come back as full-range (Y, U, V) planes instead
    of RGB, so a JPEG encoder can take them without a YUV -> RGB -> YUV round trip.
    """
    if decoder == "decord":
        return _decode_decord(str(path), t)
    if decoder == "pyav":
        return _decode_pyav(str(path), t, planes)
    raise ValueError(f"unknown decoder {decoder!r}; choose from {', '.join(DECODERS)}")


def _decode_decord(path: str, t: int) -> SampledClip:
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception as e:  # decord raises its own DECORDError and RuntimeError
        raise DecodeError(f"cannot open: {_first_line(e)}") from None
    container = len(reader)
    fps = float(reader.get_avg_fps())
    kept, note = [], None
    while True:
        try:
            kept.append(reader.next())  # NDArray: converted to numpy only if chosen
        except StopIteration:
            break
        except Exception as e:
            if not kept:
                raise DecodeError(f"no decodable frame: {_first_line(e)}") from None
            note = f"decoding stopped after {len(kept)} frames: {_first_line(e)}"
            break
    if not kept:
        raise DecodeError("no decodable frame")
    indices = clip_indices(len(kept), t)
    frames = np.stack([kept[i].asnumpy() for i in indices])
    h, w = frames.shape[1:3]
    return SampledClip(frames, indices, len(kept), container or None, fps, (w, h), note)


# MPEG video stores limited-range BT.601 (Y 16-235, chroma 16-240); JPEG (JFIF) wants full range.
_Y_TO_FULL = np.clip(np.round((np.arange(256) - 16) * 255 / 219), 0, 255).astype(np.uint8)
_C_TO_FULL = np.clip(np.round((np.arange(256) - 128) * 255 / 224 + 128), 0, 255).astype(np.uint8)


def _yuv420_planes(frame) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Full-range (Y, U, V) uint8 planes of a 4:2:0 PyAV frame, or None for other layouts."""
    name = frame.format.name
    if name not in ("yuv420p", "yuvj420p"):
        return None
    w, h = frame.width, frame.height
    out = []
    for plane, (pw, ph) in zip(frame.planes, ((w, h), ((w + 1) // 2, (h + 1) // 2), ((w + 1) // 2, (h + 1) // 2))):
        a = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:ph, :pw]
        out.append(a.copy())
    if name == "yuv420p":
        out = [_Y_TO_FULL[out[0]], _C_TO_FULL[out[1]], _C_TO_FULL[out[2]]]
    return out[0], out[1], out[2]


def _decode_pyav(path: str, t: int, planes: bool = False) -> SampledClip:
    import av

    try:
        container = av.open(path)
    except Exception as e:
        raise DecodeError(f"cannot open: {_first_line(e)}") from None
    with container:
        if not container.streams.video:
            raise DecodeError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "NONE"
        claimed = stream.frames or None
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        kept, note = [], None
        try:
            for frame in container.decode(stream):
                kept.append(frame)  # still YUV: only the chosen frames are converted
        except Exception as e:
            if not kept:
                raise DecodeError(f"no decodable frame: {_first_line(e)}") from None
            note = f"decoding stopped after {len(kept)} frames: {_first_line(e)}"
        if not kept:
            raise DecodeError("no decodable frame")
        indices = clip_indices(len(kept), t)
        chosen = [_yuv420_planes(kept[i]) if planes else None for i in indices]
        if all(c is not None for c in chosen):
            frames = chosen
        else:
            frames = np.stack([kept[i].to_ndarray(format="rgb24") for i in indices])
        size = (kept[0].width, kept[0].height)
    return SampledClip(frames, indices, len(kept), claimed, fps, size, note)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
