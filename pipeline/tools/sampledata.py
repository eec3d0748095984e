"""HMDB-shaped sample data: real MPEG-4 AVI clips whose frames carry their own index and class.

Every frame has a code band in its top 40 %: two rows of 12 black/white cells. Row 0 holds the
frame index (12 bits, most significant first); row 1 holds the class index (6 bits) followed by the
same 6 bits inverted, a check that a misread is noticed. Cells are large (1/12 of the width), so the
code survives MPEG-4, resizing to a 128 px shorter side and JPEG. Below the band the frame is filled
with a colour and a moving square chosen by class, so classes are easy to learn, and a text line
names the frame and class for people looking at contact sheets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import struct
from pathlib import Path

import av
import cv2
import numpy as np

HMDB51_CLASSES = (
    "brush_hair cartwheel catch chew clap climb climb_stairs dive draw_sword dribble drink eat "
    "fall_floor fencing flic_flac golf handstand hit hug jump kick kick_ball kiss laugh pick pour "
    "pullup punch push pushup ride_bike ride_horse run shake_hands shoot_ball shoot_bow shoot_gun "
    "sit situp smile smoke somersault stand swing_baseball sword sword_exercise talk throw turn "
    "walk wave"
).split()
assert len(HMDB51_CLASSES) == 51

CODE_COLS = 12
CODE_ROWS = 2
CODE_BAND = 0.4  # share of the frame height used by the code rows
MAX_FRAME_INDEX = 2**CODE_COLS - 1

# Movie titles in the style of HMDB file names: '#', '(', ')', '!', '&', "'" and dots all occur.
_TITLES = (
    "#122_Cleaning_Up_The_Beach_In_Chiba__Japan",
    "#20_Rhythm_Clap",
    "A_Beautiful_Mind_3",
    "Glory_(1989)",
    "Sweet_&_Lowdown",
    "Bart_Simpson's_Hair",
    "Hitch!_Part_2",
    "Mr._Smith_Goes_To_Washington",
    "veoh.com_clip_4.2",
    "Dont_Go_Away_(1954)!",
    "Return_of_the_King",
    "Faith_Rewarded",
)
_SIZES = ((320, 240), (176, 144), (352, 240), (256, 192))  # (width, height), all HMDB-like


def class_colour(class_index: int) -> tuple[int, int, int]:
    """A saturated RGB colour per class, hues spread so neighbouring indices differ strongly."""
    hue = (class_index * 0.381966) % 1.0  # golden-ratio steps
    hsv = np.uint8([[[int(hue * 179), 200, 200]]])
    r, g, b = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]
    return int(r), int(g), int(b)


def draw_frame(frame_index: int, class_index: int, width: int, height: int, label: str = "") -> np.ndarray:
    """Render one coded frame, (height, width, 3) uint8 RGB."""
    if not 0 <= frame_index <= MAX_FRAME_INDEX:
        raise ValueError(f"frame index {frame_index} does not fit in {CODE_COLS} bits")
    img = np.empty((height, width, 3), np.uint8)
    img[:] = class_colour(class_index)
    band = int(round(height * CODE_BAND))
    bits = [(frame_index >> (CODE_COLS - 1 - c)) & 1 for c in range(CODE_COLS)]
    cls_bits = [(class_index >> (5 - c)) & 1 for c in range(6)]
    rows = (bits, cls_bits + [1 - b for b in cls_bits])
    for r, row in enumerate(rows):
        y0, y1 = band * r // CODE_ROWS, band * (r + 1) // CODE_ROWS
        for c, bit in enumerate(row):
            x0, x1 = width * c // CODE_COLS, width * (c + 1) // CODE_COLS
            img[y0:y1, x0:x1] = 255 if bit else 0
    # A square that moves with time, speed and size set by class: motion for the models to see.
    side = height // 5
    span = max(1, width - side)
    x = (frame_index * (3 + class_index % 5) * 2) % (2 * span)
    x = x if x < span else 2 * span - x
    y = band + (height - band - side) * (class_index % 3) // 2
    img[y : y + side, x : x + side] = 255 - np.array(class_colour(class_index), np.uint8)
    if label:
        cv2.putText(img, label, (2, height - 4), cv2.FONT_HERSHEY_PLAIN, max(0.6, height / 240), (255, 255, 255), 1)
    return img


def read_code(frame: np.ndarray) -> tuple[int, int]:
    """Read (frame_index, class_index) back from a coded frame of any size.

    Raises ValueError when the class check bits disagree (not a coded frame, or too damaged).
    """
    h, w = frame.shape[:2]
    band = h * CODE_BAND
    grey = frame.mean(axis=2) if frame.ndim == 3 else frame
    values = []
    for r in range(CODE_ROWS):
        y0, y1 = band * r / CODE_ROWS, band * (r + 1) / CODE_ROWS
        ys = slice(int(y0 + (y1 - y0) * 0.3), int(np.ceil(y1 - (y1 - y0) * 0.3)))
        row = []
        for c in range(CODE_COLS):
            x0, x1 = w * c / CODE_COLS, w * (c + 1) / CODE_COLS
            xs = slice(int(x0 + (x1 - x0) * 0.3), int(np.ceil(x1 - (x1 - x0) * 0.3)))
            row.append(int(grey[ys, xs].mean() > 127))
        values.append(row)
    frame_index = int("".join(map(str, values[0])), 2)
    cls, check = values[1][:6], values[1][6:]
    if any(a == b for a, b in zip(cls, check)):
        raise ValueError("frame carries no valid class code")
    return frame_index, int("".join(map(str, cls)), 2)


def write_avi(
    path: Path, frames, fps: int = 30, b_frames: int = 0, gop: int = 30, container_format: str = "avi"
) -> None:
    """Encode RGB frames into MPEG-4 Part 2 (the codec family of the HMDB51 and UCF101 files) in an
    AVI, or in another container such as "mp4" (Kinetics-style files; decord and PyAV read both)."""
    frames = list(frames)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.max_b_frames = b_frames
        stream.codec_context.options = {"qscale": "3"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def overstate_frame_count(path: Path, extra: int) -> None:
    """Make the AVI headers claim `extra` more frames than the file holds.

    Patches dwTotalFrames in 'avih' and dwLength in the video 'strh': the kind of lie that makes
    container frame counts (and decoders that trust them) wrong.
    """
    data = bytearray(path.read_bytes())
    avih = data.find(b"avih")
    if avih < 0:
        raise ValueError(f"{path}: no avih chunk")
    off = avih + 8 + 16  # chunk id + size, then 4 dwords before dwTotalFrames
    struct.pack_into("<I", data, off, struct.unpack_from("<I", data, off)[0] + extra)
    # The video stream's 'strh': its chunk id, its size, then fccType 'vids' (not 'strhvids' in a
    # row: until 2026-12-02 this looked for that and patched only avih, which FFmpeg does not read,
    # so an "overstated" clip never lied to PyAV). dwLength is what PyAV's stream.frames reports.
    strh = next((m.start() for m in re.finditer(rb"strh", data) if data[m.start() + 8 : m.start() + 12] == b"vids"), -1)
    if strh < 0:
        raise ValueError(f"{path}: no video strh chunk")
    off = strh + 8 + 32  # chunk id and size, fccType .. dwStart, then dwLength
    struct.pack_into("<I", data, off, struct.unpack_from("<I", data, off)[0] + extra)
    path.write_bytes(bytes(data))


def truncate_avi(path: Path, keep: float) -> None:
    """Cut the file before the first frame chunk past `keep` of its bytes, as an interrupted copy
    would, but on a frame boundary so every remaining frame is whole. The index (idx1) is lost, the
    headers still claim the full length."""
    data = path.read_bytes()
    chunks = [m.start() for m in re.finditer(rb"00dc", data)]
    cut = next((c for c in chunks if c >= len(data) * keep), chunks[-1])
    path.write_bytes(data[:cut])


def count_decodable_frames(path: Path) -> int:
    """Frames PyAV decodes from the whole file, in order (the sequential ground truth)."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@dataclasses.dataclass(frozen=True)
