"""Which videos, which classes, which split: the dataset layouts pack-shards reads.

| layout     | videos                                              | split                                                 | labels                |
| ---------- | --------------------------------------------------- | ----------------------------------------------------- | --------------------- |
| `hmdb51`   | class folders (or `hmdb51_org/` above them)         | `<class>_test_split{1,2,3}.txt`, else grouped 70/30   | sorted class names    |
| `ucf101`   | class folders (or `UCF-101/` above them)            | `ucfTrainTestlist/` lists, else 70/30 by `gNN` group  | `classInd.txt` ids    |
| `kinetics` | `train/`, `val/`, `test/` folders of class folders | the folder (val is the test set), CSVs name the gaps  | sorted class names    |
| `folders`  | class folders                                       | grouped 70/30                                         | sorted class names    |

`discover` reads one of them (auto-detected unless forced) into a `Catalog`: every video with its
label, key and split tags, and every clip the official lists name that is not on disk.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import math
import re
from pathlib import Path

from pipeline.config import PACK_LAYOUTS, PackConfig
from pipeline.errors import UserError

LAYOUTS = tuple(name for name in PACK_LAYOUTS if name != "auto")
VIDEO_EXTENSIONS = {".avi", ".mp4", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".m4v", ".ogv", ".flv", ".wmv"}
SPLIT_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<split>[123])\.txt$")
UCF_NAME = re.compile(r"^v_(?P<cls>.+)_g(?P<group>\d+)_c(?P<clip>\d+)$")
# Kinetics split folders in the order they are looked for; `validate` is the CSVs' name for val.
KINETICS_DIRS = (("train", "train"), ("val", "val"), ("validate", "val"), ("test", "test"))
KINETICS_CSV = re.compile(r"(?:^|[_-])(?P<role>train|val|validate|test)\.csv$")
GROUPED_NOTE = "using a deterministic 70/30 split per class, grouped by source video (clips of one source never land on both sides)"


@dataclasses.dataclass(frozen=True)
class Video:
    source: str
    """Path relative to DATA_DIR, POSIX separators."""
    class_name: str
    label: int
    key: str
    tags: tuple[int, ...]
    """Split tags (1 train, 2 test, 0 unused): three for HMDB51 and UCF101, one for Kinetics and its folders."""
    unused_reason: str | None = None
    """Why a clip tagged 0 for the packed split is not packed, for the manifest; None: the tag says it."""


@dataclasses.dataclass(frozen=True)
class Missing:
    """A clip the official lists or the annotation CSV name that is not on disk."""

    source: str
    """Where it was expected, relative to DATA_DIR."""
    class_name: str
    label: int | None
    """None when the class has no folder on disk (Kinetics)."""
    tags: tuple[int, ...]
    listed_in: str
    """The list or CSV naming it."""


@dataclasses.dataclass
class Catalog:
    classes: list[str]
    videos: list[Video]
    ignored: list[str]
    split_source: str
    """'official' (split lists), 'grouped' (70/30 fallback) or 'folders' (Kinetics: the split folder decides)."""
    listed_missing: list[Missing]
    """Clips of the packed split named in split lists or annotation CSVs with no video on disk."""
    warnings: list[str] = dataclasses.field(default_factory=list)
    layout: str = "folders"


def make_key(class_name: str, file_name: str) -> str:
    """ASCII, dot-free, stable key: readable clip name plus a hash of class/file."""
    stem = Path(file_name).stem
    readable = re.sub(r"[^A-Za-z0-9]+", "_", stem).strip("_")[:60] or "clip"
    digest = hashlib.sha1(f"{class_name}/{file_name}".encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"{readable}-{digest}"


def discover(cfg: PackConfig) -> Catalog:
    data_dir = cfg.data_dir
    if not data_dir.exists():
        raise UserError(f"data folder not found: {data_dir}")
    if not data_dir.is_dir():
        raise UserError(f"data folder is not a folder: {data_dir}")
    if cfg.splits_dir is not None and not cfg.splits_dir.is_dir():
        raise UserError(f"split folder not found: {cfg.splits_dir}")
    if not any(data_dir.iterdir()):
        raise UserError(f"data folder is empty: {data_dir}")
    layout = detect_layout(cfg) if cfg.layout == "auto" else cfg.layout
    catalog = {"hmdb51": _hmdb51, "ucf101": _ucf101, "kinetics": _kinetics, "folders": _folders}[layout](cfg)
    keys = collections.Counter(v.key for v in catalog.videos)
    if max(keys.values()) > 1:
        dup = next(k for k, n in keys.items() if n > 1)
        raise UserError(f"two videos map to the same key {dup!r}")  # a sha1 prefix collision
    return catalog


def detect_layout(cfg: PackConfig) -> str:
    """The layout DATA_DIR looks like; the most specific evidence wins (split folders, then list files)."""
    d = cfg.data_dir
    if _kinetics_dirs(_kinetics_base(d)):
        return "kinetics"
    if _find_ucf_lists(cfg) is not None or (d / "UCF-101").is_dir():
        return "ucf101"
    if (d / "hmdb51_org").is_dir() or cfg.splits_dir is not None or _find_split_files(cfg):
        return "hmdb51"
    found, _ = _scan(_class_root(d, "UCF-101"), d)
    if found and all(UCF_NAME.match(Path(n).stem) for names in found.values() for n in names):
        return "ucf101"
    return "folders"


# ---------------------------------------------------------------- shared helpers


def _scan(root: Path, data_dir: Path, skip: Path | None = None) -> tuple[dict[str, list[str]], list[str]]:
    """Class folder name -> sorted video file names, and the non-video files met (relative paths)."""
    found: dict[str, list[str]] = {}
    ignored: list[str] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if skip is not None and folder.resolve() == skip.resolve():
            continue
        names = []
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in VIDEO_EXTENSIONS and not f.is_dir():
                names.append(f.name)
            elif f.is_file():
                ignored.append(f.relative_to(data_dir).as_posix())
        if names:
            found[folder.name] = names
    return found, ignored


def _require_videos(found: dict, root: Path) -> None:
    if not found:
        raise UserError(
            f"no videos found in {root} (expected one sub-folder per class holding {', '.join(sorted(VIDEO_EXTENSIONS))} files)"
        )


def _class_root(data_dir: Path, top: str) -> Path:
    """The folder holding the class folders: DATA_DIR, the level an official archive unpacks to
    (`top`), or, when DATA_DIR holds no class folder of videos itself, its one sub-folder that does,
    under any name (a tree extracted as `UCF101/` rather than the archive's `UCF-101/`)."""
    if (data_dir / top).is_dir():
        return data_dir / top
    if _holds_class_folders(data_dir):
        return data_dir
    below = [d for d in _subfolders(data_dir) if _holds_class_folders(d)]
    return below[0] if len(below) == 1 else data_dir


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _holds_class_folders(folder: Path) -> bool:
    """Whether a sub-folder of `folder` holds a video file (stops at the first one found)."""
    return any(
        f.suffix.lower() in VIDEO_EXTENSIONS and not f.is_dir() for c in _subfolders(folder) for f in c.iterdir()
    )


def _videos(root: Path, data_dir: Path, found: dict, class_of: dict, classes: list[str], tags: dict) -> list[Video]:
    label = {c: i for i, c in enumerate(classes)}
    return [
        Video(
            source=(root / folder / name).relative_to(data_dir).as_posix(),
            class_name=class_of[folder],
            label=label[class_of[folder]],
            key=make_key(folder, name),
            tags=tags[(folder, name)],
        )
        for folder in sorted(found, key=lambda f: (label[class_of[f]], f))
        for name in found[folder]
    ]


def _grouped_split(strata: dict[str, dict[str, list]], seed: int) -> dict:
    """70/30 by clip count within each stratum, whole groups to one side: item -> (tag1, tag2, tag3).

    `strata` maps a stratum name to its groups (group name -> items). The hash of (seed, split,
    stratum, group) orders the groups, so the split depends on names only, never on listing order.
    """
    tags = {}
    for stratum, groups in strata.items():
        n_items = sum(len(items) for items in groups.values())
        per_split = []
        for s in (1, 2, 3):
            order = sorted(
                groups,
                key=lambda g: hashlib.sha1(f"{seed}:{s}:{stratum}:{g}".encode("utf-8", "surrogateescape")).hexdigest(),
            )
            target = round(0.3 * n_items) if len(groups) > 1 else 0
            test, n_test = set(), 0
            for g in order:
                if n_test >= target or len(test) == len(groups) - 1:
                    break
                test.add(g)
                n_test += len(groups[g])
            per_split.append({item: 2 if g in test else 1 for g in groups for item in groups[g]})
        for item in per_split[0]:
            tags[item] = tuple(p[item] for p in per_split)
    return tags


def _rel(path: Path, data_dir: Path) -> str:
    try:
        return path.relative_to(data_dir).as_posix()
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- hmdb51 and plain folders


def _find_split_files(cfg: PackConfig) -> dict[tuple[str, int], Path]:
    if cfg.splits_dir is not None:
        candidates = sorted(cfg.splits_dir.glob("*_test_split*.txt"))
    else:
        candidates = sorted(p for depth in ("*", "*/*", "*/*/*") for p in cfg.data_dir.glob(depth + "_test_split*.txt"))
    files: dict[tuple[str, int], Path] = {}
    for p in candidates:
        m = SPLIT_FILE.match(p.name)
        if m and p.is_file():
            files.setdefault((m["cls"], int(m["split"])), p)
    return files


def _hmdb_groups(classes: list[str], found: dict) -> dict[str, dict[str, list]]:
    """HMDB clips cut from one source video share its name minus the trailing `_<n>`."""
    strata = {}
    for c in classes:
        groups = collections.defaultdict(list)
        for name in found[c]:
            groups[re.sub(r"_\d+$", "", Path(name).stem)].append((c, name))
        strata[c] = groups
    return strata


def _hmdb51(cfg: PackConfig) -> Catalog:
    data_dir = cfg.data_dir
    root = _class_root(data_dir, "hmdb51_org")
    files = _find_split_files(cfg)
    if cfg.layout == "hmdb51" and not files and root == data_dir and cfg.splits_dir is None:
        raise UserError(
            f"--layout hmdb51 does not fit {data_dir}: no hmdb51_org/ folder and no <class>_test_split1.txt split files"
        )
    found, ignored = _scan(root, data_dir)
    _require_videos(found, root)
    classes = sorted(found)  # class index = position in sorted order, never listing order
    notes = []
    if not files:
        if cfg.splits_dir is not None:
            raise UserError(f"no split files (<class>_test_split1.txt ...) in {cfg.splits_dir}")
        tags, missing, source = _grouped_split(_hmdb_groups(classes, found), cfg.seed), [], "grouped"
        notes.append(f"no official split files found: {GROUPED_NOTE}")
    else:
        tags, missing = _read_hmdb_splits(cfg, classes, found, files, _rel(root, data_dir))
        source = "official"
    if missing:
        notes.append(f"{len(missing)} clip(s) listed in the split files are not on disk, e.g. {missing[0].source}")
    videos = _videos(root, data_dir, found, {c: c for c in classes}, classes, tags)
    return Catalog(classes, videos, ignored, source, missing, notes, "hmdb51")


def _read_hmdb_splits(cfg, classes, found, files, root_rel):
    missing_files = [c for c in classes if (c, cfg.split) not in files]
    if missing_files:
        raise UserError(
            f"split {cfg.split} has no split file for {len(missing_files)} class(es), e.g. "
            f"{missing_files[0]}_test_split{cfg.split}.txt"
        )
    tags: dict[tuple[str, str], list[int]] = {(c, n): [0, 0, 0] for c in classes for n in found[c]}
    missing = []
    for (c, s), path in sorted(files.items()):
        if c not in found:
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="surrogateescape").splitlines(), 1):
            parts = line.strip().rsplit(None, 1)
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise UserError(f"{path}:{lineno}: expected '<file name> <0|1|2>', got {line.strip()!r}")
            if (c, parts[0]) in tags:
                tags[(c, parts[0])][s - 1] = int(parts[1])
            elif s == cfg.split:
                where = f"{root_rel}/{c}/{parts[0]}" if root_rel != "." else f"{c}/{parts[0]}"
                missing.append(
                    Missing(
                        where,
                        c,
                        classes.index(c),
                        tuple(int(parts[1]) if k == s - 1 else 0 for k in range(3)),
                        _rel(path, cfg.data_dir),
                    )
                )
    return {k: tuple(v) for k, v in tags.items()}, missing


