"""One clip's transform: a video file -> its sample's `.jpgs` member and the facts for its metadata.

Runs in a decoder process (pipeline.pack.pool); pure of the output folder, so any engine can call it.
"""

from __future__ import annotations

from pipeline.shardformat import MAX_JPEG_SIDE, pack_jpegs


def clip_args(cfg, video) -> tuple:
    """pack_clip's arguments for one planned video of a pack with options `cfg` (a PackConfig)."""
    stored = None if cfg.stored_frames is None else cfg.stored_count
    return (str(cfg.data_dir / video.source), cfg.frames, cfg.short_side, cfg.quality, cfg.decoder, stored)


def preload_decoders(decoder: str) -> None:
    """Import what every decoder process needs once, before they fork: each would otherwise spend
    its own 0.1-0.4 s of CPU (`python -X importtime` here) importing PyAV, OpenCV and simplejpeg."""
    import av  # noqa: F401
    import cv2  # noqa: F401
    import simplejpeg  # noqa: F401

    import pipeline.video  # noqa: F401

    if decoder == "decord":
        import decord  # noqa: F401


def pack_clip(path: str, frames: int, short_side: int | None, quality: int, decoder: str, stored=None) -> dict:
    """Runs in a worker process: one video to its `.jpgs` member and facts for the metadata.
    `stored`: n -> S, the frames to store of an n-frame clip (PackConfig.stored_count); None: T."""
    import cv2
    import simplejpeg

    from pipeline.errors import DecodeError
    from pipeline.frames import clip_indices, resized_size
    from pipeline.video import decode_clip

    def refuse_too_big(probe) -> None:  # from the header, before any frame is kept: T of them may not fit in memory
        too_big = _too_big(*probe.size, short_side)
        if too_big:
            raise DecodeError(too_big)

    try:
        keep = lambda n: clip_indices(n, stored(n) if stored else frames)  # noqa: E731
        clip = decode_clip(path, keep, decoder, planes=True, check=refuse_too_big)
    except DecodeError as e:
        return {"error": str(e)}
    too_big = _too_big(*clip.size, short_side)
    if too_big:
        return {"error": too_big}
    w, h = resized_size(*clip.size, short_side)
    interp = cv2.INTER_AREA if w <= clip.size[0] else cv2.INTER_LINEAR

    def fit(a, size):
        return a if (a.shape[1], a.shape[0]) == size else cv2.resize(a, size, interpolation=interp)

    jpegs = []
    for f in clip.frames:
        if isinstance(f, tuple):  # 4:2:0 planes straight into the JPEG encoder: no RGB round trip
            chroma = ((w + 1) // 2, (h + 1) // 2)
            y, u, v = _even_padded(fit(f[0], (w, h))), fit(f[1], chroma), fit(f[2], chroma)
            jpegs.append(simplejpeg.encode_jpeg_yuv_planes(y, u, v, quality=quality))
        else:
            jpegs.append(
                simplejpeg.encode_jpeg(fit(f, (w, h)), quality=quality, colorspace="RGB", colorsubsampling="420")
            )
    return {
        "jpgs": pack_jpegs(jpegs),
        "indices": clip.indices,
        "decoded_frames": clip.decoded_frames,
        "container_frames": clip.container_frames,
        "fps": round(clip.fps, 6),
        "original_size": list(clip.size),
        "frame_size": [w, h],
        "note": clip.note,
    }


def _even_padded(y):
    """The luma plane as a view into a copy one pixel wider/taller where its size is odd (edge
    repeated). libjpeg-turbo reads 4:2:0 luma in whole 2x2 blocks: given an odd-sized plane it reads
    a byte past each row, and past the buffer's end on the last one, so two packs of the same clip
    differed (a 320x240 clip at --short-side 128 is 171 px wide)."""
    import cv2

    h, w = y.shape
    if not (h % 2 or w % 2):
        return y
    return cv2.copyMakeBorder(y, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)[:h, :w]


def _too_big(width: int, height: int, short_side: int | None) -> str | None:
    """Why frames of this source would be refused by our own readers (shardformat.MAX_JPEG_SIDE)."""
    from pipeline.frames import resized_size

    if not (width and height):
        return None  # the header does not say; checked again on the decoded size
    w, h = resized_size(width, height, short_side)
    if max(w, h) <= MAX_JPEG_SIDE:
        return None
    return f"frames would be {w}x{h} px ({width}x{height} source), above the {MAX_JPEG_SIDE} px a side shard readers accept"
