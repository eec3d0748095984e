"""Shard URLs: schemes, local paths, where a shard's index lives, and THE one shard-pattern expansion.

A shard is a local path, a `file://`, `http(s)://` URL (pre-signed ones included: the query string
is not part of the shard's name), an object-store URL (`s3://`, `gs://`, `az://` and any other
scheme fsspec knows, see `pipeline.storage.objectstore`) or, only when the caller allows it, a
`pipe:` command. Every reader and the writer name shards through these helpers.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

from pipeline.errors import UserError
from pipeline.shardformat import INDEX_NAME, _short
from pipeline.storage import objectstore

_ANGLE_RANGE = re.compile(r"<([^<>]*)>")
_NUMERIC_RANGE = re.compile(r"^\d+\.\.\d+$")
_BRACE = re.compile(r"\{([^{}]*)\}")


def scheme(url: str) -> str:
    found = urlparse(url).scheme
    return "" if len(found) <= 1 else found  # "C:\..." is a path


def local_path(url: str) -> Path | None:
    """The file a local path or file:// URL names; None for remote URLs."""
    found = scheme(url)
    if found == "":
        return Path(url)
    if found == "file":
        return Path(urlparse(url).path)
    return None


def is_object_store(url: str) -> bool:
    """True for URLs read through fsspec: every scheme but local paths, file://, http(s):// and pipe:."""
    return scheme(url) not in ("", "file", "http", "https", "pipe")


def is_remote(url: str) -> bool:
    """Whether `url` is read over the network (object store or HTTP(S)): not a local file, not a pipe."""
    return local_path(url) is None and scheme(url) != "pipe"


def check_scheme(url: str, allow_pipe: bool) -> None:
    found = scheme(url)
    if found == "pipe" and not allow_pipe:
        raise UserError(f"{url!r} would run a shell command; set `allow_pipe` to allow pipe: URLs")
    if is_object_store(url):
        objectstore.filesystem(url)  # UserError for an unknown scheme or a missing extra


def is_file(path: Path) -> bool:
    """Path.is_file, False for any path the system cannot even look up (a name too long for it)."""
    try:
        return path.is_file()
    except OSError:
        return False


def is_pack_folder(pattern: str) -> bool:
    local = local_path(pattern)
    if local is not None:
        try:
            return local.is_dir()
        except OSError:  # e.g. ENAMETOOLONG: not a folder, and the pattern is checked as a pattern
            return False
    if pattern.endswith("/"):
        return scheme(pattern) in ("http", "https") or is_object_store(pattern)
    # `s3://bucket/hmdb51` names the packed folder as well as `s3://bucket/hmdb51/` does (one
    # request to ask the store); shard names and patterns are not asked about.
    last = pattern.rsplit("/", 1)[-1]
    plain = "." not in last and not any(c in pattern for c in ("{", "<", "::"))
    return is_object_store(pattern) and plain and objectstore.is_folder(pattern)


def shard_name(url: str) -> str:
    """The file name a shard has in the index: the last path segment, without a URL's query string
    (pre-signed URLs carry their signature there)."""
    if scheme(url) in ("http", "https"):
        url = urlparse(url).path
    return url.rsplit("/", 1)[-1]


def _without_query(url: str) -> str:
    return urlparse(url)._replace(query="", fragment="").geturl() if scheme(url) in ("http", "https") else url


def index_location(shard_url: str) -> str:
    """Where the index of a shard lives: `index.json` in its folder, or beside it under the same base URL."""
    local = local_path(shard_url)
    if local is not None:
        return str(local.parent / INDEX_NAME)
    if scheme(shard_url) in ("http", "https") or is_object_store(shard_url):
        return _without_query(shard_url).rsplit("/", 1)[0] + "/" + INDEX_NAME
    raise UserError(f"cannot tell where the index of {shard_url!r} is; pass `index`")