class SampleClip:
    """Ground truth for one generated clip."""

    class_name: str
    class_index: int
    file_name: str
    frames: int
    """Frames actually encoded (the true decodable length)."""
    size: tuple[int, int]
    """(width, height) of the source frames."""
    tags: tuple[int, int, int]
    """Official split tags for splits 1, 2, 3: 1 train, 2 test, 0 unused."""
    kind: str
    """'plain', 'bframes' (B-frames: a seeking trap), 'overstated' (headers claim 5 more frames),
    'truncated' (file cut at 70 %: the headers and container count still claim the full length),
    'missing' (Kinetics: a row of the annotation CSV whose file was not written)."""
    source: str = ""
    """Path relative to the sample data folder (where the file is, or would be for 'missing')."""


def _clip_plan(classes: list[str], clips_per_class: int, seed: int) -> list[SampleClip]:
    plan: list[SampleClip] = []
    for ci, name in enumerate(classes):
        rng = np.random.default_rng([seed, ci])
        # Source videos give 1-2 clips each, so the grouped split has something to group.
        groups: list[list[str]] = []
        clip_no = 0
        while clip_no < clips_per_class:
            title = _TITLES[(ci + len(groups)) % len(_TITLES)] + (
                f"_{len(groups)}" if len(groups) >= len(_TITLES) else ""
            )
            body = f"{title}_{name}_{'fhu'[len(groups) % 3]}_{'cm' if len(groups) % 2 else 'nm'}_np{1 + len(groups) % 4}_fr_goo"
            n = min(int(rng.integers(1, 3)), clips_per_class - clip_no)
            groups.append([f"{body}_{k}.avi" for k in range(n)])
            clip_no += n
        # Per split: ~30 % of source groups test, one group unused (tag 0) when there are 3 or more, the rest train.
        split_tags = []
        for s in range(3):
            order = np.random.default_rng([seed, ci, s]).permutation(len(groups))
            tags = {}
            n_test = max(1, round(len(groups) * 0.3)) if len(groups) > 1 else 0
            unused = 1 if len(groups) >= 3 else 0
            for rank, g in enumerate(order):
                tag = 2 if rank < n_test else (0 if rank < n_test + unused else 1)
                for f in groups[g]:
                    tags[f] = tag
            split_tags.append(tags)
        files = [f for g in groups for f in g]
        for k, f in enumerate(files):
            length, kind = _length_and_kind(rng, ci, k, len(classes))
            plan.append(
                SampleClip(
                    class_name=name,
                    class_index=ci,
                    file_name=f,
                    frames=length,
                    size=_SIZES[(ci + k) % len(_SIZES)],
                    tags=tuple(t[f] for t in split_tags),
                    kind=kind,
                    source=f"hmdb51_org/{name}/{f}",
                )
            )
    return plan


