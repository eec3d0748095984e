"""Object stores (`s3://`, `gs://`, `az://`, and any other scheme fsspec knows) through fsspec.

One mechanism for every store: the store's fsspec file system, imported lazily, so that clipstream
runs without any of them installed; `s3://` needs the `s3` extra (s3fs). Credentials and endpoints
are the store's own conventions, read by its client, never by us: for S3 the AWS environment
variables, profiles (`AWS_PROFILE`, ~/.aws) and `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` for
MinIO or Ceph (botocore reads them itself; the s3 extra asks for botocore >= 1.34, and s3fs leaves
`endpoint_url` to it when not given one). Nothing here prints a credential: messages name the URL and the store's error
code, never the request.

Readers stream a shard sequentially in BLOCK_SIZE ranged GETs (BlockReader over fsspec's
`cat_file`); a GET whose body breaks off is retried by s3fs for the same range (its retry loop
around each request), a stall is bounded by READ_TIMEOUT_S, and what still fails reaches the
stream's fault count.
"""

from __future__ import annotations

import errno
from urllib.parse import urlparse

from pipeline.errors import UserError

BLOCK_SIZE = 16 << 20
"""Bytes per ranged GET while streaming a shard (a clip is about 150 KB: one request per ~100 clips)."""
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
"""A connection that delivers nothing for this long is dropped and the request retried."""
ATTEMPTS = 3
"""Tries of each request (botocore's retry modes) before it counts as failed."""

EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
"""Scheme -> the clipstream extra that installs its fsspec package."""


def protocol(url: str) -> str:
    return urlparse(url).scheme


def _options(proto: str) -> dict:
    if proto not in ("s3", "s3a"):
        return {}
    options: dict = {
        # No cached listings: a long job (or a verify after a re-pack) must see the objects as
        # they are now, not as a listing an hour ago said (a stale ETag fails every read).
        "use_listings_cache": False,
        "config_kwargs": {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            "retries": {"max_attempts": ATTEMPTS, "mode": "standard"},
        },
    }
    return options  # no endpoint_url: botocore reads AWS_ENDPOINT_URL(_S3) and profiles itself


def filesystem(url: str):
    """(fsspec file system, path inside it) for an object-store URL. UserError (one line) for an
    unknown scheme or a store whose package is not installed."""
    proto = protocol(url)
    try:
        import fsspec
    except ImportError:  # torch depends on fsspec, so this is rare
        raise UserError(f"{proto}:// URLs need fsspec: pip install fsspec") from None
    try:
        cls = fsspec.get_filesystem_class(proto)
    except ImportError:
        extra = EXTRAS.get(proto)
        if extra:
            raise UserError(f"{proto}:// needs the {extra} extra: pip install 'clipstream[{extra}]'") from None
        raise UserError(
            f"{proto}:// needs a package fsspec could not import (see fsspec's known_implementations)"
        ) from None
    except ValueError:
        raise UserError(
            f"unsupported URL scheme {proto!r} in {url!r} (use a local path, http(s)://, s3://, gs://, az:// or pipe:)"
        ) from None
    return cls(**_options(proto)), cls._strip_protocol(url)


def describe(e: BaseException) -> str:
    """A store error in one line, without the request (which may carry a signature)."""
    if isinstance(e, FileNotFoundError):
        # s3fs says "The specified bucket does not exist" (NoSuchBucket); a missing key is its path
        return (
            "no such bucket"
            if "bucket does not exist" in str(e).lower() or "NoSuchBucket" in str(e.__cause__)
            else "no such object"
        )
    if type(e).__name__ == "NoCredentialsError":
        return "no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or write ~/.aws/credentials)"
    if isinstance(e, PermissionError):
        return f"access denied ({_store_message(e) or 'check the credentials and the bucket policy'})"
    return f"{type(e).__name__}: {_store_message(e)}"


