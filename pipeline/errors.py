"""Every error type of the package, in one place.

UserError and its subclasses are expected failures: the CLI turns them into one line on stderr and
their `exit_code` (2 unless a subclass says otherwise). The others are the readers' and decoders'
own failures, caught where a fault is counted (a bad shard member, an undecodable video, a late
HTTP shard) or, for LoaderError, a bug carried out of a worker with its traceback.
"""

import re

_PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)`")


class UserError(Exception):
    """Bad input from the user (arguments, paths, data). The message is shown as is.

    Library messages name a parameter in backquotes (`batch_size`); the CLI shows it as the option
    it maps to (--batch-size), see `as_options`."""


class TooManyFailures(UserError):
    """More videos failed than `max_failures` allows: the pack is written, and the exit code is 1."""

    exit_code = 1


class Stopped(UserError):
    """The run was stopped by a signal: one line, exit code 128 + the signal's number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class WorkerGaveUp(UserError):
    """A loader worker stopped on bad data (every clip of its shards unreadable); `faults` are the
    clips and shards it met since its last batch, for the caller to log."""

    def __init__(self, message: str, faults: list[dict]):
        super().__init__(message)
        self.faults = faults


class WorkerDied(UserError):
    """A loader worker was killed (out of memory, a signal): one line, exit code 1."""

    exit_code = 1


def as_options(message: str) -> str:
    """A library message in CLI words: each `parameter` becomes --parameter (underscores to dashes)."""
    return _PARAMETER.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)


def printable(text: str) -> str:
    """`text` safe for a terminal and for one line: control characters (escape sequences or a newline
    in a hostile member name, key or metadata string) shown as escapes, not sent raw."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ShardFormatError(ValueError):
    """A shard member that does not follow the format (truncated, garbage, oversized)."""


class DecodeError(Exception):
    """A video that cannot be decoded at all; the message names the file."""


class ShardDeadline(ConnectionError):
    """An HTTP(S) shard did not arrive within its deadline (see HTTP_SHARD_DEADLINE_S)."""


class LoaderError(RuntimeError):
    """A loader worker failed with an exception (a bug): the message carries its traceback."""