def _length_and_kind(rng: np.random.Generator, ci: int, k: int, n_classes: int, avi: bool = True) -> tuple[int, str]:
    """Length and kind of clip k of class ci; the traps that patch AVI headers only for AVI files."""
    length = int(rng.integers(24, 110))
    kinds = ("plain", "bframes", "plain", "overstated" if ci % 2 == 0 else "truncated") if avi else ("plain", "bframes")
    kind = kinds[k % len(kinds)]
    # Short clips: pinned to the first two clips of the first classes, so every sample set
    # (even 1 clip a class) has a 1-frame clip and one shorter than 16 frames.
    if ci == 0 and k == 0:
        length = 1
    elif ci == min(1, n_classes - 1) and k == 0 or (ci == 0 and k == 1):
        length = 7
    return length, kind if length > 1 else "plain"


def _write_clip(root: Path, clip: SampleClip) -> SampleClip:
    """Write one generated clip under root; returns its ground truth (a truncated clip's true length)."""
    path = root / clip.source
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = clip.size
    frames = (draw_frame(f, clip.class_index, w, h, f"{f} {clip.class_name}") for f in range(clip.frames))
    write_avi(path, frames, b_frames=2 if clip.kind == "bframes" else 0, container_format=path.suffix[1:])
    if clip.kind == "overstated":
        overstate_frame_count(path, extra=5)
    if clip.kind == "truncated":
        truncate_avi(path, 0.7)
        # The clip's true length is what survived the cut, counted by a full sequential decode.
        clip = dataclasses.replace(clip, frames=count_decodable_frames(path))
    return clip


