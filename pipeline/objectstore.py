"""Object stores (`s3://`, `gs://`, `az://`, and any other scheme fsspec knows) through fsspec.

One mechanism for every store: the store's fsspec file system, imported lazily, so that clipstream
runs without any of them installed; `s3://` needs the `s3` extra (s3fs). Credentials and endpoints
are the store's own conventions, read by its client, never by us: for S3 the AWS environment
variables, profiles (`AWS_PROFILE`, ~/.aws) and `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` for
MinIO or Ceph (botocore reads them itself; the s3 extra asks for botocore >= 1.34, and s3fs leaves
`endpoint_url` to it when not given one). Nothing here prints a credential: messages name the URL and the store's error
code, never the request.

Readers stream a shard sequentially through fsspec's read-ahead cache in BLOCK_SIZE ranged GETs; a
GET whose body breaks off is retried by s3fs for the same range (its retry loop around each block),
a stall is bounded by READ_TIMEOUT_S, and what still fails reaches the stream's fault count.
"""

from __future__ import annotations

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
        }
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
        raise UserError(f"{proto}:// needs a package fsspec could not import (see fsspec's known_implementations)") from None
    except ValueError:
        raise UserError(f"unsupported URL scheme {proto!r} in {url!r} (use a local path, http(s)://, s3://, gs://, az:// or pipe:)") from None
    return cls(**_options(proto)), cls._strip_protocol(url)


def describe(e: BaseException) -> str:
    """A store error in one line, without the request (which may carry a signature)."""
    if isinstance(e, FileNotFoundError):
        # s3fs says "The specified bucket does not exist" (NoSuchBucket); a missing key is its path
        return "no such bucket" if "bucket does not exist" in str(e).lower() or "NoSuchBucket" in str(e.__cause__) else "no such object"
    if type(e).__name__ == "NoCredentialsError":
        return "no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or write ~/.aws/credentials)"
    if isinstance(e, PermissionError):
        return f"access denied ({_first_line(e) or 'check the credentials and the bucket policy'})"
    return f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def open_read(url: str):
    """A seekable binary file of one object, read ahead in BLOCK_SIZE ranged GETs: a HEAD (its
    size and ETag: s3fs checks every later range against the ETag, so a shard replaced mid-read is
    an error, not a mix of two files) and one GET per block. Raises OSError with a one-line
    message (no such object, access denied, ...) when it cannot be read."""
    fs, path = filesystem(url)
    try:
        return _Described(fs.open(path, "rb", block_size=BLOCK_SIZE, cache_type="readahead"))
    except Exception as e:
        raise OSError(describe(e)) from None


class _Described:
    """An object-store file whose read errors say what happened in one line (`no such object`,
    `access denied (...)`, the client's error after its retries), as faults and verify report them."""

    def __init__(self, f):
        self.f = f

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except Exception as e:
            raise OSError(describe(e)) from None

    def read(self, n: int = -1) -> bytes:
        return self._call(self.f.read, n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._call(self.f.seek, offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
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
