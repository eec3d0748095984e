"""The folder pack-shards writes: a local folder or an object-store prefix, behind one interface.

Names are relative to the folder (`000.tar`, `.clipstream/state/000.tar.json`). Both kinds give
the pack the same guarantee: a file appears under its final name only when complete.
- Local: written to a hidden temporary file of the writer's own beside it
  (`.NAME.<random>-<pid>@<host>.partial`), fsynced, renamed over the final name
  (pipeline.durable.publish). Writers that share the folder (parts started together) never touch
  each other's temporary files; clean-up removes only those whose writer is gone.
- Object store: the finished bytes go up in one PUT (s3fs switches to a multipart upload above
  its block size, 50 MB, completed in one call): an S3 object appears atomically, whole or not at
  all. A killed multipart upload leaves invisible parts, never an object; a bucket lifecycle rule
  (AbortIncompleteMultipartUpload) reclaims them.
The pack's resume state (`.clipstream/`) lives in the folder itself, so for a bucket it lives in
the bucket: `--part i/N` runs on machines that share nothing but the bucket see each other's
finished shards there.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from pipeline.durable import check_real_folder, failpoint, remove_stale_temps, write_atomic
from pipeline.errors import UserError

_LOST_SLASH = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/[^/]")
STATE_DIR = ".clipstream"
"""The pack's own files inside the output folder: plan.json and state/NAME.json per finished shard."""


def open_out_dir(location: str | Path) -> LocalDir | StoreDir:
    """The output folder `location` names: an object-store URL (`s3://bucket/prefix/`) or a path.

    A path such as `s3:/bucket/prefix` (a URL that lost a slash, e.g. through pathlib.Path) is
    refused rather than created as a local folder named `s3:`.
    """
    from pipeline.storage.urls import is_object_store, local_path

    text = str(location)
    if _LOST_SLASH.match(text) and not Path(text.split("/", 1)[0]).exists():
        fixed = text.replace(":/", "://", 1)
        raise UserError(f"output folder {text!r} looks like a URL with a slash missing; did you mean {fixed!r}?")
    if is_object_store(text):
        return StoreDir(text)
    return LocalDir(local_path(text) if isinstance(location, str) else location)


class LocalDir:
    def __init__(self, path: Path):
        self.path = path
        self.url = str(path)

    def __str__(self) -> str:
        return self.url

    def _own(self, name: str) -> Path:
        """The path of `name`, one of our own names inside the folder: relative, without `..`, and
        no folder on the way a symbolic link (a link planted there would have us write elsewhere)."""
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"not a name inside the output folder: {name!r}")
        for parent in reversed(rel.parents[:-1]):
            check_real_folder(self.path / parent)
        return self.path / rel

    def check_writable(self, probe: str) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"output path is a file, not a folder: {self.path}")
        path = self._own(probe)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
            path.unlink()
        except OSError as e:
            raise UserError(f"output folder is not writable: {self.path} ({e.strerror})") from None

    def read(self, name: str) -> bytes | None:
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            return None

    def size(self, name: str) -> int | None:
        try:
            return (self.path / name).stat().st_size
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def write(self, name: str, data: bytes, midway: Callable[[], None] = lambda: None, sync: bool = True) -> None:
        """Write `data` under `name` atomically; `midway()` runs with half of it written (crash tests).
        `sync=False` skips the fsyncs, for a record whose loss costs only redone work and whose
        reader checks it: a killed process still leaves it whole or absent, but a power cut may
        leave it absent or empty."""
        path = self._own(name)
        try:
            write_atomic(path, data, midway, sync)
        except OSError as e:
            # A full disk (or a quota, or a file size limit): one line, and no half-written file left.
            raise UserError(f"cannot write {path}: {e.strerror or e}; {len(data)} bytes were to be written") from None

    def delete(self, name: str) -> None:
        self._own(name).unlink(missing_ok=True)

    def delete_tree(self, name: str) -> None:
        shutil.rmtree(self._own(name), ignore_errors=True)

    def remove_partials(self) -> None:
        """Delete the temporary files that killed writers left (not those of a part still writing)."""
        for folder in (self.path, self.path / STATE_DIR, self.path / STATE_DIR / "state"):
            remove_stale_temps(folder)


class StoreDir:
    """A prefix in an object store, through fsspec (see pipeline.storage.objectstore)."""

    def __init__(self, url: str):
        from pipeline.storage import objectstore

        self._store = objectstore
        self.url = url.rstrip("/") + "/"
        self.fs, root = objectstore.filesystem(self.url)
        self.root = root.rstrip("/")

    def __str__(self) -> str:
        return self.url

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _fail(self, doing: str, name: str, e: Exception):
        return UserError(f"cannot {doing} {self.url}{name}: {self._store.describe(e)}")

    def check_writable(self, probe: str) -> None:
        try:
            self.fs.pipe_file(self._path(probe), b"")
            self.fs.rm_file(self._path(probe))
        except Exception as e:
            raise UserError(f"output folder is not writable: {self.url} ({self._store.describe(e)})") from None

    def read(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(name))
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self._fail("read", name, e) from None

    def size(self, name: str) -> int | None:
        try:
            return int(self.fs.info(self._path(name), refresh=True)["size"])
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self._fail("read", name, e) from None

    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def write(self, name: str, data: bytes, midway: Callable[[], None] = lambda: None, sync: bool = True) -> None:
        """Upload `data` as one object (one PUT, or a multipart upload completed in one call);
        `midway()` runs before the upload (crash tests: nothing may appear). A finished PUT is
        durable, so `sync` changes nothing here."""
        midway()
        try:
            self.fs.pipe_file(self._path(name), data)
        except Exception as e:
            raise self._fail("write", name, e) from None

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self._path(name))
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self._fail("delete", name, e) from None

    def delete_tree(self, name: str) -> None:
        try:
            found = self.fs.find(self._path(name))
            if found:
                self.fs.rm(found)
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self._fail("delete", name, e) from None
        self.fs.invalidate_cache()

    def remove_partials(self) -> None:
        """Nothing to do: a store never shows a partial object."""


def write_file(out: LocalDir | StoreDir, name: str, data: bytes, sync: bool = True) -> None:
    """Publish `name` in `out` atomically, with a crash-test failpoint half way (mid-write:NAME)."""
    out.write(name, data, midway=lambda: failpoint(f"mid-write:{name.rsplit('/', 1)[-1]}"), sync=sync)


def json_bytes(obj) -> bytes:
    """The pack's JSON files (index.json, the plan, the shard records): sorted keys, ASCII, one
    field a line, so they are byte-identical across runs and readable in a diff."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()