def _folders(cfg: PackConfig) -> Catalog:
    data_dir = cfg.data_dir
    root = _class_root(data_dir, "hmdb51_org")
    found, ignored = _scan(root, data_dir)
    _require_videos(found, root)
    classes = sorted(found)
    tags = _grouped_split(_hmdb_groups(classes, found), cfg.seed)
    notes = [f"folders layout, no official split: {GROUPED_NOTE}"]
    videos = _videos(root, data_dir, found, {c: c for c in classes}, classes, tags)
    return Catalog(classes, videos, ignored, "grouped", [], notes, "folders")


# ---------------------------------------------------------------- ucf101


def _find_ucf_lists(cfg: PackConfig) -> Path | None:
    """The folder holding classInd.txt: --splits-dir, inside DATA_DIR (3 levels), or ucfTrainTestlist/ beside it."""
    if cfg.splits_dir is not None:
        return cfg.splits_dir if (cfg.splits_dir / "classInd.txt").is_file() else None
    for depth in ("", "*/", "*/*/", "*/*/*/"):
        hits = sorted(p for p in cfg.data_dir.glob(depth + "classInd.txt") if p.is_file())
        if hits:
            return hits[0].parent
    beside = cfg.data_dir.resolve().parent / "ucfTrainTestlist"
    return beside if (beside / "classInd.txt").is_file() else None