def sibling(index_url: str, name: str) -> str:
    """The URL of file `name` in the folder of `index_url`."""
    local = local_path(index_url)
    if local is not None:
        return str(local.parent / name)
    return index_url.rsplit("/", 1)[0] + "/" + name


MAX_PATTERN_URLS = 1_000_000
"""Most shard URLs one pattern may name (as many as an index may list), counted before expanding."""
MAX_PATTERN_NESTING = 16


def _count_expansions(pattern: str) -> int:
    """How many strings braceexpand makes of `pattern` (its own rules: escapes, nested groups,
    `a,b` alternatives, `000..031` and `a..z` ranges, a group without either kept as text), without
    making them. Iterative, so a deeply nested pattern is a UserError, not a RecursionError."""
    stack = [[0, 1, 0, -1]]  # per open group: alternatives closed so far, the current one's count, commas, start
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            if len(stack) > MAX_PATTERN_NESTING:
                raise UserError(f"{_short(pattern)} nests braces more than {MAX_PATTERN_NESTING} deep")
            stack.append([0, 1, 0, i])
        elif c == "," and len(stack) > 1:
            frame = stack[-1]
            frame[0], frame[1], frame[2] = frame[0] + frame[1], 1, frame[2] + 1
        elif c == "}" and len(stack) > 1:
            closed, current, commas, start = stack.pop()
            inner = pattern[start + 1 : i]
            numbers = re.match(r"^(-?\d+)\.\.(-?\d+)$", inner)
            letters = re.match(r"^([A-Za-z])\.\.([A-Za-z])$", inner)
            if numbers:
                n = abs(int(numbers[2]) - int(numbers[1])) + 1
            elif letters:
                n = abs(ord(letters[2]) - ord(letters[1])) + 1
            else:
                n = closed + current if commas else current
            stack[-1][1] *= n
        i += 1
    return stack[0][1]  # unbalanced braces: braceexpand says so


def expand_pattern(pattern: str) -> list[str]:
    """Expand one shard pattern into URLs, in order.

    `{000..031}` and `<000..031>` are numeric ranges (zero padding kept), `{a,b}` alternatives, and
    `::` separates list entries, as in webdataset. Raises UserError naming the bad part.
    """
    import braceexpand

    urls: list[str] = []
    count = 0
    for part in pattern.split("::"):
        part = part.strip()
        if not part:
            raise UserError(f"empty entry in shard list {pattern!r}")
        for inner in _ANGLE_RANGE.findall(part):
            if not _NUMERIC_RANGE.match(inner):
                raise UserError(f"malformed range <{inner}> in {pattern!r} (expected <000..031>)")
        braced = _ANGLE_RANGE.sub(r"{\1}", part)
        if "<" in braced or ">" in braced:
            raise UserError(f"malformed range in {pattern!r}: unbalanced '<' or '>'")
        for inner in _BRACE.findall(braced):
            if ".." in inner and not _NUMERIC_RANGE.match(inner) and not re.match(r"^[A-Za-z]\.\.[A-Za-z]$", inner):
                raise UserError(f"malformed range {{{inner}}} in {pattern!r} (expected {{000..031}})")
        # braceexpand builds every URL of a range before yielding the first (itertools.product holds
        # its inputs whole): `{000000..999999999}` is a billion strings. Count first, expand after.
        count += _count_expansions(braced)
        if count > MAX_PATTERN_URLS:
            raise UserError(
                f"{_short(pattern)} names {count:,} shards or more; a pattern may name at most {MAX_PATTERN_URLS:,}"
            )
        try:
            expanded = list(braceexpand.braceexpand(braced))
        except braceexpand.UnbalancedBracesError:
            raise UserError(f"malformed range in {pattern!r}: unbalanced braces") from None
        for url in expanded:
            if "{" in url or "}" in url:
                raise UserError(f"malformed range in {pattern!r}")
        urls.extend(expanded)
    return urls