def _store_message(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def open_read(url: str) -> BlockReader:
    """A binary file of one object, read front to back in BLOCK_SIZE ranged GETs (see BlockReader).
    Raises OSError with a one-line message (no such object, access denied, ...) when it cannot be
    read."""
    fs, path = filesystem(url)
    return BlockReader(fs, path)


class BlockReader:
    """One object read through `fs.cat_file(path, start, end)`: a ranged GET of BLOCK_SIZE bytes
    (or of what one read asks for, if more) each time a read leaves the block held, so a shard
    streams with one request per 16 MB and nothing else: no HEAD first (fsspec's own file asks for
    the size and ETag before its first read: on the sample set's 100 KB shards that HEAD cost a
    third of what reading from s3:// added per shard). The end shows as a short block, or as a
    range past the end (HTTP 416). A GET whose body breaks off is retried for the same range by
    s3fs; what still fails is an OSError with the store's error in one line. Seeks (inspect-shards
    skips frames, draws a clip's frames by offset) move within the block or start a new one."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        self.pos = 0
        self.block_start, self.block = 0, b""
        self.end: int | None = None
        """The object's size, once a short block or a range past the end has shown it."""

    def _fetch(self, start: int, want: int) -> None:
        size = max(BLOCK_SIZE, want)
        try:
            data = self.fs.cat_file(self.path, start=start, end=start + size)
        except OSError as e:
            if not (start > 0 and getattr(e, "errno", None) == errno.EINVAL and "range" in str(e).lower()):
                raise OSError(describe(e)) from None
            data = b""  # the block before ended exactly at the end of the object
        except Exception as e:  # the client's own errors (botocore), after its retries
            raise OSError(describe(e)) from None
        self.block_start, self.block = start, data
        if len(data) < size:
            self.end = start + len(data)

    def read(self, n: int = -1) -> bytes:
        parts = []
        while n != 0 and (self.end is None or self.pos < self.end):
            offset = self.pos - self.block_start
            if not 0 <= offset < len(self.block):
                self._fetch(self.pos, max(n, 0))
                offset = 0
                if not self.block:
                    break
            part = self.block[offset:] if n < 0 else self.block[offset : offset + n]
            parts.append(part)
            self.pos += len(part)
            n = n - len(part) if n > 0 else n
        return b"".join(parts)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            try:
                self.end = int(self.fs.size(self.path))
            except Exception as e:
                raise OSError(describe(e)) from None
        self.pos = max(0, {0: 0, 1: self.pos, 2: self.end or 0}[whence] + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.block = b""

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_bytes(url: str, limit: int, what: str) -> bytes:
    """The whole object, at most `limit` bytes; UserError naming `what` and the URL otherwise."""
    fs, path = filesystem(url)
    try:
        size = fs.size(path)
        if size is not None and size > limit:
            raise UserError(f"{what} {url!r} is larger than {limit} bytes")
        return fs.cat_file(path)
    except UserError:
        raise
    except Exception as e:  # the store's OSErrors and its client's own (botocore) errors
        raise UserError(f"cannot read {what} {url!r}: {describe(e)}") from None


def is_folder(url: str) -> bool:
    """True when the URL names a prefix with objects under it (a packed folder)."""
    fs, path = filesystem(url)
    try:
        return bool(fs.isdir(path))
    except Exception:
        return False  # let the shard reader report what is wrong with it


class ObjectPath:
    """The part of pathlib.Path the shard tools use (name, parent, /, is_file, is_dir, exists,
    stat().st_size, glob, open, read_bytes), for an object or prefix in a store: inspect-shards
    and verify-shards read a bucket through it with the same code, and the same tar reader, as a
    local folder. A store that refuses a request gives a UserError naming the URL."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.url.rsplit("/", 1)[0])

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(f"{self.url}/{name}")

    def _ask(self, what, missing=None):
        fs, path = filesystem(self.url)
        try:
            return what(fs, path)
        except FileNotFoundError as e:
            if missing is not None:
                return missing
            raise UserError(f"cannot read {self.url}: {describe(e)}") from None
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read {self.url}: {describe(e)}") from None

    def is_file(self) -> bool:
        return self._ask(lambda fs, p: fs.isfile(p), False)

    def is_dir(self) -> bool:
        return self._ask(lambda fs, p: fs.isdir(p), False)

    def exists(self) -> bool:
        return self._ask(lambda fs, p: fs.exists(p), False)

    def stat(self):
        import types

        return types.SimpleNamespace(st_size=self._ask(lambda fs, p: int(fs.size(p))))

    def glob(self, pattern: str) -> list[ObjectPath]:
        root = filesystem(self.url)[1]
        found = self._ask(lambda fs, p: fs.glob(f"{p}/{pattern}"), [])
        return sorted(self / f[len(root) + 1 :] for f in found if "/" not in f[len(root) + 1 :])

    def open(self, mode: str = "rb"):
        if mode != "rb":
            raise ValueError("objects are opened for reading only")
        return self._ask(lambda fs, p: open_read(self.url))

    def read_bytes(self) -> bytes:
        return self._ask(lambda fs, p: fs.cat_file(p))

    def __lt__(self, other: ObjectPath) -> bool:
        return self.url < other.url