def _read_class_ind(path: Path) -> list[str]:
    """Class names in classInd.txt's id order: classes[id - 1]."""
    by_id: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="surrogateescape").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit():
            raise UserError(f"{path}:{lineno}: expected '<class id> <class name>', got {line.strip()!r}")
        if int(parts[0]) in by_id:
            raise UserError(f"{path}:{lineno}: class id {parts[0]} given twice")
        by_id[int(parts[0])] = parts[1]
    if sorted(by_id) != list(range(1, len(by_id) + 1)):
        raise UserError(f"{path}: class ids must be 1..N without gaps, got {sorted(by_id)[:3]}...{sorted(by_id)[-1:]}")
    names = [by_id[i] for i in range(1, len(by_id) + 1)]
    lower = collections.Counter(n.lower() for n in names)
    if any(k > 1 for k in lower.values()):
        raise UserError(
            f"{path}: class {next(n for n in names if lower[n.lower()] > 1)!r} is listed twice (names are matched case-insensitively)"
        )
    return names


def _ucf101(cfg: PackConfig) -> Catalog:
    data_dir = cfg.data_dir
    root = _class_root(data_dir, "UCF-101")
    lists = _find_ucf_lists(cfg)
    if lists is None and cfg.splits_dir is not None:
        raise UserError(
            f"no classInd.txt in {cfg.splits_dir} (UCF101's ucfTrainTestlist/ holds classInd.txt, trainlist01.txt ...)"
        )
    found, ignored = _scan(root, data_dir, skip=lists)
    if lists is None and not found:
        raise UserError(
            f"--layout ucf101 does not fit {data_dir}: no classInd.txt (ucfTrainTestlist/) and no class folders of v_<Class>_gNN_cNN videos"
        )
    _require_videos(found, root)
    notes = []
    if lists is None:
        bad = [f"{c}/{n}" for c, names in found.items() for n in names if not UCF_NAME.match(Path(n).stem)]
        if bad:
            raise UserError(
                f"--layout ucf101 does not fit {data_dir}: no classInd.txt (ucfTrainTestlist/) and {len(bad)} "
                f"video name(s) are not v_<Class>_gNN_cNN, e.g. {bad[0]}"
            )
        classes = sorted(found)
        class_of = {c: c for c in classes}
        # The official splits hold out the same group numbers in every class (1-7, 8-14, 15-21):
        # the fallback does the same, so no group number lands on both sides in any class.
        groups = collections.defaultdict(list)
        for c in classes:
            for n in found[c]:
                groups[f"g{int(UCF_NAME.match(Path(n).stem)['group']):02d}"].append((c, n))
        tags = _grouped_split({"ucf101": groups}, cfg.seed)
        missing, source = [], "grouped"
        notes.append(
            "no UCF101 split lists (ucfTrainTestlist/classInd.txt) found: using a deterministic 70/30 split "
            "by group gNN, each group number held out of every class at once (a group never lands on both sides)"
        )
    else:
        classes = _read_class_ind(lists / "classInd.txt")
        by_lower = {c.lower(): c for c in classes}
        class_of, case_only = {}, []
        for folder in found:
            if folder.lower() not in by_lower:
                raise UserError(f"class folder {folder!r} is not in {lists / 'classInd.txt'}")
            class_of[folder] = by_lower[folder.lower()]
            if class_of[folder] != folder:
                case_only.append(f"{folder} = {class_of[folder]}")
        if len(set(class_of.values())) < len(class_of):
            raise UserError(
                f"two class folders in {root} differ only in case; classInd.txt matches them case-insensitively"
            )
        if case_only:
            notes.append(
                f"{len(case_only)} class folder(s) match classInd.txt only case-insensitively ({', '.join(case_only[:3])}); "
                "folders and list entries are matched ignoring case, as UCF101's own lists need"
            )
        tags, missing = _read_ucf_lists(cfg, lists, classes, found, _rel(root, data_dir))
        source = "official"
        if missing:
            notes.append(f"{len(missing)} clip(s) listed in the split lists are not on disk, e.g. {missing[0].source}")
    videos = _videos(root, data_dir, found, class_of, classes, tags)
    return Catalog(classes, videos, ignored, source, missing, notes, "ucf101")