SAMPLE_LAYOUTS = ("hmdb51", "ucf101", "kinetics")

# UCF101 names in the order classInd.txt numbers them here: deliberately not sorted (the real file
# is), so labels taken from sorted names instead of classInd.txt are caught. HandstandPushups is
# written to disk as HandStandPushups, the case quirk of the real download.
UCF101_CLASSES = (
    "ApplyEyeMakeup", "HandstandPushups", "Archery", "YoYo", "BabyCrawling", "PlayingCello", "Basketball",
    "JumpRope", "BenchPress", "Punch", "Biking", "Billiards", "BlowDryHair", "Bowling", "BoxingPunchingBag",
    "CliffDiving",
)  # fmt: skip
UCF101_DISK_NAMES = {"HandstandPushups": "HandStandPushups"}
# Real Kinetics labels, spaces and brackets included (folder names are the labels).
KINETICS_CLASSES = (
    "air drumming", "abseiling", "passing American football (in game)", "zumba", "bowling", "juggling balls",
    "tai chi", "yoga", "archery", "bench pressing", "clapping", "dribbling basketball",
)  # fmt: skip
MAX_SAMPLE_CLASSES = {"hmdb51": len(HMDB51_CLASSES), "ucf101": len(UCF101_CLASSES), "kinetics": len(KINETICS_CLASSES)}


def make_sample_data(
    out_dir: Path, classes: int = 8, clips_per_class: int = 24, seed: int = 0, progress=None, layout: str = "hmdb51"
) -> list[SampleClip]:
    """Write a sample set in one of the layouts pack-shards reads; returns the ground truth of every clip.

    hmdb51: DIR/hmdb51_org/<class>/*.avi and DIR/testTrainMulti_7030_splits/ like the official archive.
    ucf101: DIR/<Class>/v_<Class>_gNN_cNN.avi and DIR/ucfTrainTestlist/ (classInd.txt, train and test lists).
    kinetics: DIR/train/<label>/ and DIR/val/<label>/ .mp4 files, DIR/annotations/{train,validate}.csv
    with a few rows whose file is not written (their SampleClip has kind 'missing').
    """
    if layout not in SAMPLE_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(SAMPLE_LAYOUTS)}, got {layout!r}")
    if not 1 <= classes <= MAX_SAMPLE_CLASSES[layout]:
        raise ValueError(f"classes must be in 1..{MAX_SAMPLE_CLASSES[layout]}, got {classes}")
    if clips_per_class < 1:
        raise ValueError(f"clips per class must be >= 1, got {clips_per_class}")
    make = {"hmdb51": _make_hmdb51, "ucf101": _make_ucf101, "kinetics": _make_kinetics}[layout]
    return make(out_dir, classes, clips_per_class, seed, progress)


def _write_all(out_dir: Path, plan: list[SampleClip], progress) -> list[SampleClip]:
    for i, clip in enumerate(plan):
        if clip.kind != "missing":
            plan[i] = clip = _write_clip(out_dir, clip)
            if progress:
                progress(clip)
    return plan


