"""Pure index math: which frames a clip keeps, which of its stored frames a clip contributes, and
where its crop lies. No I/O here, so every rule is tested with literal tables of expected indices.

The pack keeps `clip_indices` of a video's decodable frames; a stream draws `segment_positions` (training)
or `view_positions` (evaluation) of a pack's stored frames, and one `crop_box` per clip from
`clip_draw`'s bits, all deterministic in (seed, epoch, key): the same clip gets the same frames and
crop in an epoch whichever rank, worker, loader or resume delivers it.
"""

from __future__ import annotations

import hashlib
import struct

from pipeline.errors import ShardFormatError


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


def clip_draw(seed: int, epoch: int, key: str) -> int:
    """One clip's 64 random bits for its augmentation in `epoch`. A keyed hash (1 us) rather than a
    seeded numpy Generator (25 us a clip, 2 % of decoding)."""
    digest = hashlib.blake2b(
        key.encode("utf-8", "surrogateescape"), digest_size=8, key=struct.pack("<2q", seed, epoch)
    ).digest()
    return int.from_bytes(digest, "little")


def segment_positions(stored: int, frames: int, seed: int, epoch: int, key: str) -> list[int]:
    """Training frames: the S stored frames cut into T equal segments, [i*S//T, (i+1)*S//T), and one
    frame drawn from each, deterministic in (seed, epoch, key). With S = T every segment is one
    frame: the T evaluation frames, as `fixed` gives them."""
    words = _words(seed, epoch, key, frames)
    out = []
    for i in range(frames):
        lo = i * stored // frames
        hi = max(lo + 1, (i + 1) * stored // frames)
        out.append(lo + words[i] % (hi - lo))
    return out


def training_positions(temporal: str, frames: int, seed: int, epoch: int, key: str):
    """`choose(S)` for a training clip (see stream.clips.crop_clip): one frame per segment (`segment`), or
    the evaluation frames (`fixed`)."""
    if temporal == "segment":
        return lambda stored: segment_positions(stored, frames, seed, epoch, key)
    return lambda stored: view_positions(stored, frames)


def view_positions(stored: int, frames: int, view: int = 0, views: int = 1) -> list[int]:
    """Evaluation frames. View 0 (and `fixed` training) is round(i*(S-1)/(T-1)): with S - 1 a
    multiple of T - 1, or every frame stored, exactly the source frames round(i*(n-1)/(T-1)).
    Temporal view k of K is shifted k/K of the way to the next: round((i + k/K)*(S-1)/(T-1)),
    at most S - 1."""
    if view == 0 or frames == 1:
        return clip_indices(stored, frames)
    den = 2 * views * (frames - 1)
    return [
        min(stored - 1, (2 * (i * views + view) * (stored - 1) + views * (frames - 1)) // den) for i in range(frames)
    ]


def _words(seed: int, epoch: int, key: str, n: int) -> list[int]:
    """n 16-bit random words for one clip's frame draws (keyed hashes, as clip_draw)."""
    data = key.encode("utf-8", "surrogateescape")
    words: list[int] = []
    block = 0
    while len(words) < n:
        digest = hashlib.blake2b(
            data, digest_size=64, key=struct.pack("<3q", seed, epoch, block), person=b"segments"
        ).digest()
        words += struct.unpack("<32H", digest)
        block += 1
    return words[:n]


def crop_box(height: int, width: int, crop: int, draw: int | None, spatial: int = 0) -> tuple[int, int, bool]:
    """(top, left, flip) of the clip's crop: from the 64 random bits `draw` (top from the low 24
    bits, left from the next 24, flip from bit 48); without, evaluation's spatial view: 0 the
    centre, 1 and 2 the two ends of the longer side (centred on the shorter one)."""
    if height < crop or width < crop:
        raise ShardFormatError(f"frames of {width}x{height} are smaller than the {crop} px crop")
    if draw is None:
        top, left = (height - crop) // 2, (width - crop) // 2
        if spatial:
            end = spatial == 2
            if width >= height:
                left = (width - crop) if end else 0
            else:
                top = (height - crop) if end else 0
        return top, left, False
    top = (draw & 0xFFFFFF) % (height - crop + 1)
    left = ((draw >> 24) & 0xFFFFFF) % (width - crop + 1)
    return top, left, bool((draw >> 48) & 1)