def _read_ucf_lists(cfg, lists: Path, classes: list[str], found: dict, root_rel: str):
    """Tags from trainlist0N.txt (`Class/v_Class_gNN_cNN.avi <class id>`) and testlist0N.txt
    (`Class/v_Class_gNN_cNN.avi`), matched to the files ignoring case (the official lists and
    folders disagree in case, e.g. HandstandPushups/v_HandStandPushups_g01_c01.avi)."""
    for name in (f"trainlist0{cfg.split}.txt", f"testlist0{cfg.split}.txt"):
        if not (lists / name).is_file():
            raise UserError(f"split {cfg.split} has no {name} in {lists}")
    on_disk = {f"{c}/{n}".lower(): (c, n) for c in found for n in found[c]}
    tags: dict[tuple[str, str], list[int]] = {pair: [0, 0, 0] for pair in on_disk.values()}
    ids = {c.lower(): i + 1 for i, c in enumerate(classes)}
    missing = []
    for s in (1, 2, 3):
        for kind, tag in (("trainlist", 1), ("testlist", 2)):
            path = lists / f"{kind}0{s}.txt"
            if not path.is_file():
                continue  # another split's list: its tags stay 0
            for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="surrogateescape").splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                entry = parts[0]
                cls = entry.split("/")[0].lower()
                if len(parts) > 2 or entry.count("/") != 1 or cls not in ids:
                    raise UserError(
                        f"{path}:{lineno}: expected '<class>/<file name>[ <class id>]' with a class of classInd.txt, got {line.strip()!r}"
                    )
                if len(parts) == 2 and parts[1] != str(ids[cls]):
                    raise UserError(
                        f"{path}:{lineno}: class id {parts[1]} but classInd.txt gives {classes[ids[cls] - 1]} id {ids[cls]}"
                    )
                if entry.lower() in on_disk:
                    tags[on_disk[entry.lower()]][s - 1] = tag
                elif s == cfg.split:
                    where = f"{root_rel}/{entry}" if root_rel != "." else entry
                    missing.append(
                        Missing(
                            where,
                            classes[ids[cls] - 1],
                            ids[cls] - 1,
                            tuple(tag if k == s - 1 else 0 for k in range(3)),
                            _rel(path, cfg.data_dir),
                        )
                    )
    return {k: tuple(v) for k, v in tags.items()}, missing