def _make_hmdb51(out_dir: Path, classes: int, clips_per_class: int, seed: int, progress) -> list[SampleClip]:
    """Classes are the first `classes` HMDB51 names (sorted)."""
    names = sorted(HMDB51_CLASSES)[:classes]
    plan = _write_all(out_dir, _clip_plan(names, clips_per_class, seed), progress)
    video_root = out_dir / "hmdb51_org"
    split_root = out_dir / "testTrainMulti_7030_splits"
    split_root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (video_root / name / "Thumbs.db").write_bytes(hashlib.sha256(name.encode()).digest())  # stray file
        for s in range(3):
            lines = [f"{c.file_name} {c.tags[s]} \n" for c in plan if c.class_name == name]
            (split_root / f"{name}_test_split{s + 1}.txt").write_text("".join(lines))
    return plan


def _make_ucf101(out_dir: Path, classes: int, clips_per_class: int, seed: int, progress) -> list[SampleClip]:
    """Clips come in groups gNN of 1-3 clips cNN. Like the official lists, a split holds out whole
    groups of every class: split s tests the groups with (NN - 1) % 3 == s - 1."""
    names = UCF101_CLASSES[:classes]
    plan = []
    for ci, name in enumerate(names):  # ci = classInd id - 1: the label
        rng = np.random.default_rng([seed, 101, ci])
        disk = UCF101_DISK_NAMES.get(name, name)
        k = 0
        group = 0
        while k < clips_per_class:
            group += 1
            for c in range(1, min(int(rng.integers(1, 4)), clips_per_class - k) + 1):
                length, kind = _length_and_kind(rng, ci, k, len(names))
                file_name = f"v_{disk}_g{group:02d}_c{c:02d}.avi"
                tags = tuple(2 if (group - 1) % 3 == s else 1 for s in range(3))
                plan.append(
                    SampleClip(
                        name, ci, file_name, length, _SIZES[(ci + k) % len(_SIZES)], tags, kind, f"{disk}/{file_name}"
                    )
                )
                k += 1
    plan = _write_all(out_dir, plan, progress)
    lists = out_dir / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    # The official files end their lines with CRLF.
    (lists / "classInd.txt").write_bytes("".join(f"{i + 1} {n}\r\n" for i, n in enumerate(names)).encode())
    for s in range(3):
        # List entries spell the class as classInd.txt does and the file as it is on disk.
        train = "".join(f"{c.class_name}/{c.file_name} {c.class_index + 1}\r\n" for c in plan if c.tags[s] == 1)
        test = "".join(f"{c.class_name}/{c.file_name}\r\n" for c in plan if c.tags[s] == 2)
        (lists / f"trainlist0{s + 1}.txt").write_bytes(train.encode())
        (lists / f"testlist0{s + 1}.txt").write_bytes(test.encode())
    return plan


def _youtube_id(seed: int, ci: int, k: int) -> str:
    """11 characters of [A-Za-z0-9_-], as YouTube ids are (a leading '-' included, now and then)."""
    import base64

    return base64.urlsafe_b64encode(hashlib.sha1(f"{seed}:{ci}:{k}".encode()).digest()).decode()[:11]


