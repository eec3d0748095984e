"""A video file -> its frames: probe, sequential decode (both decoders), exactly the frames asked for.

Which frames those are is pure index math, `pipeline.frames.clip_indices`, passed in by the caller."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import sys
from pathlib import Path

import numpy as np

from pipeline.errors import DecodeError

DECODERS = ("pyav", "decord")


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


@dataclasses.dataclass(frozen=True)
class Probe:
    """What a demux-only pass over the file says, before any decoder runs."""

    packets: int | None
    """Video packets with a payload: the decodable length when each gives one frame (checked later);
    None when not counted (the header's count is the guess)."""
    container_frames: int | None
    fps: float
    size: tuple[int, int]
    """(width, height) the stream header claims."""

    @property
    def guess(self) -> int | None:
        """The length a decode pass keeps frames for: the packets counted, else the header's count."""
        return self.packets if self.packets is not None else self.container_frames


# Demuxers FFmpeg picks for a lone picture: a renamed JPEG/PNG would otherwise pack as a 1-frame clip
# with one decoder and fail with the other.
_IMAGE_FORMAT = re.compile(r"^(image2|.+_pipe)$")


_NOT_KEYFRAME = "the first frame is not a keyframe (file cut before its first keyframe): it would decode as grey"


def _open_video(path: str):
    """(container, its first video stream, set for one decoder thread), refusing what is not a video."""
    import av

    try:
        container = av.open(path)
    except Exception as e:
        raise DecodeError(f"cannot open: {_decoder_message(e)}") from None
    if _IMAGE_FORMAT.match(container.format.name):
        container.close()
        raise DecodeError(f"not a video: a single picture ({container.format.name.removesuffix('_pipe')})")
    if not container.streams.video:
        container.close()
        raise DecodeError("no video stream")
    stream = container.streams.video[0]
    # One decoder thread: pack-shards runs a worker per core. Measured on the 153 HMDB-shaped
    # clips, whole packs alternated on the quiet 2-core machine: 2 FFmpeg frame threads took
    # 2.60 s with 1 worker and 1.81 s with 2, one thread 2.32 s and 1.49 s (medians of 7).
    stream.thread_type = "NONE"
    return container, stream


def _header(stream, packets: int | None) -> Probe:
    ctx = stream.codec_context
    rate = stream.average_rate or stream.guessed_rate
    return Probe(packets, stream.frames or None, float(rate) if rate else 0.0, (ctx.width, ctx.height))


def probe_video(path: str | Path, count: bool = True) -> Probe:
    """Count the video packets (no decoding but the first frame): the length the decode pass expects.

    Also refuses what is not a video (a picture in a video's name, no video stream) and a stream cut
    before its first keyframe: MPEG-4 decoders turn predicted frames without their keyframe into
    grey pictures without an error, so they would be packed as if they were the clip.

    count=False: stop once the first frame is out (the checks done) and leave `packets` None, so the
    header's count is the guess; the packets are counted all the same when the header has no count.
    """
    container, stream = _open_video(str(path))
    with container:
        ctx = stream.codec_context
        count = count or not stream.frames
        packets, looking = 0, True
        try:
            for packet in container.demux(stream):
                if not packet.size:
                    continue
                packets += 1
                if looking:  # until the first frame comes out (a decoder with B-frames holds one back)
                    try:
                        frames = ctx.decode(packet)
                    except Exception:
                        looking = False  # an undecodable start is the decode pass's to report
                        continue
                    if frames and not frames[0].key_frame:
                        raise DecodeError(_NOT_KEYFRAME)
                    looking = not frames
                if not (looking or count):
                    break
        except DecodeError:
            raise
        except Exception:
            pass  # a damaged tail: the decode pass finds where the frames really stop
        return _header(stream, packets if count else None)


def decode_clip(path: str | Path, indices, decoder: str = "pyav", planes: bool = False, check=None) -> SampledClip:
    """Decode the whole file sequentially, keeping only the frames `indices(n)` names of an n-frame
    clip (e.g. `lambda n: clip_indices(n, 16)`; `pack-shards --stored-frames`: S stored frames at the
    same formula).

    Sequential on purpose: container frame counts of AVI files can be wrong (a truncated file keeps
    its header), and decord's random access returns neighbouring frames on files with B-frames. A
    full sequential decode yields each frame exactly once, in order. The indices depend on the true
    length n, known only at the end, so the decode pass keeps the frames at the indices of a guess,
    the container's count (what the header says: right for almost every file), and when the decoder
    produced another number of frames (a truncated file, a damaged tail, a lying header) a second
    decode pass takes the indices of the true n. Without a count in the header (Matroska, WebM) the
    guess is the number of packets, counted first by a demux-only pass (`probe_video`). Memory holds
    the kept frames, whatever the clip's length.

    check(probe): called with the stream header's facts once the first frame is out, before any
    frame is kept; it refuses a clip by raising DecodeError (pack-shards: frames too big to store).

    planes=True (pyav only): frames of 4:2:0 video come back as full-range (Y, U, V) planes instead
    of RGB, so a JPEG encoder can take them without a YUV -> RGB -> YUV round trip.
    """
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose from {', '.join(DECODERS)}")
    path = str(path)
    check = check or (lambda probe: None)
    one_pass = _pass_decord if decoder == "decord" else functools.partial(_pass_pyav, planes=planes)
    first = _first_pass_pyav(path, indices, check, planes) if decoder == "pyav" else None
    if first is None:  # decord, or a header without a count: the checks and the guess from probe_video
        probe = probe_video(path, count=decoder == "pyav")
        check(probe)
        first = (*one_pass(path, _wanted(probe.guess, indices)), probe)
    kept, count, error, size, probe = first
    if count != probe.guess and count:
        kept, again, error, size = one_pass(path, _wanted(count, indices))
        if again != count:
            raise DecodeError(f"two sequential decodes gave {count} and {again} frames")
    if not count:
        if error and error.startswith("cannot open"):
            raise DecodeError(error)
        raise DecodeError(f"no decodable frame{': ' + error if error else ''}")
    chosen = indices(count)
    if any(isinstance(kept[i], tuple) for i in chosen) and not all(isinstance(kept[i], tuple) for i in chosen):
        kept = one_pass(path, set(chosen), planes=False)[0]  # the pixel format changed mid-stream
    frames = [kept[i] for i in chosen]
    frames = frames if isinstance(frames[0], tuple) else np.stack(frames)
    note = f"decoding stopped after {count} frames: {error}" if error else None
    return SampledClip(frames, chosen, count, probe.container_frames, probe.fps, size, note)


def _wanted(n: int, indices) -> set[int]:
    return set(indices(n)) if n else set()


def _pass_pyav(path: str, wanted: set[int], planes: bool = False):
    """One sequential decode: (frames kept by index, frames decoded, error or None, size).

    Kept frames are converted at once into arrays we own, so no decoder buffer outlives the pass
    and memory holds len(wanted) frames.
    """
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "NONE"  # as _open_video
        return _decode_keeping(container, stream, lambda: wanted, planes)


def _first_pass_pyav(path: str, indices, check, planes: bool):
    """The common case in one open: probe_video's checks, `check`, and the decode pass keeping the
    frames at indices(the header's count); (kept, count, error, size, probe), or None, having
    decoded nothing, when the header gives no count."""
    container, stream = _open_video(path)
    with container:
        probe = _header(stream, None)
        if probe.guess is None:
            return None

        def wanted() -> set[int]:  # at the first frame out: it is a keyframe
            check(probe)
            return _wanted(probe.guess, indices)

        kept, count, error, size = _decode_keeping(container, stream, wanted, planes, first_key=True)
    if not count:
        check(probe)  # refused by its header, whether or not a frame came out (as probe_video + check)
    return kept, count, error, size, probe


def _decode_keeping(container, stream, wanted, planes: bool, first_key: bool = False):
    """Decode `stream` to its end, converting only the frames whose index is in `wanted()` (called
    once the first frame is out); first_key: refuse a first frame that is not a keyframe."""
    kept, count, error, size, keep = {}, 0, None, None, set()
    try:
        for frame in container.decode(stream):
            if size is None:
                if first_key and not frame.key_frame:
                    raise DecodeError(_NOT_KEYFRAME)
                keep = wanted()
                turns = round(frame.rotation / 90) % 4
                size = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
            if count in keep:  # only the kept frames are converted
                kept[count] = _upright((planes and _yuv420_planes(frame)) or frame.to_ndarray(format="rgb24"), turns)
            count += 1
    except DecodeError:
        raise
    except Exception as e:
        error = _decoder_message(e)
    return kept, count, error, size


def _upright(frame, turns: int):
    """Turn a frame (RGB array or Y, U, V planes) as its display matrix asks, the way decord does
    itself: a phone video is stored the way it is watched. np.rot90 moves pixels, so no value changes."""
    if not turns:
        return frame
    if isinstance(frame, tuple):
        return tuple(np.ascontiguousarray(np.rot90(p, turns)) for p in frame)
    return np.ascontiguousarray(np.rot90(frame, turns))


def _pass_decord(path: str, wanted: set[int], planes: bool = False):
    """One sequential decord decode; (RGB frames kept by index, frames decoded, error or None, size)."""
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    kept, count, error, size = {}, 0, None, None
    with _native_stderr_muted():
        try:
            reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        except Exception as e:  # decord raises its own DECORDError and RuntimeError
            return kept, 0, f"cannot open: {_decoder_message(e)}", None
        try:
            while True:
                try:
                    f = reader.next()
                except StopIteration:
                    break
                if count in wanted:
                    kept[count] = _decord_rgb(f.asnumpy())
                    size = size or (kept[count].shape[1], kept[count].shape[0])
                count += 1
        except Exception as e:
            error = _decoder_message(e)
        del reader  # joins decord's decoder threads while their log lines still go nowhere
    return kept, count, error, size


def _decord_rgb(a: np.ndarray) -> np.ndarray:
    """decord 0.6 returns frames narrower than 32 px as (H, W, rowbytes / W): padded RGB rows.
    Measured on 1x1 to 16x16 clips: the first W*3 bytes of each row equal PyAV's RGB exactly."""
    if a.shape[2] == 3:
        return a
    h, w = a.shape[:2]
    return np.ascontiguousarray(a.reshape(h, -1)[:, : w * 3].reshape(h, w, 3))


@contextlib.contextmanager
def _native_stderr_muted():
    """decord's C++ logging (dmlc LOG lines: timestamp, source file, message) writes to file
    descriptor 2 whatever decord.logging says, which only reaches FFmpeg's messages. What it would
    tell is in the exception we catch anyway."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


# MPEG video stores limited-range BT.601 (Y 16-235, chroma 16-240); JPEG (JFIF) wants full range.
_Y_TO_FULL = np.clip(np.round((np.arange(256) - 16) * 255 / 219), 0, 255).astype(np.uint8)
_C_TO_FULL = np.clip(np.round((np.arange(256) - 128) * 255 / 224 + 128), 0, 255).astype(np.uint8)


def _yuv420_planes(frame) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Full-range (Y, U, V) uint8 planes of a 4:2:0 PyAV frame, or None for other layouts.

    cv2.LUT on the padded plane views: the same bytes as numpy's table indexing on copies, in
    0.18 ms against 0.32 ms a 320x240 frame (the 153 benchmark clips, 16 frames each).
    """
    import cv2

    name = frame.format.name
    if name not in ("yuv420p", "yuvj420p"):
        return None
    w, h = frame.width, frame.height
    out = []
    for k, (plane, (pw, ph)) in enumerate(
        zip(frame.planes, ((w, h), ((w + 1) // 2, (h + 1) // 2), ((w + 1) // 2, (h + 1) // 2)))
    ):
        a = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:ph, :pw]
        out.append(a.copy() if name == "yuvj420p" else cv2.LUT(a, _Y_TO_FULL if k == 0 else _C_TO_FULL))
    return out[0], out[1], out[2]


_DMLC_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def _decoder_message(e: BaseException) -> str:
    """First line of an error, without decord's `[hh:mm:ss] src/file.cc:123: ` prefix (a clock
    time in the manifest would make two packs of the same input differ)."""
    text = str(e).strip().splitlines()
    return _DMLC_PREFIX.sub("", text[0])[:200] if text else type(e).__name__