# ---------------------------------------------------------------- kinetics


def _kinetics_base(data_dir: Path) -> Path:
    """The folder holding train/ and val/: DATA_DIR, or its one sub-folder that does (any name)."""
    if _kinetics_dirs(data_dir):
        return data_dir
    below = [d for d in _subfolders(data_dir) if _kinetics_dirs(d)]
    return below[0] if len(below) == 1 else data_dir


def _kinetics_dirs(data_dir: Path) -> dict[str, Path]:
    """role ('train', 'val', 'test') -> split folder holding at least one class folder of videos."""
    dirs: dict[str, Path] = {}
    for name, role in KINETICS_DIRS:
        d = data_dir / name
        if role in dirs or not d.is_dir():
            continue
        if any(c.is_dir() and any(f.suffix.lower() in VIDEO_EXTENSIONS for f in c.iterdir()) for c in d.iterdir()):
            dirs[role] = d
    return dirs


def _find_kinetics_csvs(cfg: PackConfig) -> dict[str, Path]:
    """role -> annotation CSV (train.csv, validate.csv or val.csv, test.csv, with any prefix)."""
    base = cfg.splits_dir if cfg.splits_dir is not None else cfg.data_dir
    found: dict[str, Path] = {}
    for depth in ("", "*/", "*/*/"):
        for p in sorted(base.glob(depth + "*.csv")):
            m = KINETICS_CSV.search(p.name)
            if m and p.is_file():
                found.setdefault("val" if m["role"] == "validate" else m["role"], p)
    return found