def _make_kinetics(out_dir: Path, classes: int, clips_per_class: int, seed: int, progress) -> list[SampleClip]:
    """A third of each class's clips (at least one, with 2 or more) go to val/, the rest to train/.
    With 3 or more classes the third has no train/ folder at all, so the class list must be the
    union of both folders. Each CSV lists clips whose file is not written: one of the first class
    (train) or of the second (val), and one of a class that has no folder on disk."""
    import csv

    names = list(KINETICS_CLASSES[:classes])
    labels = sorted(names)  # the label is the position in the sorted union of folder names
    plan = []
    for ci, name in enumerate(names):
        rng = np.random.default_rng([seed, 400, ci])
        label = labels.index(name)
        n_val = clips_per_class if ci == 2 else max(1, round(clips_per_class / 3)) if clips_per_class > 1 else 0
        for k in range(clips_per_class + (ci < 2)):
            length, kind = _length_and_kind(rng, label, k, len(names), avi=False)
            start = int(rng.integers(0, 300))
            file_name = f"{_youtube_id(seed, ci, k)}_{start:06d}_{start + 10:06d}.mp4"
            folder = "val" if k < n_val else "train"
            if k == clips_per_class:  # the extra clip: in the CSV only
                kind, folder = "missing", ("train", "val")[ci]
            size = _SIZES[(ci + k) % len(_SIZES)]
            plan.append(
                SampleClip(
                    name,
                    label,
                    file_name,
                    length,
                    size,
                    (1 if folder == "train" else 2,),
                    kind,
                    f"{folder}/{name}/{file_name}",
                )
            )
    for tag, folder in ((1, "train"), (2, "val")):
        file_name = f"{_youtube_id(seed, 999, tag)}_000000_000010.mp4"
        plan.append(
            SampleClip("yodelling", -1, file_name, 0, (0, 0), (tag,), "missing", f"{folder}/yodelling/{file_name}")
        )
    plan = _write_all(out_dir, plan, progress)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    for folder, csv_name in (("train", "train.csv"), ("val", "validate.csv")):
        rows = []
        for c in plan:
            if c.source.startswith(folder + "/"):
                youtube_id, start, end = Path(c.file_name).stem.rsplit("_", 2)
                rows.append((c.class_name, youtube_id, int(start), int(end), folder))
        with open(out_dir / "annotations" / csv_name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(("label", "youtube_id", "time_start", "time_end", "split"))
            w.writerows(sorted(rows))
    return plan


BENCH_SIZES = ((320, 240), (176, 144), (352, 240), (256, 192), (320, 180), (400, 226))
"""(width, height) of the benchmark clips: the common sizes of HMDB51's files."""


def make_bench_data(
    out_dir: Path, clips: int = 153, classes: int = 9, seed: int = 0, natural: bool = False
) -> list[SampleClip]:
    """Write DIR/hmdb51_org/<class>/*.avi shaped like HMDB51's files, for pack benchmarks.

    Unlike `make_sample_data` (built to trap decoders), these are what the real set mostly holds:
    MPEG-4 Part 2, 30 fps, a keyframe every 12 frames, no B-frames, 40 to 160 frames, sizes from
    BENCH_SIZES; no split files, so a pack takes every clip. Frames carry their index and class.

    `natural`: frames that cost what footage costs. Below the code band, a textured scene (smooth
    shapes and film grain) that the camera pans across, so the encoder stores real residuals, not
    flat colour (see natural_frame); every third clip has B-frames (XviD-style, as much of HMDB51 and
    UCF101 has); and, from 20 clips up, one file cut short (truncated: fewer frames than its headers
    claim) and one empty file, which a pack records as failed and the recipe passes over.
    """
    if clips < 1 or not 1 <= classes <= len(HMDB51_CLASSES):
        raise ValueError(f"need clips >= 1 and classes in 1..{len(HMDB51_CLASSES)}, got {clips}, {classes}")
    names = sorted(HMDB51_CLASSES)[:classes]
    rng = np.random.default_rng(seed)
    damaged = {clips - 2: "truncated", clips - 1: "empty"} if natural and clips >= 20 else {}
    truth = []
    for k in range(clips):
        ci = k % classes
        w, h = BENCH_SIZES[k % len(BENCH_SIZES)]
        n = int(rng.integers(40, 161))
        folder = out_dir / "hmdb51_org" / names[ci]
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{_TITLES[k % len(_TITLES)]}_{names[ci]}_f_cm_np1_fr_goo_{k}.avi"
        path, kind = folder / name, damaged.get(k, "plain")
        if kind == "empty":
            path.write_bytes(b"")
            truth.append(SampleClip(names[ci], ci, name, 0, (w, h), (1, 1, 1), kind))
            continue
        if natural:
            scene = natural_scene(rng, w, h)
            frames = (natural_frame(scene, f, ci, w, h) for f in range(n))
            b_frames = 2 if k % 3 == 2 else 0
            kind = "bframes" if b_frames and kind == "plain" else kind
        else:
            frames, b_frames = (draw_frame(f, ci, w, h, f"{f}") for f in range(n)), 0
        write_avi(path, frames, fps=30, gop=12, b_frames=b_frames)
        if kind == "truncated":
            truncate_avi(path, 0.6)
            n = count_decodable_frames(path)
        truth.append(SampleClip(names[ci], ci, name, n, (w, h), (1, 1, 1), kind))
    return truth


def natural_scene(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A scene wider than the frame (the camera pans over it): smooth shapes at a few scales plus
    grain, (height, 2 * width, 3) uint8. At the pack's 128 px a stored frame is about 6 KB of JPEG,
    near the 7 KB a frame of real footage cut into HMDB-shaped AVIs took here."""
    scene = np.zeros((height, 2 * width, 3), np.float32)
    for cells, weight in ((4, 70.0), (16, 35.0), (64, 15.0)):
        coarse = rng.normal(0.0, 1.0, (max(2, height * cells // width), 2 * cells, 3)).astype(np.float32)
        scene += weight * cv2.resize(coarse, (2 * width, height), interpolation=cv2.INTER_CUBIC)
    scene += rng.normal(0.0, 6.0, scene.shape).astype(np.float32)
    return np.clip(scene + 128.0, 0, 255).astype(np.uint8)


def natural_frame(scene: np.ndarray, frame_index: int, class_index: int, width: int, height: int) -> np.ndarray:
    """Frame `frame_index` of a natural clip: the coded band of draw_frame on top (so frames stay
    checkable), the scene panned by two pixels a frame below it, with the class's moving square."""
    img = draw_frame(frame_index, class_index, width, height)
    band = int(round(height * CODE_BAND))
    x = (2 * frame_index) % width
    view = scene[:, x : x + width]
    square = (img[band:] != np.array(class_colour(class_index), np.uint8)).any(axis=2, keepdims=True)
    img[band:] = np.where(square, img[band:], view[band:])
    return img


def drop_leading_keyframe(path: Path) -> None:
    """Remux the file without its first packet (the opening keyframe), as a clip cut out of a longer
    stream without re-encoding would start: predicted frames whose reference is gone."""
    tmp = path.with_name(path.name + ".tmp")
    with av.open(str(path)) as src, av.open(str(tmp), "w", format="avi") as dst:
        stream = src.streams.video[0]
        out = dst.add_stream_from_template(stream)
        packets = (p for p in src.demux(stream) if p.size)
        next(packets)
        for packet in packets:
            packet.stream = out
            dst.mux(packet)
    tmp.replace(path)


def write_rotated_mp4(path: Path, frames, degrees: int = 90, fps: int = 30) -> None:
    """An MPEG-4 video in an MP4 whose track header asks players to rotate it (phones write these).

    The rotation lives in the 'tkhd' display matrix, which FFmpeg reads back as the stream's
    rotation; it is patched in after writing because PyAV 18 has no setter for it.
    """
    frames = list(frames)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = bytearray(path.read_bytes())
    tkhd = data.find(b"tkhd")
    version = data[tkhd + 4]
    matrix = (
        tkhd + 4 + 4 + (32 if version == 1 else 20) + 8 + 8
    )  # after times, track id, duration; reserved, layer..volume
    cos, sin = {0: (1, 0), 90: (0, 1), 180: (-1, 0), 270: (0, -1)}[degrees % 360]
    # 16.16 fixed point a, b, u, c, d, v, x, y, w (u, v: 2.30; w = 1.0 in 2.30)
    values = (cos << 16, sin << 16, 0, -sin << 16, cos << 16, 0, 0, 0, 1 << 30)
    struct.pack_into(">9i", data, matrix, *values)
    path.write_bytes(bytes(data))
