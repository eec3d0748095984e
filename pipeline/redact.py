"""Secrets in URLs, never printed or written: query strings and user:password@ are redacted.

A pre-signed URL (`X-Amz-Signature=...`, `X-Amz-Credential=<access key id>/...`, `sig=`, `token=`)
carries its secret in the query string; a URL may carry a password before `@`. The URL itself is
still used whole to fetch; what reaches a terminal, a log, metrics or options file goes through
`redact` first (the CLI's error line, train-stream's messages, faults logs, options.json, the
library's fault records), so that a log shared in a bug report leaks nothing.
"""

from __future__ import annotations

import re

REDACTED = "<redacted>"

# A URL runs to the first white space or quote (a shard pattern's `<000..031>` range is part of it).
# Redacting twice changes nothing: `?<redacted>` and `<redacted>@` are replaced by themselves.
_URL = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>[^\s'\"]+)")


def _one(m: re.Match) -> str:
    rest = m["rest"]
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if "@" in authority:
        authority = f"{REDACTED}@{authority.rsplit('@', 1)[1]}"
    for mark in ("?", "#"):
        head, found, secret = tail.partition(mark)
        if found and secret:
            tail = f"{head}{mark}{REDACTED}"
            break
    return f"{m['scheme']}{authority}{tail}"


def redact(text: str) -> str:
    """`text` with the query string, fragment and userinfo of every URL in it replaced by <redacted>."""
    if "://" not in text:
        return text
    return _URL.sub(_one, text)


def redact_all(value):
    """`value` (strings, lists, tuples and dicts of them, anything else as is) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_all(v) for v in value]
    return value