def _norm_label(name: str) -> str:
    """Kinetics CSV labels have spaces ('air drumming'); downloaders often name folders with underscores."""
    return re.sub(r"[\s_]+", " ", name.strip().lower())


def _read_kinetics_csv(path: Path) -> list[tuple[str, str]]:
    """(label, file stem `<youtube_id>_<start:06d>_<end:06d>`) per row; label '' when the CSV has none.
    A damaged CSV (not UTF-8, a field over csv's limit, a time that is no finite number) is one line
    naming the file."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return _kinetics_rows(path, csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except csv.Error as e:
        raise UserError(f"{path}: {e}") from None


def _kinetics_rows(path: Path, reader: csv.DictReader) -> list[tuple[str, str]]:
    need = {"youtube_id", "time_start", "time_end"}
    if not need <= set(reader.fieldnames or ()):
        raise UserError(
            f"{path}: expected columns label,youtube_id,time_start,time_end,split, got {','.join(reader.fieldnames or ())!r}"
        )
    rows = []
    for lineno, row in enumerate(reader, 2):
        try:
            start, end = float(row["time_start"]), float(row["time_end"])
        except (TypeError, ValueError):
            start = end = math.nan
        if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < 1e9 and 0 <= end < 1e9):
            raise UserError(
                f"{path}:{lineno}: time_start/time_end are not finite numbers of seconds: {str(row['time_start'])[:40]!r}, {str(row['time_end'])[:40]!r}"
            )
        rows.append((row.get("label") or "", f"{row['youtube_id']}_{int(start):06d}_{int(end):06d}"))
    return rows


def _kinetics(cfg: PackConfig) -> Catalog:
    data_dir = cfg.data_dir
    dirs = _kinetics_dirs(_kinetics_base(data_dir))
    if not dirs:
        raise UserError(
            f"--layout kinetics does not fit {data_dir}: no train/, val/ or test/ folder of class folders of videos"
        )
    if cfg.split != 1:
        raise UserError(
            f"--split {cfg.split} does not apply to the kinetics layout: its split folders are its only split (use --split 1)"
        )
    csvs = _find_kinetics_csvs(cfg)
    if cfg.splits_dir is not None and not csvs:
        raise UserError(f"no annotation CSVs (train.csv, validate.csv, test.csv) in {cfg.splits_dir}")
    # val/ is Kinetics' evaluation set, so it fills the test shards; test/ does only when there is no val/.
    tag_of = {"train": 1, "val": 2, "test": 0 if "val" in dirs else 2}
    scans = {role: _scan(d, data_dir) for role, d in dirs.items()}
    classes = sorted({c for found, _ in scans.values() for c in found})
    ignored = [f for _, ign in scans.values() for f in ign]
    by_norm = {_norm_label(c): c for c in classes}
    label_of = {c: i for i, c in enumerate(classes)}
    videos, missing, notes = [], [], []
    for role, d in dirs.items():
        found = scans[role][0]
        for c in classes:
            for name in found.get(c, ()):
                videos.append(
                    Video(
                        source=(d / c / name).relative_to(data_dir).as_posix(),
                        class_name=c,
                        label=label_of[c],
                        # The split folder is part of the hashed path: one clip may sit in two folders.
                        key=make_key(f"{d.name}/{c}", name),
                        tags=(tag_of[role],),
                        unused_reason=f"{d.name}/ is not packed when val/ exists (val/ fills the test shards)"
                        if tag_of[role] == 0
                        else None,
                    )
                )
        if role not in csvs:
            continue
        on_disk = {Path(n).stem: c for c, names in found.items() for n in names}
        listed = set()
        for label, stem in _read_kinetics_csv(csvs[role]):
            listed.add(stem)
            if stem in on_disk:
                continue
            cls = by_norm.get(_norm_label(label), label) if label else "?"
            missing.append(
                Missing(
                    f"{d.name}/{cls}/{stem}.mp4", cls, label_of.get(cls), (tag_of[role],), _rel(csvs[role], data_dir)
                )
            )
        extra = sorted(s for s in on_disk if s not in listed)
        if extra:
            notes.append(
                f"{len(extra)} clip(s) in {d.name}/ are not in {csvs[role].name}, e.g. {extra[0]} (packed all the same)"
            )
    if missing:
        notes.append(f"{len(missing)} clip(s) listed in the annotation CSVs are not on disk, e.g. {missing[0].source}")
    return Catalog(classes, videos, ignored, "folders", missing, notes, "kinetics")
